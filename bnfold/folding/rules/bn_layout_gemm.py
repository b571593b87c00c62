"""bn_layout_gemm: fold an inference BatchNormalization forward into the Gemm that reads it through
layout ops (BatchNorm2d -> Flatten -> Linear in face-recognition heads, BatchNorm1d
over a flattened feature map).

Before::

    X -> BatchNormalization -> [Flatten | Reshape | Transpose | Squeeze | Unsqueeze | Identity]+
    -> Gemm(B, C?; alpha, beta, transA, transB) -> Y

After::

    X -> [the same layout ops] -> Gemm(B'', C''; alpha = beta = 1) -> Y

Conditions:
  1. The BN's channel axis reaches the axis the Gemm contracts (1, or 0 with transA = 1), moved
     whole by Transpose / Squeeze / Unsqueeze and merged at most once, so that contracted feature
     k holds channel ``k // (K / C)`` (Flatten at the channel axis; Reshape to ``[0, -1]``, or to
     ``Concat([dim 0 of the BN's tensor], [-1] or [K])``: the channel leads the merged axes) or
     ``k % C`` (a Flatten or Reshape of any shape that merges axes ending with the channel axis);
     K must be a multiple of C (``not_per_channel``). See ``rules/layout.py``.
  2. Every value from the BN to the layer is read only by the next node and by ``Shape`` /
     ``Size`` nodes (which then read the BN's input), and is not a graph output.
  3. B (and C) are float constants.

Math (float64, cast once), with ``s_k`` / ``t_k`` the BN's scale and shift of feature k's channel
and ``B~`` (K, N) = B or B^T::

    B~''[k, :] = alpha * s_k * B~[k, :]      C'' = beta * C + alpha * t_k @ B~
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.rules.base import int_attr
from bnfold.folding.rules.bn_gemm import BnGemm
from bnfold.folding.rules.layout import ForwardThroughLayout
from bnfold.folding.rules.protocol import BatchNorm, Failure
from bnfold.folding.view import GraphView


class BnLayoutGemm(ForwardThroughLayout, BnGemm):
    name = "bn_layout_gemm"

    def layer_failure(self, view: GraphView, bn: BatchNorm, layer: int) -> Failure | None:
        return None  # transA is taken into account by contracted_axis

    def contracted_axis(self, view: GraphView, layer: int):
        return 0 if int_attr(view.nodes[layer], "transA", 0) else 1

    def contracted_rows(self, node, weight: np.ndarray) -> int:
        return weight.shape[1 if int_attr(node, "transB", 0) else 0]


RULE = BnLayoutGemm()
