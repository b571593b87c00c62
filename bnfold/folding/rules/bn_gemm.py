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

from bnfold.folding.view import set_attr
from bnfold.folding.tensors import to_float64
from bnfold.folding.rules.base import Failure, Match, finish_forward, float_attr, forward_consumer, gemm_c_failure, \
    int_attr, optional_input, representation_failure, vector_times_matrix, weight_or_failure

RULE = "bn_gemm"


def check(view, bn):
    layer = forward_consumer(view, bn, ("Gemm",))
    if layer is None or isinstance(layer, Failure):
        return layer
    node = view.nodes[layer]
    if int_attr(node, "transA", 0):
        return Failure("matmul_layout", f"{view.describe(layer)} reads BatchNormalization '{bn.label}' transposed "
                       "(transA=1), so the BN channels are rows of the product, not a scale of B")
    weight = weight_or_failure(view, layer, 1, "B matrix")
    if isinstance(weight, Failure):
        return weight
    w, w_type = weight  # the stored type: float64 only where the math needs it
    trans_b = int_attr(node, "transB", 0)
    if w.ndim != 2 or w.shape[1 if trans_b else 0] != bn.channels:
        return Failure("not_per_channel", f"{view.describe(layer)} B of shape {w.shape} (transB={trans_b}) does not "
                       f"match the {bn.channels} channels of BatchNormalization '{bn.label}'")
    alpha, beta = float_attr(node, "alpha", 1.0), float_attr(node, "beta", 1.0)
    c_name = optional_input(node, 2)
    if c_name:
        c_value = weight_or_failure(view, layer, 2, "C bias")
        if isinstance(c_value, Failure):
            return c_value
        c = to_float64(c_value[0])
        c_failure = gemm_c_failure(view, layer, c, w.shape[0 if trans_b else 1])
        if c_failure is not None:
            return c_failure
    else:
        c = np.zeros(())

    with np.errstate(over="ignore", invalid="ignore"):  # what is not finite is refused just below
        new_c = beta * c + alpha * vector_times_matrix(bn.shift, w, transposed=trans_b)
        factor = alpha * (bn.scale[None, :] if trans_b else bn.scale[:, None])
    unrepresentable = representation_failure(view, bn, layer, w_type, w, factor, new_c, c)
    if unrepresentable is not None:
        return unrepresentable

    def rewrite():
        out = node.output[0]
        view.set_scaled_constant_input(layer, 1, w, factor, w_type, node.input[1] or f"{out}_weight")
        view.set_constant_input(layer, 2, new_c, w_type, c_name or f"{out}_bias")
        set_attr(node, "alpha", None)
        set_attr(node, "beta", None)
        if view.ctx.opset < 7:
            set_attr(node, "broadcast", 1)
        finish_forward(view, bn, layer)

    return Match(RULE, layer, rewrite)
