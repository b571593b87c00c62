"""How one output or intermediate value of the candidate compares with the reference's, sample
after sample: the per-value results (``OutputResult``, ``IntermediateResult``) and the
element-wise comparison that fills them (``compare_into``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from bnfold.verify.shapes import format_shape


# Values near their dtype's limit (a float64 output of 1e308 against -1e308, errors divided by
# tiny tolerances, an infinite noise atol) overflow to Inf or give NaN in the comparison's
# arithmetic: an infinite error is a mismatch and a NaN ratio is never the maximum, so the results
# are right, and numpy's RuntimeWarnings about them would only be noise on stderr.
def float_limits_handled(function):
    """``function`` run under ``np.errstate(over="ignore", invalid="ignore")``, a fresh one per
    call (before numpy 2 an errstate object used as a decorator is not safe across threads)."""

    @functools.wraps(function)
    def guarded(*args, **kwargs):
        with np.errstate(over="ignore", invalid="ignore"):
            return function(*args, **kwargs)

    return guarded


def json_float(x):
    """``x`` as JSON can hold it: a float, or "inf" / "-inf" / "nan" as a string."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


@dataclasses.dataclass
class OutputResult:
    """How one output of the candidate compares with the reference (over all samples)."""

    name: str
    dtype: str
    shape: tuple
    rtol: float
    atol: float
    max_abs: float = 0.0
    max_rel: float = 0.0
    mismatch_fraction: float = 0.0
    mismatches: int = 0
    elements: int = 0
    nonfinite_mismatch: int = 0
    shared_nan: int = 0  # positions where both models output NaN (agreement, but worth a warning)
    shared_inf: int = 0  # positions where both models output the same Inf
    passed: bool = True
    message: str = ""
    # Where the tolerances came from: "default" (per-dtype table), "noise" (the atol is the
    # measured noise floor, larger than the default), "given" (the caller's value, literal) or
    # "exact" (integer and bool outputs).
    rtol_source: str = "default"
    atol_source: str = "default"
    noise: float | None = None  # the reference's own spread: max |ref - ref at the noise run|
    noise_atol: float | None = None  # NOISE_FACTOR x noise, capped
    noise_capped: bool = False
    # max over elements of |cand - ref| / (atol + rtol |ref|): 1 is the limit, above fails.
    error_over_tolerance: float = 0.0

    @property
    def shared_nonfinite(self) -> int:
        return self.shared_nan + self.shared_inf

    @property
    def warning(self) -> str:
        """'' unless both models output NaN/Inf at the same positions (counted as agreement)."""
        if not self.shared_nonfinite:
            return ""
        parts = [f"{kind} at {n}" for kind, n in (("NaN", self.shared_nan), ("Inf", self.shared_inf)) if n]
        positions = "position" if self.shared_nonfinite == 1 else "positions"
        return f"both models output {' and '.join(parts)} {positions}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["warning"] = self.warning
        for key in (
            "max_abs",
            "max_rel",
            "atol",
            "rtol",
            "mismatch_fraction",
            "noise",
            "noise_atol",
            "error_over_tolerance",
        ):
            if d[key] is not None:
                d[key] = json_float(d[key])
        return d

    @property
    def tolerance_text(self) -> str:
        """'rtol/atol (source)' as the table shows it."""
        if self.atol_source == "exact":
            return "exact"
        source = self.atol_source
        if self.rtol_source == "given" and self.atol_source != "given":
            source = f"rtol given, atol {self.atol_source}"
        if self.noise_capped:
            source += ", capped"
        return f"{self.rtol:.0e}/{self.atol:.1e} ({source})"


@dataclasses.dataclass
class IntermediateResult(OutputResult):
    """How one intermediate value (``bnfold.verify.intermediates``) compares: an OutputResult plus the
    node that produces it in each model and its position in the reference's node order."""

    producer: str = ""  # in the candidate, e.g. "Conv 'conv3'" (a folded layer)
    reference_producer: str = ""  # in the reference, e.g. "BatchNormalization 'bn3'"
    order: int = 0
    base_atol: float = 0.0  # the dtype's default atol before scaling by max(1, max|ref|)
    # Its own noise is above the outputs' cap (NOISE_CAP_*): its atol follows the noise uncapped.
    noise_over_cap: bool = False

    @property
    def tolerance_text(self) -> str:
        text = super().tolerance_text
        return text[:-1] + ", above the outputs' cap)" if self.noise_over_cap else text

    @property
    def producer_text(self) -> str:
        if self.reference_producer and self.reference_producer != self.producer:
            return f"{self.producer}; {self.reference_producer} in the reference"
        return self.producer

    def to_dict(self) -> dict:
        d = super().to_dict()
        del d["base_atol"]
        return d


@float_limits_handled
def compare_into(
    result: OutputResult,
    ref: np.ndarray,
    cand: np.ndarray,
    base_atol: float,
    scaled_atol: bool,
    noise_atol: float | None = None,
) -> None:
    """Fold one sample's comparison of one output into ``result`` (result.atol records the
    largest absolute tolerance actually applied). ``noise_atol``: the measured noise floor under
    a default atol (None: not measured, or the atol was given)."""
    if ref.shape != cand.shape:
        result.passed = False
        result.message = f"shape {format_shape(cand.shape)} differs from the reference's {format_shape(ref.shape)}"
        return
    result.elements += ref.size
    if ref.size == 0:
        return
    # numpy's ufuncs return scalars for 0-d operands, which the in-place steps below cannot take.
    ref, cand = np.atleast_1d(ref), np.atleast_1d(cand)
    if ref.dtype.kind == "f" and cand.dtype.kind == "f" and np.isfinite(ref).all() and np.isfinite(cand).all():
        # The common case, with a third of the passes over the data: every comparison of the
        # intermediate values of a big model goes through here.
        err_max, max_rel, mismatches = _compare_finite(result, ref, cand, base_atol, scaled_atol, noise_atol)
        result.max_abs = max(result.max_abs, err_max)
        result.max_rel = max(result.max_rel, max_rel)
        result.mismatches += mismatches
        result.mismatch_fraction = result.mismatches / result.elements
        if result.mismatches:
            result.passed = False
        return
    if ref.dtype.kind in "fc":
        r = ref.astype(np.float64)
        c = cand.astype(np.float64)
        finite_r, finite_c = np.isfinite(r), np.isfinite(c)
        both_finite = finite_r & finite_c
        shared_nan = np.isnan(r) & np.isnan(c)
        shared_inf = np.isinf(r) & np.isinf(c) & (r == c)
        same_nonfinite = shared_nan | shared_inf
        nonfinite_bad = ~both_finite & ~same_nonfinite
        err = np.zeros_like(r)
        np.subtract(r, c, out=err, where=both_finite)  # inf - inf would warn; non-finite pairs judged above
        np.abs(err, out=err)
        abs_ref = np.where(finite_r, np.abs(r), 0.0)
        atol = _applied_atol(result, abs_ref, base_atol, scaled_atol, noise_atol)
        allowed = atol + result.rtol * abs_ref
        bad = (err > allowed) | nonfinite_bad
        result.error_over_tolerance = max(result.error_over_tolerance, _worst_ratio(err, allowed, nonfinite_bad))
        significant = both_finite & (abs_ref > atol)
        max_rel = float((err[significant] / abs_ref[significant]).max()) if significant.any() else 0.0
        n_nonfinite = int(nonfinite_bad.sum())
        if n_nonfinite:
            where = np.argwhere(nonfinite_bad)[0]
            note = (
                f"{n_nonfinite} non-finite value(s) on one side only "
                f"(first at index {tuple(int(i) for i in where)}: reference {r[tuple(where)]}, candidate "
                f"{c[tuple(where)]})"
            )
            result.message = result.message or note
        result.nonfinite_mismatch += n_nonfinite
        result.shared_nan += int(shared_nan.sum())
        result.shared_inf += int(shared_inf.sum())
    else:
        diff = ref.astype(np.int64) != cand.astype(np.int64) if ref.dtype != np.uint64 else ref != cand
        err = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
        bad = diff
        if bad.any():
            result.error_over_tolerance = math.inf
        max_rel = 0.0
        nz = ref != 0
        if nz.any():
            max_rel = float((err[nz] / np.abs(ref[nz].astype(np.float64))).max())
    result.max_abs = max(result.max_abs, float(err.max()))
    result.max_rel = max(result.max_rel, max_rel)
    result.mismatches += int(bad.sum())
    result.mismatch_fraction = result.mismatches / result.elements if result.elements else 0.0
    if result.mismatches:
        result.passed = False


def _compare_finite(
    result: OutputResult,
    ref: np.ndarray,
    cand: np.ndarray,
    base_atol: float,
    scaled_atol: bool,
    noise_atol: float | None,
) -> tuple:
    """``(max abs error, max rel error, mismatches)`` of finite float arrays, as the general
    path of ``compare_into`` computes them (float64, the same tolerance), recording the atol
    and the error over the tolerance in ``result``."""
    err = np.subtract(ref, cand, dtype=np.float64)
    np.abs(err, out=err)
    abs_ref = np.absolute(ref, dtype=np.float64)
    atol = _applied_atol(result, abs_ref, base_atol, scaled_atol, noise_atol)
    allowed = abs_ref * result.rtol
    allowed += atol
    mismatches = int(np.count_nonzero(err > allowed))
    err_max = float(err.max())
    if atol > 0:
        np.divide(err, allowed, out=allowed)
        ratio = float(allowed.max())
    else:  # nothing allowed where ref is 0: the general rule (inf for any error there)
        ratio = _worst_ratio(err, allowed, np.zeros(err.shape, bool))
    result.error_over_tolerance = max(result.error_over_tolerance, ratio)
    # Relative error where |ref| > atol; elsewhere the denominator is made infinite (ratio 0).
    abs_ref[abs_ref <= atol] = np.inf
    np.divide(err, abs_ref, out=err)
    return err_max, float(err.max()), mismatches


def _applied_atol(
    result: OutputResult, abs_ref: np.ndarray, base_atol: float, scaled_atol: bool, noise_atol: float | None
) -> float:
    """The atol one sample is judged by: ``base_atol``, times max(1, max|ref|) when
    ``scaled_atol``, raised to ``noise_atol``; ``result.atol`` keeps the largest applied."""
    atol = base_atol * max(1.0, float(abs_ref.max())) if scaled_atol else base_atol
    if noise_atol is not None:
        atol = max(atol, noise_atol)
    result.atol = max(result.atol, atol)
    return atol


def _worst_ratio(err: np.ndarray, allowed: np.ndarray, nonfinite_bad: np.ndarray) -> float:
    """max err / allowed: how close the worst element came to its tolerance (1 = at the limit;
    inf for a non-finite mismatch or an error where nothing is allowed)."""
    if nonfinite_bad.any():
        return math.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err > 0, err / allowed, 0.0)
    return float(ratio.max()) if ratio.size else 0.0
