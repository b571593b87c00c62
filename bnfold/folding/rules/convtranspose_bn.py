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

from bnfold.folding.rules.base import int_attr
from bnfold.folding.rules.protocol import BatchNorm, Failure, Reason
from bnfold.folding.rules.skeleton import BackwardFold, ChannelLayout, on_axis_1_per_group
from bnfold.folding.view import GraphView


class ConvTransposeBn(BackwardFold):
    name = "convtranspose_bn"
    layer_ops = ("ConvTranspose",)

    def weight_failure(self, view: GraphView, bn: BatchNorm, layer: int, weight: np.ndarray) -> Failure | None:
        group = int_attr(view.nodes[layer], "group", 1)
        if group < 1 or weight.ndim < 3 or weight.shape[0] % group or weight.shape[1] * group != bn.channels:
            return Failure(
                Reason.NOT_PER_CHANNEL,
                f"{view.describe(layer)} has weight shape {weight.shape} with "
                f"group={group}, which does not match the {bn.channels} channels of BatchNormalization "
                f"'{bn.label}'",
            )
        return None

    def output_channels(self, node, weight: np.ndarray) -> int:
        return int_attr(node, "group", 1) * weight.shape[1]

    def channel_layout(self, node, weight: np.ndarray) -> ChannelLayout:
        return on_axis_1_per_group(weight, int_attr(node, "group", 1))


RULE = ConvTransposeBn()
