"""bn_conv: fold an inference BatchNormalization forward into an unpadded Conv that reads it.

Before::

    X -> BatchNormalization -> Conv(W, b?; pads all 0 or auto_pad VALID) -> Y

After::

    X -> Conv(W'', b'') -> Y

Conditions:
  1. The Conv is the only reader of the BN output, reads it as X, and the BN output is not a
     graph output.
  2. No padding: pads absent or all zero and auto_pad NOTSET or VALID. With padding the Conv
     sees zeros at the borders where the original model saw ``t = beta - mean*s``, so the fold
     would be wrong there: ``padded_conv``.
  3. W (and b, if present) are float constants; group * W.shape[1] == BN channels.

Math (float64, cast once). W is (Cout, Cin/group, k...); output channel o of group
``g = o // (Cout/group)`` reads input channel ``c = g*(Cin/group) + i`` through ``W[o, i, ...]``::

    W''[o, i, ...] = W[o, i, ...] * s[c]
    b''[o]         = b[o] + sum_{i, k} W[o, i, k] * t[c]
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.view import get_attr
from bnfold.folding.tensors import to_float64
from bnfold.folding.rules.base import Failure, Match, bias_or_failure, finish_forward, forward_consumer, int_attr, \
    representation_failure, weight_or_failure

RULE = "bn_conv"


def check(view, bn):
    layer = forward_consumer(view, bn, ("Conv",))
    if layer is None or isinstance(layer, Failure):
        return layer
    node = view.nodes[layer]
    auto_pad = get_attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    pads = list(get_attr(node, "pads", []) or [])
    if auto_pad not in ("NOTSET", "VALID") or (auto_pad == "NOTSET" and any(pads)):
        how = f"auto_pad={auto_pad}" if auto_pad not in ("NOTSET", "VALID") else f"pads={pads}"
        return Failure("padded_conv", f"{view.describe(layer)} pads its input ({how}); folding BatchNormalization "
                       f"'{bn.label}' into it would be wrong at the borders")
    weight = weight_or_failure(view, layer, 1, "weight")
    if isinstance(weight, Failure):
        return weight
    w, w_type = to_float64(weight[0]), weight[1]
    group = int_attr(node, "group", 1)
    if group < 1 or w.ndim < 3 or w.shape[0] % group or w.shape[1] * group != bn.channels:
        return Failure("not_per_channel", f"{view.describe(layer)} weight shape {w.shape} with group={group} does not "
                       f"match the {bn.channels} channels of BatchNormalization '{bn.label}'")
    bias = bias_or_failure(view, layer, 2, w.shape[0])
    if isinstance(bias, Failure):
        return bias
    bias_name, b = bias

    cout, cin_g = w.shape[0], w.shape[1]
    kernel = w.shape[2:]
    grouped = w.reshape((group, cout // group, cin_g) + kernel)
    s = bn.scale.reshape((group, 1, cin_g) + (1,) * len(kernel))
    t = bn.shift.reshape((group, 1, cin_g) + (1,) * len(kernel))
    with np.errstate(over="ignore", invalid="ignore"):  # a bias that is not finite is refused just below
        new_b = b + (grouped * t).reshape(cout, -1).sum(axis=1)
    unrepresentable = representation_failure(view, bn, layer, w_type, grouped, s, new_b, b)
    if unrepresentable is not None:
        return unrepresentable

    def rewrite():
        out = node.output[0]
        view.set_scaled_constant_input(layer, 1, grouped, s, w_type, node.input[1] or f"{out}_weight", shape=w.shape)
        view.set_constant_input(layer, 2, new_b, w_type, bias_name or f"{out}_bias")
        finish_forward(view, bn, layer)

    return Match(RULE, layer, rewrite)
