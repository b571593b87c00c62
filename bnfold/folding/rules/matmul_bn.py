"""matmul_bn: fold an inference BatchNormalization into a MatMul by a constant matrix.

Before::

    A (M, K) -> MatMul(B (K, N) constant) -> [per-channel Add/Sub/Mul/Div]* -> BatchNormalization -> Y

After::

    A -> Gemm(B', C') -> Y            (one node; Gemm is the MatMul + bias ONNX already has)

Conditions:
  1. B is a constant 2-D float matrix (else ``non_constant_weight`` / ``matmul_layout``).
  2. A has rank 2, so BN channel axis 1 is the product's last axis N. For rank-3 A (N, T, K) the
     BN normalizes axis 1 = T, which is not a column of B: ``matmul_layout``. Unknown rank:
     ``unknown_rank``.
  3. The MatMul output and each chain value are read only by the next node, not graph outputs.
  4. Chain constants are per-channel for the rank-2 output; BN channels == N.

Math (float64, cast once), with the chain + BN reduced to ``S * y + T`` per column::

    B' = B * S[None, :]        C' = T
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.rules.protocol import BatchNorm, Failure, Reason
from bnfold.folding.rules.skeleton import BackwardFold, ChannelLayout, LayerBias, make_plain_gemm, on_axis
from bnfold.folding.view import GraphView


class MatMulBn(BackwardFold):
    name = "matmul_bn"
    layer_ops = ("MatMul",)
    weight_role = "second input"

    def weight_failure(self, view: GraphView, bn: BatchNorm, layer: int, weight: np.ndarray) -> Failure | None:
        if weight.ndim != 2:
            return Failure(
                Reason.MATMUL_LAYOUT,
                f"{view.describe(layer)} multiplies by a rank-{weight.ndim} "
                "constant; only a 2-D matrix keeps the BN channel on the product's last axis",
            )
        node = view.nodes[layer]
        rank = view.rank(node.input[0])
        if rank is None:
            return Failure(
                Reason.UNKNOWN_RANK,
                f"the rank of {view.describe(layer)} input '{node.input[0]}' is "
                "unknown, so BN channel axis 1 cannot be proven to be the product's last axis",
            )
        if rank != 2:
            return Failure(
                Reason.MATMUL_LAYOUT,
                f"{view.describe(layer)} input has rank {rank}: BN channel axis 1 "
                "is not the product's last axis, so the BN is not a per-column scale of the matrix",
            )
        if weight.shape[1] != bn.channels:
            return Failure(
                Reason.NOT_PER_CHANNEL,
                f"{view.describe(layer)} has {weight.shape[1]} columns but "
                f"BatchNormalization '{bn.label}' has {bn.channels} channels",
            )
        return None

    def output_channels(self, node, weight: np.ndarray) -> int:
        return weight.shape[1]

    def channel_layout(self, node, weight: np.ndarray) -> ChannelLayout:
        return on_axis(weight, 1)

    def bias(self, view: GraphView, layer: int, weight: np.ndarray) -> LayerBias | None:
        return None  # a MatMul has none: the Gemm it becomes gets C' = T

    def finish_layer(self, view: GraphView, node) -> None:
        make_plain_gemm(view, node)


RULE = MatMulBn()
