"""Screening a BatchNormalization node before anything is done with it: is it an inference-mode,
per-channel BN whose parameters are constant float (C,) vectors, and are its folded values finite?

The fold pass reduces every BN that passes to its float64 affine map (``inference_batch_norm``);
calibration, which replaces the running mean and variance, screens with
``screen_batch_norm(..., statistics_replaced=True)``. ``variance_outlier_channels`` flags the
channels whose near-zero variance gives them scales orders of magnitude above the others (the
report shows them; folding is not refused for them).
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.rules.protocol import BatchNorm, Failure, Reason
from bnfold.folding.tensors import FLOAT_TYPES, to_float64
from bnfold.folding.view import GraphView, get_attr


def inference_mode_failure(node, label: str, opset: int) -> Failure | None:
    """Why a BatchNormalization node is not an inference-mode, per-channel BN with all five inputs,
    or None when it is. The fold pass and calibration both screen BNs with this (a BN in training
    mode normalizes by batch statistics: neither foldable nor worth re-estimating)."""
    if get_attr(node, "training_mode", 0) == 1:
        return Failure(
            Reason.TRAINING_MODE,
            f"BatchNormalization '{label}' has training_mode=1: it normalizes with "
            "batch statistics, not the running ones",
        )
    if any(node.output[1:]):
        return Failure(
            Reason.TRAINING_MODE,
            f"BatchNormalization '{label}' produces running/saved statistics "
            "outputs, which only exist in training mode",
        )
    if opset <= 6 and get_attr(node, "is_test", 0) == 0:
        return Failure(
            Reason.TRAINING_MODE,
            f"BatchNormalization '{label}' (opset {opset}) has is_test=0, which "
            "means training mode; set is_test=1 for inference",
        )
    if get_attr(node, "spatial", 1) == 0:
        return Failure(
            Reason.SPATIAL_MODE,
            f"BatchNormalization '{label}' has spatial=0 (statistics per activation, not per channel)",
        )
    if len(node.input) < 5 or not all(node.input[:5]):
        return Failure(Reason.NON_CONSTANT_PARAMS, f"BatchNormalization '{label}' lacks some of scale/B/mean/var")
    return None


def screen_batch_norm(view: GraphView, index: int, *, statistics_replaced: bool = False) -> Failure | None:
    """Why BatchNormalization node ``index`` of ``view`` cannot be used, or None when it can.

    Folding (the default) needs, in this order: inference mode (``inference_mode_failure``);
    scale, B, mean and var each a constant (``GraphView.constant``) of a float type; the four of
    them (C,) vectors of one length; the folded ``s = scale / sqrt(var + eps)`` and
    ``t = B - mean * s`` finite (``invalid_statistics``). The Failure is the one the fold pass
    reports for the BN, reason code and message alike.

    ``statistics_replaced=True`` (calibration, which computes new running statistics and reads
    scale and B at run time) needs only what a BN must be whatever its statistics: inference mode
    with all five inputs. Statistics that are graph inputs, computed, NaN or of another shape are
    what calibration replaces."""
    if statistics_replaced:
        return inference_mode_failure(view.nodes[index], view.labels[index], view.ctx.opset)
    screened = inference_batch_norm(view, index)
    return screened if isinstance(screened, Failure) else None


def inference_batch_norm(view: GraphView, index: int) -> BatchNorm | Failure:
    """The BN as a float64 affine map ``s*x + t``, or the Failure that rules it out entirely."""
    parameters = _constant_parameters(view, index)
    if isinstance(parameters, Failure):
        return parameters
    node, label = view.nodes[index], view.labels[index]
    gamma, beta, mean, var = parameters
    eps = float(get_attr(node, "epsilon", 1e-5))
    with np.errstate(all="ignore"):
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        return Failure(
            Reason.INVALID_STATISTICS,
            f"BatchNormalization '{label}' has non-finite folded parameters "
            "(variance + epsilon <= 0, or NaN/Inf in its statistics or scale)",
        )
    return BatchNorm(index, label, node.input[0], node.output[0], scale, shift)


# A channel is an outlier when its |scale| is at least this many times the BN's median |scale|, and
# its variance alone accounts for as much (median(var + eps) / (var + eps) >= the square of it).
# Three orders of magnitude: on the project's corpus (123 models, 4455 BNs, trained and
# synthetic statistics) the largest ratio of any BN is 680 (MobileOne's 1x1 scale branches; at 100
# this rule would flag 25 channels of MobileOne and FastViT, at 30 119 channels in 4 models), and
# a dead channel (var = 0) of a BN with eps 1e-5 and unit median variance stands at only ~316.
OUTLIER_SCALE_RATIO = 1e3


def variance_outlier_channels(view: GraphView, index: int) -> tuple[int, ...]:
    """Indices of the channels of BatchNormalization node ``index`` whose variance is ~0 next to
    the BN's other channels: ``|s_c| >= OUTLIER_SCALE_RATIO * median |s|`` with ``s = gamma /
    sqrt(var + eps)``, and ``var_c + eps <= median(var + eps) / OUTLIER_SCALE_RATIO**2`` (the
    variance, not a large gamma, is what sets the channel apart). Folding multiplies that
    channel's weights by ``s_c``: huge values, which round badly where they cancel against the
    huge bias the same fold gives. Empty for a BN that does not pass the screen (nothing folds)."""
    parameters = _constant_parameters(view, index)
    if isinstance(parameters, Failure):
        return ()
    gamma, _, _, var = parameters
    eps = float(get_attr(view.nodes[index], "epsilon", 1e-5))
    with np.errstate(all="ignore"):
        spread = var + eps
        scale = np.abs(gamma / np.sqrt(spread))
    if scale.size < 2 or not (np.all(np.isfinite(scale)) and np.all(spread > 0)):
        return ()  # invalid_statistics, or nothing to compare with
    with np.errstate(all="ignore"):  # a median of 0 makes every nonzero scale infinitely far above it
        scale_ratio = scale / np.median(scale)
        variance_ratio = np.median(spread) / spread
    outliers = (scale_ratio >= OUTLIER_SCALE_RATIO) & (variance_ratio >= OUTLIER_SCALE_RATIO**2)
    return tuple(int(c) for c in np.flatnonzero(outliers))


def _constant_parameters(view: GraphView, index: int) -> list[np.ndarray] | Failure:
    """``[scale, B, mean, var]`` in float64 of an inference BN, or the Failure that rules it out."""
    node = view.nodes[index]
    label = view.labels[index]
    failure = inference_mode_failure(node, label, view.ctx.opset)
    if failure is not None:
        return failure
    params = []
    for role, name in zip(("scale", "B", "mean", "var"), node.input[1:5]):
        value = view.constant(name)
        if value is None:
            kind = "a graph input" if name in view.input_names else "computed at run time"
            return Failure(
                Reason.NON_CONSTANT_PARAMS, f"BatchNormalization '{label}' {role} '{name}' is not a constant ({kind})"
            )
        if view.constant_type(name) not in FLOAT_TYPES:
            return Failure(
                Reason.UNSUPPORTED_DTYPE, f"BatchNormalization '{label}' {role} '{name}' is not a float tensor"
            )
        params.append(to_float64(value))
    if any(p.ndim != 1 for p in params) or len({p.shape[0] for p in params}) != 1:
        shapes = ", ".join(str(p.shape) for p in params)
        return Failure(
            Reason.NOT_PER_CHANNEL,
            f"BatchNormalization '{label}' parameters have shapes {shapes}, not one (C,) vector each",
        )
    return params
