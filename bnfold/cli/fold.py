"""``bnfold fold IN.onnx -o OUT.onnx``: fold every foldable BatchNormalization, prove parity, save.

Flow: load (one-line error on a bad file) -> bnfold.fold -> onnxruntime parity check of the result
against the original on the written bytes (bnfold.cli.checked_fold; skipped with --no-check) -> atomic
save of OUT (and the --json report). A model that fails the check is not written unless --force.
"""

from __future__ import annotations

import collections
import sys

from bnfold.cli.options import (
    ForceOption,
    JsonReportOption,
    OutputOption,
    SeedOption,
    ShapeOption,
    VerboseOption,
    add_command,
    add_option_groups,
    exit_status,
    parse_options,
)
from bnfold.common import format_table

EXAMPLES = """examples:
  bnfold fold model.onnx -o folded.onnx
  bnfold fold model.onnx -o folded.onnx --json fold.json --shape input:1x3x224x224
  bnfold fold model.onnx -o folded.onnx --no-check

After folding, the result is run in onnxruntime against the original on random inputs (dynamic
dimensions from --shape, default 1 for the batch and 32 for the others) unless --no-check:
every output and every intermediate value the two models share (each folded layer's output)
must match within the tolerance of bnfold check.
""" + exit_status(
    ok="folded (and parity holds)",
    failed="parity check failed (nothing written unless --force)",
    bad_input="missing/corrupt/non-ONNX file, bad option, unwritable output, output path equal to the input",
)


def register(subparsers) -> None:
    parser = add_command(
        subparsers,
        "fold",
        help="fold BatchNormalization nodes into neighbouring Conv/ConvTranspose/Gemm/MatMul weights",
        description="Fold every exactly-foldable BatchNormalization of IN into the weights of its "
        "neighbouring layer, check the result against IN in onnxruntime, and write it to OUT. "
        "Every BN left in the model is listed with the reason it could not be folded.",
        epilog=EXAMPLES,
    )
    parser.add_argument("input", metavar="IN.onnx", help="the model to fold (never modified)")
    add_option_groups(
        parser,
        OutputOption("OUT.onnx", "where to write the folded model"),
        JsonReportOption("write the fold report (each BN: rule or reason) as JSON", aliases=("--report",)),
    )
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    add_option_groups(parser, ShapeOption(" for the parity check"), ForceOption(), SeedOption(), VerboseOption())
    parser.set_defaults(func=run)


def run(args) -> int:
    from bnfold.cli.checked_fold import fold_checked
    from bnfold.errors import ParityError
    from bnfold.io import check_outputs, files_size, write_json_atomic

    parse_options(args)
    # Refuse bad output paths before any work: the input must never be overwritten.
    check_outputs({"-o": args.output, args.json_option: args.json}, model_option="-o", models=[args.input])

    check_options = None if args.no_check else {"shapes": args.shapes or None, "seed": args.seed}
    folded = fold_checked(
        args.input,
        args.output,
        force=args.force,
        check_options=check_options,
        could_not_run_hint=" (use --no-check to skip it)",
    )
    report, check_report = folded.report, folded.check

    out = sys.stdout
    print(format_summary(report, folded.fold_seconds, check_report), file=out)

    if folded.failed:
        if not args.force:
            raise ParityError(f"parity check FAILED; nothing written (use --force to write {args.output} anyway)")
        print(f"bnfold fold: parity check FAILED; wrote {args.output} anyway (--force)", file=sys.stderr)

    if args.json:
        write_json_atomic(report.to_dict(), args.json)
    print(f"model size: {_size(files_size(args.input))} -> {_size(files_size(args.output))}", file=out)
    print(f"wrote {args.output}" + (f" and {args.json}" if args.json else ""), file=out)
    return 1 if folded.failed else 0


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def format_branch_merges(report, each_merge: bool = False) -> list:
    """Lines on the summed Conv branches merged into one Conv (``each_merge``: one line per merge)
    and the Adds of Convs left apart; none when there are neither."""
    if not report.merged and not report.unmerged:
        return []
    n_convs = sum(len(m.convs) for m in report.merged)
    lines = [
        f"Conv branches: {n_convs} merged into {len(report.merged)} Conv(s), {len(report.unmerged)} Add(s) left apart"
    ]
    for m in report.merged if each_merge else ():
        where = f" (in {m.graph})" if m.graph else ""
        lines.append(f"  {m.rule}{where}: {' + '.join(m.convs)} -> {m.target} (summed by {m.add})")
    for u in report.unmerged:
        where = f" (in {u.graph})" if u.graph else ""
        lines.append(f"  not merged at {u.add}{where}: {u.reason}: {u.message}")
    return lines


def outlier_lines(bn_nodes) -> list[str]:
    """One line per BN with variance-outlier channels (``BNInfo.outlier_channels``), for fold and inspect."""
    lines = []
    for info in bn_nodes:
        if not info.outlier_channels:
            continue
        where = f" (in {info.graph})" if info.graph else ""
        shown = ", ".join(str(c) for c in info.outlier_channels[:10])
        more = f", ... ({len(info.outlier_channels)} in all)" if len(info.outlier_channels) > 10 else ""
        lines.append(
            f"  outlier channels of {info.bn}{where}: {shown}{more} (variance ~0: scale over 1000x the median; "
            "their folded weights are that much larger)"
        )
    return lines


def format_summary(report, fold_seconds, check_report) -> str:
    """The text the command prints: op-count changes, BN outcome, time, parity (file sizes are
    printed once the output exists)."""
    before, after = collections.Counter(report.ops_before), collections.Counter(report.ops_after)
    changed = sorted(op for op in set(before) | set(after) if before[op] != after[op])
    total_b, total_a = sum(before.values()), sum(after.values())
    rows = [(op, before[op], after[op], f"{after[op] - before[op]:+d}") for op in changed]
    rows.append(("total", total_b, total_a, f"{total_a - total_b:+d}"))
    # numbers at least 7 wide, as the columns always were
    lines = format_table(
        ("op type", f"{'before':>7}", f"{'after':>7}", f"{'change':>7}"), rows, rule=False, right=(1, 2, 3)
    )
    lines.append("")
    lines.append(f"BatchNormalization: {report.n_folded} folded, {report.n_remaining} remaining")
    if report.n_chains_folded:
        lines.append(f"decomposed BN (per-channel Mul/Add chains without a BN node): {report.n_chains_folded} folded")
    for r in report.remaining:
        where = f" (in {r.graph})" if r.graph else ""
        lines.append(f"  remaining {r.bn}{where}: {r.reason}: {r.message}")
    lines += format_branch_merges(report)
    lines += outlier_lines(report.bn_nodes)
    if report.flushed_subnormals:
        lines.append(
            f"subnormals flushed to zero: {report.flushed_subnormals} value(s) of the folded weights and biases "
            "(below 1.2e-38 in float32 / bfloat16, 2.2e-308 in float64)"
        )
    lines.append(f"fold time (load, fold, write): {fold_seconds * 1000:.1f} ms")
    if check_report is None:
        lines.append("parity check: skipped (--no-check)")
    else:
        if check_report.passed:
            lines.append(
                f"parity check: passed (max abs error {check_report.max_abs_error:.3g}; "
                f"{check_report.tolerance_brief}; {check_report.intermediates_brief})"
            )
        else:  # the check's own one-line verdict names the outputs and why (e.g. NaN on one side)
            lines.append(f"parity check: FAILED: {check_report.summary().removeprefix('FAIL: ')}")
        lines += [f"  warning: {w}" for w in check_report.warnings]
    return "\n".join(lines)
