"""``bnfold fold IN.onnx -o OUT.onnx``: fold every foldable BatchNormalization, prove parity, save.

Flow: load (one-line error on a bad file) -> bnfold.fold -> onnxruntime parity check of the result
against the original (bnfold.verify.parity.check; skipped with --no-check) -> atomic save of OUT (and the
--report JSON). A model that fails the check is not written unless --force.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

from bnfold.common import format_table

EXAMPLES = """examples:
  bnfold fold model.onnx -o folded.onnx
  bnfold fold model.onnx -o folded.onnx --report fold.json --shape input:1x3x224x224
  bnfold fold model.onnx -o folded.onnx --no-check

After folding, the result is run in onnxruntime against the original on random inputs (dynamic
dimensions from --shape, default 1 for the batch and 32 for the others) unless --no-check:
every output and every intermediate value the two models share (each folded layer's output)
must match within the tolerance of bnfold check.
exit status: 0 folded (and parity holds), 1 parity check failed (nothing written unless --force),
2 bad input (missing/corrupt/non-ONNX file, unwritable output, output path equal to the input)."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fold",
        help="fold BatchNormalization nodes into neighbouring Conv/ConvTranspose/Gemm/MatMul weights",
        description="Fold every exactly-foldable BatchNormalization of IN into the weights of its "
        "neighbouring layer, check the result against IN in onnxruntime, and write it to OUT. "
        "Every BN left in the model is listed with the reason it could not be folded.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="IN.onnx", help="the model to fold (never modified)")
    parser.add_argument("-o", "--output", metavar="OUT.onnx", required=True, help="where to write the folded model")
    parser.add_argument("--report", metavar="R.json", help="write the fold report (each BN: rule or reason) as JSON")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    parser.add_argument(
        "--shape", action="append", default=[], metavar="NAME:D1xD2x...",
        help="shape of an input with dynamic dimensions for the parity check, e.g. input:1x3x224x224 (repeatable)",
    )
    parser.add_argument("--force", action="store_true", help="write OUT even when the parity check fails")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parity check's random inputs (default 0)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from bnfold.folding import fold_file
    from bnfold.io import check_outputs, files_size, write_json_atomic

    from bnfold.cli.check import check_input_options

    check_input_options(args)
    shapes = {}
    if args.shape:
        from bnfold.verify import parse_shape_specs

        shapes = parse_shape_specs(args.shape)
    # Refuse bad output paths before any work: the input must never be overwritten.
    check_outputs({"-o": args.output, "--report": args.report}, model_option="-o", models=[args.input])

    outcome = {"check": None}

    def verify(tmp_path):
        # The folded model is complete in a temporary file beside OUT: the parity check runs
        # on exactly the bytes that will be moved into place.
        outcome["fold_seconds"] = time.perf_counter() - start
        if args.no_check:
            return True
        check_report = outcome["check"] = _parity(args.input, tmp_path, args.output, shapes, args.seed)
        return check_report.passed

    start = time.perf_counter()
    report = fold_file(args.input, args.output, verify=verify, write_refused=args.force)
    check_report = outcome["check"]

    out = sys.stdout
    print(format_summary(report, outcome["fold_seconds"], check_report), file=out)

    if check_report is not None and not check_report.passed:
        if not args.force:
            print(f"bnfold fold: parity check FAILED; nothing written (use --force to write {args.output} "
                  "anyway)", file=sys.stderr)
            return 1
        print(f"bnfold fold: parity check FAILED; wrote {args.output} anyway (--force)", file=sys.stderr)

    if args.report:
        write_json_atomic(report.to_dict(), args.report)
    print(f"model size: {_size(files_size(args.input))} -> {_size(files_size(args.output))}", file=out)
    print(f"wrote {args.output}" + (f" and {args.report}" if args.report else ""), file=out)
    return 1 if check_report is not None and not check_report.passed else 0


def _parity(original, folded, label, shapes, seed):
    from bnfold.errors import InputError
    from bnfold.verify import check

    try:
        # bnfold's fold keeps every value's name and meaning, so its intermediate values are
        # compared too: each folded layer is checked directly, whatever the head hides.
        return check(original, folded, shapes=shapes or None, seed=seed, candidate_label=label, intermediates=True)
    except InputError as e:
        raise InputError(f"parity check could not run: {e} (use --no-check to skip it)") from None


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def format_summary(report, fold_seconds, check_report) -> str:
    """The text the command prints: op-count changes, BN outcome, time, parity (file sizes are
    printed once the output exists)."""
    before, after = collections.Counter(report.ops_before), collections.Counter(report.ops_after)
    changed = sorted(op for op in set(before) | set(after) if before[op] != after[op])
    total_b, total_a = sum(before.values()), sum(after.values())
    rows = [(op, before[op], after[op], f"{after[op] - before[op]:+d}") for op in changed]
    rows.append(("total", total_b, total_a, f"{total_a - total_b:+d}"))
    # numbers at least 7 wide, as the columns always were
    lines = format_table(("op type", f"{'before':>7}", f"{'after':>7}", f"{'change':>7}"), rows, rule=False,
                         right=(1, 2, 3))
    lines.append("")
    lines.append(f"BatchNormalization: {report.n_folded} folded, {report.n_remaining} remaining")
    for r in report.remaining:
        where = f" (in {r.graph})" if r.graph else ""
        lines.append(f"  remaining {r.bn}{where}: {r.reason}: {r.message}")
    lines.append(f"fold time (load, fold, write): {fold_seconds * 1000:.1f} ms")
    if check_report is None:
        lines.append("parity check: skipped (--no-check)")
    else:
        if check_report.passed:
            lines.append(f"parity check: passed (max abs error {check_report.max_abs_error:.3g}; "
                         f"{check_report.tolerance_brief}; {check_report.intermediates_brief})")
        else:  # the check's own one-line verdict names the outputs and why (e.g. NaN on one side)
            lines.append(f"parity check: FAILED: {check_report.summary().removeprefix('FAIL: ')}")
        lines += [f"  warning: {w}" for w in check_report.warnings]
    return "\n".join(lines)
