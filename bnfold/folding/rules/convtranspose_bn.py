"""convtranspose_bn: fold an inference BatchNormalization into the ConvTranspose before it.

Before::

    X -> ConvTranspose(W, b?) -> [Add/Sub/Mul/Div by per-channel constants]* -> BatchNormalization -> Y

After::

    X -> ConvTranspose(W', b') -> Y

Conditions:
  1. Weight (and bias, if any) are float constants.
  2. The ConvTranspose output and each value along the chain are read only by the next node and
     are not graph outputs.
  3. Every chain constant broadcasts along channel axis 1 (exporters emit ConvTranspose -> Add(bias)
     with a (C,1,1) bias; a (C,) constant is NOT per-channel for rank > 2).
  4. BN channels == group * W.shape[1]. output_padding, strides, pads and dilations do not matter.

Math (float64, cast once). The weight is (Cin, Cout/group, k...); output channel
``o = g * (Cout/group) + j`` is weight axis 1 index j of the input-channel block of group g::

    W viewed as (group, Cin/group, Cout/group, k...):  W'[g, :, j, ...] = W[g, :, j, ...] * S[g*Cout/group + j]
    b'[o] = b[o] * S[o] + T[o]
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.rules.base import (
    Failure,
    Match,
    bias_or_failure,
    check_chain_and_combine,
    finish_backward,
    int_attr,
    representation_failure,
    trace_backward,
    weight_or_failure,
)

RULE = "convtranspose_bn"


def check(view, bn):
    chain = trace_backward(view, bn, ("ConvTranspose",))
    if chain is None:
        return None
    node = view.nodes[chain.layer]
    weight = weight_or_failure(view, chain.layer, 1, "weight")
    if isinstance(weight, Failure):
        return weight
    w, w_type = weight
    group = int_attr(node, "group", 1)
    if group < 1 or w.ndim < 3 or w.shape[0] % group or w.shape[1] * group != bn.channels:
        return Failure("not_per_channel", f"{view.describe(chain.layer)} has weight shape {w.shape} with group={group}, "
                       f"which does not match the {bn.channels} channels of BatchNormalization '{bn.label}'")
    bias = bias_or_failure(view, chain.layer, 2, bn.channels)
    if isinstance(bias, Failure):
        return bias
    bias_name, b = bias
    combined = check_chain_and_combine(view, bn, chain, w.ndim)
    if isinstance(combined, Failure):
        return combined
    scale, shift = combined
    cin, cout_g = w.shape[0], w.shape[1]
    kernel = w.shape[2:]
    grouped = w.reshape((group, cin // group, cout_g) + kernel)
    factor = scale.reshape((group, 1, cout_g) + (1,) * len(kernel))
    with np.errstate(over="ignore", invalid="ignore"):  # a bias that is not finite is refused just below
        new_b = b * scale + shift
    unrepresentable = representation_failure(view, bn, chain.layer, w_type, grouped, factor, new_b, b)
    if unrepresentable is not None:
        return unrepresentable

    def rewrite():
        out = node.output[0]
        view.set_scaled_constant_input(chain.layer, 1, grouped, factor, w_type, node.input[1] or f"{out}_weight",
                                       shape=w.shape)
        view.set_constant_input(chain.layer, 2, new_b, w_type, bias_name or f"{out}_bias")
        finish_backward(view, bn, chain)

    return Match(RULE, chain.layer, rewrite, chain.nodes)
