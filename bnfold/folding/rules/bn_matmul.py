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

from bnfold.folding.view import set_attr
from bnfold.folding.rules.base import Failure, Match, finish_forward, forward_consumer, representation_failure, \
    vector_times_matrix, weight_or_failure

RULE = "bn_matmul"


def check(view, bn):
    layer = forward_consumer(view, bn, ("MatMul",))
    if layer is None or isinstance(layer, Failure):
        return layer
    node = view.nodes[layer]
    weight = weight_or_failure(view, layer, 1, "second input")
    if isinstance(weight, Failure):
        return weight
    w, w_type = weight  # the stored type: float64 only where the math needs it
    if w.ndim != 2:
        return Failure("matmul_layout", f"{view.describe(layer)} multiplies by a rank-{w.ndim} constant; only a "
                       "2-D matrix can absorb the BN")
    rank = view.rank(bn.x)
    if rank is None:
        return Failure("unknown_rank", f"the rank of BatchNormalization '{bn.label}' input is unknown, so its channel "
                       f"axis cannot be proven to be the axis {view.describe(layer)} contracts")
    if rank != 2:
        return Failure("matmul_layout", f"BatchNormalization '{bn.label}' input has rank {rank}: its channel axis 1 "
                       f"is not the axis {view.describe(layer)} contracts")
    if w.shape[0] != bn.channels:
        return Failure("not_per_channel", f"{view.describe(layer)} has {w.shape[0]} rows but BatchNormalization "
                       f"'{bn.label}' has {bn.channels} channels")
    with np.errstate(over="ignore", invalid="ignore"):  # a bias that is not finite is refused just below
        new_c = vector_times_matrix(bn.shift, w)
    unrepresentable = representation_failure(view, bn, layer, w_type, w, bn.scale[:, None], new_c)
    if unrepresentable is not None:
        return unrepresentable

    def rewrite():
        out = node.output[0]
        view.set_scaled_constant_input(layer, 1, w, bn.scale[:, None], w_type, node.input[1] or f"{out}_weight")
        view.set_constant_input(layer, 2, new_c, w_type, f"{out}_bias")
        node.op_type = "Gemm"
        if view.ctx.opset < 7:
            set_attr(node, "broadcast", 1)
        finish_forward(view, bn, layer)

    return Match(RULE, layer, rewrite)
