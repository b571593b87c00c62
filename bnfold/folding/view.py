"""A thin, editable view over an ONNX graph for the fold pass.

``GraphView`` answers the questions the fold rules ask — who produces a value, who reads it
(including nodes whose If/Loop/Scan bodies read it from the outer scope), is it a graph output,
is it a constant and what is its value, what is its rank — and offers the few edits the rules
need: replace a constant input (in place when nobody else reads it, otherwise as a fresh copy),
rename outputs, mark nodes for removal. ``ModelContext`` holds what is shared by every graph of
one model: the default-domain opset, the set of names used anywhere (for fresh unique names),
lazily inferred ranks, and the tensors the edits wrote (``flush_written_subnormals`` zeroes their
subnormals once the fold is done). Alongside: node labels and attributes, and walking nested graphs.

Nodes are addressed by their index in the graph's original node list; nodes are never inserted
and removed nodes are only marked until ``commit()``, so indices and the labels derived from them
(``"Conv#3"`` for an unnamed node) stay stable while rules run.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper

from bnfold.folding.tensors import (
    FlushedSubnormals,
    ScaledWeight,
    constant_node_type,
    constant_node_value,
    flush_subnormals,
    read_tensor,
    scale_in_float64,
    write_tensor,
)

DEFAULT_DOMAINS = ("", "ai.onnx")

# A "small constant subgraph" (e.g. Cast(initializer) feeding a BN scale) is evaluated only when
# its inputs are at most this many elements in total, so the pass never does real inference work.
_MAX_CONSTANT_FOLD_ELEMENTS = 1 << 20
_MAX_CONSTANT_FOLD_DEPTH = 8
_NON_DETERMINISTIC_PREFIXES = ("Random", "Multinomial", "Bernoulli")


def node_label(node: onnx.NodeProto, index: int) -> str:
    """The node's name, or a stable label like ``"Conv#3"`` (op type and index in its graph)."""
    return node.name or f"{node.op_type}#{index}"


def is_default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in DEFAULT_DOMAINS


def is_batch_norm(node: onnx.NodeProto) -> bool:
    """A standard ONNX BatchNormalization node (not a custom domain's op of the same name)."""
    return node.op_type == "BatchNormalization" and is_default_domain(node)


def node_subgraphs(node: onnx.NodeProto):
    """Yield ``(label_suffix, GraphProto)`` for every graph attribute (If/Loop/Scan bodies)."""
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == AttributeProto.GRAPHS:
            for k, g in enumerate(attr.graphs):
                yield f"{attr.name}[{k}]", g


def defined_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names |= {t.values.name for t in graph.sparse_initializer}
    for node in graph.node:
        names.update(o for o in node.output if o)
    return names


def outer_scope_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads, directly or in nested bodies, that it does not define itself."""
    defined = defined_names(graph)
    reads = set()
    for node in graph.node:
        reads.update(i for i in node.input if i)
        for _, sub in node_subgraphs(node):
            reads |= outer_scope_reads(sub)
    reads.update(o.name for o in graph.output)
    return reads - defined


def all_names(graph: onnx.GraphProto, into: set[str]) -> set[str]:
    """Every value and node name used in ``graph`` and its nested bodies."""
    into.update(i.name for i in graph.input)
    into.update(o.name for o in graph.output)
    into.update(v.name for v in graph.value_info)
    into.update(t.name for t in graph.initializer)
    for node in graph.node:
        into.update(node.input)
        into.update(node.output)
        if node.name:
            into.add(node.name)
        for _, sub in node_subgraphs(node):
            all_names(sub, into)
    into.discard("")
    return into


def iter_graphs(graph: onnx.GraphProto):
    """Yield ``graph`` and every nested body, depth first."""
    yield graph
    for node in graph.node:
        for _, sub in node_subgraphs(node):
            yield from iter_graphs(sub)


def get_attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    """Set (or, with ``value=None``, remove) attribute ``name``."""
    for k, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[k]
            break
    if value is not None:
        node.attribute.append(helper.make_attribute(name, value))


class ModelContext:
    """What every graph of one model shares: opset, used names, inferred ranks."""

    def __init__(self, model: onnx.ModelProto, payloads=None):
        self.model = model
        self.payloads = payloads  # TensorPayloads holding some initializers' data, or None
        self.ir_version = model.ir_version
        self.opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 1)
        self.names = all_names(model.graph, set())
        self._types: dict | None = None
        # Every tensor an edit wrote: (id of its graph, name) -> (graph, subnormals it holds, None
        # for a product computed only when written). Rewritten in place, a tensor keeps one entry.
        self.written: dict[tuple[int, str], tuple[onnx.GraphProto, int | None]] = {}

    def note_written(self, graph: onnx.GraphProto, name: str, subnormals: int | None) -> None:
        """Record that an edit wrote initializer ``name`` of ``graph`` (see ``written``)."""
        self.written[(id(graph), name)] = (graph, subnormals)

    def flush_written_subnormals(self) -> FlushedSubnormals:
        """Zero the subnormals of every tensor the edits wrote that is still in the model, once
        every fold is done (so a weight that a later fold scales again is flushed only as it ends
        up); tensors no edit wrote are never touched. A product still to be computed when the
        model is written (``ScaledWeight`` in the payload store) is marked to flush as it is
        computed: its count is known only then (``FlushedSubnormals.total``)."""
        flushed = FlushedSubnormals()
        initializers: dict[int, dict] = {}
        for graph, name, subnormals in [(g, n, c) for (_, n), (g, c) in self.written.items()]:
            if id(graph) not in initializers:
                initializers[id(graph)] = {t.name: t for t in graph.initializer}
            tensor = initializers[id(graph)].get(name)
            if tensor is None:  # removed since (a later fold replaced it, cleanup dropped it)
                continue
            payloads = self.payloads if graph is self.model.graph else None
            deferred = payloads.deferred(tensor) if payloads is not None else None
            if deferred is not None:
                deferred.flush = True
                flushed.deferred.append(deferred)
            elif subnormals:
                value, n = flush_subnormals(read_tensor(tensor, payloads))
                write_tensor(tensor, value, tensor.data_type, tensor.name, payloads)
                flushed.counted += n
        return flushed

    def fresh_name(self, base: str) -> str:
        """A name unused anywhere in the model (main graph and all bodies); reserved on return."""
        candidate = f"{base}_bnfold"
        k = 1
        while candidate in self.names:
            candidate = f"{base}_bnfold_{k}"
            k += 1
        self.names.add(candidate)
        return candidate

    def inferred_rank(self, name: str):
        """Rank from onnx shape inference (run once, lazily, on a copy; None when unknown)."""
        inferred = self.inferred_type(name)
        return None if inferred is None or inferred[1] is None else len(inferred[1])

    def inferred_type(self, name: str):
        """``(elem_type, dims)`` of a value from onnx shape inference (run once, lazily, on a
        copy), ``dims`` a tuple of ints (None where unknown) or None when even the rank is
        unknown; None when inference says nothing about the value."""
        if self._types is None:
            self._types = {}
            try:
                inferred = onnx.shape_inference.infer_shapes(self.model, strict_mode=False)
            except Exception:  # noqa: BLE001 - inference is optional help, never required
                return None
            for g in iter_graphs(inferred.graph):
                for vi in list(g.value_info) + list(g.input) + list(g.output):
                    described = value_info_type(vi)
                    if described is not None:
                        self._types.setdefault(vi.name, described)
        return self._types.get(name)


def value_info_type(vi: onnx.ValueInfoProto):
    """``(elem_type, dims)`` a ValueInfoProto declares for a tensor (dims: a tuple of ints, None
    for a symbolic or unknown dimension; None when no shape is declared), or None."""
    if not vi.type.HasField("tensor_type"):
        return None
    tensor_type = vi.type.tensor_type
    if not tensor_type.HasField("shape"):
        return tensor_type.elem_type, None
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in tensor_type.shape.dim)
    return tensor_type.elem_type, dims


def _value_info_rank(vi: onnx.ValueInfoProto):
    described = value_info_type(vi)
    return None if described is None or described[1] is None else len(described[1])


class GraphView:
    """Producers, consumers, constants and ranks of one graph, plus the edits rules make."""

    def __init__(self, graph: onnx.GraphProto, ctx: ModelContext, path: str = "", parent: GraphView | None = None):
        self.graph = graph
        self.ctx = ctx
        self.path = path
        self.parent = parent
        self.nodes = list(graph.node)
        self.labels = [node_label(n, i) for i, n in enumerate(self.nodes)]
        self.removed: set[int] = set()
        self.released: set[str] = set()  # constants that may have become unused (cleanup candidates)
        self.vanished: set[str] = set()  # values no node produces any more (stale value_info)
        self._subgraph_reads = [
            set().union(*(outer_scope_reads(sub) for _, sub in node_subgraphs(n))) for n in self.nodes
        ]
        self._constant_cache: dict[str, np.ndarray | None] = {}
        self.renamed_from: dict[str, str] = {}  # new output name -> the name the value had before
        # Payloads are kept apart for the main graph's initializers only (the writer streams those).
        self.payloads = ctx.payloads if parent is None else None
        self.refresh()

    # ----- structure -------------------------------------------------------------------------
    def refresh(self) -> None:
        """Recompute producers/consumers from the node list (edits below keep them up to date)."""
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        self.implicit_consumers: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(self.nodes):
            if i in self.removed:
                continue
            for o in node.output:
                if o:
                    self.producer[o] = i
            for name in node.input:
                if name:
                    self.consumers[name].append(i)
            for name in self._subgraph_reads[i]:
                self.implicit_consumers[name].append(i)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.input_names = {i.name for i in self.graph.input}
        self.output_names = {o.name for o in self.graph.output}

    def readers(self, name: str) -> list[int]:
        """Every live node that reads ``name``: directly (once per use) or from a nested body."""
        return self.consumers.get(name, []) + self.implicit_consumers.get(name, [])

    def producer_of(self, name: str):
        """Index of the live node producing ``name`` in this graph, or None."""
        return self.producer.get(name)

    def is_graph_output(self, name: str) -> bool:
        return name in self.output_names

    def describe(self, index: int) -> str:
        return f"{self.nodes[index].op_type} '{self.labels[index]}'"

    # ----- constants -------------------------------------------------------------------------
    def _overridable(self, name: str) -> bool:
        # From IR 4 on, an initializer also listed as a graph input is only a default value the
        # caller may replace at run time, so it is not a constant.
        return self.ctx.ir_version >= 4 and name in self.input_names

    def constant(self, name: str, _depth: int = 0):
        """Value of ``name`` when it is a constant (initializer, Constant node, or a small
        subgraph of constant-only deterministic nodes), else None. Outer scopes are searched too."""
        if not name:
            return None
        if name in self._constant_cache:
            return self._constant_cache[name]
        value = self._local_constant(name, _depth)
        if value is None and self.parent is not None and not self._defines(name):
            value = self.parent.constant(name, _depth)
        if name not in self.initializers:
            # Initializer arrays are not kept: holding a second copy of every weight would double
            # the memory of large models, and reading one again is cheap.
            self._constant_cache[name] = value
        return value

    def _defines(self, name: str) -> bool:
        return name in self.initializers or name in self.input_names or name in self.producer

    def _local_constant(self, name: str, depth: int):
        if name in self.initializers:
            if self._overridable(name):
                return None
            try:
                return read_tensor(self.initializers[name], self.ctx.payloads)
            except Exception:  # noqa: BLE001 - e.g. external data that was never loaded
                return None
        index = self.producer.get(name)
        if index is None:
            return None
        node = self.nodes[index]
        if not is_default_domain(node):
            return None
        if node.op_type == "Constant":
            return constant_node_value(node)
        return self._evaluate_constant_node(index, name, depth)

    def _evaluate_constant_node(self, index: int, name: str, depth: int):
        node = self.nodes[index]
        if (
            depth >= _MAX_CONSTANT_FOLD_DEPTH
            or self._subgraph_reads[index]
            or any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute)
        ):
            return None
        if node.op_type.startswith(_NON_DETERMINISTIC_PREFIXES) or not any(node.input):
            return None
        if node.op_type in ("Shape", "Size"):
            # Only the shape matters (exporters build a bias-less Conv's zero bias from
            # Shape(weight)): constant whenever the shape is static, whatever the values.
            return self._shape_node_value(index, name)
        feeds = {}
        for position, input_name in enumerate(node.input):
            if not input_name:
                continue
            value = self.constant(input_name, depth + 1)
            if value is None and node.op_type == "CastLike" and position == 1:
                # CastLike reads only the element type of its second input.
                target = self.elem_type(input_name)
                value = None if target is None else np.zeros(0, dtype=helper.tensor_dtype_to_np_dtype(target))
            if value is None:
                return None
            feeds[input_name] = value
        if sum(np.asarray(v).size for v in feeds.values()) > _MAX_CONSTANT_FOLD_ELEMENTS:
            return None
        try:
            from onnx.reference import ReferenceEvaluator

            inputs = [
                helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype), None)
                for n, v in feeds.items()
            ]
            outputs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in node.output if o]
            g = helper.make_graph([node], "constant", inputs, outputs)
            evaluator = ReferenceEvaluator(g, opsets={"": self.ctx.opset})
            # A constant that comes out NaN/Inf is judged where it is used (BN statistics, chain
            # constants, weights), like one read from an initializer: no warning here.
            with np.errstate(all="ignore"):
                results = evaluator.run(None, feeds)
        except Exception:  # noqa: BLE001 - anything the evaluator cannot do is simply not constant
            return None
        values = dict(zip([o for o in node.output if o], (np.asarray(r) for r in results)))
        self._constant_cache.update(values)
        return values.get(name)

    def _shape_node_value(self, index: int, name: str):
        node = self.nodes[index]
        shape = self.static_shape(node.input[0])
        if shape is None:
            return None
        if node.op_type == "Shape":
            # Shape-15's start/end are clamped like Python slice bounds; only the dimensions
            # kept need to be known.
            shape = shape[get_attr(node, "start", 0) : get_attr(node, "end", None)]
        if any(d is None for d in shape):
            return None
        if node.op_type == "Size":
            value = np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
        else:
            value = np.array(shape, dtype=np.int64)
        self._constant_cache[node.output[0]] = value
        return value if name == node.output[0] else None

    def static_shape(self, name: str):
        """Shape of a constant value (an initializer the caller cannot replace, or a Constant
        node; outer scopes searched) as a tuple, else None.

        Nothing else counts, although a declared or inferred shape is often right: onnxruntime
        does not enforce declared shapes inside If / Loop / Scan bodies nor in ``value_info``,
        onnx shape inference disagrees with onnxruntime on some operators (MaxPool with
        ``ceil_mode``, STFT), other runtimes let users reshape inputs, and an overridable
        initializer (IR >= 4, also a graph input) may be fed with any shape. A ``Shape`` made
        constant from such a guess is a miscompile the moment the guess is wrong."""
        view = self
        while view is not None:
            if name in view.initializers:
                if view._overridable(name):
                    return None
                return tuple(int(d) for d in view.initializers[name].dims)
            index = view.producer.get(name)
            if index is not None:
                node = view.nodes[index]
                if node.op_type == "Constant" and is_default_domain(node):
                    value = constant_node_value(node)
                    return None if value is None else tuple(value.shape)
                return None
            if name in view.input_names:
                return None
            view = view.parent
        return None

    def elem_type(self, name: str):
        """TensorProto element type of any value (constant or not) when known, else None."""
        known = self.constant_type(name)
        if known is not None:
            return known
        view = self
        while view is not None:
            for vi in list(view.graph.input) + list(view.graph.value_info) + list(view.graph.output):
                if vi.name == name and vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                    return vi.type.tensor_type.elem_type
            if view._defines(name):
                break
            view = view.parent
        inferred = self.ctx.inferred_type(name)
        return inferred[0] if inferred is not None and inferred[0] else None

    def constant_type(self, name: str):
        """TensorProto element type of a constant input, or None."""
        view = self
        while view is not None:
            if name in view.initializers:
                return view.initializers[name].data_type
            index = view.producer.get(name)
            if index is not None:
                node = view.nodes[index]
                if node.op_type == "Constant":
                    return constant_node_type(node)
                value = view.constant(name)
                if value is None:
                    return None
                return helper.np_dtype_to_tensor_dtype(value.dtype)
            view = view.parent
        return None

    # ----- ranks -----------------------------------------------------------------------------
    def rank(self, name: str):
        """Rank of a value from initializers, declared types, constants, else shape inference."""
        known = self._rank_of(name)
        for _ in range(len(self.renamed_from)):
            if known is not None or name not in self.renamed_from:
                break
            name = self.renamed_from[name]  # declarations and inference may know the name it had
            known = self._rank_of(name)
        return known

    def _rank_of(self, name: str):
        view = self
        while view is not None:
            if name in view.initializers:
                return len(view.initializers[name].dims)
            for vi in list(view.graph.value_info) + list(view.graph.input) + list(view.graph.output):
                if vi.name == name:
                    rank = _value_info_rank(vi)
                    if rank is not None:
                        return rank
            view = view.parent
        inferred = self.ctx.inferred_rank(name)
        if inferred is not None:
            return inferred
        return self._rank_from_producer(name)

    def _rank_from_producer(self, name: str):
        """The rank some ops fix whatever their input (onnx shape inference gives up on a Reshape
        whose target shape is computed): Flatten's is 2, Reshape's the length of its shape input."""
        index = self.producer.get(name)
        if index is None:
            return None
        node = self.nodes[index]
        if not is_default_domain(node):
            return None
        if node.op_type == "Flatten":
            return 2
        if node.op_type == "Reshape" and len(node.input) > 1:
            shape = self.ctx.inferred_type(node.input[1])
            if shape is not None and shape[1] is not None and len(shape[1]) == 1 and shape[1][0] is not None:
                return shape[1][0]
        return None

    # ----- edits -----------------------------------------------------------------------------
    def set_scaled_constant_input(
        self,
        index: int,
        position: int,
        weight: np.ndarray,
        factor: np.ndarray,
        data_type: int,
        base_name: str,
        shape=None,
    ) -> str:
        """``set_constant_input`` with ``weight * factor`` (``factor`` broadcasting against
        ``weight``, the product reshaped to ``shape`` if given), computed in float64 and rounded
        once to ``data_type``. When the model's big payloads are kept apart
        (``ModelContext.payloads``), the product of a float32/float64 weight is computed only as
        the model is written."""
        value = ScaledWeight.of(weight, factor, data_type) if self.payloads is not None else None
        if value is None or value.nbytes < self.payloads.threshold:
            value = scale_in_float64(weight, factor, data_type)
        if shape is not None:
            value = value.reshape(shape)
        return self.set_constant_input(index, position, value, data_type, base_name)

    def set_constant_input(self, index: int, position: int, value64: np.ndarray, data_type: int, base_name: str) -> str:
        """Make input ``position`` of node ``index`` a constant with ``value64`` cast to ``data_type``.

        The existing initializer is overwritten only when it lives in this graph, is read by
        this node alone (once, and by no nested body), is neither a graph input nor output and
        keeps its type; otherwise a fresh initializer with a unique name is created, so no other
        reader of the old tensor ever sees a change.
        """
        node = self.nodes[index]
        old = node.input[position] if position < len(node.input) else ""
        if (
            old
            and old in self.initializers
            and self.readers(old) == [index]
            and old not in self.input_names
            and old not in self.output_names
            and self.initializers[old].data_type == data_type
        ):
            dims_before = tuple(self.initializers[old].dims)
            subnormals = write_tensor(self.initializers[old], value64, data_type, old, self.payloads)
            self.ctx.note_written(self.graph, old, subnormals)
            self._constant_cache.pop(old, None)
            if tuple(self.initializers[old].dims) != dims_before:
                # A merged kernel grows (1x1 -> 3x3): a declaration of the old shape (dynamo writes
                # value_info for initializers too) would now contradict the tensor.
                for k in range(len(self.graph.value_info) - 1, -1, -1):
                    if self.graph.value_info[k].name == old:
                        del self.graph.value_info[k]
            return old
        name = self.ctx.fresh_name(base_name)
        home = self
        if self.ctx.ir_version < 4:
            # IR 3 requires every initializer to be declared as a graph input as well, which
            # an If / Loop / Scan body cannot do (its inputs are fixed by the operator): the
            # new constant lives in the main graph, and the body reads it from the outer scope.
            while home.parent is not None:
                home = home.parent
        tensor = home.graph.initializer.add()
        self.ctx.note_written(home.graph, name, write_tensor(tensor, value64, data_type, name, self.payloads))
        if self.ctx.ir_version < 4:
            home.graph.input.append(helper.make_tensor_value_info(name, data_type, list(tensor.dims)))
            home.initializers[name] = tensor
        while len(node.input) <= position:
            node.input.append("")
        if old:
            self.released.add(old)
            self.consumers[old].remove(index)
        node.input[position] = name
        self.consumers[name].append(index)
        if home is self:
            self.initializers[name] = tensor
        return name

    def truncate_inputs(self, index: int, count: int) -> None:
        """Keep only the first ``count`` inputs of node ``index`` (the rest are released)."""
        node = self.nodes[index]
        for name in node.input[count:]:
            if name:
                if self.constant(name) is not None:
                    self.released.add(name)
                self.consumers[name].remove(index)
        del node.input[count:]

    def remove_node(self, index: int) -> None:
        """Mark node ``index`` removed and drop it from the producer/reader maps."""
        node = self.nodes[index]
        self.released.update(i for i in node.input if i and self.constant(i) is not None)
        self.vanished.update(o for o in node.output if o)
        self.removed.add(index)
        for name in node.input:
            if name and index in self.consumers.get(name, ()):
                self.consumers[name].remove(index)
        for name in self._subgraph_reads[index]:
            self.implicit_consumers[name].remove(index)
        for name in node.output:
            if self.producer.get(name) == index:
                del self.producer[name]

    def rename_output(self, index: int, position: int, new_name: str) -> None:
        """Output ``position`` of node ``index`` is now called ``new_name``; it has the old value's
        shape (every rename a fold makes keeps it), so ``rank`` answers for it as for the old one."""
        node = self.nodes[index]
        old = node.output[position]
        self.renamed_from.setdefault(new_name, old)
        self.vanished.add(old)
        if self.producer.get(old) == index:
            del self.producer[old]
        node.output[position] = new_name
        self.producer[new_name] = index

    def redirect_input(self, index: int, position: int, new_name: str) -> None:
        node = self.nodes[index]
        self.consumers[node.input[position]].remove(index)
        node.input[position] = new_name
        self.consumers[new_name].append(index)

    def commit(self) -> None:
        """Delete the nodes marked removed from the underlying GraphProto (call once, last)."""
        for index in sorted(self.removed, reverse=True):
            del self.graph.node[index]
        self.removed.clear()
