"""Intermediate values for the parity check: which values two models both compute, and how to
make onnxruntime hand them out.

``bnfold.verify.parity.check(..., intermediates=True)`` compares not only the graph outputs but every
float tensor value that a node of the main graph produces in *both* models under the same name.
For a model and bnfold's own fold of it, one name means one quantity in both: the fold pass
never gives a name a new meaning (a folded layer's output takes the name of the BN's output,
which it now computes; the BN's input and the chain values between layer and BN vanish; a BN
folded forward vanishes and its reader reads the BN's input; weights change, but weights are
initializers and are not compared). So each intermediate checks one layer directly, whatever
the head of the network does to an error (a softmax over 1000 classes shrinks it below the
output tolerance, a saturated sigmoid erases it).

What is selected (``select``), in the reference's node order:

* produced by a node of the main graph in both models, with a non-empty name, not a graph
  input, initializer or graph output of either model;
* a float tensor (float32, float64, float16: what onnxruntime can hand to numpy) of the same
  element type in both, the type taken from the models' ``value_info`` or from onnx shape
  inference;
* dependent on a graph input: values computed from constants only (weights behind Identity,
  Cast, ``Shape`` of a weight, ...) are parameters, which a fold is meant to change, not
  activations; values downstream of a random op (RandomNormal, Bernoulli, ...) are skipped
  because two runs of the same model differ there.

Exposure (``exposure_suffix``): a serialized ``ModelProto`` holding only ``graph.output``
entries for the selected names. Protobuf parses a concatenation of two messages as their merge
(repeated fields appended), so ``model bytes + suffix`` is the model with those values as extra
graph outputs, made without parsing or copying the model in protobuf; the files on disk are
never touched.

Memory (``estimate_bytes``): onnxruntime keeps every graph output of a run alive until the run
ends, so exposing all values costs the sum of the activations instead of the largest live set.
The check estimates that sum from shape inference on the concrete input shapes before any run
and measures it after the first; beyond ``MAX_BYTES`` (or ``MAX_VALUES`` values) it compares the
outputs only and says so.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
from onnx import TensorProto

from bnfold.folding import iter_graphs, node_label, outer_scope_reads, value_info_type

# More values than this: outputs only (the report says so). Real CNNs have 100-2000.
MAX_VALUES = 5000
# Bytes of intermediate values held at once, (samples + 1) x one sample's values: the reference's
# values of every sample plus one run of the candidate or the noise run.
MAX_BYTES = 2 << 30

# Element types compared (onnxruntime hands these to numpy; bfloat16 it cannot).
COMPARED_TYPES = {TensorProto.FLOAT: "float32", TensorProto.DOUBLE: "float64", TensorProto.FLOAT16: "float16"}

_RANDOM_OP_PREFIXES = ("Random", "Multinomial", "Bernoulli")
# Initializers at least this large are replaced by typed stubs in the copy given to shape
# inference (it needs their type and dims, and the values of small shape-like tensors only).
_STUB_ABOVE_BYTES = 1 << 16
_STUB_LOCATION = "bnfold-structure-only"


@dataclasses.dataclass(frozen=True)
class Intermediate:
    """One value compared as if it were an output."""

    name: str
    dtype: str  # "float32", "float64" or "float16"
    producer: str  # the candidate's node that produces it, e.g. "Conv 'conv3'"
    reference_producer: str  # the reference's node (differs where a layer took over a BN's output)
    order: int  # position in the reference's node order (the first failing one is the culprit)


@dataclasses.dataclass
class Selection:
    """``values`` to compare, or none and ``note`` saying why."""

    values: list
    candidates: int = 0  # values both models produce (before the type / input-dependence filters)
    note: str = ""


def structure_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference: everything but the main graph's large
    initializers, which become typed stubs without data (marked as external data, so no tool
    mistakes them for empty tensors). Cheap on a 100 MB model: the weights are not copied."""
    copy = onnx.ModelProto()
    _copy_fields(model, copy, skip="graph")
    _copy_fields(model.graph, copy.graph, skip="initializer")
    for tensor in model.graph.initializer:
        if tensor.ByteSize() < _STUB_ABOVE_BYTES:
            copy.graph.initializer.add().CopyFrom(tensor)
            continue
        stub = copy.graph.initializer.add()
        stub.name = tensor.name
        stub.data_type = tensor.data_type
        stub.dims.extend(tensor.dims)
        stub.data_location = TensorProto.EXTERNAL
        entry = stub.external_data.add()
        entry.key, entry.value = "location", _STUB_LOCATION
    return copy


def _copy_fields(source, target, skip: str) -> None:
    for field in source.DESCRIPTOR.fields:
        if field.name == skip:
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            values = getattr(source, field.name)
            if len(values):
                getattr(target, field.name).extend(values)
        elif source.HasField(field.name):
            if field.message_type is not None:
                getattr(target, field.name).CopyFrom(getattr(source, field.name))
            else:
                setattr(target, field.name, getattr(source, field.name))


def value_types(structure: onnx.ModelProto, input_shapes=None) -> dict:
    """``{name: (elem_type, dims)}`` of the main graph's values from ``value_info`` and onnx shape
    inference (dims: a tuple of ints, None where unknown; None when the rank is unknown).
    ``input_shapes`` ({input: concrete shape}) are set on ``structure`` (a ``structure_only``
    copy, edited in place) first, so that inference can give concrete sizes."""
    graph = structure.graph
    if input_shapes:
        for vi in graph.input:
            shape = input_shapes.get(vi.name)
            if shape is None or not vi.type.HasField("tensor_type"):
                continue
            dims = vi.type.tensor_type.shape
            dims.ClearField("dim")
            for d in shape:
                dims.dim.add().dim_value = int(d)
    described = {}
    for vi in list(graph.value_info) + list(graph.output):
        entry = _value_info_entry(vi)
        if entry is not None:
            described[vi.name] = entry
    try:
        inferred = onnx.shape_inference.infer_shapes(structure, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference only adds information; declared types still count
        return described
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        entry = _value_info_entry(vi)
        if entry is None:
            continue
        old = described.get(vi.name)
        # Inference may know more dims than a declaration (concrete inputs); never a different type.
        if old is None or (old[0] == entry[0] and _known(entry[1]) > _known(old[1])):
            described[vi.name] = entry
    return described


def _value_info_entry(vi):
    """``(elem_type, dims)`` of a declaration that names a tensor type, else None."""
    entry = value_info_type(vi)
    return entry if entry is not None and entry[0] else None


def _known(dims) -> int:
    return -1 if dims is None else sum(d is not None for d in dims)


def input_dependent(graph: onnx.GraphProto) -> set:
    """Names of the main graph's node outputs that depend on a graph input (an input that is not
    an initializer) and on no random op. Nodes are in topological order (ONNX requires it)."""
    initializers = {t.name for t in graph.initializer}
    dynamic = {i.name for i in graph.input if i.name not in initializers}
    random_values = set()
    for node in graph.node:
        bodies = [
            sub
            for attr in node.attribute
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs)
        ]
        reads = {i for i in node.input if i}
        for body in bodies:
            reads |= outer_scope_reads(body)
        random_op = node.op_type.startswith(_RANDOM_OP_PREFIXES) or any(
            n.op_type.startswith(_RANDOM_OP_PREFIXES) for body in bodies for g in iter_graphs(body) for n in g.node
        )
        outputs = [o for o in node.output if o]
        if random_op or reads & random_values:
            random_values.update(outputs)
        elif reads & dynamic:
            dynamic.update(outputs)
    return dynamic - random_values - {i.name for i in graph.input}


def _producers(graph: onnx.GraphProto) -> dict:
    """``{value: (node index, "Op 'label'")}``; a name produced twice (invalid) is left out."""
    producers, twice = {}, set()
    for index, node in enumerate(graph.node):
        for name in node.output:
            if not name:
                continue
            if name in producers:
                twice.add(name)
            producers[name] = (index, f"{node.op_type} '{node_label(node, index)}'")
    for name in twice:
        del producers[name]
    return producers


def select(reference: onnx.ModelProto, candidate: onnx.ModelProto, *, max_values: int | None = None) -> Selection:
    """The values to compare (see the module docstring), or an empty selection with a note.
    ``reference`` / ``candidate`` are the loaded models (weights may be absent: only the
    structure is read)."""
    limit = MAX_VALUES if max_values is None else max_values
    ref_graph, cand_graph = reference.graph, candidate.graph
    ref_producers, cand_producers = _producers(ref_graph), _producers(cand_graph)
    excluded = set()
    for graph in (ref_graph, cand_graph):
        excluded.update(i.name for i in graph.input)
        excluded.update(t.name for t in graph.initializer)
        excluded.update(o.name for o in graph.output)
    shared = [name for name in ref_producers if name in cand_producers and name not in excluded]
    if not shared:
        return Selection([], 0, "the models share no value names besides their inputs and outputs")
    dependent = input_dependent(ref_graph) & input_dependent(cand_graph)
    shared_dynamic = [name for name in shared if name in dependent]
    if not shared_dynamic:
        return Selection([], len(shared), "no value the models share depends on their inputs")
    ref_types = value_types(structure_only(reference))
    cand_types = value_types(structure_only(candidate))
    values = []
    for name in shared_dynamic:
        ref_type, cand_type = ref_types.get(name), cand_types.get(name)
        if ref_type is None or cand_type is None or ref_type[0] != cand_type[0] or ref_type[0] not in COMPARED_TYPES:
            continue
        order, ref_label = ref_producers[name]
        values.append(Intermediate(name, COMPARED_TYPES[ref_type[0]], cand_producers[name][1], ref_label, order))
    values.sort(key=lambda v: v.order)
    if len(values) > limit:
        return Selection(
            [],
            len(shared),
            f"{len(values)} intermediate values, more than the {limit} compared at most (memory); outputs only",
        )
    if not values:
        return Selection([], len(shared), "no shared value is a float tensor of the same type in both models")
    return Selection(values, len(shared))


def exposure_suffix(values) -> bytes:
    """Bytes that, appended to a serialized ModelProto, make each of ``values`` a graph output
    (see the module docstring). Only the element type is declared: onnxruntime infers shapes."""
    shell = onnx.ModelProto()
    for value in values:
        output = shell.graph.output.add()
        output.name = value.name
        output.type.tensor_type.elem_type = next(k for k, v in COMPARED_TYPES.items() if v == value.dtype)
    return shell.SerializeToString()


def estimate_bytes(reference: onnx.ModelProto, values, input_shapes: dict) -> tuple:
    """``(bytes, unknown)``: the size of one sample's ``values`` from shape inference on
    ``input_shapes``, and how many values inference could not size (counted as 0)."""
    types = value_types(structure_only(reference), input_shapes)
    total, unknown = 0, 0
    for value in values:
        dims = (types.get(value.name) or (None, None))[1]
        if dims is None or any(d is None for d in dims):
            unknown += 1
            continue
        # Python ints: an int64 product of huge inferred dims would wrap around, possibly to a
        # small or negative size, and let the check expose values it cannot hold.
        total += math.prod(int(d) for d in dims) * np.dtype(value.dtype).itemsize
    return total, unknown
