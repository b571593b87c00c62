"""``bnfold demo``: build a CNN, fold it, check parity, benchmark, summarize (see bnfold.demo.run)."""

from __future__ import annotations

from bnfold.cli.options import (
    OutputOption,
    ThreadsOption,
    VerboseOption,
    add_command,
    add_option_groups,
    exit_status,
    parse_options,
)

EXAMPLES = """examples:
  bnfold demo                          temporary output directory, a few seconds
  bnfold demo -o demo_out              keep the files in ./demo_out
  bnfold demo --image-size 128 --quick

No downloads: the CNN is built with random weights and BN statistics computed from random data.
Writes original.onnx, folded.onnx and report.json (fold report, parity result, latencies).
""" + exit_status(
    ok="parity holds",
    failed="the folded model failed the parity check",
    bad_input="bad option, unwritable output directory",
)


def register(subparsers) -> None:
    parser = add_command(
        subparsers,
        "demo",
        help="fold, check and benchmark a built-in CNN (no downloads)",
        description="Build a small CNN with BatchNormalization layers (residual, depthwise and fully "
        "connected blocks), fold it, check parity with onnxruntime and compare latency.",
        epilog=EXAMPLES,
    )
    add_option_groups(
        parser,
        OutputOption(
            "DIR", "directory for the files (default: a new temporary directory)", required=False, aliases=("--out",)
        ),
    )
    parser.add_argument("--image-size", type=int, default=64, metavar="N", help="input height and width (default 64)")
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage (default 16)")
    add_option_groups(
        parser,
        ThreadsOption(
            default=1,
            help="onnxruntime threads for the latency comparison (default 1: stable figures for a small model)",
        ),
        VerboseOption(),
    )
    parser.add_argument(
        "--quick", action="store_true", help="one parity sample and 5 timed runs (seconds, not minutes)"
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    from bnfold.demo import run_demo
    from bnfold.errors import InputError

    # The demo's model is built in memory: its size grows with width^2 and image_size^2.
    if not 8 <= args.image_size <= 1024:
        raise InputError(f"--image-size must be between 8 and 1024, got {args.image_size}")
    if not 2 <= args.width <= 256:
        raise InputError(f"--width must be between 2 and 256, got {args.width}")
    parse_options(args)
    result = run_demo(args.output, image_size=args.image_size, width=args.width, quick=args.quick, threads=args.threads)
    print(result.summary)
    return 0 if result.passed else 1
