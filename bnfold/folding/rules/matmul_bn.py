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

from bnfold.folding.view import set_attr
from bnfold.folding.rules.base import Failure, Match, check_chain_and_combine, finish_backward, representation_failure, \
    trace_backward, weight_or_failure

RULE = "matmul_bn"


def check(view, bn):
    chain = trace_backward(view, bn, ("MatMul",))
    if chain is None:
        return None
    node = view.nodes[chain.layer]
    weight = weight_or_failure(view, chain.layer, 1, "second input")
    if isinstance(weight, Failure):
        return weight
    w, w_type = weight  # the stored type: float64 only where the math needs it
    if w.ndim != 2:
        return Failure("matmul_layout", f"{view.describe(chain.layer)} multiplies by a rank-{w.ndim} constant; "
                       "only a 2-D matrix keeps the BN channel on the product's last axis")
    rank = view.rank(node.input[0])
    if rank is None:
        return Failure("unknown_rank", f"the rank of {view.describe(chain.layer)} input '{node.input[0]}' is unknown, "
                       "so BN channel axis 1 cannot be proven to be the product's last axis")
    if rank != 2:
        return Failure("matmul_layout", f"{view.describe(chain.layer)} input has rank {rank}: BN channel axis 1 "
                       "is not the product's last axis, so the BN is not a per-column scale of the matrix")
    if w.shape[1] != bn.channels:
        return Failure("not_per_channel", f"{view.describe(chain.layer)} has {w.shape[1]} columns but "
                       f"BatchNormalization '{bn.label}' has {bn.channels} channels")
    combined = check_chain_and_combine(view, bn, chain, 2)
    if isinstance(combined, Failure):
        return combined
    scale, shift = combined
    unrepresentable = representation_failure(view, bn, chain.layer, w_type, w, scale[None, :], shift)
    if unrepresentable is not None:
        return unrepresentable

    def rewrite():
        out = node.output[0]
        view.set_scaled_constant_input(chain.layer, 1, w, scale[None, :], w_type, node.input[1] or f"{out}_weight")
        view.set_constant_input(chain.layer, 2, shift, w_type, f"{out}_bias")
        node.op_type = "Gemm"
        if view.ctx.opset < 7:
            set_attr(node, "broadcast", 1)  # Gemm-1/6 needs it for a (N,) C
        finish_backward(view, bn, chain)

    return Match(RULE, chain.layer, rewrite, chain.nodes)
