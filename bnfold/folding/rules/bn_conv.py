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

from bnfold.folding.rules.base import int_attr
from bnfold.folding.rules.protocol import BatchNorm, Failure, Reason
from bnfold.folding.rules.skeleton import ChannelLayout, ForwardFold, LayerConstants, on_axis_1_per_group
from bnfold.folding.view import GraphView, get_attr


class BnConv(ForwardFold):
    name = "bn_conv"
    layer_ops = ("Conv",)
    weight_in_float64 = True

    def layer_failure(self, view: GraphView, bn: BatchNorm, layer: int) -> Failure | None:
        node = view.nodes[layer]
        auto_pad = get_attr(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        pads = list(get_attr(node, "pads", []) or [])
        if auto_pad not in ("NOTSET", "VALID") or (auto_pad == "NOTSET" and any(pads)):
            how = f"auto_pad={auto_pad}" if auto_pad not in ("NOTSET", "VALID") else f"pads={pads}"
            return Failure(
                Reason.PADDED_CONV,
                f"{view.describe(layer)} pads its input ({how}); folding "
                f"BatchNormalization '{bn.label}' into it would be wrong at the borders",
            )
        return None

    def weight_failure(self, view: GraphView, bn: BatchNorm, layer: int, weight: np.ndarray) -> Failure | None:
        group = int_attr(view.nodes[layer], "group", 1)
        if group < 1 or weight.ndim < 3 or weight.shape[0] % group or weight.shape[1] * group != bn.channels:
            return Failure(
                Reason.NOT_PER_CHANNEL,
                f"{view.describe(layer)} weight shape {weight.shape} with "
                f"group={group} does not match the {bn.channels} channels of BatchNormalization "
                f"'{bn.label}'",
            )
        return None

    def output_channels(self, node, weight: np.ndarray) -> int:
        return weight.shape[0]

    def channel_layout(self, node, weight: np.ndarray) -> ChannelLayout:
        return on_axis_1_per_group(weight, int_attr(node, "group", 1))  # the input channels

    def shift_through_weight(self, read: LayerConstants, shift: np.ndarray) -> np.ndarray:
        t = shift.reshape(read.layout.factor_shape)
        return (read.seen * t).reshape(read.weight.shape[0], -1).sum(axis=1)


RULE = BnConv()
