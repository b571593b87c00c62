"""conv_bn: fold an inference BatchNormalization into the Conv that produces its input.

Before::

    X -> Conv(W, b?) -> [Add/Sub/Mul/Div by per-channel constants]* -> BatchNormalization -> Y

After::

    X -> Conv(W', b') -> Y

Conditions:
  1. The Conv is in the default domain and its weight (and bias, if any) are constants of a
     float type (float32/float64/float16/bfloat16).
  2. The Conv output, and each value along the chain, is read only by the next node and is not a
     graph output (``graph_output`` / ``multiple_consumers``).
  3. Every chain constant broadcasts along channel axis 1 of the Conv output (``not_per_channel``).
  4. The BN has as many channels as the Conv has output channels.
  Pads, auto_pad, strides, dilations and groups do not matter: the fold is per output channel.

Math (float64, cast once to W's type). With the chain and BN reduced to ``S * z + T`` per
output channel o (for a bare BN ``S = s = gamma / sqrt(var + eps)``, ``T = beta - mean * s``)::

    W'[o, ...] = W[o, ...] * S[o]          (W is (Cout, Cin/group, k1, ..., kn))
    b'[o]      = b[o] * S[o] + T[o]        (b = 0 when the Conv has no bias)
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.rules.base import (
    Failure,
    Match,
    bias_or_failure,
    check_chain_and_combine,
    finish_backward,
    representation_failure,
    trace_backward,
    weight_or_failure,
)

RULE = "conv_bn"


def check(view, bn):
    chain = trace_backward(view, bn, ("Conv",))
    if chain is None:
        return None
    node = view.nodes[chain.layer]
    weight = weight_or_failure(view, chain.layer, 1, "weight")
    if isinstance(weight, Failure):
        return weight
    w, w_type = weight
    if w.ndim < 3 or w.shape[0] != bn.channels:
        return Failure("not_per_channel", f"{view.describe(chain.layer)} has weight shape {w.shape}, which does not "
                       f"match the {bn.channels} channels of BatchNormalization '{bn.label}'")
    bias = bias_or_failure(view, chain.layer, 2, bn.channels)
    if isinstance(bias, Failure):
        return bias
    bias_name, b = bias
    combined = check_chain_and_combine(view, bn, chain, w.ndim)
    if isinstance(combined, Failure):
        return combined
    scale, shift = combined
    factor = scale.reshape((-1,) + (1,) * (w.ndim - 1))
    with np.errstate(over="ignore", invalid="ignore"):  # a bias that is not finite is refused just below
        new_b = b * scale + shift
    unrepresentable = representation_failure(view, bn, chain.layer, w_type, w, factor, new_b, b)
    if unrepresentable is not None:
        return unrepresentable

    def rewrite():
        out = node.output[0]
        view.set_scaled_constant_input(chain.layer, 1, w, factor, w_type, node.input[1] or f"{out}_weight")
        view.set_constant_input(chain.layer, 2, new_b, w_type, bias_name or f"{out}_bias")
        finish_backward(view, bn, chain)

    return Match(RULE, chain.layer, rewrite, chain.nodes)
