"""gemm_bn: fold an inference BatchNormalization into the Gemm that produces its input.

Before::

    A -> Gemm(B, C?; alpha, beta, transA, transB) -> [per-channel Add/Sub/Mul/Div]* -> BatchNormalization -> Y

After::

    A -> Gemm(B', C'; alpha=1, beta=1, same transA/transB) -> Y

Conditions:
  1. B (and C, if present) are float constants; A may be anything (transA is irrelevant).
  2. The Gemm output and each chain value are read only by the next node, not graph outputs.
  3. Chain constants are per-channel: for the rank-2 output (M, N) channel axis 1 is the last
     axis, so (N,), (1, N) and scalars qualify.
  4. BN channels == N (B.shape[1], or B.shape[0] with transB=1).

Math (float64, cast once). With ``B~ = B`` or ``B^T`` (K, N) and the chain + BN reduced to
``S * y + T`` per column n of ``y = alpha * A~ B~ + beta * C``::

    B~'  = alpha * B~ * S[None, :]     (stored back in B's orientation)
    C'   = beta * C * S + T            (C = 0 when absent; broadcasting keeps C's (M,1)/(M,N) forms)
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.rules.base import int_attr
from bnfold.folding.rules.protocol import BatchNorm, Failure, Reason
from bnfold.folding.rules.skeleton import BackwardFold, ChannelLayout, GemmLayer, on_axis
from bnfold.folding.view import GraphView


class GemmBn(GemmLayer, BackwardFold):
    name = "gemm_bn"
    layer_ops = ("Gemm",)

    def weight_failure(self, view: GraphView, bn: BatchNorm, layer: int, weight: np.ndarray) -> Failure | None:
        trans_b = int_attr(view.nodes[layer], "transB", 0)
        if weight.ndim != 2 or weight.shape[0 if trans_b else 1] != bn.channels:
            return Failure(
                Reason.NOT_PER_CHANNEL,
                f"{view.describe(layer)} has B of shape {weight.shape} "
                f"(transB={trans_b}), which does not match the {bn.channels} channels of "
                f"BatchNormalization '{bn.label}'",
            )
        return None

    def channel_layout(self, node, weight: np.ndarray) -> ChannelLayout:
        return on_axis(weight, 0 if int_attr(node, "transB", 0) else 1)  # the N columns of the product


RULE = GemmBn()
