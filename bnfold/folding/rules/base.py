"""The checks and the math the fold rules share.

Finding the layer: ``trace_backward`` walks from a BN to the layer producing its input, through a
chain of Identity and per-channel constant Add/Sub/Mul/Div nodes, and ``check_chain_and_combine``
folds that chain into the BN's affine map; ``forward_consumer`` finds the one layer reading a BN's
output. Reading the layer: ``weight_or_failure``, ``bias_or_failure``, ``gemm_c_failure``.
Judging the result: ``representation_failure`` (overflow and precision loss of the folded values
in the layer's type). Finishing: ``finish_backward`` / ``finish_forward`` rewire the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from bnfold.folding.rules.protocol import BatchNorm, Failure, Reason
from bnfold.folding.tensors import FLOAT_TYPES, flush_subnormals, numpy_type, to_float64
from bnfold.folding.view import GraphView, get_attr, is_default_domain

CHAIN_OPS = ("Add", "Sub", "Mul", "Div")


def weight_or_failure(view: GraphView, layer: int, position: int, role: str):
    """``(value in its own dtype, TensorProto type)`` of the layer's constant float input, or a
    Failure saying why it cannot be used. The value may be read-only: compute new arrays."""
    node = view.nodes[layer]
    name = node.input[position] if position < len(node.input) else ""
    value = view.constant(name)
    if value is None:
        return Failure(
            Reason.NON_CONSTANT_WEIGHT,
            f"{view.describe(layer)} {role} '{name}' is not a constant (initializer or Constant node)",
        )
    data_type = view.constant_type(name)
    if data_type not in FLOAT_TYPES:
        return Failure(
            Reason.UNSUPPORTED_DTYPE,
            f"{view.describe(layer)} {role} '{name}' is not a float tensor (float32, float64, float16 or bfloat16)",
        )
    return np.asarray(value), data_type


# Largest finite values of the float types, and unit roundoffs of those a fold can realistically
# push into their subnormals.
_LARGEST_FINITE = {
    TensorProto.FLOAT16: 65504.0,
    TensorProto.BFLOAT16: 3.3895313892515355e38,
    TensorProto.FLOAT: float(np.finfo(np.float32).max),
    TensorProto.DOUBLE: float(np.finfo(np.float64).max),
}
_UNIT_ROUNDOFF = {TensorProto.FLOAT16: 2.0**-11, TensorProto.BFLOAT16: 2.0**-8}
# A folded weight may lose this many unit roundoffs (norm-relative) before its BN is left: rounding
# to a normal number costs at most one, so only underflow into subnormals or zero gets past it.
LOST_PRECISION_LIMIT = 4.0


def representation_failure(
    view: GraphView, bn: BatchNorm, layer: int, data_type: int, weight, factor, new_bias, old_bias=None
):
    """Failure when the folded values cannot be stored in ``data_type`` as faithfully as the
    model's own, else None. The new weight is ``weight * factor`` (``factor``: the small float64
    per-channel array that broadcasts against ``weight``); ``new_bias`` (float64) is computed from
    ``old_bias``, the layer's bias before the fold (None: the layer had none, a zero bias).

    * ``would_overflow``: the fold makes a value that is finite in the model infinite or NaN:
      a per-channel factor that is not finite, a new bias element beyond the type's largest
      finite number (or NaN) where the old one was finite — an overflow, or, in a forward fold,
      a weight holding Inf/NaN summed into the bias, which the original model would have applied
      to data instead — and, for float16 / bfloat16, a new weight element beyond the type's
      range where the old one was finite. NaN and Inf already in the model are carried over
      as they are: multiplied by a finite factor they stay what they were. float32/float64
      weights are not scanned (a pass over every weight of a big model): they overflow only
      for elements beyond ~1e38 / factor, which a trained network does not hold.
    * ``would_lose_precision``: a new float16 / bfloat16 weight whose rounding to the type loses
      more than ``LOST_PRECISION_LIMIT`` unit roundoffs relative to its norm (``||round(P) - P||
      / ||P||``, over its finite elements), which only underflow does (scaled weights that
      become subnormal or zero; for bfloat16 the subnormals count as the zeros they are flushed
      to). The original model multiplies by the stored weights exactly, so
      such a fold would make that layer measurably less precise. Biases are not judged this way:
      a bias is added, not multiplied, and rounded once from float64, so each element is off by
      at most half a unit in its own last place — under float16 underflow at most 2**-25 (3e-8)
      absolute — which is no more than the rounding of the layer's float16 output itself, which
      the original BN does as well (tests/test_fold_numerics.py measures it)."""
    limit = _LARGEST_FINITE.get(data_type)
    if limit is None:
        return None
    type_name = FLOAT_TYPES[data_type]
    target = f"folding BatchNormalization '{bn.label}' into {view.describe(layer)}"
    if not np.all(np.isfinite(factor)):
        return Failure(
            Reason.WOULD_OVERFLOW,
            f"{target} would scale its weights by a factor that is not finite "
            "(the layer's alpha times the BN scale is NaN or beyond the float64 range); left unfolded",
        )
    new_bias = np.asarray(new_bias, dtype=np.float64)
    old_bias = np.zeros(()) if old_bias is None else to_float64(old_bias)
    with np.errstate(invalid="ignore"):  # NaN compares False: it counts as out of range, as wanted
        created = ~(np.abs(new_bias) <= limit) & np.broadcast_to(np.isfinite(old_bias), new_bias.shape)
    if np.any(created):
        bad = new_bias[created]
        what = "a NaN bias" if np.any(np.isnan(bad)) else f"a bias of {float(np.max(np.abs(bad))):.3g}"
        return Failure(
            Reason.WOULD_OVERFLOW,
            f"{target} would give it {what} where the model's is finite, outside the "
            f"{type_name} range (largest {limit:.5g}): its weights hold Inf/NaN, or the folded values "
            "overflow; left unfolded",
        )
    unit = _UNIT_ROUNDOFF.get(data_type)
    if unit is None:
        return None
    old_weight = to_float64(weight)
    with np.errstate(over="ignore", invalid="ignore"):  # the products that overflow are what is looked for
        product = old_weight * factor
    finite_before = np.broadcast_to(np.isfinite(old_weight), product.shape)
    overflowing = ~(np.abs(product) <= limit) & finite_before
    if np.any(overflowing):
        worst = float(np.max(np.abs(product[overflowing])))
        return Failure(
            Reason.WOULD_OVERFLOW,
            f"{target} would give values up to {worst:.3g}, beyond the largest "
            f"{type_name} ({limit:.5g}); left unfolded",
        )
    product = product[finite_before]
    norm = float(np.linalg.norm(product))
    if norm == 0.0:
        return None
    # Judged as stored: rounded once, and (bfloat16) with the subnormals the fold pass flushes.
    stored, _ = flush_subnormals(product.astype(numpy_type(data_type)))
    lost = float(np.linalg.norm(to_float64(stored) - product)) / norm / unit
    if lost > LOST_PRECISION_LIMIT:
        return Failure(
            Reason.WOULD_LOSE_PRECISION,
            f"{target} would round its scaled {type_name} weights with a relative error of "
            f"{lost * unit:.2g} ({lost:.0f}x the {type_name} unit roundoff; many would become subnormal "
            "or zero); left unfolded",
        )
    return None


def vector_times_matrix(
    vector: np.ndarray, matrix: np.ndarray, transposed: bool = False, block_rows: int = 1024
) -> np.ndarray:
    """``vector @ matrix`` (``vector @ matrix.T`` when ``transposed``) in float64, converting the
    (possibly float32/float16, possibly large) matrix a block of rows at a time instead of as a
    whole float64 copy."""
    rows = matrix.shape[0]
    if transposed:
        out = np.empty(rows, dtype=np.float64)
        for start in range(0, rows, block_rows):
            out[start : start + block_rows] = to_float64(matrix[start : start + block_rows]) @ vector
        return out
    out = np.zeros(matrix.shape[1], dtype=np.float64)
    for start in range(0, rows, block_rows):
        out += vector[start : start + block_rows] @ to_float64(matrix[start : start + block_rows])
    return out


def gemm_c_failure(view: GraphView, layer: int, c: np.ndarray, columns: int):
    """Failure when a Gemm's C (``c``, float64) does not broadcast to the ``(M, columns)``
    product as ONNX requires; the checker does not look, and the fold's arithmetic must not
    meet such a C unprepared."""
    if c.ndim > 2:
        return Failure(Reason.NOT_PER_CHANNEL, f"{view.describe(layer)} C has rank {c.ndim} > 2")
    if c.ndim and c.shape[-1] not in (1, columns):
        return Failure(
            Reason.NOT_PER_CHANNEL,
            f"{view.describe(layer)} C of shape {c.shape} does not broadcast to the {columns} columns of its product",
        )
    return None


def optional_input(node, position: int) -> str:
    return node.input[position] if position < len(node.input) else ""


def bias_or_failure(view: GraphView, layer: int, position: int, channels: int):
    """``(input name or "", float64 bias)`` of the layer's optional per-channel bias input (zeros
    when absent), or a Failure saying why it cannot be used. A bias that is not a (channels,)
    vector is refused: the checker does not look at its shape (onnxruntime refuses it)."""
    name = optional_input(view.nodes[layer], position)
    if not name:
        return "", np.zeros(channels)
    bias = weight_or_failure(view, layer, position, "bias")
    if isinstance(bias, Failure):
        return bias
    if bias[0].shape != (channels,):
        return Failure(
            Reason.NOT_PER_CHANNEL,
            f"{view.describe(layer)} bias '{name}' has shape {bias[0].shape}, "
            f"not one value for each of its {channels} output channels",
        )
    return name, to_float64(bias[0])


def sole_reader_failure(view: GraphView, value: str, expected_reader: int, producer: int):
    """Failure when ``value`` (produced by ``producer``) is a graph output or read by anyone else."""
    if view.is_graph_output(value):
        return Failure(
            Reason.GRAPH_OUTPUT,
            f"{view.describe(producer)} output '{value}' is a graph output; folding would change it",
        )
    others = [r for r in view.readers(value) if r != expected_reader]
    direct = view.consumers.get(value, [])
    if others or direct.count(expected_reader) > 1:
        names = ", ".join(sorted({f"'{view.labels[r]}'" for r in others})) or f"'{view.labels[expected_reader]}' twice"
        nested = " (from a nested subgraph)" if any(r in view.implicit_consumers.get(value, []) for r in others) else ""
        return Failure(
            Reason.MULTIPLE_CONSUMERS,
            f"{view.describe(producer)} output is also read by {names}{nested}; folding would change that reader",
        )
    return None


@dataclass
class BackwardChain:
    """layer -> [per-channel Add/Sub/Mul/Div or Identity ...] -> BN, with the chain's nodes in graph order."""

    layer: int
    nodes: list[int]  # chain nodes from the layer to the BN


def trace_backward(view: GraphView, bn: BatchNorm, layer_ops: tuple[str, ...]):
    """Find ``layer -> chain -> bn`` where the chain nodes are Identity or have one constant
    operand; None if the value feeding the BN (through such a chain) is not produced by one of
    ``layer_ops``."""
    return trace_backward_from(view, bn.x, layer_ops)


def trace_backward_from(view: GraphView, value: str, layer_ops: tuple[str, ...]):
    """``trace_backward`` from any value: the node of ``layer_ops`` producing ``value`` through a
    chain of Identity and one-constant Add/Sub/Mul/Div nodes, or None."""
    chain = []
    for _ in range(64):
        index = view.producer_of(value)
        if index is None:
            return None
        node = view.nodes[index]
        if not is_default_domain(node):
            return None
        if node.op_type in layer_ops:
            return BackwardChain(index, list(reversed(chain)))
        if node.op_type == "Identity" and len(node.input) == 1:
            # Exporters leave Identity nodes on the data path (paddle2onnx: ConvTranspose ->
            # Identity -> Add -> Identity -> BN); they fold away with the chain.
            chain.append(index)
            value = node.input[0]
            continue
        if node.op_type not in CHAIN_OPS or len(node.input) != 2:
            return None
        variable = chain_variable_operand(view, node)
        if variable is None:
            return None
        chain.append(index)
        value = node.input[variable]
    return None


def chain_variable_operand(view: GraphView, node):
    """Position of the non-constant operand of a chain node, or None if it is not of that form."""
    a, b = node.input
    a_const, b_const = view.constant(a) is not None, view.constant(b) is not None
    if b_const and not a_const:
        return 0
    if a_const and not b_const and node.op_type in ("Add", "Mul", "Sub"):
        return 1
    return None


def check_chain_and_combine(view: GraphView, bn: BatchNorm, chain: BackwardChain, rank: int | None):
    """Check every value from the layer to the BN is read only by the next node and every chain
    constant is per-channel; return ``(S, T)`` with ``BN(chain(z)) == S * z + T`` per channel, or
    a Failure."""
    path = [chain.layer] + chain.nodes + [bn.index]
    for producer, reader in zip(path[:-1], path[1:]):
        value = view.nodes[producer].output[0]
        failure = sole_reader_failure(view, value, reader, producer)
        if failure:
            return failure
    # NaN/Inf in a chain constant, or products that overflow, make the combined map non-finite;
    # that is refused here, once, instead of being warned about op by op.
    with np.errstate(over="ignore", invalid="ignore"):
        combined = combine_chain(view, chain, rank, bn.channels)
        if isinstance(combined, Failure):
            return combined
        a, b = combined
        scale, shift = bn.scale * a, bn.scale * b + bn.shift
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        return Failure(
            Reason.INVALID_STATISTICS,
            f"the per-channel constants between {view.describe(chain.layer)} and "
            f"BatchNormalization '{bn.label}' make the folded scale or shift non-finite (NaN/Inf in a "
            "constant, or products beyond the float64 range)",
        )
    return scale, shift


def combine_chain(view: GraphView, chain: BackwardChain, rank, channels: int):
    """``(a, b)`` with ``chain(z) == a * z + b`` per channel, or a Failure."""
    a = np.ones(channels)
    b = np.zeros(channels)
    for index in chain.nodes:
        node = view.nodes[index]
        if node.op_type == "Identity":
            continue
        if rank is None:
            return Failure(
                Reason.UNKNOWN_RANK,
                f"the rank of {view.describe(chain.layer)} output is unknown, so "
                f"whether {view.describe(index)} is per-channel cannot be proven",
            )
        variable = chain_variable_operand(view, node)
        const_name = node.input[1 - variable]
        c = per_channel_vector(view.constant(const_name), rank, channels)
        if c is None:
            shape = tuple(np.shape(view.constant(const_name)))
            return Failure(
                Reason.NOT_PER_CHANNEL,
                f"{view.describe(index)} constant '{const_name}' of shape {shape} does not broadcast "
                f"along channel axis 1 of a rank-{rank} output with {channels} channels",
            )
        if view.constant_type(const_name) not in FLOAT_TYPES:
            return Failure(
                Reason.UNSUPPORTED_DTYPE, f"{view.describe(index)} constant '{const_name}' is not a float tensor"
            )
        if node.op_type == "Div" and np.any(c == 0):  # a zero divisor has no exact affine form
            return Failure(Reason.NOT_PER_CHANNEL, f"{view.describe(index)} divides by a constant containing zeros")
        a, b = then_apply(node.op_type, variable, c, a, b)
    return a, b


def then_apply(op: str, variable: int, c: np.ndarray, a: np.ndarray, b: np.ndarray):
    """``(a', b')`` with ``op(a * z + b, c) == a' * z + b'``: the affine map ``a * z + b`` followed
    by a chain node ``op`` whose constant operand is ``c`` and variable operand is input ``variable``
    (Div by a non-zero constant only)."""
    if op == "Add":
        return a, b + c
    if op == "Mul":
        return a * c, b * c
    if op == "Sub" and variable == 0:
        return a, b - c
    if op == "Sub":
        return -a, c - b
    return a / c, b / c


def per_channel_vector(value, rank: int, channels: int):
    """The (C,) float64 vector a constant contributes along channel axis 1 of a rank-``rank``
    output, or None when it broadcasts along any other axis (or would grow the output).

    numpy/ONNX broadcasting aligns shapes on the right: (C,) lines up with the LAST axis, so it
    is per-channel only for rank-2 outputs; (C,1,1) or (1,C,1,1) are per-channel for rank 4.
    """
    value = np.asarray(value)
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if shape[0] != 1 or any(d != 1 for d in shape[2:]) or shape[1] not in (1, channels):
        return None
    return (
        np.broadcast_to(to_float64(value).reshape(-1), (channels,)).copy()
        if shape[1] == channels
        else np.full(channels, float(to_float64(value).reshape(-1)[0]))
    )


def finish_backward(view: GraphView, bn: BatchNorm, chain: BackwardChain) -> None:
    """The layer now computes the BN's output directly: rename its output, drop chain and BN."""
    for index in chain.nodes:
        view.remove_node(index)
    view.remove_node(bn.index)
    view.rename_output(chain.layer, 0, bn.y)


def forward_consumer(view: GraphView, bn: BatchNorm, layer_ops: tuple[str, ...]):
    """The single layer reading the BN output as its input 0: index, Failure, or None."""
    readers = view.readers(bn.y)
    candidates = [r for r in readers if view.nodes[r].op_type in layer_ops and is_default_domain(view.nodes[r])]
    if not candidates:
        return None
    layer = candidates[0]
    if view.nodes[layer].input[0] != bn.y:
        return None
    if view.is_graph_output(bn.y):
        return Failure(
            Reason.GRAPH_OUTPUT,
            f"BatchNormalization '{bn.label}' output '{bn.y}' is a graph output; "
            f"folding it into {view.describe(layer)} would change it",
        )
    if len(readers) > 1:
        others = (
            ", ".join(sorted({f"'{view.labels[r]}'" for r in readers if r != layer})) or f"'{view.labels[layer]}' twice"
        )
        return Failure(
            Reason.MULTIPLE_CONSUMERS,
            f"BatchNormalization '{bn.label}' output is also read by {others}; "
            f"folding it into {view.describe(layer)} would change that reader",
        )
    return layer


def finish_forward(view: GraphView, bn: BatchNorm, layer: int) -> None:
    """The layer now reads the BN's input directly; the BN goes."""
    view.redirect_input(layer, 0, bn.x)
    view.remove_node(bn.index)


def int_attr(node, name: str, default: int) -> int:
    return int(get_attr(node, name, default))


def float_attr(node, name: str, default: float) -> float:
    return float(get_attr(node, name, default))
