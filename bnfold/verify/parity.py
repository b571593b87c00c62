"""onnxruntime parity between two models: does the candidate compute what the reference computes?

``check(reference, candidate)`` runs both models in onnxruntime on the same inputs and compares
every output by name; with ``intermediates=True`` also every float value that both main graphs
produce under the same name (below). It is what ``bnfold check`` prints and what ``bnfold fold`` /
``calibrate`` / ``demo`` use, with intermediates, for their automatic check.

Inputs are either given (a dict or an .npz file, validated against the models' input specs) or
synthesized from the specs:

* dynamic dimensions come from ``shapes``; otherwise a symbolic dimension that another input
  already fixed gets the same value (symbols are shared by name), the leading dimension (batch)
  defaults to 1 and any other dynamic dimension to ``DEFAULT_DYNAMIC_DIM`` (32, large enough for
  typical convolution kernels and pooling windows);
* float inputs are standard normal, bool inputs fair coin flips, integer inputs small non-negative
  values in ``[0, 10)``, narrowed to the table size when the input indexes a constant with
  ``Gather`` / ``GatherElements``;
* before anything is drawn, the inputs of all samples are sized (``check_input_budget``): more
  than ``INPUT_MEMORY_SHARE`` (25 %) of the available memory, an element count beyond int64 or
  more than ``MAX_SAMPLES`` (10000) samples is refused with one line naming the input, its
  shape and size, and the limit.

Both models run at the same onnxruntime graph optimization level, ``"disabled"`` by default
(``opt_level``; ``candidate_opt_level`` only if a caller asks for a different one):

* the reference is then the model as written. From ``"basic"`` on, onnxruntime fuses Conv+BN
  (and folds constants) itself, so the reference would partly be onnxruntime's fold of the same
  BNs rather than the BNs: the check would compare one fold with another, and a mistake the two
  share would be invisible;
* the candidate runs the same kernels, so the only difference between the two runs is what the
  candidate changed, and a model checked against itself agrees bit for bit. With the reference at
  ``"disabled"`` and the candidate at ``"all"`` (the old defaults), deep float32 networks
  differed from *themselves* by more than the fixed tolerance: 8 of 49 real torch exports failed
  ``check M M``.

What a user deploys, ``"all"``, is where the noise is measured. Per sample, the reference runs a
second time, at ``noise_opt_level(opt_level)`` (``"all"``; ``"disabled"`` when the comparison is
at ``"all"``) on the inputs with every float value moved by one ulp up or down
(``nudge_inputs``; integer and bool inputs untouched; a fixed seed, so the check stays
deterministic). Its outputs' spread, ``noise = max |ref - ref'|`` over all samples, is the
reference's own float32 noise: onnxruntime's deployment optimizations round every layer
differently (including its own Conv+BN fusion, a fold in float32) and the ulp moves measure how
much the network amplifies rounding at its input - the same kind of error a correct fold makes.
A *default* atol becomes ``max(default, NOISE_FACTOR x noise)``; ``NOISE_FACTOR = 4`` because on
49 real torch exports and the suite's deep model a correct fold's error was 0.24-1.72 times the
noise, and every wrong fold tried (one Conv's weights x 1.01, a bias shifted by 0.01, one BN's
variance x 1.1) was at least 6 times the resulting atol, usually over 36 times
(docs/check-bench-demo.md has the table). The measured atol is capped at
``NOISE_CAP_OVER_DEFAULT`` (100) times the dtype's default atol and at ``NOISE_CAP_OF_SCALE``
(1%) of the output's scale, so a reference that is not reproducible (random ops, an optimizer
bug) cannot open the check to anything; the report says when the cap applied.
``measure_noise=False`` keeps the fixed defaults. The noise run costs one session and one run of
the reference per sample; it is skipped when every float output's atol is given.

Tolerances (``DEFAULT_TOLERANCES``) are per output dtype, loosened to the lowest float precision
either model computes in (initializers, Constant values, Cast targets, declared value types): a
mixed-precision model — float16 inside, float32 inputs and outputs — is compared with float16
tolerances, since its own rounding is float16's. An element passes when
``|cand - ref| <= atol + rtol * |ref|``. The *default* ``atol`` is relative to the output's scale
(multiplied by ``max(1, max|ref|)``) because folding changes rounding in proportion to the
magnitudes of the values involved, and raised to the noise floor above; explicit ``rtol`` /
``atol`` values are taken literally (an explicit ``rtol`` leaves the default atol, noise floor
included). Every ``OutputResult`` says where its tolerances came from (``rtol_source``,
``atol_source``: "default", "noise", "given" or "exact") and what noise was measured (``noise``,
``noise_atol``, ``noise_capped``); ``CheckReport.tolerance_note`` says it in one sentence. Integer
and bool outputs must match exactly. NaN or Inf on one side only (or a different Inf) is always a mismatch.
NaN (or the same Inf) at the same position on both sides is agreement, but it is counted
(``shared_nan`` / ``shared_inf``) and reported as a warning; an output that is non-finite at every
element on both sides does not pass, since no real value was compared.

Intermediate values (``intermediates=True``). Outputs alone miss wrong folds on real models: a
sigmoid map that random inputs saturate to 0/1 (PaddleOCR detection) or a softmax over 1000
classes whose probabilities are ~1e-3, under an atol of 1e-5 absolute (Keras EfficientNetB0),
moves by less than the tolerance when one folded layer's weights are off by 1 %. bnfold's fold
keeps value names (a folded layer's output takes the BN's output name; every other value keeps
its name and meaning), so every value both models produce denotes one quantity, and comparing
them checks each folded layer directly. ``bnfold.verify.intermediates.select`` picks them: produced by a
node of both main graphs, not a graph input, initializer or output, a float tensor of one element
type in both (value_info or onnx shape inference), dependent on a graph input and on no random
op (parameters behind Identity/Cast/Shape are constants a fold is meant to change). Both models
are given to onnxruntime again with those values as extra graph outputs (the serialized model
plus a small serialized ``graph.output`` message, which protobuf merges; the files are never
touched; external data still resolves). Each value gets the outputs' default rule: the dtype's
default (loosened to the working precision) scaled by its own max(1, max|ref|), raised to
NOISE_FACTOR x its own noise - not capped, since a value can only add failures and the outputs
keep the cap (capped, a float16 MobileNetV2's correct fold failed at 27 values whose own noise
exceeded 1 % of their scale); ``rtol`` / ``atol`` given by the caller apply to outputs only. Its
noise comes from a second noise run of the reference with the values exposed. The outputs are
judged exactly as without intermediates: their noise comes from the plain model (exposing a value
stops onnxruntime fusing the node that produces it, which changes the rounding at level "all":
ResNet-50 8.4e-5 -> 6.1e-5), and they come from the exposed runs only at level "disabled" in
float32/float64 models, where exposing changes nothing; at other levels, and in float16 models
(onnxruntime keeps float32 between nodes it runs in float32, but rounds an exposed value to
float16), the plain models run too (``_Runner``).
The check passes only if outputs and intermediates pass; the report counts the intermediates,
names the worst one relative to its tolerance and lists the first failing ones (``CheckReport.
intermediates``, ``failed_intermediates``), and a failing verdict names the first failing value
in node order - the wrong layer's output - and the node that produces it in each model. The
intermediates are outputs-only when comparing them would cost too much memory: more than
``bnfold.verify.intermediates.MAX_VALUES`` values, or (samples + 1) x one sample's values above
``MAX_BYTES`` (onnxruntime keeps every exposed value of a run alive to its end; sized by shape
inference on the concrete inputs before the first run and measured after it), or a model that
would exceed protobuf's 2 GiB with the extra outputs; ``intermediates_note`` says which. Off by
default in ``bnfold check``: two models that are not a model and its fold may use one name for
different things.

This module holds ``check`` itself, its report and the runs; the pieces it puts together are its
neighbours: ``shapes`` (``--shape`` and concrete input shapes), ``models`` (``LoadedModel`` and
the models' interfaces), ``inputs`` (synthesized and given inputs, their memory budget),
``noise`` (the noise run and its atol), ``tolerances`` (defaults, working precision, ``--rtol`` /
``--atol``) and ``compare`` (``OutputResult`` and the element-wise comparison).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import numpy as np
import onnx

from bnfold.common import format_table
from bnfold.errors import ArgumentTypeError, InputError
from bnfold.io import load_model, write_json_atomic
from bnfold.verify import intermediates as intermediates_module
from bnfold.verify.compare import IntermediateResult, OutputResult, compare_into, json_float
from bnfold.verify.inputs import check_seed, checked_samples, prepare_input_sets
from bnfold.verify.intermediates import estimate_bytes, exposure_suffix
from bnfold.verify.intermediates import select as select_intermediates
from bnfold.verify.models import (
    ExposureUnavailable,
    LoadedModel,
    check_model_argument,
    compare_interfaces,
    session_specs,
)
from bnfold.verify.noise import (
    NOISE_FACTOR,
    apply_noise_floor,
    has_low_precision_layer_weights,
    noise_opt_level,
    nudge_inputs,
    nudge_rng,
    output_scale,
    rounded_once_more,
    widen_spreads,
)
from bnfold.verify.session import OPT_LEVELS, ort_level, run_session
from bnfold.verify.shapes import format_shape, validated_shapes
from bnfold.verify.tolerances import DEFAULT_TOLERANCES, lowest_precision, tolerance_for, validate_tolerance

# Both models run at this level unless told otherwise (see the module docstring for why).
DEFAULT_OPT_LEVEL = "disabled"

_ALL_ATOLS_GIVEN = "atol as given for every float output (no noise run for the outputs)"
_EXPOSED_NOISE_RUN_FAILED = "the noise run with intermediate values as outputs failed: {}; outputs only"

# Rows of failing intermediate values shown in the table and the JSON (the first ones in node
# order; the count says how many more there are).
INTERMEDIATE_ROWS = 10


@dataclasses.dataclass
class CheckReport:
    """Result of ``check``: ``passed``, per-output results, and what was compared how."""

    outputs: list
    inputs: dict  # name -> {"dtype", "shape"}
    samples: int
    seed: int | None
    opt_level: str
    candidate_opt_level: str
    reference: str
    candidate: str
    # The noise run (see the module docstring): the reference again at this level on inputs
    # moved by one ulp; None when it did not run (every float atol given, measure_noise=False,
    # or it failed: ``noise_note`` says why).
    noise_opt_level: str | None = None
    noise_factor: float = NOISE_FACTOR
    noise_note: str = ""
    # check(intermediates=True): the IntermediateResults in the reference's node order, or none
    # and ``intermediates_note`` saying why (too many, too large, not exposable, ...).
    intermediates_requested: bool = False
    intermediates: list = dataclasses.field(default_factory=list)
    intermediates_note: str = ""
    intermediates_noise_measured: bool = False

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs) and all(v.passed for v in self.intermediates)

    @property
    def failed_outputs(self) -> list:
        return [o.name for o in self.outputs if not o.passed]

    @property
    def failed_intermediates(self) -> list:
        """The failing IntermediateResults, first in node order first."""
        return [v for v in self.intermediates if not v.passed]

    @property
    def worst_intermediate(self):
        """The IntermediateResult closest to (or furthest beyond) its tolerance, or None."""
        return max(self.intermediates, key=lambda v: (not v.passed, v.error_over_tolerance), default=None)

    @property
    def intermediates_brief(self) -> str:
        """A few words for one-line verdicts: how many intermediates were compared, or why none."""
        if not self.intermediates_requested:
            return ""
        if not self.intermediates:
            return f"intermediate values not compared: {self.intermediates_note}"
        failed = len(self.failed_intermediates)
        worst = self.worst_intermediate
        if failed:
            return f"{failed} of {len(self.intermediates)} intermediate values differ"
        return (
            f"{len(self.intermediates)} intermediate values match "
            f"(worst at {worst.error_over_tolerance:.2g} x its tolerance)"
        )

    @property
    def warnings(self) -> list:
        """One line per output where both models output NaN/Inf at the same positions."""
        return [f"output {o.name!r}: {o.warning}" for o in self.outputs if o.warning]

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "failed_outputs": self.failed_outputs,
            "max_abs_error": json_float(self.max_abs_error),
            "max_rel_error": json_float(self.max_rel_error),
            "reference": self.reference,
            "candidate": self.candidate,
            "opt_level": self.opt_level,
            "candidate_opt_level": self.candidate_opt_level,
            "tolerance": self.tolerance_note,
            "noise": {
                "measured": self.noise_opt_level is not None,
                "opt_level": self.noise_opt_level,
                "inputs": "float inputs moved by one ulp" if self.noise_opt_level is not None else None,
                "factor": self.noise_factor,
                "note": self.noise_note,
            },
            "samples": self.samples,
            "seed": self.seed,
            "inputs": self.inputs,
            "warnings": self.warnings,
            "outputs": [o.to_dict() for o in self.outputs],
            "intermediates": self._intermediates_dict(),
        }

    def _intermediates_dict(self) -> dict:
        failed = self.failed_intermediates
        worst = self.worst_intermediate
        return {
            "requested": self.intermediates_requested,
            "compared": len(self.intermediates),
            "failed": len(failed),
            "passed": not failed,
            "note": self.intermediates_note,
            "noise_measured": self.intermediates_noise_measured,
            "atol_from_noise": sum(v.atol_source == "noise" for v in self.intermediates),
            "noise_over_cap": sum(v.noise_over_cap for v in self.intermediates),
            "shared_nonfinite": sum(v.shared_nonfinite > 0 for v in self.intermediates),
            "worst": worst.to_dict() if worst is not None else None,
            "failures": [v.to_dict() for v in failed[:INTERMEDIATE_ROWS]],
            "failures_left_off": max(0, len(failed) - INTERMEDIATE_ROWS),
        }

    def to_json(self, path) -> None:
        write_json_atomic(self.to_dict(), path)

    def summary(self) -> str:
        warnings = "".join(f"; warning: {w}" for w in self.warnings)
        inter = self._intermediates_summary()
        if self.passed:
            return (
                f"PASS: {len(self.outputs)} output(s) match "
                f"(max abs error {self.max_abs_error:.3g}, max rel error {self.max_rel_error:.3g})"
                f"{'; ' + inter if inter else ''}{warnings}"
            )
        details = [f"{o.name!r} ({_why(o)})" for o in self.outputs if not o.passed]
        if details:
            parts = [f"output {', '.join(details)}"] + ([inter] if inter else [])
        else:  # only intermediate values fail: they come first, since they are the verdict
            parts = [inter, f"the {len(self.outputs)} output(s) match"]
        return f"FAIL: {'; '.join(parts)}{warnings}"

    def _intermediates_summary(self) -> str:
        if not self.intermediates_requested:
            return ""
        if not self.intermediates:
            return f"intermediate values not compared ({self.intermediates_note})"
        failed = self.failed_intermediates
        if not failed:
            worst = self.worst_intermediate
            return (
                f"{len(self.intermediates)} intermediate value(s) match (worst {worst.name!r} at "
                f"{worst.error_over_tolerance:.2g} x its tolerance)"
            )
        first = failed[0]
        return (
            f"intermediate value {first.name!r} (produced by {first.producer_text}) differs ({_why(first)}); "
            f"it is the first in node order of {len(failed)} of {len(self.intermediates)} intermediate values "
            "that differ"
        )

    @property
    def _float_outputs(self) -> list:
        """The outputs compared with tolerances (integer and bool ones compare exactly)."""
        return [o for o in self.outputs if o.atol_source != "exact"]

    @property
    def tolerance_brief(self) -> str:
        """A few words on the tolerances, for one-line verdicts (fold, calibrate, demo)."""
        floats = self._float_outputs
        if not floats:
            return "exact comparison"
        if all(o.atol_source == "given" for o in floats):
            return _ALL_ATOLS_GIVEN
        from_noise = sum(o.atol_source == "noise" for o in floats)
        if from_noise:
            return (
                f"atol raised to {self.noise_factor:g} x the reference's own float noise on "
                f"{from_noise} of {len(floats)} output(s)"
            )
        return "default tolerances" + (" (noise not measured)" if self.noise_opt_level is None else "")

    @property
    def tolerance_note(self) -> str:
        """One sentence: how the tolerances were chosen (the table's and the JSON's footnote)."""
        floats = self._float_outputs
        if not floats:
            return "integer and bool outputs compared exactly"
        if all(o.atol_source == "given" for o in floats):
            return _ALL_ATOLS_GIVEN
        if self.noise_opt_level is None:
            why = f" ({self.noise_note})" if self.noise_note else ""
            return f"default atol = dtype default x max(1, max|ref|); noise not measured{why}"
        from_noise = sum(o.atol_source == "noise" for o in floats)
        capped = sum(o.noise_capped for o in floats)
        text = (
            f"default atol = max(dtype default x max(1, max|ref|), {self.noise_factor:g} x ref noise), "
            f"ref noise = max |reference - reference at opt level {self.noise_opt_level}, inputs moved by one ulp|; "
            f"set by the noise for {from_noise} of {len(floats)} float output(s)"
        )
        if capped:
            text += (
                f"; capped for {capped} (the reference's own noise exceeds what a default may accept; "
                "give --atol to accept more)"
            )
        return text

    def format_table(self) -> str:
        header = (
            "output",
            "dtype",
            "shape",
            "max abs err",
            "max rel err",
            "mismatch",
            "non-finite (one side/both)",
            "ref noise",
            "tol (rtol/atol)",
            "result",
        )
        rows = [
            (
                o.name,
                o.dtype,
                format_shape(o.shape),
                f"{o.max_abs:.3g}",
                f"{o.max_rel:.3g}",
                f"{o.mismatch_fraction:.2%}",
                f"{o.nonfinite_mismatch}/{o.shared_nonfinite}",
                "-" if o.noise is None else f"{o.noise:.2g}",
                o.tolerance_text,
                "ok" if o.passed else "FAIL",
            )
            for o in self.outputs
        ]
        lines = format_table(header, rows)
        inputs = ", ".join(f"{n} {format_shape(i['shape'])} {i['dtype']}" for n, i in self.inputs.items())
        lines.append("")
        lines.append(
            f"inputs: {inputs or 'none'}; samples: {self.samples}; onnxruntime optimization: "
            f"reference {self.opt_level}, candidate {self.candidate_opt_level}"
        )
        lines.append(f"tolerance: {self.tolerance_note}")
        lines += self._intermediates_lines()
        lines.append(self.summary())
        return "\n".join(lines)

    def _intermediates_lines(self) -> list:
        """The table's intermediate section: one line of totals, the worst one, and the first
        failing ones as rows."""
        if not self.intermediates_requested:
            return []
        if not self.intermediates:
            return [f"intermediate values: not compared ({self.intermediates_note})"]
        failed = self.failed_intermediates
        from_noise = sum(v.atol_source == "noise" for v in self.intermediates)
        over_cap = sum(v.noise_over_cap for v in self.intermediates)
        noise = (
            f"raised to {self.noise_factor:g} x its own noise (for {from_noise} of {len(self.intermediates)}"
            + (f"; {over_cap} noisier than the outputs' cap, not capped" if over_cap else "")
            + ")"
            if self.intermediates_noise_measured
            else "noise not measured"
        )
        lines = [
            (
                f"intermediate values: {len(self.intermediates)} compared (float values both models produce "
                f"under one name), {len(failed)} fail; default atol scaled by each one's own max|ref|, {noise}"
            )
        ]
        worst = self.worst_intermediate
        lines.append(
            f"  worst: {worst.name!r} from {worst.producer_text}: max abs err {worst.max_abs:.3g} = "
            f"{worst.error_over_tolerance:.3g} x its tolerance {worst.tolerance_text}"
        )
        if failed:
            header = (
                "intermediate value",
                "produced by",
                "shape",
                "max abs err",
                "x tol",
                "mismatch",
                "ref noise",
                "tol (rtol/atol)",
            )
            rows = [
                (
                    v.name,
                    v.producer_text,
                    format_shape(v.shape),
                    f"{v.max_abs:.3g}",
                    f"{v.error_over_tolerance:.3g}",
                    f"{v.mismatch_fraction:.2%}",
                    "-" if v.noise is None else f"{v.noise:.2g}",
                    v.tolerance_text,
                )
                for v in failed[:INTERMEDIATE_ROWS]
            ]
            lines += format_table(header, rows, indent="  ")
            if len(failed) > INTERMEDIATE_ROWS:
                lines.append(
                    f"  ... and {len(failed) - INTERMEDIATE_ROWS} more failing (all in the JSON count, "
                    f"the first {INTERMEDIATE_ROWS} as rows)"
                )
        return lines


def _why(result) -> str:
    """Why one output or intermediate value failed, in a few words."""
    return result.message or (
        f"{result.mismatch_fraction:.2%} of elements differ, max abs error {result.max_abs:.3g}, "
        f"tolerance {result.tolerance_text}"
    )


def check(
    reference,
    candidate,
    *,
    shapes=None,
    inputs=None,
    seed=0,
    samples=1,
    rtol=None,
    atol=None,
    opt_level=DEFAULT_OPT_LEVEL,
    candidate_opt_level=None,
    measure_noise=True,
    candidate_label=None,
    intermediates=False,
) -> CheckReport:
    """Run ``reference`` and ``candidate`` (paths or ModelProtos) in onnxruntime on the same inputs
    and compare every output by name. See the module docstring for inputs and tolerances.

    ``opt_level``: onnxruntime's graph optimization level for both models (default
    ``"disabled"``); ``candidate_opt_level``: a different one for the candidate (default: the
    same). ``measure_noise``: run the reference once more per sample to measure its own float
    noise and raise default atols to ``NOISE_FACTOR`` times it (False: the fixed per-dtype
    defaults only). ``intermediates``: also compare every float value both models' main graphs
    produce under the same name (``bnfold.verify.intermediates``), each as if it were an output with a
    default tolerance; meant for a model and its fold by bnfold, where one name means one
    quantity in both. Raises InputError when a model is unreadable, the two models' interfaces
    disagree, or the inputs/options are unusable. A numerical difference is not an exception: it
    is ``report.passed == False`` with the failing outputs named. ``candidate_label``: how
    messages name the candidate (default: its path).

    Arguments are checked before any work, and errors name them: an argument of the wrong type
    raises ArgumentTypeError (a TypeError and an InputError), a bad value InputError (a
    ValueError). ``seed``: a non-negative integer (any size numpy takes). ``samples``: 1 to
    ``MAX_SAMPLES``. ``shapes``: ``{input: dims}`` with every dimension >= 1. Synthesized inputs
    of all samples together must fit in ``input_memory_limit()`` (see ``check_input_budget``).
    """
    check_model_argument(reference, "reference")
    check_model_argument(candidate, "candidate")
    samples = checked_samples(samples)
    check_seed(seed)
    shapes = validated_shapes(shapes)
    if inputs is not None and not isinstance(inputs, (str, os.PathLike, Mapping)):
        raise ArgumentTypeError(
            f"inputs must be a dict of arrays or a path to an .npz file, got {type(inputs).__name__}"
        )
    if candidate_label is not None and not isinstance(candidate_label, str):
        raise ArgumentTypeError(f"candidate_label must be a str or None, got {type(candidate_label).__name__}")
    if inputs is not None and samples != 1:
        raise InputError("samples > 1 cannot be combined with given inputs (one input set is given)")
    if candidate_opt_level is None:
        candidate_opt_level = opt_level
    for argument, level in (("opt_level", opt_level), ("candidate_opt_level", candidate_opt_level)):
        if not isinstance(level, str):
            raise ArgumentTypeError(f"{argument} must be one of {', '.join(OPT_LEVELS)}, got {level!r}")
        ort_level(level)
    ref_model = LoadedModel(reference, _label(reference, "reference"))
    cand_model = LoadedModel(candidate, candidate_label or _label(candidate, "candidate"))
    noise_model = ref_model
    try:
        lowest = lowest_precision(ref_model.proto, cand_model.proto)
        values, inter_note = _prepare_intermediates(ref_model, cand_model) if intermediates else ([], "")
        # One run of the exposed model gives the outputs too only where exposing values cannot
        # change them (see _Runner); elsewhere the plain model computes the outputs.
        shared = opt_level == candidate_opt_level == "disabled" and lowest not in ("float16", "bfloat16")
        ref_run, cand_run, note = _open_runners(
            ref_model, cand_model, opt_level, candidate_opt_level, exposed=bool(values), shared=shared
        )
        if note:
            values, inter_note = [], note

        def outputs_only(why: str) -> None:
            """Compare the outputs only from now on; ``why`` is the report's intermediates_note."""
            nonlocal values, inter_note
            values, inter_note = [], why
            ref_run.drop_values()
            cand_run.drop_values()

        exposed_names = {v.name for v in values}

        def specs_of(runner):
            ins, outs = session_specs(runner.outputs_session, runner.model.label)
            return ins, [s for s in outs if s.name not in exposed_names]

        ref_specs = specs_of(ref_run)
        cand_specs = specs_of(cand_run)
        compare_interfaces(ref_specs, cand_specs, ref_model.label, cand_model.label)
        input_specs, output_specs = ref_specs
        output_names = [s.name for s in output_specs]
        validate_tolerance(rtol, "rtol", output_names)
        validate_tolerance(atol, "atol", output_names)

        if inputs is not None and shapes:
            raise InputError("shapes cannot be combined with given inputs (their shapes are used)")
        input_sets = prepare_input_sets(
            input_specs, ref_model.proto, inputs=inputs, shapes=shapes, seed=seed, samples=samples
        )
        dynamic = inputs is None and any(
            s.shape is None or any(not isinstance(d, int) for d in s.shape) for s in input_specs
        )
        shape_hint = (
            " on synthesized inputs with default sizes for dynamic dimensions; set them with --shape NAME:D1xD2x..."
            if dynamic
            else ""
        )

        if values:
            # Before any run: onnxruntime keeps every exposed value of a run alive to its end.
            per_sample, _ = estimate_bytes(ref_model.proto, values, {n: a.shape for n, a in input_sets[0].items()})
            too_big = _too_big_note(per_sample, len(input_sets), "estimated")
            if too_big:
                outputs_only(too_big)

        results = []
        scaled, base_atols = {}, {}
        for spec in output_specs:
            r, r_default = tolerance_for(spec.name, spec.dtype, rtol, "rtol", lowest)
            a, a_default = tolerance_for(spec.name, spec.dtype, atol, "atol", lowest)
            result = OutputResult(
                spec.name,
                spec.dtype,
                (),
                r,
                a,
                rtol_source="default" if r_default else "given",
                atol_source="default" if a_default else "given",
            )
            if spec.dtype not in DEFAULT_TOLERANCES:  # integers and bools compare exactly
                result.rtol = result.atol = a = 0.0
                a_default = False
                result.rtol_source = result.atol_source = "exact"
            results.append(result)
            scaled[spec.name] = a_default
            base_atols[spec.name] = a

        # The reference first, on every sample, so that the noise floor is known (over all
        # samples) before anything is judged; then the candidate.
        noisy_outputs = [o.name for o in results if o.atol_source == "default"]
        noise_session, noise_level, noise_note = None, None, ""
        # float16 / bfloat16 models: the outputs' noise run also rounds the layer weights once
        # more, as any fold into them must (see rounded_once_more), so that a correct fold is not
        # refused for the rounding it cannot avoid. The intermediate values keep their own noise
        # run: deep inside a float16 network that rounding is as large as a 2 % error in one
        # layer, which they must still catch (and a correct fold passes them as it is).
        if measure_noise and lowest in ("float16", "bfloat16") and noisy_outputs:
            full = load_model(reference) if ref_model.path is not None else ref_model.proto
            if has_low_precision_layer_weights(full):
                noise_model = LoadedModel(rounded_once_more(full), ref_model.label)
            del full
        if noisy_outputs and measure_noise:
            noise_level = noise_opt_level(opt_level)
            try:
                noise_session = noise_model.session(noise_level)
            except InputError as e:
                noise_level, noise_note = None, f"the noise run failed: {e}"
        elif noisy_outputs:
            noise_note = "switched off: measure_noise=False / --no-noise"
        # The intermediates' noise comes from a run of the reference with them exposed (their
        # values are needed); the outputs' from the plain model, as without intermediates:
        # exposing values keeps onnxruntime from fusing the nodes that produce them, which
        # changes the rounding the outputs' noise run measures.
        inter_noise_session = None
        if values and measure_noise:
            try:
                inter_noise_session = ref_model.session(noise_opt_level(opt_level), exposed=True)
            except InputError as e:
                outputs_only(_EXPOSED_NOISE_RUN_FAILED.format(e))
        spread = dict.fromkeys(noisy_outputs, 0.0)
        inter_spread = {v.name: 0.0 for v in values}
        ref_outs, ref_inters = [], []
        for i, feeds in enumerate(input_sets):
            try:
                outs, inters = ref_run.run(feeds, output_names, [v.name for v in values], shape_hint)
            except InputError as e:
                if not values:
                    raise
                # The plain model may still run: then only the exposure is at fault.
                outputs_only(
                    f"onnxruntime failed to run the models with their intermediate values as outputs ({e}); "
                    "outputs only"
                )
                outs, inters = ref_run.run(feeds, output_names, [], shape_hint)
            ref_outs.append(outs)
            ref_inters.append(inters)
            if i == 0 and values:
                measured = sum(np.asarray(a).nbytes for a in inters.values())
                too_big = _too_big_note(measured, len(input_sets), "measured")
                if too_big:
                    outputs_only(too_big)
                    ref_inters = [{}]
            del outs, inters
            if not values:
                inter_noise_session = None
            noise_runs = noise_session is not None or inter_noise_session is not None
            nudged = nudge_inputs(feeds, nudge_rng(i)) if noise_runs else None
            if noise_session is not None:
                try:
                    again = run_session(noise_session, nudged, ref_model.label, noisy_outputs, shape_hint)
                except InputError as e:
                    noise_session, noise_level, noise_note = None, None, f"the noise run failed: {e}"
                else:
                    widen_spreads(spread, ref_outs[-1], again)
            if inter_noise_session is not None:
                try:
                    again = run_session(
                        inter_noise_session, nudged, ref_model.label, [v.name for v in values], shape_hint
                    )
                except InputError as e:
                    outputs_only(_EXPOSED_NOISE_RUN_FAILED.format(e))
                    inter_noise_session = None
                else:
                    widen_spreads(inter_spread, ref_inters[-1], again)
                    del again
        noise_atols = {}
        if noise_level is not None:
            for result in results:
                if result.name not in spread:
                    continue
                scale = output_scale(out[result.name] for out in ref_outs)
                # From weights rounded once more the noise includes what that rounding costs: a
                # property of the model's low precision, not an irreproducible reference; not capped.
                apply_noise_floor(
                    result, spread[result.name], base_atols[result.name], scale, cap=noise_model is ref_model
                )
                noise_atols[result.name] = result.noise_atol
        inter_results = [
            _intermediate_result(
                v,
                lowest,
                [ref[v.name] for ref in ref_inters],
                inter_spread[v.name] if inter_noise_session is not None else None,
            )
            for v in values
        ]

        for k, (feeds, ref_out) in enumerate(zip(input_sets, ref_outs)):
            cand_out, cand_inter = cand_run.run(feeds, output_names, [r.name for r in inter_results], shape_hint)
            for result in results:
                ref_value = np.asarray(ref_out[result.name])
                result.shape = tuple(ref_value.shape)
                compare_into(
                    result,
                    ref_value,
                    np.asarray(cand_out[result.name]),
                    base_atols[result.name],
                    scaled[result.name],
                    noise_atols.get(result.name),
                )
            for result in inter_results:
                ref_value = np.asarray(ref_inters[k][result.name])
                result.shape = tuple(ref_value.shape)
                compare_into(
                    result, ref_value, np.asarray(cand_inter[result.name]), result.base_atol, True, result.noise_atol
                )
            ref_inters[k] = None  # compared: nothing refers to this sample's values any more
            del cand_out, cand_inter
        for result in results:
            if result.passed and result.elements and result.shared_nonfinite == result.elements:
                result.passed = False
                result.message = f"all {result.elements} elements are NaN/Inf in both models: nothing real was compared"
        if results and all(r.elements == 0 and r.passed for r in results):
            shapes_text = ", ".join(f"{r.name!r} {format_shape(r.shape)}" for r in results)
            raise InputError(
                f"nothing was compared: every output has zero elements ({shapes_text}); "
                "give inputs whose outputs are not empty"
            )
        input_info = {
            name: {"dtype": str(array.dtype), "shape": list(array.shape)} for name, array in input_sets[0].items()
        }
        return CheckReport(
            outputs=results,
            inputs=input_info,
            samples=len(input_sets),
            seed=None if inputs is not None else seed,
            opt_level=opt_level,
            candidate_opt_level=candidate_opt_level,
            reference=ref_model.label,
            candidate=cand_model.label,
            noise_opt_level=noise_level,
            noise_note=noise_note,
            intermediates_requested=bool(intermediates),
            intermediates=inter_results,
            intermediates_note=inter_note,
            intermediates_noise_measured=inter_noise_session is not None and bool(inter_results),
        )
    finally:
        ref_model.close()
        cand_model.close()
        if noise_model is not ref_model:
            noise_model.close()


def _prepare_intermediates(ref_model: LoadedModel, cand_model: LoadedModel):
    """``(values, note)``: the intermediate values to compare, each model prepared to expose
    them, or none and why."""
    selection = select_intermediates(ref_model.proto, cand_model.proto)
    if not selection.values:
        return [], selection.note
    suffix = exposure_suffix(selection.values)
    try:
        ref_model.expose(suffix)
        cand_model.expose(suffix)
    except ExposureUnavailable as e:
        return [], f"{e}; outputs only"
    return selection.values, ""


class _Runner:
    """Runs one model for the check: its outputs and, while intermediate values are compared,
    those values. ``shared``: one run of the exposed model gives both - where exposing values
    cannot change the outputs: at level "disabled" in float32/float64 models. At higher levels
    an exposed value stops onnxruntime fusing the node that produces it, and in float16 models
    it becomes a float16 result where onnxruntime would otherwise keep float32 between nodes it
    runs in float32 (its inserted Casts): the outputs change. There the plain model computes
    the outputs, so that they are judged exactly as without intermediates."""

    def __init__(self, model: LoadedModel, opt_level: str, *, exposed: bool, shared: bool):
        self.model, self.opt_level = model, opt_level
        self.values_session = model.session(opt_level, exposed=True) if exposed else None
        self.outputs_session = self.values_session if exposed and shared else model.session(opt_level)

    def drop_values(self) -> None:
        """Outputs only from now on (a fallback; the plain model replaces a shared session)."""
        if self.values_session is not None and self.outputs_session is self.values_session:
            self.outputs_session = self.model.session(self.opt_level)
        self.values_session = None

    def run(self, feeds, output_names, value_names, shape_hint):
        """``(outputs, values)``, dicts by name (``values`` empty once dropped)."""
        label = self.model.label
        if self.values_session is None or not value_names:
            return run_session(self.outputs_session, feeds, label, output_names, shape_hint), {}
        if self.outputs_session is self.values_session:
            everything = run_session(
                self.values_session, feeds, label, list(output_names) + list(value_names), shape_hint
            )
            return ({n: everything[n] for n in output_names}, {n: everything[n] for n in value_names})
        return (
            run_session(self.outputs_session, feeds, label, output_names, shape_hint),
            run_session(self.values_session, feeds, label, value_names, shape_hint),
        )


def _open_runners(ref_model, cand_model, opt_level, candidate_opt_level, *, exposed, shared):
    """``(reference runner, candidate runner, note)``. Exposed models that onnxruntime refuses
    fall back to the plain models (``note`` says why); the plain models' errors are the check's
    errors."""
    note = ""
    if exposed:
        try:
            return (
                _Runner(ref_model, opt_level, exposed=True, shared=shared),
                _Runner(cand_model, candidate_opt_level, exposed=True, shared=shared),
                "",
            )
        except InputError as e:
            note = f"{e}; outputs only"
    return (
        _Runner(ref_model, opt_level, exposed=False, shared=shared),
        _Runner(cand_model, candidate_opt_level, exposed=False, shared=shared),
        note,
    )


def _too_big_note(per_sample: int, samples: int, how: str) -> str:
    held = (samples + 1) * per_sample
    if held <= intermediates_module.MAX_BYTES:
        return ""
    return (
        f"the intermediate values take {per_sample / 2**20:.0f} MiB per sample ({how}); holding {samples + 1} "
        f"sample(s) of them would exceed {intermediates_module.MAX_BYTES / 2**30:g} GiB; outputs only"
    )


def _intermediate_result(value, lowest, ref_values, spread):
    """An IntermediateResult with the outputs' default rule: the dtype's default (loosened to the
    lowest working precision) scaled by the value's own max|ref|, raised to NOISE_FACTOR x its
    own measured spread (``spread``; None when not measured).

    Not capped: the outputs' cap keeps an irreproducible reference from passing anything, and
    the outputs keep it; an intermediate value can only add failures. Where a value's own noise
    is above the cap its tolerance follows the noise (``noise_over_cap`` says so): capping it
    failed correct folds - in a float16 MobileNetV2, 84 of 102 values were noisier than 1 % of
    their scale, and 27 failed with errors of 0.3-0.7 x their own noise."""
    rtol, _ = tolerance_for(value.name, value.dtype, None, "rtol", lowest)
    atol, _ = tolerance_for(value.name, value.dtype, None, "atol", lowest)
    result = IntermediateResult(
        value.name,
        value.dtype,
        (),
        rtol,
        atol,
        producer=value.producer,
        reference_producer=value.reference_producer,
        order=value.order,
        base_atol=atol,
    )
    if spread is not None:
        result.noise_over_cap = apply_noise_floor(result, spread, atol, output_scale(ref_values), cap=False)
    return result


def _label(model_or_path, fallback: str) -> str:
    if isinstance(model_or_path, onnx.ModelProto):
        return f"{fallback} (in memory)"
    return os.fspath(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else fallback
