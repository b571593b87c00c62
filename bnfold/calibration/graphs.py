"""Graph analysis and rewriting for calibration: which BNs to calibrate and their levels, copies of
the model pruned to the BN inputs a pass needs and exposing them as outputs, the batch-mode
rewrite (BNs normalizing by batch statistics), and writing the new statistics into the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.errors import InputError
from bnfold.folding import (
    FLOAT_TYPES,
    GraphView,
    get_attr,
    is_batch_norm,
    node_label,
    node_subgraphs,
    numpy_type,
    outer_scope_reads,
    read_tensor,
)

# Prefix of every tensor/node name the calibration graphs add (never written to the result).
NAME_PREFIX = "bnfold_calib"


@dataclass
class BNToCalibrate:
    """A BatchNormalization node of the main graph that will be calibrated."""

    index: int  # position in model.graph.node
    label: str
    x: str
    level: int = 0


def subgraph_bns(graph, path):
    """(label, graph path) of every BN inside the subgraphs of ``graph``'s nodes, recursively."""
    found = []
    for i, node in enumerate(graph.node):
        owner = node_label(node, i)
        for attr_label, sub in node_subgraphs(node):
            sub_path = f"{path}/{owner}/{attr_label}" if path else f"{owner}/{attr_label}"
            for j, inner in enumerate(sub.node):
                if is_batch_norm(inner):
                    found.append((node_label(inner, j), sub_path))
            found += subgraph_bns(sub, sub_path)
    return found


def _outer_references(node) -> set:
    """Names a node's subgraphs read from the enclosing scope (implicit inputs)."""
    refs = set()
    for _, sub in node_subgraphs(node):
        refs |= outer_scope_reads(sub)
    return refs


def _node_inputs(node) -> set:
    return {n for n in node.input if n} | _outer_references(node)


def assign_levels(model, bns: list[BNToCalibrate]) -> None:
    """level(BN) = number of calibrated BNs on the longest path from the graph inputs, itself
    included. The main graph is topologically sorted (the ONNX checker requires it)."""
    by_index = {b.index: b for b in bns}
    depth = {}
    for i, node in enumerate(model.graph.node):
        d = max((depth.get(n, 0) for n in _node_inputs(node)), default=0)
        if i in by_index:
            d += 1
            by_index[i].level = d
        for o in node.output:
            if o:
                depth[o] = d


def prune_to_outputs(model, outputs: list[str], elem_types: dict) -> None:
    """Keep only the nodes and initializers needed to compute ``outputs``; make them the outputs.
    Graph inputs are kept so every batch can be fed as is."""
    graph = model.graph
    needed = set(outputs)
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed |= _node_inputs(node)
    keep.reverse()
    kept_inits = [t for t in graph.initializer if t.name in needed]
    # IR 3 lists every initializer as a graph input too: one pruned away must not stay behind as
    # an input onnxruntime then requires a feed for.
    pruned = {t.name for t in graph.initializer} - needed
    kept_inputs = [vi for vi in graph.input if vi.name not in pruned]
    del graph.node[:]
    graph.node.extend(keep)
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    del graph.input[:]
    graph.input.extend(kept_inputs)
    known = {vi.name: vi for vi in list(graph.value_info) + list(graph.output) + list(graph.input)}
    del graph.output[:]
    for name in outputs:
        vi = onnx.ValueInfoProto()
        if name in known:
            vi.CopyFrom(known[name])
        elif name in elem_types:
            vi = helper.make_tensor_value_info(name, elem_types[name], None)
        else:
            vi.name = name
        graph.output.append(vi)


def expose_bn_inputs(model, bns: list[BNToCalibrate], elem_types: dict) -> dict:
    """Make every BN input fetchable as a graph output; returns BN label -> output name.

    A BN reading a graph input (or an initializer) directly gets an Identity in between, because a
    name cannot be both a graph input and a graph output in every runtime.
    """
    graph = model.graph
    direct = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    fetch = {}
    identities = {}
    for b in bns:
        if b.x in direct:
            if b.x not in identities:
                out = f"{NAME_PREFIX}/input_copy/{len(identities)}"
                graph.node.insert(0, helper.make_node("Identity", [b.x], [out], name=out))
                identities[b.x] = out
                if b.x in elem_types:
                    elem_types[out] = elem_types[b.x]
                for bb in bns:
                    bb.index += 1
            fetch[b.label] = identities[b.x]
        else:
            fetch[b.label] = b.x
    return fetch


def value_types(model) -> tuple[dict, dict]:
    """(name -> ONNX element type, name -> static shape) for every tensor shape inference can
    type (best effort). A shape is a tuple of ints, None for a dimension that is not a number."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - shape inference fails in many ways; try without data propagation
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # noqa: BLE001 - no shapes then: the declared ones are used
            inferred = model
    types, shapes = {}, {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.elem_type:
            types[vi.name] = tt.elem_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    for t in g.initializer:
        types[t.name] = t.data_type
        shapes[t.name] = tuple(t.dims)
    return types, shapes


def static_shape(shapes: dict, name: str):
    """``shapes[name]`` (from ``value_types``) when every dimension of it is a number, else None."""
    shape = shapes.get(name)
    return shape if shape is not None and all(d is not None for d in shape) else None


def rewrite_batch_mode(model, bns: list[BNToCalibrate], elem_types: dict, opset: int) -> None:
    """Replace every BN in ``bns`` with explicit batch-statistics normalization, in place.

    x (N, C, ...) -> reshape (N, C, S) -> mean/biased var over axes (0, 2) -> (x - mean) /
    sqrt(var + eps) * scale + bias (the per-channel factor scale / sqrt(var + eps) computed first)
    -> reshape back. Reshape keeps it rank-agnostic.
    """
    graph = model.graph
    p = NAME_PREFIX
    consts = [
        numpy_helper.from_array(np.array([0, 0, -1], np.int64), f"{p}/shape_ncs"),
        numpy_helper.from_array(np.array([1, -1, 1], np.int64), f"{p}/shape_1c1"),
    ]
    if opset >= 18:
        consts.append(numpy_helper.from_array(np.array([0, 2], np.int64), f"{p}/axes_0_2"))
    graph.initializer.extend(consts)

    def reduce_mean(inp, out, name):
        if opset >= 18:
            return helper.make_node("ReduceMean", [inp, f"{p}/axes_0_2"], [out], name=name, keepdims=1)
        return helper.make_node("ReduceMean", [inp], [out], name=name, axes=[0, 2], keepdims=1)

    by_index = {b.index: b for b in bns}
    new_nodes = []
    for i, node in enumerate(graph.node):
        if i not in by_index:
            new_nodes.append(node)
            continue
        b = by_index[i]
        q = f"{p}/{i}"
        x, scale, bias = node.input[0], node.input[1], node.input[2]
        x_type = elem_types.get(x) or elem_types.get(scale) or onnx.TensorProto.FLOAT
        eps = float(get_attr(node, "epsilon", 1e-5))
        graph.initializer.append(
            numpy_helper.from_array(np.array(eps, dtype=helper.tensor_dtype_to_np_dtype(x_type)), f"{q}/eps")
        )
        ops = [
            helper.make_node("Reshape", [x, f"{p}/shape_ncs"], [f"{q}/x3"], name=f"{q}/x3"),
            reduce_mean(f"{q}/x3", f"{q}/mean", f"{q}/mean"),
            helper.make_node("Sub", [f"{q}/x3", f"{q}/mean"], [f"{q}/centered"], name=f"{q}/centered"),
            helper.make_node("Mul", [f"{q}/centered", f"{q}/centered"], [f"{q}/sq"], name=f"{q}/sq"),
            reduce_mean(f"{q}/sq", f"{q}/var", f"{q}/var"),
            helper.make_node("Add", [f"{q}/var", f"{q}/eps"], [f"{q}/var_eps"], name=f"{q}/var_eps"),
            helper.make_node("Sqrt", [f"{q}/var_eps"], [f"{q}/std"], name=f"{q}/std"),
        ]
        for role, name in (("scale", scale), ("bias", bias)):
            src = name
            if elem_types.get(name, x_type) != x_type:
                src = f"{q}/{role}_cast"
                ops.append(helper.make_node("Cast", [name], [src], name=src, to=x_type))
            ops.append(
                helper.make_node("Reshape", [src, f"{p}/shape_1c1"], [f"{q}/{role}_1c1"], name=f"{q}/{role}_1c1")
            )
        # scale / std is per channel: one full-size Mul instead of a Div and a Mul.
        ops += [
            helper.make_node("Div", [f"{q}/scale_1c1", f"{q}/std"], [f"{q}/gain"], name=f"{q}/gain"),
            helper.make_node("Mul", [f"{q}/centered", f"{q}/gain"], [f"{q}/scaled"], name=f"{q}/scaled"),
            helper.make_node("Add", [f"{q}/scaled", f"{q}/bias_1c1"], [f"{q}/y3"], name=f"{q}/y3"),
            helper.make_node("Shape", [x], [f"{q}/x_shape"], name=f"{q}/x_shape"),
            helper.make_node("Reshape", [f"{q}/y3", f"{q}/x_shape"], [node.output[0]], name=f"{q}/y"),
        ]
        new_nodes += ops
        b.index = -1  # node no longer exists in this graph copy
    del graph.node[:]
    graph.node.extend(new_nodes)


def write_statistics(
    view: GraphView, bn_index: int, label: str, mean: np.ndarray, var: np.ndarray, elem_types: dict
) -> None:
    """Set the BN's running mean/var with ``GraphView.set_constant_input``: an initializer only
    this BN reads is overwritten in place (name and dtype kept); otherwise -- a tensor another node
    also reads, the output of an Identity / Cast / Constant node or of a constant subgraph, a graph
    input -- that value is left as it is and the BN gets a fresh initializer, so nothing else in the
    model changes. The tensors it no longer reads are in ``view.released`` for ``remove_unused``."""
    node = view.nodes[bn_index]
    for slot, values, role in ((3, mean, "running_mean"), (4, var, "running_var")):
        name = node.input[slot]
        # The type the BN reads: the initializer's, a Cast's target type, the declared input type.
        data_type = view.constant_type(name) or elem_types.get(name, onnx.TensorProto.FLOAT)
        if data_type not in FLOAT_TYPES:
            raise InputError(f"BN '{label}': {role} '{name}' is not a float tensor; nothing written")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, by BN
            stored = np.asarray(values, dtype=np.float64).astype(numpy_type(data_type))
        if not np.isfinite(stored.astype(np.float64)).all():
            problem = (
                "is non-finite (NaN/Inf)"
                if not np.isfinite(values).all()
                else f"exceeds the {FLOAT_TYPES[data_type]} range of the tensor it replaces"
            )
            raise InputError(f"BN '{label}': the calibrated {role} {problem}; nothing written")
        view.set_constant_input(bn_index, slot, stored, data_type, f"{label}.{role}")


def initial_statistics(view: GraphView, node):
    """Current running mean/var of a BN (float64, flat) for the report; None where not constant.

    Read as the fold pass reads BN parameters (``GraphView.constant``: initializers, Constant
    nodes, Identity / Cast / small constant subgraphs). An initializer that is also a graph input
    (IR >= 4) is only a default the caller may override, so GraphView does not call it constant;
    its stored value is still what the model computes with, so the report shows it."""
    out = []
    for name in node.input[3:5]:
        value = view.constant(name)
        if value is None and name in view.initializers:
            value = read_tensor(view.initializers[name])
        out.append(None if value is None else np.asarray(value, dtype=np.float64).reshape(-1))
    return out
