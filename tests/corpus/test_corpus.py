"""bnfold on every model of the real-world corpus (tools/build_corpus.py), as a user runs it.

For each model: ``bnfold inspect`` succeeds; ``bnfold fold`` succeeds (its own parity check passes)
and the output passes the full ONNX checker, matches the original in onnxruntime within the
original's own float noise (judged here, independently of bnfold's check), and runs in OpenVINO
with the same outputs; a fold made wrong on purpose (one folded layer's weights scaled by 1.01)
fails the check; ``bnfold calibrate`` succeeds with default options, in batch mode on every model
and in sequential mode on one export of each architecture (the one with the most BNs). An exit
code other than the expected one is a failure, whatever its cause: these are files users have.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from bnfold.cli.app import main as bnfold_main

ort.set_default_logger_severity(3)

FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}
# Relative tolerance of a comparison, by the lowest precision the model computes in; the original
# model's own spread between onnxruntime's optimization levels widens it (deep float32 networks
# differ by more than 1e-4 from reordered arithmetic alone).
BASE_RTOL = {"float32": 1e-4, "float16": 1e-2}
NOISE_FACTOR = 4.0
CALIBRATION_SAMPLES = 8
# Sequential mode runs the model once per BN level on every sample: half the samples keep its share
# of CI near batch mode's. (Two were too few: a float16 LeViT calibrated on two random samples got a
# channel of ~0 variance and overflowed.)
SEQUENTIAL_CALIBRATION_SAMPLES = 4
# ... or fewer (at least 2) where 8 would exceed this many input values: a video model's
# 1x3x16x224x224 input takes 8 x 2.4 M values, and sequential mode runs one pass per BN level.
CALIBRATION_VALUES = 4_000_000

_fold_results: dict = {}


def run_cli(*args) -> tuple[int, str]:
    """Run ``bnfold ARGS`` in-process; (exit code, stdout + stderr)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), warnings.catch_warnings():
        code = bnfold_main([str(a) for a in args])
    return code, out.getvalue()


def model_path(corpus_dir, entry) -> str:
    return os.path.join(corpus_dir, entry["path"])


def precision(entry) -> str:
    return "float32" if entry.get("float16", "none") == "none" else "float16"


def session(path_or_bytes, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 2
    return ort.InferenceSession(path_or_bytes, options, providers=["CPUExecutionProvider"])


def concrete_shape(shape, batch: int, example=None):
    """A shape for an input declared as ``shape``: its fixed dimensions, else the corpus entry's
    example (models shipped with dynamic sizes that only some values suit), else ``batch`` for
    the first dimension and 64 (a small image) for others."""
    dims = []
    for k, d in enumerate(shape):
        if isinstance(d, int) and d > 0:
            dims.append(d)
        elif example is not None:
            dims.append(int(example[k]) if k else batch)
        else:
            dims.append(batch if k == 0 else 64)
    return dims


def has_symbolic_sizes(entry) -> bool:
    """Whether some input has a symbolic dimension other than the batch."""
    return any(not isinstance(d, int) for dims in entry["inputs"].values() for d in dims[1:])


def shape_options(entry) -> list:
    """``--shape`` options a user gives for inputs with symbolic sizes (the entry's example)."""
    examples = entry.get("example_inputs") or {}
    if not has_symbolic_sizes(entry) or not examples:
        return []
    options = []
    for name, dims in examples.items():
        options += ["--shape", f"{name}:" + "x".join(str(int(d)) for d in dims)]
    return options


def synthesize_feeds(sess, entry, seed=0, batch=1) -> dict:
    rng = np.random.default_rng(seed)
    examples = entry.get("example_inputs") or {}
    feeds = {}
    for spec in sess.get_inputs():
        dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}.get(
            spec.type
        )
        assert dtype is not None, f"input {spec.name} has type {spec.type}; the corpus test synthesizes floats only"
        shape = concrete_shape(spec.shape, batch, examples.get(spec.name))
        feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run(sess, feeds) -> list:
    return [np.asarray(o, dtype=np.float64) for o in sess.run(None, feeds)]


def max_error(a: list, b: list) -> float:
    return max(float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(a, b))


def scale_of(outputs: list) -> float:
    return max(1.0, max(float(np.max(np.abs(o))) if o.size else 0.0 for o in outputs))


def own_noise(path, feeds, reference) -> float:
    """How far the original model's own outputs move between onnxruntime's optimization levels."""
    optimized = run(session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL), feeds)
    return max_error(reference, optimized)


def tolerance(entry, outputs, noise) -> float:
    return max(BASE_RTOL[precision(entry)] * scale_of(outputs), NOISE_FACTOR * noise)


def folded(corpus_dir, entry, tmp_path_factory):
    """``(exit code, output text, folded path)`` of ``bnfold fold`` on the model, run once per session."""
    name = entry["name"]
    if name not in _fold_results:
        out_dir = tmp_path_factory.mktemp("folded")
        out = str(out_dir / (os.path.basename(entry["path"])))
        code, text = run_cli(
            "fold", model_path(corpus_dir, entry), "-o", out, "--report", out + ".report.json", *shape_options(entry)
        )
        _fold_results[name] = (code, text, out)
    return _fold_results[name]


def test_inspect(corpus_dir, corpus_entry):
    code, text = run_cli("inspect", model_path(corpus_dir, corpus_entry))
    assert code == 0, text
    assert "BatchNormalization node(s)" in text or "no BatchNormalization" in text, text


def upcast_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 twin of a float16 model (weights, constants, Cast targets and declared types
    widened; every float16 value is exact in float32): what the model means, free of float16
    rounding, to judge a float16 fold's error against the original's own."""
    from bnfold.folding.view import iter_graphs

    twin = onnx.ModelProto()
    twin.CopyFrom(model)

    def widen(tensor):
        if tensor.data_type == TensorProto.FLOAT16:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))

    for graph in iter_graphs(twin.graph):
        for tensor in graph.initializer:
            widen(tensor)
        for info in list(graph.input) + list(graph.output) + list(graph.value_info):
            if info.type.tensor_type.elem_type == TensorProto.FLOAT16:
                info.type.tensor_type.elem_type = TensorProto.FLOAT
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.name == "to" and attribute.i == TensorProto.FLOAT16:
                    attribute.i = TensorProto.FLOAT
                if attribute.type == onnx.AttributeProto.TENSOR:
                    widen(attribute.t)
    return twin


def run_openvino(path, feeds) -> list:
    import openvino as ov

    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    names = list(feeds)
    ordered = []
    for k, port in enumerate(compiled.inputs):
        match = [n for n in names if n in port.get_names()]
        ordered.append(feeds[match[0]] if match else feeds[names[k]])
    results = compiled(ordered)
    return [np.asarray(results[port], dtype=np.float64) for port in compiled.outputs]


def test_fold_is_exact_valid_and_portable(corpus_dir, corpus_entry, tmp_path_factory):
    """float32: the fold matches the original within the original's own spread between
    onnxruntime's optimization levels, and OpenVINO matches onnxruntime alike. float16: judged
    against the model's float32 twin, the fold (in onnxruntime and in OpenVINO) may be off by
    at most twice what the original itself is off by (its float16 arithmetic, in onnxruntime at
    both levels and in OpenVINO) or twice what one more float16 rounding of its weights costs
    (compare_corpus's ``rounded_once_more``: the rounding no float16 fold can avoid), or 1 % of
    the outputs."""
    source = model_path(corpus_dir, corpus_entry)
    code, text, out = folded(corpus_dir, corpus_entry, tmp_path_factory)
    assert code == 0, text
    onnx.checker.check_model(out, full_check=True)

    original = session(source)
    feeds = synthesize_feeds(original, corpus_entry, seed=1)
    reference = run(original, feeds)
    candidate = run(session(out), feeds)
    by_openvino = run_openvino(out, feeds)
    assert [o.shape for o in by_openvino] == [o.shape for o in candidate]
    if precision(corpus_entry) == "float32":
        noise = own_noise(source, feeds, reference)
        error = max_error(reference, candidate)
        assert error <= tolerance(corpus_entry, reference, noise), (
            f"folded model differs by {error:.3g} (original's own noise {noise:.3g}, scale {scale_of(reference):.3g})"
        )
        error = max_error(candidate, by_openvino)
        assert error <= tolerance(corpus_entry, candidate, noise), f"OpenVINO differs from onnxruntime by {error:.3g}"
        return
    original_model = onnx.load(source)
    wide_feeds = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in feeds.items()}
    truth = run(session(upcast_float16(original_model).SerializeToString()), wide_feeds)
    deployed = run(session(source, ort.GraphOptimizationLevel.ORT_ENABLE_ALL), feeds)
    own_error = max(max_error(truth, outputs) for outputs in (reference, deployed, run_openvino(source, feeds)))
    rounding = run(
        session(upcast_float16(_compare_tool().rounded_once_more(original_model)).SerializeToString()), wide_feeds
    )
    rounding_error = max_error(truth, rounding)
    allowed = max(BASE_RTOL["float16"] * scale_of(truth), 2 * own_error, 2 * rounding_error)
    for label, outputs in (("onnxruntime", candidate), ("OpenVINO", by_openvino)):
        error = max_error(truth, outputs)
        assert error <= allowed, (
            f"folded model in {label} is off by {error:.3g} from the float32 twin; the original "
            f"is off by {own_error:.3g}, one more float16 rounding of its weights moves it by "
            f"{rounding_error:.3g} (allowed {allowed:.3g})"
        )


def test_wrong_fold_fails_the_check(corpus_dir, corpus_entry, tmp_path_factory):
    """The folded model with one folded layer's weights scaled by 1.01 (1.05 for float16), as a
    wrong fold would leave them, fails the check ``bnfold fold`` runs (outputs and the
    intermediate values both models share, the wrong layer's own output among them). The first
    layer a BN was folded into is taken (the first Conv/Gemm/MatMul when the exporter left no BN
    to fold): there the model's own float noise is smallest, whereas deep in a float16 network
    (or where an untrained network's activations have faded away) it can exceed 1 %."""
    source = model_path(corpus_dir, corpus_entry)
    code, text, out = folded(corpus_dir, corpus_entry, tmp_path_factory)
    assert code == 0, text
    model = onnx.load(out)
    initializers = {t.name: t for t in model.graph.initializer}
    with open(out + ".report.json") as f:
        targets = {entry["target"] for entry in json.load(f)["folded"] if not entry["graph"]}
    layers = [
        n
        for n in model.graph.node
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
        and len(n.input) > 1
        and n.input[1] in initializers
        and initializers[n.input[1]].data_type in FLOAT_TYPES
    ]
    assert layers, "no constant Conv/Gemm/MatMul weight to perturb"
    folded_layers = [n for n in layers if n.name in targets]
    target = initializers[(folded_layers or layers)[0].input[1]]
    factor = 1.01 if precision(corpus_entry) == "float32" else 1.05
    value = numpy_helper.to_array(target).astype(np.float64) * factor
    target.CopyFrom(numpy_helper.from_array(value.astype(FLOAT_TYPES[target.data_type]), target.name))
    wrong = str(tmp_path_factory.mktemp("wrong") / "wrong.onnx")
    onnx.save(model, wrong, save_as_external_data=bool(corpus_entry.get("external_data", False)))
    code, text = run_cli("check", "--intermediates", source, wrong, *shape_options(corpus_entry))
    assert code == 1, f"{target.name} scaled by {factor} was not caught:\n{text}"


def _compare_tool():
    """tools/compare_corpus.py (loaded by path): its counting and its way of running each tool."""
    import importlib.util
    import sys

    name = "bnfold_compare_corpus"
    if name not in sys.modules:
        path = os.path.join(
            os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools", "compare_corpus.py"
        )
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.parametrize("tool", ["ort-basic", "onnxoptimizer"])
def test_bnfold_leaves_no_more_bns_than_another_tool(corpus_dir, corpus_entry, tool, tmp_path_factory):
    """The quick part of tools/compare_corpus.py, in every run: onnxruntime's portable offline
    optimizer and onnxoptimizer (with fuse_bn_into_conv) on the same file never leave fewer
    BatchNormalization nodes than bnfold fold, nor, on a model whose BNs were exported as
    per-channel Mul/Add chains, fewer of those (the full comparison, with onnxslim, onnxsim,
    onnxscript and AIMET and every output verified, is the tool's; docs/corpus.md)."""
    compare = _compare_tool()
    code, text, out = folded(corpus_dir, corpus_entry, tmp_path_factory)
    assert code == 0, text
    ours = compare.count_nodes(onnx.load(out, load_external_data=False))
    source = model_path(corpus_dir, corpus_entry)
    theirs = other_tool_counts(compare, corpus_dir, source, tool, tmp_path_factory)
    assert ours["bn"] <= theirs["bn"], f"bnfold leaves {ours['bn']} BatchNormalization nodes, {tool} {theirs['bn']}"
    original = compare.count_nodes(onnx.load(source, load_external_data=False))
    if original["bn"] == 0 and original["chains"]:
        # BNs exported decomposed (Keras 3, FrozenBatchNorm2d): the per-channel Mul/Add chains are
        # the BNs, and onnxruntime's basic level folds them into the Convs.
        assert ours["chains"] <= theirs["chains"], (
            f"bnfold leaves {ours['chains']} decomposed-BN ops, {tool} {theirs['chains']}"
        )


def other_tool_counts(compare, corpus_dir, source, tool, tmp_path_factory) -> dict:
    """``count_nodes`` of what ``tool`` makes of ``source``, cached in the corpus directory by the
    model's bytes and the versions of the packages involved (another tool's output changes only
    with them; bnfold, the tool under test, always runs afresh)."""
    import hashlib
    import importlib.metadata

    files = [source] + compare._external_data_files(onnx.load(source, load_external_data=False), source)
    distributions = ("onnx", "onnxruntime", "numpy") + (("onnxoptimizer",) if tool == "onnxoptimizer" else ())
    material = json.dumps(
        {
            "model": compare._sha256_files(files),
            "tool": tool,
            "versions": {d: importlib.metadata.version(d) for d in distributions},
            "format": compare.CACHE_FORMAT,
        },
        sort_keys=True,
    )
    cached = os.path.join(corpus_dir, ".compare-cache", "counts", hashlib.sha256(material.encode()).hexdigest())
    if os.path.exists(cached):
        with open(cached, encoding="utf-8") as f:
            return json.load(f)
    theirs_path = str(tmp_path_factory.mktemp(tool) / "out.onnx")
    if tool == "ort-basic":
        compare._run_onnxruntime(source, theirs_path, "ORT_ENABLE_BASIC")
    else:
        compare._run_onnxoptimizer(source, theirs_path)
    counts = compare.count_nodes(onnx.load(theirs_path, load_external_data=False))
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    compare._write_json_atomic(cached, counts)
    return counts


def test_calibrate_batch_with_default_options(corpus_dir, corpus_entry, tmp_path):
    calibrate_with_default_options(corpus_dir, corpus_entry, "batch", tmp_path)


def test_calibrate_sequential_with_default_options(corpus_dir, corpus_entry_per_arch, tmp_path):
    """Sequential mode runs the model once per BN level: on one export of each architecture."""
    calibrate_with_default_options(corpus_dir, corpus_entry_per_arch, "sequential", tmp_path)


def calibrate_with_default_options(corpus_dir, corpus_entry, mode, tmp_path):
    """Random calibration data (8 samples, or 8 fixed batches, 4 in sequential mode; fewer, at
    least 2, for inputs of millions of values) in a .npy file for single-input models, an .npz
    with one array per input otherwise; default options."""
    source = model_path(corpus_dir, corpus_entry)
    sess = session(source)
    examples = corpus_entry.get("example_inputs") or {}
    rng = np.random.default_rng(2)
    specs = []
    for spec in sess.get_inputs():
        dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}[spec.type]
        fixed_batch = spec.shape[0] if isinstance(spec.shape[0], int) and spec.shape[0] > 0 else 1
        specs.append((spec.name, dtype, fixed_batch, concrete_shape(spec.shape, 1, examples.get(spec.name))[1:]))
    per_sample = sum(batch * int(np.prod(rest)) for _, _, batch, rest in specs)
    most = SEQUENTIAL_CALIBRATION_SAMPLES if mode == "sequential" else CALIBRATION_SAMPLES
    samples = int(np.clip(CALIBRATION_VALUES // max(per_sample, 1), 2, most))
    arrays = {name: rng.standard_normal([samples * batch] + rest).astype(dtype) for name, dtype, batch, rest in specs}
    if len(arrays) == 1:
        data = tmp_path / "calib.npy"
        np.save(data, next(iter(arrays.values())))
    else:
        data = tmp_path / "calib.npz"
        np.savez(data, **arrays)
    out = tmp_path / "calibrated.onnx"
    code, text = run_cli("calibrate", source, "-o", out, "--data", data, "--mode", mode, "--no-progress")
    assert code == 0, text
    calibrated = session(str(out))
    outputs = run(calibrated, synthesize_feeds(calibrated, corpus_entry, seed=3))
    assert all(np.isfinite(o).all() for o in outputs), "calibrated model computes non-finite values"
