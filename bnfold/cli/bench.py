"""``bnfold bench MODEL.onnx [OTHER.onnx]``: onnxruntime latency, original vs folded (see bnfold.verify.bench)."""

from __future__ import annotations

import math
import os

from bnfold.cli.options import (
    InputsFileOption,
    JsonReportOption,
    NoProgressOption,
    SeedOption,
    ShapeOption,
    ThreadsOption,
    VerboseOption,
    add_command,
    add_option_groups,
    exit_status,
    parse_options,
)
from bnfold.errors import InputError
from bnfold.io import check_outputs
from bnfold.verify import DEFAULT_TIME_BUDGET, DEFAULT_WARMUP, OPT_LEVELS, benchmark

EXAMPLES = f"""examples:
  bnfold bench model.onnx                          original vs folded in memory, opt level all
  bnfold bench model.onnx folded.onnx --opt-level disabled,all --threads 1
  bnfold bench model.onnx --shape input:8x3x224x224 --repeat 50 --json bench.json

With one model, bench folds it in memory (bnfold.fold) and compares the original with the folded
model. The models take turns in blocks of runs so machine noise hits both alike. Default optimization
level: all (how onnxruntime runs models in production; onnxruntime then fuses Conv+BN itself, so
the gain is what it cannot fuse); use --opt-level disabled,all to see both. Default: {DEFAULT_WARMUP}
warm-up runs, then timed runs for {DEFAULT_TIME_BUDGET:g} s per model and level (at least 5).
""" + exit_status(ok="measured", bad_input="unreadable model, bad option or --inputs file, unwritable --json path")


def register(subparsers) -> None:
    parser = add_command(
        subparsers,
        "bench",
        help="latency of models in onnxruntime (one model: original vs folded)",
        description="Measure onnxruntime latency (median and p10-p90) of one or two models; the "
        "second (or the folded model) is compared with the first.",
        epilog=EXAMPLES,
    )
    parser.add_argument("model", help="the model to measure (.onnx)")
    parser.add_argument("other", nargs="?", help="a second model to compare with (default: MODEL folded in memory)")
    parser.add_argument(
        "--opt-level",
        action="append",
        metavar="LEVEL[,LEVEL]",
        help=f"onnxruntime optimization level(s): {', '.join(OPT_LEVELS)} "
        "(repeatable or comma-separated; default: all)",
    )
    parser.add_argument(
        "--warmup", type=int, default=DEFAULT_WARMUP, help=f"untimed warm-up runs (default {DEFAULT_WARMUP})"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--repeat", type=int, help="exact number of timed runs per model and level")
    group.add_argument(
        "--time",
        type=float,
        metavar="SECONDS",
        help=f"time budget per model and level (default {DEFAULT_TIME_BUDGET:g})",
    )
    add_option_groups(
        parser,
        ThreadsOption(),
        ShapeOption(),
        SeedOption(),
        InputsFileOption("time on these inputs (arrays named by input)"),
        NoProgressOption(),
        JsonReportOption("write all measurements as JSON"),
        VerboseOption(),
    )
    parser.set_defaults(func=run)


def _check_options(args) -> None:
    """Validate the options under their CLI names (the API's messages name its arguments)."""
    parse_options(args)
    if args.time is not None and not (math.isfinite(args.time) and args.time > 0):
        raise InputError(f"--time must be a finite number of seconds > 0, got {args.time:g}")
    if args.warmup < 0:
        raise InputError(f"--warmup must be >= 0, got {args.warmup}")
    if args.repeat is not None and args.repeat < 1:
        raise InputError(f"--repeat must be >= 1, got {args.repeat}")


def run(args) -> int:
    _check_options(args)
    # Before folding and timing: a bad path must not cost the run, and no input may be overwritten.
    check_outputs({args.json_option: args.json}, models=[args.model, args.other], inputs=[args.inputs])
    if args.other is None:
        from bnfold.folding import fold

        folded, fold_report = fold(args.model)
        models = {"original": args.model, "folded": folded}
        print(f"folded in memory: {fold_report.n_folded} BN(s) folded, {fold_report.n_remaining} left")
    else:
        a, b = os.path.basename(args.model), os.path.basename(args.other)
        if a == b:
            a, b = args.model, args.other
        if a == b:  # the same file twice: a measure of the noise
            a, b = f"{a} (1)", f"{b} (2)"
        models = {a: args.model, b: args.other}
    report = benchmark(
        models,
        opt_levels=args.opt_level or ("all",),
        threads=args.threads,
        warmup=args.warmup,
        repeat=args.repeat,
        time_budget=args.time,
        shapes=args.shapes,
        inputs=args.inputs,
        seed=args.seed,
        progress=False if args.no_progress else None,
    )
    print(report.format_table())
    if args.json:
        report.to_json(args.json)
        print(f"measurements written to {args.json}")
    return 0
