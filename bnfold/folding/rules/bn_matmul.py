"""bn_matmul: fold an inference BatchNormalization forward into the MatMul that reads its output.

Before::

    X (M, K) -> BatchNormalization -> MatMul(B (K, N) constant) -> Y

After::

    X -> Gemm(B'', C'') -> Y

Conditions:
  1. The MatMul is the only reader of the BN output, reads it as its first input, and the BN
     output is not a graph output.
  2. B is a constant 2-D float matrix (``non_constant_weight`` / ``matmul_layout``).
  3. X has rank 2, so BN channel axis 1 is the contracted axis K (rank > 2: ``matmul_layout``,
     unknown: ``unknown_rank``).

Math (float64, cast once)::

    (x*s + t) B = x (diag(s) B) + t B      B'' = s[:, None] * B      C'' = t @ B
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.rules.base import vector_times_matrix
from bnfold.folding.rules.protocol import BatchNorm, Failure, Reason
from bnfold.folding.rules.skeleton import (
    ChannelLayout,
    ForwardFold,
    LayerBias,
    LayerConstants,
    make_plain_gemm,
    on_axis,
)
from bnfold.folding.view import GraphView


class BnMatMul(ForwardFold):
    name = "bn_matmul"
    layer_ops = ("MatMul",)
    weight_role = "second input"

    def weight_failure(self, view: GraphView, bn: BatchNorm, layer: int, weight: np.ndarray) -> Failure | None:
        if weight.ndim != 2:
            return Failure(
                Reason.MATMUL_LAYOUT,
                f"{view.describe(layer)} multiplies by a rank-{weight.ndim} "
                "constant; only a 2-D matrix can absorb the BN",
            )
        rank = view.rank(bn.x)
        if rank is None:
            return Failure(
                Reason.UNKNOWN_RANK,
                f"the rank of BatchNormalization '{bn.label}' input is unknown, so "
                f"its channel axis cannot be proven to be the axis {view.describe(layer)} contracts",
            )
        if rank != 2:
            return Failure(
                Reason.MATMUL_LAYOUT,
                f"BatchNormalization '{bn.label}' input has rank {rank}: its "
                f"channel axis 1 is not the axis {view.describe(layer)} contracts",
            )
        if weight.shape[0] != bn.channels:
            return Failure(
                Reason.NOT_PER_CHANNEL,
                f"{view.describe(layer)} has {weight.shape[0]} rows but "
                f"BatchNormalization '{bn.label}' has {bn.channels} channels",
            )
        return None

    def output_channels(self, node, weight: np.ndarray) -> int:
        return weight.shape[1]

    def channel_layout(self, node, weight: np.ndarray) -> ChannelLayout:
        return on_axis(weight, 0)

    def bias(self, view: GraphView, layer: int, weight: np.ndarray) -> LayerBias | None:
        return None  # a MatMul has none: the Gemm it becomes gets C'' = t @ B

    def shift_through_weight(self, read: LayerConstants, shift: np.ndarray) -> np.ndarray:
        return vector_times_matrix(shift, read.weight)

    def finish_layer(self, view: GraphView, node) -> None:
        make_plain_gemm(view, node)


RULE = BnMatMul()
