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

from bnfold.folding.rules.protocol import BatchNorm, Failure, Reason
from bnfold.folding.rules.skeleton import BackwardFold, ChannelLayout, on_axis
from bnfold.folding.view import GraphView


class ConvBn(BackwardFold):
    name = "conv_bn"
    layer_ops = ("Conv",)

    def weight_failure(self, view: GraphView, bn: BatchNorm, layer: int, weight: np.ndarray) -> Failure | None:
        if weight.ndim < 3 or weight.shape[0] != bn.channels:
            return Failure(
                Reason.NOT_PER_CHANNEL,
                f"{view.describe(layer)} has weight shape {weight.shape}, which "
                f"does not match the {bn.channels} channels of BatchNormalization '{bn.label}'",
            )
        return None

    def output_channels(self, node, weight: np.ndarray) -> int:
        return weight.shape[0]

    def channel_layout(self, node, weight: np.ndarray) -> ChannelLayout:
        return on_axis(weight, 0)


RULE = ConvBn()
