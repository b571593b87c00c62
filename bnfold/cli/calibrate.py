"""``bnfold calibrate IN.onnx -o OUT.onnx --data PATH``: re-estimate BN statistics from data (PreciseBN).

Flow: check the output paths -> load IN -> bnfold.calibrate (data streamed in batches, progress bar
on a terminal) -> print the per-BN report -> with --fold: bnfold.fold the calibrated model and check
parity (bnfold.check with intermediate values, on the first calibration samples unless --shape is
given; on the written bytes, through bnfold.cli.checked_fold as `bnfold fold` does) -> atomic save of
OUT and the --json report. Nothing is written when the data is bad (exit 2) or when the folded model
fails parity (exit 1) unless --force.
"""

from __future__ import annotations

import os
import sys

from bnfold.cli.options import (
    ForceOption,
    JsonReportOption,
    NoProgressOption,
    OutputOption,
    ShapeOption,
    VerboseOption,
    add_command,
    add_option_groups,
    exit_status,
    parse_options,
)

EXAMPLES = """examples:
  bnfold calibrate model.onnx -o calibrated.onnx --data calib.npz
  bnfold calibrate model.onnx -o calibrated.onnx --data calib_dir/ --batch-size 64 --max-batches 50
  bnfold calibrate model.onnx -o folded.onnx --data calib.npy --mode sequential --fold --json calib.json

--data: a .npy file (single-input models), an .npz file with one array per input name, or a
directory of such files (read in name order). Samples are streamed along axis 0 in batches of
--batch-size; the whole data set is never loaded at once.
--mode batch (default, PreciseBN): every BN normalizes by the statistics of the current batch while
the population statistics are gathered; deeper BNs' statistics depend on the batch size.
--mode sequential: every BN's statistics are computed with the earlier BNs already using their new
statistics, i.e. what the BN sees at inference time; independent of the batch size, one pass over
the data per BN level.
A model with a fixed batch dimension (torch.onnx.export's default: 1) is run at that batch in
sequential mode; batch mode runs it at --batch-size with the batch made symbolic when that checks
out on the first batch, else at the fixed batch (a note says which). Samples that do not fill a
last fixed batch are not used (a note says how many).
""" + exit_status(
    ok="calibrated (and, with --fold, parity holds)",
    failed="parity check of --fold failed (nothing written unless --force)",
    bad_input="model, data, options or output path",
)

# Samples of the first calibration batch used as parity-check inputs for --fold.
_PARITY_SAMPLES = 4


def register(subparsers) -> None:
    parser = add_command(
        subparsers,
        "calibrate",
        help="re-estimate BatchNormalization running statistics from data (PreciseBN)",
        description="Recompute the running mean/variance of every BatchNormalization of IN as exact "
        "population statistics over calibration data, run through onnxruntime, and write the "
        "result to OUT. Scale, bias and all other weights are unchanged.",
        epilog=EXAMPLES,
    )
    parser.add_argument("input", metavar="IN.onnx", help="the model to calibrate (never modified)")
    add_option_groups(parser, OutputOption("OUT.onnx", "where to write the calibrated model"))
    parser.add_argument("--data", metavar="PATH", required=True, help=".npy / .npz file or a directory of them")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B", help="samples per batch (default 32)")
    parser.add_argument("--max-batches", type=int, default=None, metavar="K", help="use at most K batches per pass")
    parser.add_argument(
        "--mode", choices=("batch", "sequential"), default="batch", help="statistics semantics (default batch)"
    )
    parser.add_argument(
        "--fold", action="store_true", help="fold the calibrated model (as `bnfold fold`) and check parity"
    )
    add_option_groups(
        parser,
        ForceOption("with --fold: "),
        JsonReportOption("write the calibration report (per BN old/new statistics) as JSON", aliases=("--report",)),
        ShapeOption(" (with --fold: check parity on random inputs of this shape instead of calibration samples)"),
        NoProgressOption(),
        VerboseOption(),
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    from bnfold.calibration import calibrate
    from bnfold.errors import InputError
    from bnfold.io import (
        check_outputs,
        load_model,
        save_model_atomic,
        write_json_atomic,
    )

    parse_options(args)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_batches is not None and args.max_batches < 1:
        raise InputError(f"--max-batches must be >= 1, got {args.max_batches}")
    check_outputs(
        {"-o": args.output, args.json_option: args.json}, model_option="-o", models=[args.input], inputs=[args.data]
    )

    original = load_model(args.input)
    calibrated, report = calibrate(
        original,
        args.data,
        mode=args.mode,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        progress=not args.no_progress,
    )
    print(report.format_table())
    report_data = {"calibration": report.to_dict()}

    parity_failed = False
    if args.fold:
        parity_failed = _fold_checked(args, calibrated, report, report_data)
    else:
        save_model_atomic(calibrated, args.output, source_path=args.input)
    if args.json:
        write_json_atomic(report_data, args.json)
    print(f"wrote {args.output}" + (f" and {args.json}" if args.json else ""))
    return 1 if parity_failed else 0


def _fold_checked(args, calibrated, report, report_data):
    """Fold the calibrated model as ``bnfold fold`` folds a file: the calibrated model goes to a
    temporary file beside OUT and ``fold_checked`` folds it into OUT, with the parity check
    (intermediate values included) on exactly the bytes that are then moved into place — also
    when float16 folds have to be left (``fold_file``'s precision search). Returns whether the
    check failed (OUT is then written only with --force; without it, ParityError: nothing is
    written)."""
    from bnfold.calibration import iter_batches
    from bnfold.cli.checked_fold import fold_checked
    from bnfold.errors import ParityError
    from bnfold.io import save_model_atomic, scratch_directory

    if args.shapes:
        check_options = {"shapes": args.shapes}
    else:
        # A model with a fixed batch dimension takes exactly that many samples.
        parity_samples = report.fixed_batch or min(args.batch_size, _PARITY_SAMPLES)
        feeds = next(iter_batches(calibrated, args.data, batch_size=parity_samples, max_batches=1))
        check_options = {"inputs": feeds}

    directory = os.path.dirname(os.path.abspath(args.output))
    with scratch_directory(directory) as scratch:
        calibrated_path = os.path.join(scratch, "calibrated.onnx")
        save_model_atomic(calibrated, calibrated_path, source_path=args.input)
        folded = fold_checked(calibrated_path, args.output, force=args.force, check_options=check_options)
    fold_report, check_report = folded.report, folded.check
    verdict = "passed" if check_report.passed else "FAILED"
    print(
        f"fold: {fold_report.n_folded} BatchNormalization folded, {fold_report.n_remaining} remaining; "
        f"parity check {verdict} (max abs error {check_report.max_abs_error:.3g}; {check_report.tolerance_brief}; "
        f"{check_report.intermediates_brief})"
    )
    for remaining in fold_report.remaining:
        if remaining.reason == "would_lose_precision":
            print(f"  remaining {remaining.bn}: {remaining.reason}: {remaining.message}")
    for warning in check_report.warnings:
        print(f"  warning: {warning}")
    report_data["fold"] = fold_report.to_dict()
    report_data["parity"] = check_report.to_dict()
    if not check_report.passed:
        if not args.force:
            raise ParityError(
                f"parity check of the folded model FAILED; nothing written (use --force to write {args.output} anyway)"
            )
        print(f"bnfold calibrate: parity check FAILED; wrote {args.output} anyway (--force)", file=sys.stderr)
        return True
    return False
