"""``bnfold inspect model.onnx``: list every BatchNormalization, what it is attached to, and whether
(and by which rule) it can be folded or why not. Reads only; writes nothing but the --json file."""

from __future__ import annotations

from bnfold.cli.fold import format_branch_merges, outlier_lines
from bnfold.cli.options import (
    JsonReportOption,
    VerboseOption,
    add_command,
    add_option_groups,
    exit_status,
)
from bnfold.common import format_table

EXAMPLES = """examples:
  bnfold inspect model.onnx
  bnfold inspect model.onnx --json bn_nodes.json

Columns: BN node, the graph it is in ("main" or the subgraph path such as If_3/then_branch),
producer op -> BN -> consumer ops, foldable yes/no, and the fold rule or the reason code with a
sentence.
""" + exit_status(ok="listed", bad_input="missing/corrupt/non-ONNX file, unwritable --json path")


def register(subparsers) -> None:
    parser = add_command(
        subparsers,
        "inspect",
        help="list BN nodes and whether each can be folded",
        description="List the BatchNormalization nodes of a model (subgraphs included) with their "
        "neighbours and what `bnfold fold` would do with each. Nothing is written except --json.",
        epilog=EXAMPLES,
    )
    parser.add_argument("model", metavar="model.onnx", help="the model to inspect")
    add_option_groups(parser, JsonReportOption("also write the full report as JSON"), VerboseOption())
    parser.set_defaults(func=run)


def run(args) -> int:
    from bnfold.folding import inspect
    from bnfold.io import check_outputs, load_model, write_json_atomic

    check_outputs({args.json_option: args.json}, models=[args.model])
    report = inspect(load_model(args.model))
    print(format_bn_table(report))
    for line in format_branch_merges(report, each_merge=True):
        print(line)
    if args.json:
        write_json_atomic(report.to_dict(), args.json)
        print(f"wrote {args.json}")
    return 0


def format_bn_table(report) -> str:
    from bnfold.folding import BATCH_NORM_KIND

    rows = [("BN node", "graph", "attached", "foldable", "rule / reason")]
    details = []
    for info in report.bn_nodes:
        producer = info.producer_op or "(input)"
        consumers = ",".join(info.consumer_ops) if info.consumer_ops else "(output)"
        middle = "BN" if info.kind == BATCH_NORM_KIND else "affine chain"
        rows.append(
            (
                info.bn,
                info.graph or "main",
                f"{producer} -> {middle} -> {consumers}",
                "yes" if info.foldable else "no",
                info.rule_or_reason,
            )
        )
        details.append(info.message)
    if len(rows) == 1:
        return "no BatchNormalization nodes"
    lines = format_table(rows[0], rows[1:], rule=False)
    lines[1:] = [f"{line}  ({detail})" if detail else line for line, detail in zip(lines[1:], details)]
    batch_norms = [info for info in report.bn_nodes if info.kind == BATCH_NORM_KIND]
    n_yes = sum(1 for info in batch_norms if info.foldable)
    lines.append(
        f"{len(batch_norms)} BatchNormalization node(s): {n_yes} foldable, {len(batch_norms) - n_yes} not foldable"
    )
    n_chains = sum(1 for info in report.bn_nodes if info.kind != BATCH_NORM_KIND and info.foldable)
    if n_chains:
        lines.append(f"{n_chains} decomposed BN(s) (per-channel Mul/Add chains without a BN node) foldable")
    flagged = outlier_lines(report.bn_nodes)
    if flagged:
        lines.append(f"{len(flagged)} BatchNormalization node(s) with variance-outlier channels:")
        lines += flagged
    return "\n".join(lines)
