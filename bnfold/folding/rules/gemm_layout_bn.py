"""gemm_layout_bn: fold an inference BatchNormalization into a Gemm that reaches it through
layout ops.

Before::

    A -> Gemm(B, C?; alpha, beta, transA, transB) -> [Flatten | Reshape | Transpose | Squeeze |
    Unsqueeze | Identity]+ -> BatchNormalization -> Y

After::

    A -> Gemm(B', C'; alpha = beta = 1) -> [the same layout ops] -> Y

The last layout value is renamed to Y (its ``Shape`` readers read Y); every other value keeps its
name and shape.

Conditions: as ``matmul_layout_bn`` (the BN channel axis is, through the layout ops, axis 1 of the
product; one Flatten/Reshape at most; readers along the path only the next node and ``Shape`` /
``Size``), with B and C as ``gemm_bn`` takes them.

Math (float64, cast once), with ``B~`` = B or B^T::

    B~' = alpha * B~ * s[None, :]      C' = beta * C * s + t
"""

from __future__ import annotations

from bnfold.folding.rules.gemm_bn import GemmBn
from bnfold.folding.rules.layout import BackwardThroughLayout


class GemmLayoutBn(BackwardThroughLayout, GemmBn):
    name = "gemm_layout_bn"


RULE = GemmLayoutBn()
