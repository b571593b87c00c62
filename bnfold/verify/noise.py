"""The reference's own float noise: the runs that measure it (inputs moved by one ulp, another
optimization level, low-precision layer weights rounded once more) and the atol it allows
(``NOISE_FACTOR`` times the noise, capped). Why and how: ``bnfold.verify.parity``'s docstring.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.verify.compare import float_limits_handled

# The noise floor (see bnfold.verify.parity's docstring): a default atol is at least NOISE_FACTOR
# times the reference's own measured spread, and a measured tolerance never exceeds
# NOISE_CAP_OVER_DEFAULT times the dtype's default atol nor NOISE_CAP_OF_SCALE of the output's scale.
NOISE_FACTOR = 4.0
NOISE_CAP_OVER_DEFAULT = 100.0
NOISE_CAP_OF_SCALE = 1e-2
# Seeds the random up/down choice of the one-ulp input moves; independent of ``seed`` so that
# given inputs (no seed) are moved deterministically too.
_NUDGE_STREAM = 0x6E6F697365


_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_LOW_PRECISION = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _layer_weight_names(model: onnx.ModelProto) -> set:
    return {n.input[1] for n in model.graph.node if n.op_type in _LAYER_OPS and len(n.input) > 1}


def has_low_precision_layer_weights(model: onnx.ModelProto) -> bool:
    """Whether some Conv / ConvTranspose / Gemm / MatMul of the main graph has a float16 or
    bfloat16 initializer as its weight."""
    names = _layer_weight_names(model)
    return any(t.name in names and t.data_type in _LOW_PRECISION for t in model.graph.initializer)


def rounded_once_more(model: onnx.ModelProto, seed: int = 5) -> onnx.ModelProto:
    """A copy of ``model`` whose float16 / bfloat16 layer weights (main graph initializers, with
    their data loaded) are rounded to their type once more at a random per-output-channel scale,
    then divided by the scale and rounded back (types unchanged: about sqrt(2) roundings).

    What storing folded weights in a low-precision type costs in any case -- a fold rounds
    ``W * gamma / sigma`` once -- measured on the model itself: the unavoidable part of a
    float16 fold's error, as opposed to a wrong fold's. The check's noise run uses it for float16
    / bfloat16 models (see ``check``)."""
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    names = _layer_weight_names(copy)
    for tensor in copy.graph.initializer:
        if tensor.name not in names or tensor.data_type not in _LOW_PRECISION or not tensor.dims:
            continue
        weights = numpy_helper.to_array(tensor)
        low = weights.dtype
        weights = weights.astype(np.float64)
        scale = rng.uniform(0.5, 2.0, (weights.shape[0],) + (1,) * (weights.ndim - 1))
        with np.errstate(over="ignore"):  # a weight near the type's limit, scaled up: Inf, kept as it was below
            again = (weights * scale).astype(low).astype(np.float64) / scale
        # Where the scaled weight leaves the type's range it cannot be rounded there: it stays.
        overflowed = ~np.isfinite(again) & np.isfinite(weights)
        again[overflowed] = weights[overflowed]
        tensor.CopyFrom(numpy_helper.from_array(again.astype(low), tensor.name))
    return copy


def noise_opt_level(opt_level: str) -> str:
    """Level of the noise run for a comparison at ``opt_level``: the deployment level ``"all"``,
    or ``"disabled"`` when the comparison itself runs at ``"all"`` (a second run at the same level
    would measure nothing)."""
    return "disabled" if opt_level == "all" else "all"


def nudge_inputs(feeds: dict, rng: np.random.Generator) -> dict:
    """``feeds`` with every float value moved by one unit in the last place of its dtype, up or
    down at random; integer and bool inputs (indices, shapes, masks) are left exactly as they are.
    NaN and Inf stay what they are."""
    nudged = {}
    for name, value in feeds.items():
        value = np.asarray(value)
        if value.dtype.kind != "f" or value.size == 0:
            nudged[name] = value
            continue
        up = rng.random(value.shape) < 0.5
        toward = np.where(up, np.array(np.inf, value.dtype), np.array(-np.inf, value.dtype))
        with np.errstate(over="ignore"):  # the dtype's largest value moved outwards: Inf, replaced below
            moved = np.nextafter(value, toward).astype(value.dtype)
        # A finite value must stay finite: at the dtype's limit the ulp move goes inwards instead.
        outwards = ~np.isfinite(moved) & np.isfinite(value)
        if outwards.any():
            moved[outwards] = np.nextafter(value[outwards], -toward[outwards])
        nudged[name] = np.where(np.isfinite(value), moved, value).astype(value.dtype)
    return nudged


def nudge_rng(sample: int) -> np.random.Generator:
    return np.random.default_rng((_NUDGE_STREAM, sample))


@float_limits_handled  # two finite values far apart: an infinite spread, which noise_tolerance caps
def finite_spread(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| over the positions where both are finite (0 when there are none)."""
    if a.shape != b.shape or a.size == 0:
        return 0.0
    a, b = np.atleast_1d(a), np.atleast_1d(b)  # 0-d operands would make the ufuncs return scalars
    if a.dtype.kind == "f" and b.dtype.kind == "f" and np.isfinite(a).all() and np.isfinite(b).all():
        diff = np.subtract(a, b, dtype=np.float64)
        return float(np.abs(diff, out=diff).max())
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    both = np.isfinite(a) & np.isfinite(b)
    if not both.any():
        return 0.0
    return float(np.abs(a[both] - b[both]).max())


def widen_spreads(spreads: dict, reference: dict, again: dict) -> None:
    """Widen ``spreads`` (value name -> the largest spread so far) by one sample's runs: the
    reference's values and those of its noise run, by name."""
    for name in spreads:
        spreads[name] = max(spreads[name], finite_spread(np.asarray(reference[name]), np.asarray(again[name])))


def output_scale(values) -> float:
    """max(1, max |finite value|) over one output's values from every sample."""
    scale = 1.0
    for v in values:
        v = np.asarray(v)
        if v.size and v.dtype.kind == "f" and np.isfinite(v).all():
            scale = max(scale, abs(float(v.max())), abs(float(v.min())))
        elif v.size:
            finite = np.abs(v[np.isfinite(v)]) if v.dtype.kind in "fc" else np.abs(v)
            if finite.size:
                scale = max(scale, float(finite.max()))
    return scale


def noise_tolerance(noise: float, default_atol: float, scale: float) -> tuple:
    """(atol, capped) from a measured ``noise``: NOISE_FACTOR x noise, but never above
    NOISE_CAP_OVER_DEFAULT x ``default_atol`` x ``scale`` nor NOISE_CAP_OF_SCALE x ``scale``."""
    cap = min(NOISE_CAP_OVER_DEFAULT * default_atol, NOISE_CAP_OF_SCALE) * scale
    wanted = NOISE_FACTOR * noise
    return (cap, True) if wanted > cap else (wanted, False)


def apply_noise_floor(result, noise: float, base_atol: float, scale: float, *, cap: bool) -> bool:
    """Record a measured ``noise`` in ``result`` (an output's or intermediate value's result, of
    the dtype's default atol ``base_atol`` and the values' ``scale``): its noise floor
    ``noise_atol`` is NOISE_FACTOR x noise, capped as ``noise_tolerance`` caps it when ``cap``, and
    its atol comes from the noise where that floor exceeds the scaled default. Returns whether the
    floor is above the cap, applied or not."""
    capped_atol, over_cap = noise_tolerance(noise, base_atol, scale)
    result.noise = noise
    result.noise_atol = capped_atol if cap else NOISE_FACTOR * noise
    result.noise_capped = cap and over_cap
    if result.noise_atol > base_atol * scale:
        result.atol_source = "noise"
    return over_cap
