"""Following a BN's channel axis through layout ops: Flatten, Reshape, Transpose, Squeeze,
Unsqueeze (and Identity) between a BN and the Gemm/MatMul it folds into.

A layout op moves elements without changing them, so a BN that normalizes axis 1 of a reshaped
or transposed product is still a per-feature affine map of the product when its channel axis is
one whole axis of the product, the one the weight's columns (backward) or rows (forward) index.
The functions here find such a path and prove where the channel axis goes, step by step, from
ranks (declared or inferred, as the other rules use them) and constant attributes or axes inputs:

* Transpose: the axis is permuted (``perm``, default reversed).
* Squeeze / Unsqueeze: the axis shifts past the removed / inserted axes (which must be constant);
  the channel axis itself is never one of them.
* Flatten / Reshape (any shape input, constant or computed; one per path): the channel axis must
  be the last axis on both sides. Element ``[..., c]`` of a row-major tensor whose last axis has C entries sits
  at flat position ``q * C + c``, so when the other side's last axis also has C entries (the BN's
  channel count on one side, the layer's features on the other: both are enforced at run time)
  the element keeps its last index whatever the rest of the shape is. Forward, the layer's
  contracted axis may be longer than C: feature ``f`` then holds channel ``f % C`` when C divides
  it (a trailing merge, ``cyclic``), or channel ``f // (K / C)`` after Flatten(axis = the channel
  axis) or Reshape to ``[0, -1]`` (the channel axis leads the merged trailing axes, ``block``).

Values on the path may also be read by ``Shape`` / ``Size`` nodes: a fold changes the values on
the path but never their shapes. Those values get fresh names (``rename_outputs``), so a value
that keeps its name keeps its meaning.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

import numpy as np

from bnfold.folding.rules.protocol import BatchNorm, Failure, Reason
from bnfold.folding.view import GraphView, get_attr, is_default_domain, value_info_type

LAYOUT_OPS = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")
# Readers that see only the shape of a value, which folding never changes.
SHAPE_ONLY_OPS = ("Shape", "Size")
_MAX_PATH = 16


@dataclass
class LayoutPath:
    """layer -> layout nodes -> BN (backward) or BN -> layout nodes -> layer (forward); ``nodes``
    in data-flow order."""

    layer: int
    nodes: list[int]


def shape_only_readers(view: GraphView, value: str) -> list[int]:
    """Direct readers of ``value`` that read only its shape (``Shape`` / ``Size`` as input 0)."""
    return [
        r
        for r in view.consumers.get(value, [])
        if view.nodes[r].op_type in SHAPE_ONLY_OPS and is_default_domain(view.nodes[r])
    ]


def other_reader_failure(view: GraphView, value: str, expected_reader: int, producer: str) -> Failure | None:
    """Failure when ``value`` (``producer`` names its node) is a graph output or is read by
    anything but ``expected_reader`` (once) and shape-only readers."""
    if view.is_graph_output(value):
        return Failure(Reason.GRAPH_OUTPUT, f"{producer} output '{value}' is a graph output; folding would change it")
    shape_readers = set(shape_only_readers(view, value))
    direct = view.consumers.get(value, [])
    others = [r for r in view.readers(value) if r != expected_reader and r not in shape_readers]
    if others or direct.count(expected_reader) > 1:
        names = ", ".join(sorted({f"'{view.labels[r]}'" for r in others})) or f"'{view.labels[expected_reader]}' twice"
        return Failure(
            Reason.MULTIPLE_CONSUMERS,
            f"{producer} output '{value}' is also read by {names}; folding would change that reader",
        )
    return None


# Ops whose output 0 has the rank of their input 0, and ops that broadcast their inputs.
_RANK_KEEPING = frozenset(
    [
        "Abs",
        "Cast",
        "CastLike",
        "Ceil",
        "Clip",
        "Dropout",
        "Elu",
        "Erf",
        "Exp",
        "Floor",
        "Gelu",
        "HardSigmoid",
        "HardSwish",
        "Identity",
        "LayerNormalization",
        "LeakyRelu",
        "Log",
        "LogSoftmax",
        "Mish",
        "Neg",
        "PRelu",
        "Reciprocal",
        "Relu",
        "Round",
        "Selu",
        "Sigmoid",
        "Sign",
        "Sin",
        "Cos",
        "Softmax",
        "Softplus",
        "Softsign",
        "Sqrt",
        "Tanh",
        "BatchNormalization",
        "InstanceNormalization",
    ]
)
_BROADCASTING = frozenset(
    ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Where", "Equal", "Less", "Greater", "And", "Or"]
)
# GraphView -> {value: rank}, built once per graph the first time a layout path needs a rank.
# Folds keep every value's shape (renamed values resolve through GraphView.renamed_from), so the
# table stays right while the rules edit the graph.
_RANK_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def value_rank(view: GraphView, name: str):
    """Rank of ``name``: declared or inferred (as ``view.rank``), else worked out from the ops that
    produce it. ONNX shape inference gives up on a Reshape whose shape is computed
    (``Reshape(x, Concat(Slice(Shape(x)), [-1]))``, whose output rank is the known length of the
    shape) and on everything after it, which is how dynamic-batch TorchScript exports of
    transformers at opset < 14 look; each op below has a rank rule that holds whatever the values."""
    table = _RANK_TABLES.get(view)
    if table is None:
        table = _RANK_TABLES[view] = _rank_table(view)
    for _ in range(len(view.renamed_from) + 1):
        if table.get(name) is not None:
            return table[name]
        if name not in view.renamed_from:
            break
        name = view.renamed_from[name]
    return view.rank(name)


def _rank_table(view: GraphView) -> dict:
    declared = {t.name: len(t.dims) for t in view.graph.initializer}
    for vi in list(view.graph.value_info) + list(view.graph.input) + list(view.graph.output):
        described = value_info_type(vi)
        if described is not None and described[1] is not None:
            declared.setdefault(vi.name, len(described[1]))
    table: dict = {}

    def rank(value: str):
        if value in table:
            return table[value]
        if value in declared:
            return declared[value]
        known = view.ctx.inferred_rank(value)
        if known is None and view.producer_of(value) is None:
            known = view.rank(value)  # a graph input or a value of an outer scope
        return known

    for node in view.nodes:  # a valid graph lists its nodes in topological order
        for out in node.output:
            if out:
                table[out] = rank(out)
        if not is_default_domain(node):
            continue
        if node.op_type == "Split":  # every piece has the rank of the whole
            for out in node.output:
                if out and table[out] is None:
                    table[out] = rank(node.input[0])
        elif node.output and node.output[0] and table[node.output[0]] is None:
            table[node.output[0]] = _derived_rank(view, node, rank)
    return table


def _shape_length(view: GraphView, name: str, rank):
    """Length of the 1-D shape tensor ``name``: constant, inferred, or ``Shape(v)`` of a value of known rank."""
    shape = view.constant(name)
    if shape is not None:
        return int(np.asarray(shape).size)
    inferred = view.ctx.inferred_type(name)
    dims = None if inferred is None else inferred[1]
    if dims is not None and len(dims) == 1 and dims[0] is not None:
        return dims[0]
    index = view.producer_of(name)
    node = None if index is None else view.nodes[index]
    if node is not None and node.op_type == "Shape" and is_default_domain(node):
        whole = rank(node.input[0])
        if whole is not None:  # Shape-15's start/end clamp like Python slice bounds
            return len(range(whole)[get_attr(node, "start", 0) : get_attr(node, "end", None)])
    return None


def _derived_rank(view: GraphView, node, rank):
    op = node.op_type
    inputs = [i for i in node.input if i]
    if not inputs:
        return None
    if op in _RANK_KEEPING or op in ("Transpose", "Slice", "Pad", "Resize", "Tile"):
        return rank(node.input[0])
    if op in _BROADCASTING:
        ranks = [rank(i) for i in inputs]
        return None if None in ranks else max(ranks)
    if op == "Flatten":
        return 2
    if op == "Reshape" and len(node.input) > 1:
        return _shape_length(view, node.input[1], rank)
    if op == "Expand" and len(node.input) > 1:
        length, before = _shape_length(view, node.input[1], rank), rank(node.input[0])
        return None if length is None or before is None else max(length, before)
    if op == "Concat":
        return next((r for r in map(rank, inputs) if r is not None), None)
    if op == "MatMul" and len(node.input) == 2:
        a, b = rank(node.input[0]), rank(node.input[1])
        return max(a, b) if a is not None and b is not None and a >= 2 and b >= 2 else None
    if op in ("Squeeze", "Unsqueeze"):
        axes = _axes(view, node)
        before = rank(node.input[0])
        if axes is None or before is None or (op == "Squeeze" and not axes):
            return None
        return before - len(axes) if op == "Squeeze" else before + len(axes)
    return None


def _is_layout(node) -> bool:
    return node.op_type in LAYOUT_OPS and is_default_domain(node) and len(node.output) == 1


def find_backward_path(view: GraphView, bn: BatchNorm, layer_ops: tuple[str, ...]) -> LayoutPath | None:
    """``layer -> (at least one Flatten/Reshape/Transpose/Squeeze/Unsqueeze, Identity) -> bn``, or None."""
    nodes = []
    value = bn.x
    for _ in range(_MAX_PATH):
        index = view.producer_of(value)
        if index is None:
            return None
        node = view.nodes[index]
        if node.op_type in layer_ops and is_default_domain(node):
            moved = any(view.nodes[k].op_type != "Identity" for k in nodes)
            return LayoutPath(index, list(reversed(nodes))) if moved else None
        if not _is_layout(node) or not node.input:
            return None
        nodes.append(index)
        value = node.input[0]
    return None


def find_forward_path(view: GraphView, bn: BatchNorm, layer_ops: tuple[str, ...]) -> LayoutPath | None:
    """``bn -> (at least one layout op) -> layer`` reading the path's last value as input 0, or None.
    Each value on the path must have one reader that is not shape-only (checked later)."""
    nodes = []
    value = bn.y
    for _ in range(_MAX_PATH):
        shape_readers = set(shape_only_readers(view, value))
        readers = [r for r in view.readers(value) if r not in shape_readers]
        candidates = [r for r in readers if view.nodes[r].input and view.nodes[r].input[0] == value]
        layer = [r for r in candidates if view.nodes[r].op_type in layer_ops and is_default_domain(view.nodes[r])]
        if layer and nodes and any(view.nodes[k].op_type != "Identity" for k in nodes):
            return LayoutPath(layer[0], nodes)
        layout = [r for r in candidates if _is_layout(view.nodes[r])]
        if not layout:
            return None
        nodes.append(layout[0])
        value = view.nodes[layout[0]].output[0]
    return None


def _axes(view: GraphView, node):
    """Squeeze/Unsqueeze axes as a list (attribute before opset 13, constant input from 13), [] when
    absent, None when they are an input that is not constant."""
    if len(node.input) > 1 and node.input[1]:
        value = view.constant(node.input[1])
        return None if value is None else [int(a) for a in np.asarray(value).reshape(-1)]
    return [int(a) for a in get_attr(node, "axes", [])]


def _rank_failure(view: GraphView, index: int, which: str, value: str) -> Failure:
    return Failure(
        Reason.UNKNOWN_RANK,
        f"the rank of {view.describe(index)} {which} '{value}' is unknown, so where it puts the "
        "BatchNormalization channel axis cannot be proven",
    )


def _moved_failure(view: GraphView, bn: BatchNorm, index: int, what: str) -> Failure:
    return Failure(
        Reason.MATMUL_LAYOUT,
        f"{view.describe(index)} {what}, so the channel axis of BatchNormalization '{bn.label}' is not "
        "one whole feature axis of the layer",
    )


def axis_before(view: GraphView, bn: BatchNorm, index: int, axis: int) -> int | Failure:
    """The axis of layout node ``index``'s input that becomes ``axis`` of its output, where ``axis``
    holds the BN's channels (C entries), or a Failure."""
    node = view.nodes[index]
    if node.op_type == "Identity":
        return axis
    out_rank = value_rank(view, node.output[0])
    in_rank = value_rank(view, node.input[0])
    if out_rank is None:
        return _rank_failure(view, index, "output", node.output[0])
    if in_rank is None:
        return _rank_failure(view, index, "input", node.input[0])
    op = node.op_type
    if op == "Transpose":
        perm = [int(p) for p in get_attr(node, "perm", list(range(in_rank - 1, -1, -1)))]
        return perm[axis]
    if op in ("Squeeze", "Unsqueeze"):
        axes = _axes(view, node)
        if axes is None:
            return _moved_failure(view, bn, index, "has axes that are not constant")
        if op == "Unsqueeze":
            inserted = {a % out_rank for a in axes}
            if axis in inserted:
                return _moved_failure(view, bn, index, "inserts the channel axis")
            return axis - sum(1 for a in inserted if a < axis)
        if not axes:
            return _moved_failure(view, bn, index, "squeezes axes not named by a constant")
        removed = {a % in_rank for a in axes}
        kept = [a for a in range(in_rank) if a not in removed]
        return kept[axis]
    # Flatten / Reshape: only the last axis is provably kept whole (see the module docstring).
    if axis != out_rank - 1:
        return _moved_failure(view, bn, index, f"reshapes with the channel axis on output axis {axis}, not the last")
    return in_rank - 1


def backward_feature_axis(view: GraphView, bn: BatchNorm, path: LayoutPath) -> int | Failure:
    """The axis of the layer's output that the BN's channel axis (axis 1 of its input) comes from."""
    axis = 1
    if value_rank(view, bn.x) is None:
        return Failure(
            Reason.UNKNOWN_RANK,
            f"the rank of BatchNormalization '{bn.label}' input is unknown, so which layer axis holds "
            "its channels cannot be proven",
        )
    reshapes = [k for k in path.nodes if view.nodes[k].op_type in ("Flatten", "Reshape")]
    if len(reshapes) > 1:
        # Between two reshapes the last axis may have any length, and a transpose there would
        # move elements between rows: only one reshape keeps the proof above.
        return _moved_failure(view, bn, reshapes[1], "is a second reshape on the path")
    for index in reversed(path.nodes):
        axis = axis_before(view, bn, index, axis)
        if isinstance(axis, Failure):
            return axis
    return axis


def backward_reader_failure(view: GraphView, bn: BatchNorm, path: LayoutPath) -> Failure | None:
    chain = [path.layer] + path.nodes + [bn.index]
    for producer, reader in zip(chain[:-1], chain[1:]):
        failure = other_reader_failure(view, view.nodes[producer].output[0], reader, view.describe(producer))
        if failure is not None:
            return failure
    return None


def forward_reader_failure(view: GraphView, bn: BatchNorm, path: LayoutPath) -> Failure | None:
    chain = [bn.index] + path.nodes + [path.layer]
    for producer, reader in zip(chain[:-1], chain[1:]):
        failure = other_reader_failure(view, view.nodes[producer].output[0], reader, view.describe(producer))
        if failure is not None:
            return failure
    return None


@dataclass
class ForwardAxis:
    """Where the BN channels are after a forward layout path: ``axis`` of the last value and how
    its entries map to channels (``"whole"``: entry c is channel c; ``"block"``: entry f is channel
    f // (K / C); ``"cyclic"``: entry f is channel f % C)."""

    axis: int
    mapping: str


def _reshape_is_flatten_at_1(view: GraphView, node, same_batch: set) -> bool:
    """Reshape to ``[0, -1]`` / ``[0, K]`` (allowzero 0) or to ``Concat(dim 0 of v, [-1] or [K])``
    with v a value of the same dimension 0 (``same_batch``; TorchScript's and dynamo's
    ``x.view(x.size(0), -1)``): dimension 0 kept, everything after it merged."""
    if len(node.input) < 2:
        return False
    shape = _flat_ints(view, node.input[1])
    if shape is not None:
        return not get_attr(node, "allowzero", 0) and len(shape) == 2 and shape[0] == 0 and _merges_rest(shape[1])
    concat = _producer(view, node.input[1], "Concat")
    if concat is None or int(get_attr(concat, "axis", 0)) != 0 or len(concat.input) != 2:
        return False
    rest = _flat_ints(view, concat.input[1])
    return (
        rest is not None and len(rest) == 1 and _merges_rest(rest[0]) and _is_dim_0(view, concat.input[0], same_batch)
    )


def _merges_rest(dim: int) -> bool:
    """After a kept dimension 0, -1 or any positive length is all the other axes merged: the
    element count leaves the reshape no other choice (for a non-empty batch)."""
    return dim == -1 or dim > 0


def _producer(view: GraphView, name: str, op: str):
    index = view.producer_of(name)
    node = None if index is None else view.nodes[index]
    return node if node is not None and node.op_type == op and is_default_domain(node) else None


def _flat_ints(view: GraphView, name: str):
    value = view.constant(name) if name else None
    return None if value is None else np.asarray(value).reshape(-1).tolist()


def _is_dim_0(view: GraphView, name: str, same_batch: set, depth: int = 0) -> bool:
    """``name`` is the 1-element vector ``[v.shape[0]]`` of a value v in ``same_batch``: Shape(v)
    cut to its first element (Shape's start/end, Slice, Gather with [0]), or the scalar below
    made a vector again (Unsqueeze at 0, Reshape to [-1] or [1]: the dynamo exporter's form)."""
    if depth > 8:
        return False
    index = view.producer_of(name)
    node = None if index is None else view.nodes[index]
    if node is None or not is_default_domain(node) or not node.input:
        return False
    op = node.op_type
    if op == "Shape":
        return get_attr(node, "start", 0) == 0 and get_attr(node, "end", None) == 1 and node.input[0] in same_batch
    if op == "Unsqueeze":
        return _axes(view, node) == [0] and _is_scalar_dim_0(view, node.input[0], same_batch, depth + 1)
    if op == "Reshape" and len(node.input) > 1 and _flat_ints(view, node.input[1]) in ([-1], [1]):
        return _is_scalar_dim_0(view, node.input[0], same_batch, depth + 1) or _is_dim_0(
            view, node.input[0], same_batch, depth + 1
        )
    if op not in ("Gather", "Slice"):
        return False
    shape = _producer(view, node.input[0], "Shape")
    if shape is None or shape.attribute or shape.input[0] not in same_batch:
        return False
    if op == "Gather":
        index_value = view.constant(node.input[1]) if len(node.input) > 1 else None
        return (
            index_value is not None
            and np.ndim(index_value) == 1
            and int(get_attr(node, "axis", 0)) == 0
            and np.asarray(index_value).tolist() == [0]
        )
    starts, ends = (_flat_ints(view, i) for i in (list(node.input[1:3]) + ["", ""])[:2])
    axes = node.input[3] if len(node.input) > 3 else ""
    steps = node.input[4] if len(node.input) > 4 else ""
    return starts == [0] and ends == [1] and (not axes or _flat_ints(view, axes) == [0]) and not steps


def _is_scalar_dim_0(view: GraphView, name: str, same_batch: set, depth: int) -> bool:
    """``name`` is the scalar ``v.shape[0]``: Gather(Shape(v), 0), or a Squeeze of ``[v.shape[0]]``."""
    index = view.producer_of(name)
    node = None if index is None else view.nodes[index]
    if node is None or not is_default_domain(node) or not node.input:
        return False
    if node.op_type == "Gather":
        shape = _producer(view, node.input[0], "Shape")
        index_value = view.constant(node.input[1]) if len(node.input) > 1 else None
        return (
            shape is not None
            and not shape.attribute
            and shape.input[0] in same_batch
            and index_value is not None
            and np.ndim(index_value) == 0
            and int(index_value) == 0
            and int(get_attr(node, "axis", 0)) == 0
        )
    if node.op_type == "Squeeze":
        axes = _axes(view, node)
        return axes in ([], [0]) and _is_dim_0(view, node.input[0], same_batch, depth + 1)
    return False


def _keeps_dim_0(view: GraphView, node) -> bool:
    """The layout op's output has its input's dimension 0 as its own dimension 0."""
    if node.op_type == "Transpose":
        perm = get_attr(node, "perm", None)
        return perm is not None and int(perm[0]) == 0
    if node.op_type in ("Squeeze", "Unsqueeze"):
        axes = _axes(view, node)
        return bool(axes) and all(int(a) > 0 for a in axes)  # negative axes could be 0: not proven
    return False


def _flatten_axis(node, rank: int) -> int:
    """Flatten's ``axis`` in 0..rank (axis = rank puts every axis in the rows)."""
    axis = int(get_attr(node, "axis", 1))
    return axis + rank if axis < 0 else axis


def forward_feature_axis(view: GraphView, bn: BatchNorm, path: LayoutPath) -> ForwardAxis | Failure:
    """Follow the BN channel axis (axis 1 of its output) forward to the axis of the layer's input."""
    axis, mapping = 1, "whole"
    if value_rank(view, bn.y) is None:
        return Failure(
            Reason.UNKNOWN_RANK,
            f"the rank of BatchNormalization '{bn.label}' output is unknown, so which layer axis holds "
            "its channels cannot be proven",
        )
    same_batch = {bn.x, bn.y}  # values whose dimension 0 is the BN's
    for index in path.nodes:
        node = view.nodes[index]
        if node.op_type == "Identity":
            same_batch.add(node.output[0])
            continue
        if _keeps_dim_0(view, node) and node.input[0] in same_batch:
            same_batch.add(node.output[0])
        out_rank, in_rank = value_rank(view, node.output[0]), value_rank(view, node.input[0])
        if out_rank is None:
            return _rank_failure(view, index, "output", node.output[0])
        if in_rank is None:
            return _rank_failure(view, index, "input", node.input[0])
        op = node.op_type
        if op == "Transpose":
            perm = [int(p) for p in get_attr(node, "perm", list(range(in_rank - 1, -1, -1)))]
            axis = perm.index(axis)
            continue
        if op in ("Squeeze", "Unsqueeze"):
            axes = _axes(view, node)
            if axes is None or (op == "Squeeze" and not axes):
                return _moved_failure(view, bn, index, "has axes that are not constant")
            if op == "Squeeze":
                removed = {a % in_rank for a in axes}
                if axis in removed:
                    return _moved_failure(view, bn, index, "squeezes the channel axis")
                axis -= sum(1 for a in removed if a < axis)
            else:
                inserted = {a % out_rank for a in axes}
                kept = [a for a in range(out_rank) if a not in inserted]
                axis = kept[axis]
            continue
        if mapping != "whole":
            return _moved_failure(view, bn, index, "merges axes a second time")
        leads_merge = (
            _flatten_axis(node, in_rank) == axis
            if op == "Flatten"
            else axis == 1 and _reshape_is_flatten_at_1(view, node, same_batch)
        )
        if leads_merge:
            axis, mapping = out_rank - 1, "block"
        elif axis == in_rank - 1 and (op == "Reshape" or _flatten_axis(node, in_rank) < in_rank):
            axis, mapping = out_rank - 1, "cyclic"
        else:
            return _moved_failure(view, bn, index, "merges the channel axis with axes after it in a way not proven")
    return ForwardAxis(axis, mapping)


def channel_of_rows(bn: BatchNorm, mapping: str, rows: int):
    """The BN channel of each of the layer's ``rows`` contracted entries, or None when ``rows`` does
    not fit the mapping (then the model cannot run, or the channel axis is split)."""
    channels = bn.channels
    if mapping == "whole":
        return np.arange(rows) if rows == channels else None
    if rows % channels:
        return None
    if mapping == "block":
        return np.arange(rows) // (rows // channels)
    return np.arange(rows) % channels


def rename_outputs(view: GraphView, producers) -> None:
    """Give output 0 of each node a fresh name, its readers following. A fold changes the values on
    its path; under new names no reader or comparison can take them for the old ones."""
    for index in producers:
        old = view.nodes[index].output[0]
        new = view.ctx.fresh_name(old)
        for reader in list(view.consumers.get(old, [])):
            for position, name in enumerate(view.nodes[reader].input):
                if name == old:
                    view.redirect_input(reader, position, new)
        view.rename_output(index, 0, new)


def finish_backward_through_layout(view: GraphView, bn: BatchNorm, path: LayoutPath) -> None:
    """The BN goes; the last layout node now produces the BN's output (same shape as its input),
    shape-only readers of the BN input read the BN output instead, and the values before it, which
    now hold scaled features, get fresh names."""
    rename_outputs(view, [path.layer] + path.nodes[:-1])
    for reader in shape_only_readers(view, bn.x):
        view.redirect_input(reader, 0, bn.y)
    view.remove_node(bn.index)
    view.rename_output(path.nodes[-1], 0, bn.y)


def finish_forward_through_layout(view: GraphView, bn: BatchNorm, path: LayoutPath) -> None:
    """The BN goes; the first layout node (and shape-only readers of the BN output) read its input,
    and the layout values, which now hold unnormalized features, get fresh names."""
    rename_outputs(view, path.nodes)
    for reader in shape_only_readers(view, bn.y):
        view.redirect_input(reader, 0, bn.x)
    view.redirect_input(path.nodes[0], 0, bn.x)
    view.remove_node(bn.index)


def turn_into_add(view: GraphView, bn: BatchNorm, shift: np.ndarray, data_type: int, rank: int) -> None:
    """The BN node becomes ``Add(x, shift)``, the shift laid along channel axis 1 of its rank-``rank``
    input (shape ``(C, 1, ..., 1)``, which broadcasts from the right onto axes 1..rank-1)."""
    node = view.nodes[bn.index]
    view.truncate_inputs(bn.index, 1)
    view.set_constant_input(bn.index, 1, shift.reshape((-1,) + (1,) * (rank - 2)), data_type, f"{bn.y}_shift")
    node.op_type = "Add"
    del node.attribute[:]
    if node.name:
        node.name = view.ctx.fresh_name(f"{node.name}_shift")


class BackwardThroughLayout:
    """``check`` for a ``BackwardFold`` whose layer reaches the BN through layout ops: the path,
    its readers, the channel axis proven to be the layer output's last (feature) axis, the layer's
    constants; ``layout_match`` then builds the Match (default: the skeleton's weight and bias
    rewrite, the BN removed)."""

    def check(self, view: GraphView, bn: BatchNorm):
        path = find_backward_path(view, bn, self.layer_ops)
        if path is None:
            return None
        failure = backward_reader_failure(view, bn, path)
        if failure is not None:
            return failure
        axis = backward_feature_axis(view, bn, path)
        if isinstance(axis, Failure):
            return axis
        layer_output = view.nodes[path.layer].output[0]
        out_rank = value_rank(view, layer_output)
        if out_rank is None:
            return _rank_failure(view, path.layer, "output", layer_output)
        if axis != out_rank - 1:
            return Failure(
                Reason.MATMUL_LAYOUT,
                f"the channel axis of BatchNormalization '{bn.label}' is axis {axis} of {view.describe(path.layer)} "
                f"output (rank {out_rank}), not its last (feature) axis",
            )
        read = self.read_layer(view, bn, path.layer)
        if isinstance(read, Failure):
            return read
        return self.layout_match(view, bn, path, read, out_rank)

    def layout_match(self, view: GraphView, bn: BatchNorm, path: LayoutPath, read, out_rank: int):
        alpha, beta = self.gains(view.nodes[path.layer])
        with np.errstate(over="ignore", invalid="ignore"):  # what is not finite is refused in folded()
            factor = alpha * bn.scale.reshape(read.layout.factor_shape)
            new_bias = bn.shift if read.bias is None else beta * read.bias.value * bn.scale + bn.shift
        return self.folded(
            view, bn, path.layer, read, factor, new_bias, lambda: finish_backward_through_layout(view, bn, path)
        )


class ForwardThroughLayout:
    """``check`` for a ``ForwardFold`` whose layer reads the BN through layout ops: the channel of
    each contracted row proven (``forward_feature_axis``, ``channel_of_rows``), the BN's ``s`` and
    ``t`` repeated over the rows, then the skeleton's forward math. ``contracted_axis(view, layer)``
    says which axis of input 0 the layer contracts (a Failure when none can take the BN)."""

    def contracted_axis(self, view: GraphView, layer: int):
        raise NotImplementedError

    def check(self, view: GraphView, bn: BatchNorm):
        path = find_forward_path(view, bn, self.layer_ops)
        if path is None:
            return None
        failure = forward_reader_failure(view, bn, path)
        if failure is not None:
            return failure
        found = forward_feature_axis(view, bn, path)
        if isinstance(found, Failure):
            return found
        contracted = self.contracted_axis(view, path.layer)
        if isinstance(contracted, Failure):
            return contracted
        if found.axis != contracted:
            return Failure(
                Reason.MATMUL_LAYOUT,
                f"the channel axis of BatchNormalization '{bn.label}' reaches {view.describe(path.layer)} as axis "
                f"{found.axis} of its input, not the axis {contracted} it contracts",
            )
        weight = view.constant(view.nodes[path.layer].input[1])
        rows = None if weight is None or np.ndim(weight) != 2 else self.contracted_rows(view.nodes[path.layer], weight)
        channels = None if rows is None else channel_of_rows(bn, found.mapping, rows)
        if rows is not None and channels is None:
            return Failure(
                Reason.NOT_PER_CHANNEL,
                f"{view.describe(path.layer)} contracts {rows} features, which do not map onto the "
                f"{bn.channels} channels of BatchNormalization '{bn.label}' ({found.mapping} layout)",
            )
        # Feature k of the layer is channel channels[k]: the BN seen per feature.
        per_feature = bn if channels is None else replace(bn, scale=bn.scale[channels], shift=bn.shift[channels])
        read = self.read_layer(view, per_feature, path.layer)
        if isinstance(read, Failure):
            return read
        alpha, beta = self.gains(view.nodes[path.layer])
        with np.errstate(over="ignore", invalid="ignore"):  # what is not finite is refused in folded()
            through = alpha * self.shift_through_weight(read, per_feature.shift)
            new_bias = through if read.bias is None else beta * read.bias.value + through
            factor = alpha * per_feature.scale.reshape(read.layout.factor_shape)
        return self.folded(
            view, bn, path.layer, read, factor, new_bias, lambda: finish_forward_through_layout(view, bn, path)
        )
