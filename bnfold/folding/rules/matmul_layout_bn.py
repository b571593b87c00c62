"""matmul_layout_bn: fold an inference BatchNormalization into a MatMul by a constant matrix that
reaches it through layout ops (timm LeViT's ``bn(linear(x).flatten(0, 1)).reshape_as(x)``).

Before::

    A (..., K) -> MatMul(B (K, C) constant) -> [Flatten | Reshape | Transpose | Squeeze | Unsqueeze
    | Identity]+ -> BatchNormalization -> Y

After, when the product has rank 2::

    A -> Gemm(B', C' = t) -> [the same layout ops] -> Y

and otherwise (a MatMul has no bias; Gemm takes only 2-D inputs)::

    A -> MatMul(B') -> [the same layout ops] -> Add(t laid along channel axis 1) -> Y

The Add replaces the BN node in place. Every value keeps its shape, so ``Shape`` readers along the
path stay valid; the values that now hold scaled features get fresh names (the last layout value
becomes Y in the Gemm form, its ``Shape`` readers reading Y).

Conditions:
  1. The BN's channel axis is, through the layout ops, the product's last axis (see
     ``rules/layout.py``: Transpose/Squeeze/Unsqueeze map axes through their constant attributes
     or inputs; one Flatten/Reshape, of any shape, keeps the last axis when it is the channel axis
     on both sides); ranks declared or inferred (else ``unknown_rank``; otherwise
     ``matmul_layout``).
  2. B is a constant 2-D float matrix with C columns, C = the BN's channels (``matmul_layout`` /
     ``not_per_channel`` / ``non_constant_weight``).
  3. Every value from the MatMul to the BN is read only by the next node and by ``Shape`` /
     ``Size`` nodes, and is not a graph output.

Math (float64, cast once)::

    B' = B * s[None, :]      C' = t   (or the Add of t)
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.rules.base import representation_failure
from bnfold.folding.rules.layout import BackwardThroughLayout, LayoutPath, rename_outputs, turn_into_add, value_rank
from bnfold.folding.rules.matmul_bn import MatMulBn
from bnfold.folding.rules.protocol import BatchNorm, Failure, Match, Reason
from bnfold.folding.view import GraphView


class MatMulLayoutBn(BackwardThroughLayout, MatMulBn):
    name = "matmul_layout_bn"

    def weight_failure(self, view: GraphView, bn: BatchNorm, layer: int, weight: np.ndarray) -> Failure | None:
        if weight.ndim != 2:
            return Failure(
                Reason.MATMUL_LAYOUT,
                f"{view.describe(layer)} multiplies by a rank-{weight.ndim} constant; only a 2-D matrix has "
                "one column per feature",
            )
        if weight.shape[1] != bn.channels:
            return Failure(
                Reason.NOT_PER_CHANNEL,
                f"{view.describe(layer)} has {weight.shape[1]} columns but BatchNormalization '{bn.label}' "
                f"has {bn.channels} channels",
            )
        return None

    def layout_match(self, view: GraphView, bn: BatchNorm, path: LayoutPath, read, out_rank: int):
        if out_rank == 2:
            return super().layout_match(view, bn, path, read, out_rank)  # becomes a Gemm with C' = t
        layer = path.layer
        factor = bn.scale.reshape(read.layout.factor_shape)
        unrepresentable = representation_failure(view, bn, layer, read.data_type, read.seen, factor, bn.shift)
        if unrepresentable is not None:
            return unrepresentable
        node = view.nodes[layer]
        bn_rank = value_rank(view, bn.x)

        def rewrite():
            name = node.input[1] or f"{node.output[0]}_weight"
            view.set_scaled_constant_input(layer, 1, read.seen, factor, read.data_type, name)
            rename_outputs(view, [layer] + path.nodes)
            turn_into_add(view, bn, bn.shift, read.data_type, bn_rank)

        return Match(self.name, layer, rewrite)


RULE = MatMulLayoutBn()
