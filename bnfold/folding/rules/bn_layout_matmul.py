"""bn_layout_matmul: fold an inference BatchNormalization forward into the MatMul by a constant
matrix that reads it through layout ops, as ``bn_layout_gemm`` does for a Gemm.

Before::

    X -> BatchNormalization -> [Flatten | Reshape | Transpose | Squeeze | Unsqueeze | Identity]+
    -> MatMul(B (K, N) constant) -> Y

After::

    X -> [the same layout ops] -> Gemm(B'', C'') -> Y

Conditions: as ``bn_layout_gemm``, with the contracted axis the last axis of the MatMul's input,
which must have rank 2 (a MatMul has no bias for the shift, and only a rank-2 one becomes a
Gemm: ``matmul_layout``; unknown rank: ``unknown_rank``); B is a constant 2-D float matrix
whose K rows map onto the channels.

Math (float64, cast once), ``s_k`` / ``t_k`` the scale and shift of feature k's channel::

    B''[k, :] = s_k * B[k, :]      C'' = t_k @ B
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.rules.bn_matmul import BnMatMul
from bnfold.folding.rules.layout import ForwardThroughLayout, value_rank
from bnfold.folding.rules.protocol import BatchNorm, Failure, Reason
from bnfold.folding.view import GraphView


class BnLayoutMatMul(ForwardThroughLayout, BnMatMul):
    name = "bn_layout_matmul"
    layer_ops = ("MatMul",)

    def weight_failure(self, view: GraphView, bn: BatchNorm, layer: int, weight: np.ndarray) -> Failure | None:
        if weight.ndim != 2 or weight.shape[0] != bn.channels:
            return Failure(
                Reason.NOT_PER_CHANNEL if weight.ndim == 2 else Reason.MATMUL_LAYOUT,
                f"{view.describe(layer)} multiplies by a constant of shape {weight.shape}, which does not "
                "have one row per feature",
            )
        return None

    def contracted_axis(self, view: GraphView, layer: int):
        data = view.nodes[layer].input[0]
        rank = value_rank(view, data)
        if rank is None:
            return Failure(
                Reason.UNKNOWN_RANK,
                f"the rank of {view.describe(layer)} input '{data}' is unknown, so the axis it contracts "
                "cannot be proven",
            )
        if rank != 2:
            return Failure(
                Reason.MATMUL_LAYOUT,
                f"{view.describe(layer)} input has rank {rank}: a MatMul has no bias to take the BN's shift, and "
                "only a rank-2 one becomes a Gemm",
            )
        return 1

    def contracted_rows(self, node, weight: np.ndarray) -> int:
        return weight.shape[0]


RULE = BnLayoutMatMul()
