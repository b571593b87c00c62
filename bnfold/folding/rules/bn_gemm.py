"""bn_gemm: fold an inference BatchNormalization forward into the Gemm that reads its output.

Before::

    X (M, K) -> BatchNormalization -> Gemm(B, C?; alpha, beta, transA=0, transB) -> Y

After::

    X -> Gemm(B'', C''; alpha=1, beta=1, transB) -> Y

Conditions:
  1. The Gemm is the only reader of the BN output, reads it as A, and the BN output is not a
     graph output (``multiple_consumers`` / ``graph_output``).
  2. transA = 0: the BN channels (axis 1 of X) are then the K columns of A, each of which meets
     one row of B~. With transA = 1 they would be rows of the product: ``matmul_layout``.
  3. B (and C, if present) are float constants.

Math (float64, cast once). With ``BN(x) = x * s + t`` per column k and ``B~ = B`` or ``B^T``
(K, N)::

    alpha * (x*s + t) B~ + beta * C = x (alpha * diag(s) B~) + (alpha * t B~ + beta * C)
    B~'' = alpha * s[:, None] * B~      (stored back in B's orientation)
    C''  = beta * C + alpha * t @ B~
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.rules.base import int_attr, vector_times_matrix
from bnfold.folding.rules.protocol import BatchNorm, Failure, Reason
from bnfold.folding.rules.skeleton import ChannelLayout, ForwardFold, GemmLayer, LayerConstants, on_axis
from bnfold.folding.view import GraphView


class BnGemm(GemmLayer, ForwardFold):
    name = "bn_gemm"
    layer_ops = ("Gemm",)

    def layer_failure(self, view: GraphView, bn: BatchNorm, layer: int) -> Failure | None:
        if int_attr(view.nodes[layer], "transA", 0):
            return Failure(
                Reason.MATMUL_LAYOUT,
                f"{view.describe(layer)} reads BatchNormalization '{bn.label}' "
                "transposed (transA=1), so the BN channels are rows of the product, not a scale of B",
            )
        return None

    def weight_failure(self, view: GraphView, bn: BatchNorm, layer: int, weight: np.ndarray) -> Failure | None:
        trans_b = int_attr(view.nodes[layer], "transB", 0)
        if weight.ndim != 2 or weight.shape[1 if trans_b else 0] != bn.channels:
            return Failure(
                Reason.NOT_PER_CHANNEL,
                f"{view.describe(layer)} B of shape {weight.shape} "
                f"(transB={trans_b}) does not match the {bn.channels} channels of BatchNormalization "
                f"'{bn.label}'",
            )
        return None

    def channel_layout(self, node, weight: np.ndarray) -> ChannelLayout:
        return on_axis(weight, 1 if int_attr(node, "transB", 0) else 0)  # the K rows of B~

    def shift_through_weight(self, read: LayerConstants, shift: np.ndarray) -> np.ndarray:
        return vector_times_matrix(shift, read.weight, transposed=read.layout.factor_shape == (1, -1))


RULE = BnGemm()
