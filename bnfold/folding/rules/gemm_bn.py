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

from bnfold.folding.tensors import to_float64
from bnfold.folding.rules.base import (
    Failure,
    Match,
    check_chain_and_combine,
    finish_backward,
    float_attr,
    gemm_c_failure,
    int_attr,
    optional_input,
    representation_failure,
    trace_backward,
    weight_or_failure,
)
from bnfold.folding.view import set_attr

RULE = "gemm_bn"


def check(view, bn):
    chain = trace_backward(view, bn, ("Gemm",))
    if chain is None:
        return None
    node = view.nodes[chain.layer]
    weight = weight_or_failure(view, chain.layer, 1, "B matrix")
    if isinstance(weight, Failure):
        return weight
    w, w_type = weight  # the stored type: float64 only where the math needs it
    trans_b = int_attr(node, "transB", 0)
    if w.ndim != 2 or w.shape[0 if trans_b else 1] != bn.channels:
        return Failure("not_per_channel", f"{view.describe(chain.layer)} has B of shape {w.shape} (transB={trans_b}), "
                       f"which does not match the {bn.channels} channels of BatchNormalization '{bn.label}'")
    alpha, beta = float_attr(node, "alpha", 1.0), float_attr(node, "beta", 1.0)
    c_name = optional_input(node, 2)
    if c_name:
        c_value = weight_or_failure(view, chain.layer, 2, "C bias")
        if isinstance(c_value, Failure):
            return c_value
        c = to_float64(c_value[0])
        c_failure = gemm_c_failure(view, chain.layer, c, bn.channels)
        if c_failure is not None:
            return c_failure
    else:
        c = np.zeros(())
    combined = check_chain_and_combine(view, bn, chain, 2)
    if isinstance(combined, Failure):
        return combined
    scale, shift = combined
    with np.errstate(over="ignore", invalid="ignore"):  # what is not finite is refused just below
        factor = alpha * (scale[:, None] if trans_b else scale[None, :])
        new_c = beta * c * scale + shift
    unrepresentable = representation_failure(view, bn, chain.layer, w_type, w, factor, new_c, c)
    if unrepresentable is not None:
        return unrepresentable

    def rewrite():
        out = node.output[0]
        view.set_scaled_constant_input(chain.layer, 1, w, factor, w_type, node.input[1] or f"{out}_weight")
        view.set_constant_input(chain.layer, 2, new_c, w_type, c_name or f"{out}_bias")
        set_attr(node, "alpha", None)
        set_attr(node, "beta", None)
        if view.ctx.opset < 7:
            set_attr(node, "broadcast", 1)  # Gemm-1/6 needs it for a (N,) C
        finish_backward(view, bn, chain)

    return Match(RULE, chain.layer, rewrite, chain.nodes)
