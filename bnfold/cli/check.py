"""``bnfold check A.onnx B.onnx``: onnxruntime parity of two models (see bnfold.verify.parity)."""

from __future__ import annotations

import sys

from bnfold.cli.options import (
    InputsFileOption,
    JsonReportOption,
    SamplesOption,
    SeedOption,
    ShapeOption,
    ToleranceOptions,
    VerboseOption,
    add_command,
    add_option_groups,
    exit_status,
    parse_options,
)
from bnfold.verify import DEFAULT_OPT_LEVEL, NOISE_FACTOR, OPT_LEVELS, check

EXAMPLES = """examples:
  bnfold check model.onnx folded.onnx
  bnfold check model.onnx folded.onnx --shape input:8x3x224x224 --samples 3 --json parity.json
  bnfold check model.onnx folded.onnx --inputs batch.npz --atol 1e-4 --rtol logits:1e-3

Inputs are synthesized from the models' input specs unless --inputs is given: float inputs are
standard normal, integer inputs small non-negative values, bool inputs random. Dynamic dimensions
default to 1 for the leading (batch) dimension and 32 for the others; set them with --shape.
Default tolerances per output dtype (|cand - ref| <= atol + rtol*|ref|, default atol scaled by
max(1, max|ref|)): float32 rtol 1e-4 atol 1e-5, float16 rtol 1e-2 atol 1e-3, float64 rtol 1e-9
atol 1e-10, and a default atol is raised to the measured noise floor (the reference's own spread
between optimization levels on inputs moved by one ulp, times the noise factor; see
docs/check-bench-demo.md). --atol/--rtol values are taken literally. Integer and bool outputs
must match exactly.

--intermediates also compares every float value that a node of both main graphs produces under
the same name, each with the default rule above (its own scale and noise; --rtol/--atol apply
to outputs only): each layer of a fold is then checked directly, even where the network's head
hides an error (a softmax of 1000 small probabilities, a saturated sigmoid). It is off by
default because it assumes one name means one quantity in both models, which holds for a model
and its fold by bnfold (bnfold fold checks that way) but not for two unrelated exports.

""" + exit_status(
    ok="all outputs (and intermediates) match",
    failed="an output or intermediate value differs",
    bad_input="unreadable model, models whose input/output names, dtypes or shapes disagree, bad option or "
    "--inputs file",
)


def register(subparsers) -> None:
    parser = add_command(
        subparsers,
        "check",
        help="compare two models' outputs in onnxruntime",
        description="Run REFERENCE and CANDIDATE in onnxruntime on the same inputs and compare every "
        "output by name. By default both run with onnxruntime's graph optimizations disabled, so the "
        "reference is the model as written (onnxruntime's own BN fusion cannot stand in for it) and the "
        "only difference is the candidate's. The reference runs once more, at level all (disabled when "
        "--opt-level is all) on inputs moved by one ulp, to measure its own float noise: a default atol "
        f"is at least {NOISE_FACTOR:g} x that noise.",
        epilog=EXAMPLES,
    )
    parser.add_argument("reference", help="the original model (.onnx)")
    parser.add_argument("candidate", help="the model to verify, e.g. the folded one (.onnx)")
    add_option_groups(
        parser,
        ShapeOption(),
        SeedOption(),
        SamplesOption(),
        InputsFileOption("use these inputs (arrays named by input) instead of random ones"),
        ToleranceOptions(),
        JsonReportOption("write the full result as JSON"),
        VerboseOption(),
    )
    parser.add_argument(
        "--opt-level",
        choices=OPT_LEVELS,
        default=DEFAULT_OPT_LEVEL,
        help=f"onnxruntime graph optimization level for both models (default: {DEFAULT_OPT_LEVEL})",
    )
    parser.add_argument(
        "--candidate-opt-level",
        choices=OPT_LEVELS,
        default=None,
        help="a different optimization level for the candidate (default: the same as --opt-level)",
    )
    parser.add_argument(
        "--no-noise",
        action="store_true",
        help="do not measure the reference's own float noise: fixed default tolerances only",
    )
    parser.add_argument(
        "--intermediates",
        action="store_true",
        help="also compare every float value both models compute under the same name (for a model and its "
        "fold by bnfold; two unrelated models may use one name for different things)",
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    from bnfold.io import check_outputs

    # Before the work: a bad path must not cost a whole check, and no input may be overwritten.
    check_outputs({args.json_option: args.json}, models=[args.reference, args.candidate], inputs=[args.inputs])
    parse_options(args)
    report = check(
        args.reference,
        args.candidate,
        shapes=args.shapes,
        inputs=args.inputs,
        seed=args.seed,
        samples=args.samples,
        rtol=args.tolerances["rtol"],
        atol=args.tolerances["atol"],
        opt_level=args.opt_level,
        candidate_opt_level=args.candidate_opt_level,
        measure_noise=not args.no_noise,
        intermediates=args.intermediates,
    )
    print(report.format_table())
    if args.json:
        report.to_json(args.json)
        print(f"result written to {args.json}")
    if not report.passed:
        print(f"bnfold check: {report.summary()}", file=sys.stderr)
        return 1
    return 0
