"""Helpers shared by the fold-pass tests: load tools/make_models.py, run a model, compare outputs.

Models run in onnxruntime with graph optimizations DISABLED (so onnxruntime's own BN fusion cannot
hide a broken fold). Models onnxruntime cannot run on CPU (double Conv, bfloat16, BatchNormalization
opsets 1/6) run in onnx.reference.ReferenceEvaluator instead, and opset-1 BN, which neither
implements, runs after onnx's version converter lifted the model to opset 9.
"""

from __future__ import annotations

import collections
import importlib.util
import os

import numpy as np
import onnx
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ort.set_default_logger_severity(3)


def load_make_models():
    spec = importlib.util.spec_from_file_location("bnfold_make_models", os.path.join(ROOT, "tools", "make_models.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MM = load_make_models()


class NotRunnable(Exception):
    """No engine available here can execute the model."""


def _run_ort(model, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _run_reference(model, feeds):
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, feeds)


def _run_converted(model, feeds):
    from onnx import version_converter

    return _run_ort(version_converter.convert_version(model, 9), feeds)


def run_model(model, feeds):
    """(outputs, engine name). Raises NotRunnable when no engine can run it."""
    errors = []
    for engine, fn in (("onnxruntime", _run_ort), ("reference", _run_reference), ("converted", _run_converted)):
        try:
            return [np.asarray(o) for o in fn(model, feeds)], engine
        except Exception as e:  # noqa: BLE001 - each engine refuses in its own way; try the next
            errors.append(f"{engine}: {type(e).__name__}: {str(e)[:200]}")
    raise NotRunnable("; ".join(errors))


def tolerance(dtype) -> float:
    """Relative tolerance for one output dtype (float32: the 1e-5 the issue asks for)."""
    name = np.dtype(dtype).name
    return {"float64": 1e-10, "float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}.get(name, 0.0)


def assert_close(reference, candidate, label=""):
    """Elementwise |c - r| <= rtol * |r| + rtol * max|r|: relative to each value and to the output's
    scale, so values that are (near) zero in a large output don't demand impossible precision."""
    assert len(reference) == len(candidate), f"{label}: {len(reference)} vs {len(candidate)} outputs"
    for i, (r, c) in enumerate(zip(reference, candidate)):
        assert r.shape == c.shape, f"{label} output {i}: shape {c.shape} != {r.shape}"
        assert r.dtype == c.dtype, f"{label} output {i}: dtype {c.dtype} != {r.dtype}"
        rtol = tolerance(r.dtype)
        r64, c64 = r.astype(np.float64), c.astype(np.float64)
        assert np.array_equal(np.isnan(r64), np.isnan(c64)), f"{label} output {i}: NaNs differ"
        r64, c64 = np.nan_to_num(r64, nan=0.0), np.nan_to_num(c64, nan=0.0)
        scale = float(np.max(np.abs(r64))) if r64.size else 0.0
        err = np.abs(c64 - r64)
        bound = rtol * np.abs(r64) + rtol * scale
        worst = float(np.max(err - bound)) if err.size else 0.0
        assert worst <= 0.0, (
            f"{label} output {i} ({r.dtype}): max abs error {float(err.max()):.3g} exceeds "
            f"{rtol:g} relative (output scale {scale:.3g})"
        )


def assert_parity(original, folded, feeds_list, label=""):
    """Both models give the same outputs on every feed; returns the engine used for the original."""
    engine = None
    for i, feeds in enumerate(feeds_list):
        ref, engine = run_model(original, feeds)
        out, _ = run_model(folded, feeds)
        assert_close(ref, out, f"{label} feed {i}")
    return engine


def iter_graphs(graph, path=""):
    """(path, graph) for the graph and every subgraph below it, paths like FoldReport's."""
    yield path, graph
    for i, node in enumerate(graph.node):
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                holder = node.name or f"{node.op_type}#{i}"
                sub_path = f"{path}/{holder}/{attr.name}" if path else f"{holder}/{attr.name}"
                yield from iter_graphs(sub, sub_path)


def op_counts(model) -> collections.Counter:
    return collections.Counter(n.op_type for _, g in iter_graphs(model.graph) for n in g.node)


def count_bn(model) -> int:
    return op_counts(model)["BatchNormalization"]


def signature(model):
    """What folding must keep: IR version, opsets, graph inputs/outputs (names and types).

    Before IR 4 every initializer had to be listed as a graph input too; those entries are weights,
    not the model's interface (folding replaces them), so they are left out there."""
    weights = {t.name for t in model.graph.initializer} if model.ir_version < 4 else set()
    return (
        model.ir_version,
        sorted((o.domain, o.version) for o in model.opset_import),
        [(v.name, v.type.SerializeToString()) for v in model.graph.input if v.name not in weights],
        [(v.name, v.type.SerializeToString()) for v in model.graph.output],
    )


def constant_value(graph, name):
    """numpy value of an initializer or Constant-node output of ``graph`` (None if neither)."""
    from onnx import numpy_helper

    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
    return None


def report_entries(report):
    """[(bn, graph, 'fold'|'remain', rule_or_reason, message)] for every BN in a FoldReport."""
    rows = [(f.bn, f.graph, "fold", f.rule, "") for f in report.folded if f.kind == "BatchNormalization"]
    rows += [(r.bn, r.graph, "remain", r.reason, r.message) for r in report.remaining if r.kind == "BatchNormalization"]
    return rows
