"""How many BatchNormalization nodes bnfold leaves, next to other ONNX optimizers, per model.

For every model of a corpus (a directory with the ``manifest.json`` written by
``tools/build_corpus.py``) or every ``.onnx`` file given on the command line, this runs on the
same file:

==================  ===========================================================================
column              what runs
==================  ===========================================================================
``bnfold``          ``bnfold.fold_file(IN, OUT)`` (what ``bnfold fold --no-check`` does)
``ort-basic``       onnxruntime's offline optimizer: an InferenceSession at ``ORT_ENABLE_BASIC``
                    (the portable level) with ``optimized_model_filepath`` set
``ort-extended``    the same at ``ORT_ENABLE_EXTENDED``; its output usually holds com.microsoft
                    operators (FusedConv ...), which no other runtime reads: such an output is
                    shown in parentheses and never counts as "best other tool"
``onnxslim``        ``onnxslim.slim(IN)``
``onnxsim``         ``onnxsim.simplify(model)``
``onnxoptimizer``   ``onnxoptimizer.optimize(model, passes)``: its default passes (fuse and
                    elimination) plus ``fuse_bn_into_conv``
``onnxscript``      ``onnxscript.rewriter.rewrite(model)``: its default rules (BN fusion into
                    Conv / ConvTranspose / Gemm among them)
``aimet``           AIMET-ONNX's ``batch_norm_fold.fold_all_batch_norms_to_weight(model)``; it
                    needs torch and a dozen packages, so it usually lives in a venv of its own:
                    ``--aimet-python VENV/bin/python`` (or ``BNFOLD_AIMET_PYTHON``)
==================  ===========================================================================

Each output is counted (BatchNormalization nodes and all nodes, in every graph: If / Loop /
Scan bodies and local functions included) and *verified*: it must load in onnxruntime and give
the original's outputs on seeded random inputs (both with onnxruntime's optimizations off, so
what is compared is what the tool wrote). The tolerance per output is the larger of a floor
relative to the output's size, absolute below 1 (1e-4 for float32, 1e-2 for float16 / bfloat16) and 10 times the
model's own float noise (the original at ``ORT_DISABLE_ALL`` against ``ORT_ENABLE_ALL``). A BN
that a tool "removed" by writing a wrong model does not count: its cell says ``wrong``.

Every tool runs in a child process with a timeout (``--timeout``), so a tool that crashes,
hangs or is not installed is a result in its cell (``error``, ``timeout``, ``n/a``; the
reasons are listed under the table), never the end of the run. Results of the other tools are
cached per model, keyed by the sha256 of the model's bytes (external data included), the tool
and the versions of the packages involved, in ``<corpus dir>/.compare-cache/`` (for files given
on the command line: ``.compare-cache/`` beside each; ``--cache-dir``, ``--no-cache``); bnfold,
the tool under test, always runs afresh.

    python tools/compare_corpus.py CORPUS_DIR                 # table
    python tools/compare_corpus.py CORPUS_DIR --json out.json --check
    python tools/compare_corpus.py a.onnx b.onnx --tools bnfold,ort-basic,onnxslim
    python tools/compare_corpus.py CORPUS_DIR --aimet-python /opt/aimet/bin/python

``--check`` exits 1 when, on some model, bnfold leaves more BNs than the best other tool
whose output is correct — or bnfold fails on a model (crash, timeout or wrong output), which
leaves the user every BN of it — or a model could not be read at all. Exit 2: bad arguments or
no models.

API (the file can be loaded by path; it imports nothing from ``tools/``):
``compare_model(path, *, tools=None, cache_dir=None) -> dict`` and
``compare_manifest(corpus_dir, *, tools=None, cache_dir=None) -> list[dict]``.

The child processes import numpy / onnx / onnxruntime and the tools; this module's top level
imports only the standard library, so it also runs as a worker under another interpreter
(AIMET's venv) that has onnx but not bnfold.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

# Bump when what a cached result means changes (counting, verification, tolerances).
CACHE_FORMAT = 4

TOOL_ORDER = ("bnfold", "ort-basic", "ort-extended", "onnxslim", "onnxsim", "onnxoptimizer", "onnxscript", "aimet")
UNDER_TEST = "bnfold"

# tool -> (module that must be importable, distributions whose versions make the cache key)
TOOL_REQUIREMENTS = {
    "bnfold": ("bnfold", ("bnfold",)),
    "ort-basic": ("onnxruntime", ("onnxruntime",)),
    "ort-extended": ("onnxruntime", ("onnxruntime",)),
    "onnxslim": ("onnxslim", ("onnxslim",)),
    "onnxsim": ("onnxsim", ("onnxsim",)),
    "onnxoptimizer": ("onnxoptimizer", ("onnxoptimizer",)),
    "onnxscript": ("onnxscript", ("onnxscript", "onnx-ir")),
    "aimet": ("aimet_onnx", ("aimet-onnx", "torch")),
}
# Every tool's output also depends on these (the tools call them, the verification uses them).
COMMON_DISTRIBUTIONS = ("onnx", "onnxruntime", "numpy")

DEFAULT_TIMEOUT = 600.0
DEFAULT_SEED = 0
# Verification: tolerance = max(floor * max|reference|, NOISE_FACTOR * own noise).
RELATIVE_FLOOR = {"float32": 1e-4, "float64": 1e-9, "float16": 1e-2, "bfloat16": 3e-2}
NOISE_FACTOR = 10.0
# ... and twice what one more rounding of a float16 model's weights moves its outputs.
ROUNDING_FACTOR = 2.0
# Symbolic dimensions the manifest does not fix: the first (batch) gets 2, so a tool that bakes
# in batch 1 is caught; others get a size every CNN of the corpus accepts.
SYMBOLIC_BATCH = 2
SYMBOLIC_OTHER = 64
STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml"}
# A tool's output at or above this size is written with external data (protobuf's 2 GiB limit).
EXTERNAL_DATA_BYTES = 1 << 30
AIMET_PYTHON_ENV = "BNFOLD_AIMET_PYTHON"

STATUS_OK = "ok"  # output loads, matches the original
STATUS_UNVERIFIED = "unverified"  # output counted, but the original itself does not run
STATUS_NOT_PORTABLE = "not_portable"  # correct, but uses operators outside standard ONNX
STATUS_WRONG = "wrong"  # output does not load in onnxruntime or differs
STATUS_ERROR = "error"  # the tool raised or its process died
STATUS_TIMEOUT = "timeout"
STATUS_NA = "n/a"  # tool not installed
COUNTED_STATUSES = (STATUS_OK, STATUS_UNVERIFIED)


# --------------------------------------------------------------------------------------------
# Counting and small helpers (used by the parent and the workers)


def _is_batch_norm(node) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def _walk_nodes(graph):
    """Every node of ``graph`` and of the bodies nested in its nodes' attributes."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _walk_nodes(attribute.g)
            for body in attribute.graphs:
                yield from _walk_nodes(body)


def _all_nodes(model):
    yield from _walk_nodes(model.graph)
    for function in model.functions:  # a FunctionProto holds its nodes as a graph does
        yield from _walk_nodes(function)


def count_nodes(model) -> dict:
    """BN count, node count, decomposed-BN count (``count_layer_chains``) and operator domains
    over all graphs of an ``onnx.ModelProto``."""
    n_bn = n_nodes = 0
    domains = set()
    for node in _all_nodes(model):
        n_nodes += 1
        n_bn += _is_batch_norm(node)
        domains.add(node.domain)
    return {"bn": n_bn, "nodes": n_nodes, "chains": count_layer_chains(model), "domains": sorted(domains)}


_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_CHAIN_OPS = ("Add", "Sub", "Mul", "Div")


def count_layer_chains(model) -> int:
    """Add / Sub / Mul / Div nodes of the main graph with one constant operand (an initializer or
    a Constant node) whose other operand comes, through such nodes and Identity, from a Conv /
    ConvTranspose / Gemm / MatMul whose weight is constant: the decomposed BNs a fold may remove
    (an upper bound: not every such node acts per channel, and a rank-3 MatMul's bias cannot go)."""
    graph = model.graph
    constants = {t.name for t in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    produced = {o: n for n in graph.node for o in n.output if o}

    def variable_operand(node):
        if node.op_type not in _CHAIN_OPS or len(node.input) != 2:
            return None
        kinds = [name in constants for name in node.input]
        return node.input[kinds.index(False)] if kinds.count(True) == 1 else None

    count = 0
    for node in graph.node:
        value = variable_operand(node)
        if value is None:
            continue
        producer = produced.get(value)
        for _ in range(64):
            if producer is None or producer.op_type in _LAYER_OPS:
                break
            if producer.op_type == "Identity":
                producer = produced.get(producer.input[0])
            elif variable_operand(producer) is not None:
                producer = produced.get(variable_operand(producer))
            else:
                producer = None
        if producer is not None and producer.op_type in _LAYER_OPS and len(producer.input) > 1:
            count += producer.input[1] in constants
    return count


def _bn_label(node) -> str:
    # Unnamed BNs are known by the tensor they write: an index would differ between files.
    return node.name or f"<BN writing {node.output[0]}>"


def _batch_norm_outputs(model) -> dict:
    """BN label -> the tensor it writes (its first output), over all graphs."""
    return {_bn_label(node): node.output[0] for node in _all_nodes(model) if _is_batch_norm(node) and node.output}


def _batch_norm_readers(model) -> dict:
    """BN label -> {"output", "reader"}: the tensor it writes and one place that reads it, as
    ("node", node name, input index) or ("graph_output", position in the main graph's outputs)."""
    bns = {}
    for node in _all_nodes(model):
        if _is_batch_norm(node) and node.output:
            bns[node.output[0]] = {"bn": _bn_label(node), "output": node.output[0], "reader": None}
    for node in _all_nodes(model):
        for index, name in enumerate(node.input):
            if name in bns and bns[name]["reader"] is None and node.name:
                bns[name]["reader"] = ["node", node.name, index]
    for position, output in enumerate(model.graph.output):
        if output.name in bns and bns[output.name]["reader"] is None:
            bns[output.name]["reader"] = ["graph_output", position]
    return {entry["bn"]: {"output": entry["output"], "reader": entry["reader"]} for entry in bns.values()}


def _producers(model) -> dict:
    """tensor name -> (op_type, node name) of the node that writes it, over all graphs."""
    produced = {}
    for node in _all_nodes(model):
        for output in node.output:
            if output:
                produced[output] = (node.op_type, node.name)
    return produced


def _load_structure(path):
    """The model's graph without its tensor bytes (external data is not read)."""
    import onnx

    return onnx.load(path, load_external_data=False)


def _external_data_files(model, model_path) -> list:
    """The external data files a model refers to, as paths (each once, in first-seen order)."""
    import onnx

    locations = []

    def visit_tensor(tensor):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value not in locations:
                    locations.append(entry.value)

    def visit_graph(graph):
        for tensor in graph.initializer:
            visit_tensor(tensor)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    visit_tensor(attribute.t)
                if attribute.HasField("g"):
                    visit_graph(attribute.g)
                for body in attribute.graphs:
                    visit_graph(body)

    visit_graph(model.graph)
    base = os.path.dirname(os.path.abspath(model_path))
    return [os.path.join(base, location) for location in locations]


def _sha256_files(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _write_json_atomic(path, data) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=False, default=str)
            f.write("\n")
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _save_model(model, path) -> None:
    """onnx.save, with external data beside ``path`` when the model is too big for one message."""
    import onnx

    if model.ByteSize() >= EXTERNAL_DATA_BYTES:
        onnx.save(
            model,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=os.path.basename(path) + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save(model, path)


def _uses_external_data_or_is_big(path) -> bool:
    model = _load_structure(path)
    external = _external_data_files(model, path)
    return bool(external) or os.path.getsize(path) >= EXTERNAL_DATA_BYTES


def _link_source_external_data(src, dst):
    """Make the external data files ``dst`` names resolve, when they are the source's.

    A tool may write its output with references to the source's data file (onnxruntime does for
    initializers it kept); beside the source, where a user writes it, that file is there. The
    output sits in a scratch directory here, so the source's files are linked in beside it.
    Returns the linked names.
    """
    out_dir, src_dir = os.path.dirname(os.path.abspath(dst)), os.path.dirname(os.path.abspath(src))
    linked = []
    for wanted in _external_data_files(_load_structure(dst), dst):
        if os.path.exists(wanted):
            continue
        original = os.path.join(src_dir, os.path.relpath(wanted, out_dir))
        if os.path.exists(original):
            os.makedirs(os.path.dirname(wanted), exist_ok=True)
            os.symlink(original, wanted)
            linked.append(os.path.relpath(wanted, out_dir))
    return linked


# --------------------------------------------------------------------------------------------
# The tools (each runs inside a worker process: src -> dst file, returns extra facts or None)


def _run_bnfold(src, dst):
    import bnfold

    report = bnfold.fold_file(src, dst)
    return {
        "folded": report.n_folded,
        "remaining": [
            {"bn": e.bn, "reason": e.reason, "graph": e.graph, "message": e.message} for e in report.remaining
        ],
    }


def _run_onnxruntime(src, dst, level_name):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level_name)
    options.optimized_model_filepath = dst
    options.intra_op_num_threads = 1
    if _uses_external_data_or_is_big(src):
        # By default onnxruntime writes new initializers inline (failing past 2 GiB) and keeps
        # references to the source's data file for the others; this way it writes its own file.
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", os.path.basename(dst) + ".data"
        )
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])
    if not os.path.exists(dst):
        raise RuntimeError("onnxruntime wrote no optimized model")
    return None


def _run_onnxslim(src, dst):
    import onnxslim

    _save_model(onnxslim.slim(src), dst)
    return None


def _run_onnxsim(src, dst):
    import onnx
    import onnxsim

    simplified, check_passed = onnxsim.simplify(onnx.load(src))
    _save_model(simplified, dst)
    return {"onnxsim_check": bool(check_passed)}


def _run_onnxoptimizer(src, dst):
    import onnx
    import onnxoptimizer

    passes = list(onnxoptimizer.get_fuse_and_elimination_passes())
    if "fuse_bn_into_conv" not in passes:
        passes.append("fuse_bn_into_conv")
    _save_model(onnxoptimizer.optimize(onnx.load(src), passes), dst)
    return None


def _run_onnxscript(src, dst):
    import onnx
    from onnxscript import rewriter

    _save_model(rewriter.rewrite(onnx.load(src)), dst)
    return None


def _run_aimet(src, dst):
    import onnx
    from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight

    model = onnx.load(src)
    # Edits the model in place; returns the (layer, BN) pairs it folded.
    folded = fold_all_batch_norms_to_weight(model)
    _save_model(model, dst)
    pairs = folded[0] if isinstance(folded, tuple) else folded
    return {"folded": len(pairs) if pairs is not None else None}


TOOL_RUNNERS = {
    "bnfold": _run_bnfold,
    "ort-basic": lambda src, dst: _run_onnxruntime(src, dst, "ORT_ENABLE_BASIC"),
    "ort-extended": lambda src, dst: _run_onnxruntime(src, dst, "ORT_ENABLE_EXTENDED"),
    "onnxslim": _run_onnxslim,
    "onnxsim": _run_onnxsim,
    "onnxoptimizer": _run_onnxoptimizer,
    "onnxscript": _run_onnxscript,
    "aimet": _run_aimet,
}


# --------------------------------------------------------------------------------------------
# Reference run and verification (workers, main interpreter)


def _numpy_dtype(ort_type: str):
    import numpy as np

    names = {
        "tensor(float)": np.float32,
        "tensor(double)": np.float64,
        "tensor(float16)": np.float16,
        "tensor(int64)": np.int64,
        "tensor(int32)": np.int32,
        "tensor(int8)": np.int8,
        "tensor(uint8)": np.uint8,
        "tensor(bool)": np.bool_,
    }
    if ort_type not in names:
        raise ValueError(f"cannot synthesize an input of type {ort_type}")
    return names[ort_type]


def _session(path, level_name, threads):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level_name)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _synthesize_inputs(session, declared_shapes, seed):
    """Seeded inputs for every graph input: normal floats, zero integers, False booleans."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds, shapes = {}, {}
    for _position, spec in enumerate(session.get_inputs()):
        declared = declared_shapes.get(spec.name)
        shape = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and dim >= 0:
                shape.append(dim)
            elif declared is not None and axis < len(declared) and isinstance(declared[axis], int):
                shape.append(declared[axis])
            else:
                shape.append(SYMBOLIC_BATCH if axis == 0 else SYMBOLIC_OTHER)
        dtype = _numpy_dtype(spec.type)
        if np.issubdtype(dtype, np.floating):
            value = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            value = np.zeros(shape, dtype)
        else:
            # Integer inputs are mostly indices or sizes; zero is in range for any of them.
            value = np.zeros(shape, dtype)
        feeds[spec.name] = value
        shapes[spec.name] = shape
    return feeds, shapes


def _reference_task(spec) -> dict:
    """Run the original: inputs + outputs (saved to an .npz) and its own float noise."""
    import numpy as np

    plain = _session(spec["model"], "ORT_DISABLE_ALL", spec["threads"])
    feeds, shapes = _synthesize_inputs(plain, spec.get("declared_shapes") or {}, spec["seed"])
    output_names = [o.name for o in plain.get_outputs()]
    outputs = plain.run(output_names, feeds)
    # The original's own float noise: the same inputs through onnxruntime's full optimization
    # (its fusions reorder float math). Tolerances follow it so deep nets are not misjudged.
    noise = [0.0] * len(outputs)
    noise_note = None
    try:
        optimized = _session(spec["model"], "ORT_ENABLE_ALL", spec["threads"])
        for i, (a, b) in enumerate(zip(outputs, optimized.run(output_names, feeds))):
            noise[i] = _max_difference(np.asarray(a), np.asarray(b))
    except Exception as error:  # noqa: BLE001 - noise stays 0: only the floors apply
        noise_note = _one_line(f"{type(error).__name__}: {error}")
    # A float16 model's layers cannot be folded without rounding their weights once more: what
    # that alone costs is measured on the model itself, so a correct float16 fold is not "wrong".
    rounding = [0.0] * len(outputs)
    import onnx

    model = onnx.load(spec["model"])
    if _has_low_precision_weights(model):
        again = rounded_once_more(model)
        rounded_path = spec["npz"] + ".rounded.onnx"
        _save_model(again, rounded_path)
        try:
            rounded = _session(rounded_path, "ORT_DISABLE_ALL", spec["threads"]).run(output_names, feeds)
            for i, (a, b) in enumerate(zip(outputs, rounded)):
                rounding[i] = _max_difference(np.asarray(a), np.asarray(b))
        finally:
            for leftover in (rounded_path, rounded_path + ".data"):
                if os.path.exists(leftover):
                    os.remove(leftover)
    del model
    arrays = {f"in{i}": value for i, value in enumerate(feeds.values())}
    arrays.update({f"out{i}": np.asarray(value) for i, value in enumerate(outputs)})
    np.savez(spec["npz"], **arrays)
    return {
        "inputs": list(feeds),
        "input_shapes": shapes,
        "outputs": output_names,
        "output_dtypes": [str(np.asarray(v).dtype) for v in outputs],
        "noise": noise,
        "noise_note": noise_note,
        "rounding": rounding,
    }


def rounded_once_more(model):
    """bnfold.verify.noise.rounded_once_more (this runs in the main interpreter, which has bnfold)."""
    from bnfold.verify.noise import rounded_once_more as rounded

    return rounded(model)


def _has_low_precision_weights(model) -> bool:
    from bnfold.verify.noise import has_low_precision_layer_weights

    return has_low_precision_layer_weights(model)


def _max_difference(a, b) -> float:
    import numpy as np

    if a.shape != b.shape:
        return float("inf")
    if not (np.issubdtype(a.dtype, np.number) and np.issubdtype(b.dtype, np.number)):
        return 0.0 if np.array_equal(a, b) else float("inf")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    finite_a, finite_b = np.isfinite(a64), np.isfinite(b64)
    if not np.array_equal(finite_a, finite_b):
        return float("inf")
    # Non-finite entries must agree exactly (inf with inf of the same sign, nan with nan).
    if not np.array_equal(np.nan_to_num(a64[~finite_a], nan=0.5), np.nan_to_num(b64[~finite_b], nan=0.5)):
        return float("inf")
    if not finite_a.any():
        return 0.0
    return float(np.max(np.abs(a64[finite_a] - b64[finite_b])))


def _verify(candidate_path, reference, npz_path, threads) -> dict:
    """Does the candidate load in onnxruntime and give the reference's outputs?"""
    import numpy as np

    arrays = np.load(npz_path)
    try:
        session = _session(candidate_path, "ORT_DISABLE_ALL", threads)
    except Exception as error:  # noqa: BLE001 - any failure is this tool's result
        return {"correct": False, "problem": _one_line(f"onnxruntime cannot load it: {error}")}
    candidate_inputs = [i.name for i in session.get_inputs()]
    candidate_outputs = [o.name for o in session.get_outputs()]
    reference_inputs, reference_outputs = reference["inputs"], reference["outputs"]
    notes = []
    if sorted(candidate_inputs) != sorted(reference_inputs):
        if len(candidate_inputs) != len(reference_inputs):
            return {"correct": False, "problem": f"inputs {candidate_inputs} instead of {reference_inputs}"}
        notes.append("inputs renamed, fed by position")
        feeds = {name: arrays[f"in{i}"] for i, name in enumerate(candidate_inputs)}
    else:
        feeds = {name: arrays[f"in{reference_inputs.index(name)}"] for name in candidate_inputs}
    if sorted(candidate_outputs) != sorted(reference_outputs):
        if len(candidate_outputs) != len(reference_outputs):
            return {"correct": False, "problem": f"outputs {candidate_outputs} instead of {reference_outputs}"}
        notes.append("outputs renamed, compared by position")
        order = candidate_outputs
    else:
        order = reference_outputs
    try:
        results = session.run(order, feeds)
    except Exception as error:  # noqa: BLE001 - any failure is this tool's result
        return {"correct": False, "problem": _one_line(f"onnxruntime cannot run it: {error}")}
    worst_ratio, per_output = 0.0, []
    for i, (name, value) in enumerate(zip(reference_outputs, results)):
        expected = arrays[f"out{i}"]
        value = np.asarray(value)
        error = _max_difference(expected, value)
        dtype = str(expected.dtype)
        if dtype in RELATIVE_FLOOR:
            finite = expected[np.isfinite(expected)]
            scale = float(np.max(np.abs(finite.astype(np.float64)))) if finite.size else 0.0
            # The floor is absolute below 1 (as in bnfold's check): outputs of ~1e-7 (a saturated
            # sigmoid) carry onnxruntime's absolute float error, which one noise run may miss.
            tolerance = max(
                RELATIVE_FLOOR[dtype] * max(scale, 1.0),
                NOISE_FACTOR * reference["noise"][i],
                ROUNDING_FACTOR * (reference.get("rounding") or [0.0] * (i + 1))[i],
            )
        else:
            tolerance = NOISE_FACTOR * reference["noise"][i]  # integers/bools: exact unless noisy
        if value.dtype != expected.dtype:
            notes.append(f"output {name}: {value.dtype} instead of {expected.dtype}")
            error = float("inf")
        per_output.append({"output": name, "max_error": error, "tolerance": tolerance})
        ratio = error / tolerance if tolerance > 0 else (0.0 if error == 0 else float("inf"))
        worst_ratio = max(worst_ratio, ratio)
    correct = worst_ratio <= 1.0
    result = {"correct": correct, "worst_error_ratio": worst_ratio, "per_output": per_output}
    if notes:
        result["notes"] = notes
    if not correct:
        worst = max(per_output, key=lambda o: o["max_error"] / o["tolerance"] if o["tolerance"] else float("inf"))
        result["problem"] = (
            f"output {worst['output']} differs by {worst['max_error']:.3g} (tolerance {worst['tolerance']:.3g})"
        )
    return result


def _describe_removed(original_bns: dict, candidate) -> dict:
    """For each original BN absent from the candidate: what now stands where its output was.

    Tools either give the layer before the BN the BN's output name (then the writer of that
    tensor says what it was folded into) or reconnect the BN's readers (then what one of them
    reads now, found by the reader's node name, says it).
    """
    present = set(_batch_norm_outputs(candidate))
    producers = _producers(candidate)
    nodes_by_name = {node.name: node for node in _all_nodes(candidate) if node.name}

    def source_of(tensor):
        if tensor not in producers:
            return f"graph input or initializer {tensor!r}"
        op_type, name = producers[tensor]
        return op_type + (f" {name!r}" if name else "")

    described = {}
    for bn, where in original_bns.items():
        if bn in present:
            continue
        reader = where["reader"]
        if where["output"] in producers:
            described[bn] = f"its output is now written by {source_of(where['output'])}"
        elif (
            reader
            and reader[0] == "node"
            and reader[1] in nodes_by_name
            and reader[2] < len(nodes_by_name[reader[1]].input)
        ):
            now = nodes_by_name[reader[1]].input[reader[2]]
            described[bn] = f"its reader {reader[1]!r} now reads from {source_of(now)}"
        elif reader and reader[0] == "graph_output" and reader[1] < len(candidate.graph.output):
            now = candidate.graph.output[reader[1]].name
            described[bn] = f"the graph output now comes from {source_of(now)}"
        else:
            described[bn] = "removed (its output and readers are not recognizable in the new graph)"
    return described


def _inspect_output(spec, result) -> None:
    """Count the tool's output and verify it; fills ``result``."""
    candidate = _load_structure(spec["out"])
    counts = count_nodes(candidate)
    result.update(bn=counts["bn"], nodes=counts["nodes"], chains=counts["chains"], domains=counts["domains"])
    result["left_bns"] = sorted(_batch_norm_outputs(candidate))
    result["removed_bns"] = _describe_removed(spec["original_bns"], candidate)
    del candidate
    new_domains = sorted(set(counts["domains"]) - STANDARD_DOMAINS - set(spec["original_domains"]))
    if spec.get("reference") is None:
        result["status"] = STATUS_UNVERIFIED
        result["problem"] = "the original does not run in onnxruntime: output not verified"
        return
    result["phase"] = "verify"
    verification = _verify(spec["out"], spec["reference"], spec["npz"], spec["threads"])
    result["verification"] = verification
    if not verification["correct"]:
        result["status"] = STATUS_WRONG
        result["problem"] = verification["problem"]
    elif new_domains:
        result["status"] = STATUS_NOT_PORTABLE
        result["problem"] = f"output uses operators of domain(s) {', '.join(new_domains)}"
    else:
        result["status"] = STATUS_OK


def _worker_main(spec_path) -> int:
    """Child process: one task described by a JSON file; the result goes to spec['result']."""
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    result = {}
    try:
        if spec["task"] == "reference":
            result = _reference_task(spec)
        elif spec["task"] == "versions":
            result = _local_versions(spec["distributions"], spec["modules"])
        else:
            if spec["task"] in ("tool", "tool_only"):
                result["phase"] = "tool"
                _write_json_atomic(spec["result"], result)  # a timeout can tell the phase
                start = time.perf_counter()
                facts = TOOL_RUNNERS[spec["tool"]](spec["model"], spec["out"])
                result["seconds"] = time.perf_counter() - start
                linked = _link_source_external_data(spec["model"], spec["out"])
                if linked:
                    facts = dict(facts or {}, refers_to_source_data=linked)
                if facts:
                    result["facts"] = facts
            if spec["task"] in ("tool", "verify"):
                result["phase"] = "inspect"
                _write_json_atomic(spec["result"], result)
                _inspect_output(spec, result)
            result.pop("phase", None)
    except Exception as error:  # noqa: BLE001 - the tool's (or verification's) failure is the result
        result["status"] = STATUS_ERROR
        where = result.get("phase", "")
        result["problem"] = _one_line(f"{type(error).__name__}: {error}")
        if where and where != "tool":
            result["problem"] = f"while checking its output: {result['problem']}"
            result["status"] = STATUS_WRONG
    _write_json_atomic(spec["result"], result)
    return 0


# --------------------------------------------------------------------------------------------
# Parent: tool availability, child processes, cache


def _local_versions(distributions, modules) -> dict:
    versions, missing = {}, {}
    for name in distributions:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError) as error:
            found, missing[module] = False, _one_line(str(error))
        if not found:
            missing.setdefault(module, f"module {module} is not installed")
    return {"versions": versions, "missing": missing}


class ToolSetup:
    """Which interpreter runs a tool, its package versions, or why it is not available."""

    def __init__(self, name, python, versions, reason=None):
        self.name, self.python, self.versions, self.reason = name, python, versions, reason

    @property
    def available(self) -> bool:
        return self.reason is None

    def to_dict(self) -> dict:
        return {"python": self.python, "versions": self.versions, "available": self.available, "reason": self.reason}


def _run_child(python, spec, work_dir, timeout):
    """Run one worker task; returns (result dict or None, failure sentence or None, seconds)."""
    spec = dict(spec)
    handle, spec_path = tempfile.mkstemp(dir=work_dir, prefix="spec-", suffix=".json")
    os.close(handle)
    spec["result"] = spec_path[: -len(".json")] + "-result.json"
    _write_json_atomic(spec_path, spec)
    environment = dict(os.environ)
    # Two cores shared with others: every child stays on one thread unless told otherwise.
    environment.setdefault("OMP_NUM_THREADS", str(spec.get("threads", 1)))
    environment["PYTHONWARNINGS"] = "ignore"
    start = time.perf_counter()
    log_path = spec_path[: -len(".json")] + ".log"
    failure = None
    with open(log_path, "wb") as log:
        try:
            process = subprocess.Popen(
                [python, os.path.abspath(__file__), "--worker", spec_path],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=environment,
                start_new_session=True,
            )
        except OSError as error:
            return None, _one_line(f"cannot start {python}: {error}"), 0.0
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # The child's own children (onnxsim may spawn some) go with its session.
            try:
                os.killpg(process.pid, 9)
            except ProcessLookupError:
                pass
            process.wait()
            code, failure = None, f"timed out after {timeout:g} s"
    seconds = time.perf_counter() - start
    result = None
    if os.path.exists(spec["result"]):
        with open(spec["result"], encoding="utf-8") as f:
            result = json.load(f)
    if failure is None and code != 0:
        with open(log_path, "rb") as f:
            tail = f.read()[-4000:].decode("utf-8", "replace").strip().splitlines()
        last = tail[-1] if tail else ""
        how = f"killed by signal {-code}" if code < 0 else f"exited {code}"
        failure = _one_line(f"process {how}" + (f": {last}" if last else ""))
    return result, failure, seconds


def resolve_tools(tools=None, *, aimet_python=None) -> dict:
    """Name -> ToolSetup for the requested tools (all by default), availability checked."""
    names = list(TOOL_ORDER) if tools is None else list(tools)
    unknown = [n for n in names if n not in TOOL_REQUIREMENTS]
    if unknown:
        raise ValueError(f"unknown tool(s) {', '.join(unknown)}; known: {', '.join(TOOL_ORDER)}")
    if UNDER_TEST not in names:
        names.insert(0, UNDER_TEST)
    setups = {}
    for name in names:
        module, distributions = TOOL_REQUIREMENTS[name]
        wanted = tuple(distributions) + COMMON_DISTRIBUTIONS
        python = sys.executable
        if name == "aimet":
            python = aimet_python or os.environ.get(AIMET_PYTHON_ENV) or sys.executable
        if python == sys.executable:
            found = _local_versions(wanted, (module, "onnx", "numpy"))
        else:
            found, failure = _query_interpreter(python, wanted, (module, "onnx", "numpy"))
            if found is None:
                setups[name] = ToolSetup(name, python, {}, f"{python}: {failure}")
                continue
        reason = None
        if found["missing"]:
            reason = "; ".join(found["missing"].values())
            if name == "aimet" and python == sys.executable:
                reason += (
                    f" (AIMET-ONNX needs torch and many packages: install `aimet-onnx` in "
                    f"a venv of its own and pass --aimet-python or {AIMET_PYTHON_ENV})"
                )
        setups[name] = ToolSetup(name, python, found["versions"], reason)
    return setups


def _query_interpreter(python, distributions, modules):
    work_dir = tempfile.mkdtemp(prefix="compare-versions-")
    try:
        result, failure, _ = _run_child(
            python, {"task": "versions", "distributions": distributions, "modules": modules}, work_dir, 120
        )
        if failure or result is None or "versions" not in result:
            return None, failure or (result or {}).get("problem", "no answer")
        return result, None
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _cache_key(model_sha, tool, setup, settings) -> str:
    material = json.dumps(
        {"format": CACHE_FORMAT, "model": model_sha, "tool": tool, "versions": setup.versions, "settings": settings},
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()


def _cache_read(cache_dir, key):
    if cache_dir is None:
        return None
    path = os.path.join(cache_dir, key[:2], key + ".json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _cache_write(cache_dir, key, result) -> None:
    if cache_dir is None:
        return
    try:
        _write_json_atomic(os.path.join(cache_dir, key[:2], key + ".json"), result)
    except OSError:
        pass  # a read-only corpus only costs the next run its speed


# --------------------------------------------------------------------------------------------
# Comparing


def compare_model(
    path,
    *,
    tools=None,
    cache_dir=None,
    name=None,
    declared_shapes=None,
    timeout=DEFAULT_TIMEOUT,
    seed=DEFAULT_SEED,
    threads=1,
    aimet_python=None,
    setups=None,
    log=None,
) -> dict:
    """Run bnfold and the other tools on one model file; counts, errors and correctness per tool.

    ``tools``: names from ``TOOL_ORDER`` (bnfold is always added); ``cache_dir``: where other
    tools' results are cached (None: no cache); ``declared_shapes``: input name -> dims for
    symbolic dimensions (a manifest entry's ``inputs``). Returns a JSON-ready dict:
    ``{"name", "path", "sha256", "bn_original", "nodes_original", "reference", "tools":
    {tool: {"status", "bn", "nodes", "problem", "seconds", "cached", ...}}, "best_other",
    "bnfold_bn", "bnfold_more", "bnfold_failed"}`` (see ``summarize``).
    """
    path = os.path.abspath(os.fspath(path))
    if setups is None:
        setups = resolve_tools(tools, aimet_python=aimet_python)
    start = time.perf_counter()
    record = {"name": name or os.path.splitext(os.path.basename(path))[0], "path": path, "tools": {}}
    try:
        structure = _load_structure(path)
        files = [path] + _external_data_files(structure, path)
        record["sha256"] = _sha256_files(files)
    except Exception as error:  # noqa: BLE001 - any failure is this tool's result
        record["error"] = _one_line(f"cannot read the model: {type(error).__name__}: {error}")
        record["seconds"] = time.perf_counter() - start
        return summarize(record)
    counts = count_nodes(structure)
    record["bn_original"], record["nodes_original"] = counts["bn"], counts["nodes"]
    record["chains_original"] = counts["chains"]
    original_bns = _batch_norm_readers(structure)
    del structure
    settings = {
        "seed": seed,
        "declared_shapes": declared_shapes or {},
        "floors": RELATIVE_FLOOR,
        "noise_factor": NOISE_FACTOR,
    }
    work_dir = tempfile.mkdtemp(prefix="compare-corpus-")
    try:
        needed = []
        for tool, setup in setups.items():
            if not setup.available:
                record["tools"][tool] = {"status": STATUS_NA, "problem": setup.reason}
                continue
            key = _cache_key(record["sha256"], tool, setup, settings)
            cached = None if tool == UNDER_TEST else _cache_read(cache_dir, key)
            if cached is not None:
                record["tools"][tool] = dict(cached, cached=True)
            else:
                needed.append((tool, setup, key))
        reference = None
        if needed:
            npz = os.path.join(work_dir, "reference.npz")
            reference, failure, seconds = _run_child(
                sys.executable,
                {
                    "task": "reference",
                    "model": path,
                    "npz": npz,
                    "seed": seed,
                    "declared_shapes": declared_shapes or {},
                    "threads": threads,
                },
                work_dir,
                timeout,
            )
            if failure or reference is None or reference.get("status") == STATUS_ERROR:
                problem = failure or (reference or {}).get("problem", "no result")
                record["reference"] = {"error": problem, "seconds": seconds}
                reference = None
            else:
                record["reference"] = dict(reference, seconds=seconds)
        for tool, setup, key in needed:
            result = _run_tool(
                tool, setup, path, work_dir, reference, original_bns, counts["domains"], timeout, seed, threads
            )
            if log:
                log(
                    f"  {record['name']}: {tool} {result['status']}"
                    + (f" ({result['problem']})" if result.get("problem") else "")
                )
            # Cache what the tool did, not what the machine did: timeouts depend on load, and
            # outputs not verified (the reference failed) would stay unverified forever.
            if tool != UNDER_TEST and result["status"] != STATUS_TIMEOUT and reference is not None:
                _cache_write(cache_dir, key, result)
            record["tools"][tool] = dict(result, cached=False)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    record["tools"] = {tool: record["tools"][tool] for tool in setups if tool in record["tools"]}
    record["seconds"] = time.perf_counter() - start
    return summarize(record)


def _run_tool(tool, setup, path, work_dir, reference, original_bns, original_domains, timeout, seed, threads) -> dict:
    tool_dir = os.path.join(work_dir, tool)
    os.makedirs(tool_dir)
    spec = {
        "tool": tool,
        "model": path,
        "out": os.path.join(tool_dir, "out.onnx"),
        "npz": os.path.join(work_dir, "reference.npz"),
        "reference": reference,
        "original_bns": original_bns,
        "original_domains": original_domains,
        "seed": seed,
        "threads": threads,
    }
    deadline = time.perf_counter() + timeout
    foreign = setup.python != sys.executable
    # A foreign interpreter (AIMET's venv) only runs the tool; the verification runs here, with
    # the same onnxruntime as every other tool's.
    result, failure, _ = _run_child(
        setup.python, dict(spec, task="tool_only" if foreign else "tool"), work_dir, timeout
    )
    result = result or {}
    if failure is None and foreign and result.get("status") != STATUS_ERROR:
        tool_seconds = result.get("seconds")
        remaining = max(deadline - time.perf_counter(), 30.0)
        result, failure, _ = _run_child(sys.executable, dict(spec, task="verify"), work_dir, remaining)
        result = dict(result or {}, seconds=tool_seconds)
    phase = result.pop("phase", None)
    if failure is not None:
        if phase in ("inspect", "verify"):
            # The tool finished; loading or running its output killed or hung onnxruntime.
            result["status"] = STATUS_WRONG if "timed out" not in failure else STATUS_TIMEOUT
            result["problem"] = f"while checking its output: {failure}"
        else:
            result["status"] = STATUS_TIMEOUT if "timed out" in failure else STATUS_ERROR
            result["problem"] = failure
    result.setdefault("status", STATUS_ERROR)
    return result


def summarize(record) -> dict:
    """Add ``best_other`` (fewest BNs among other tools with a correct, portable output),
    ``bnfold_bn`` (bnfold's count; the original's when it failed) and ``bnfold_more``."""
    original = record.get("bn_original")
    results = record.get("tools", {})
    best, best_tools = None, []
    for tool, result in results.items():
        if tool == UNDER_TEST or result.get("status") not in COUNTED_STATUSES:
            continue
        if best is None or result["bn"] < best:
            best, best_tools = result["bn"], [tool]
        elif result["bn"] == best:
            best_tools.append(tool)
    record["best_other"] = {"bn": best, "tools": best_tools}
    ours = results.get(UNDER_TEST, {})
    failed = ours.get("status") not in COUNTED_STATUSES
    # A bnfold that fails leaves the user every BN of the model.
    record["bnfold_failed"] = bool(failed and original is not None)
    record["bnfold_bn"] = original if failed else ours.get("bn")
    record["bnfold_more"] = best is not None and record["bnfold_bn"] is not None and record["bnfold_bn"] > best
    return record


BUILDER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build_corpus.py")
BUILDER_MODULE = "_bnfold_build_corpus"


def _load_builder():
    """tools/build_corpus.py loaded by path (None when it is not beside this file)."""
    if BUILDER_MODULE in sys.modules:
        return sys.modules[BUILDER_MODULE]
    if not os.path.exists(BUILDER_PATH):
        return None
    spec = importlib.util.spec_from_file_location(BUILDER_MODULE, BUILDER_PATH)
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: its dataclasses look their module up in sys.modules.
    sys.modules[BUILDER_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[BUILDER_MODULE]
        raise
    return module


def _manifest(corpus_dir) -> dict:
    """The corpus manifest: through build_corpus.load_manifest when it sits beside this file."""
    builder = _load_builder()
    if builder is not None and hasattr(builder, "load_manifest"):
        return builder.load_manifest(corpus_dir)
    with open(os.path.join(corpus_dir, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def default_cache_dir(corpus_dir) -> str:
    return os.path.join(os.path.abspath(corpus_dir), ".compare-cache")


def compare_manifest(
    corpus_dir,
    *,
    tools=None,
    cache_dir=None,
    use_cache=True,
    names=None,
    timeout=DEFAULT_TIMEOUT,
    seed=DEFAULT_SEED,
    threads=1,
    jobs=1,
    aimet_python=None,
    log=None,
) -> list:
    """``compare_model`` for every model of the corpus manifest; one dict per model, in order.

    ``cache_dir`` defaults to ``<corpus_dir>/.compare-cache`` (``use_cache=False``: none);
    ``names``: only these model names; ``jobs``: models compared at the same time.
    """
    manifest = _manifest(corpus_dir)
    if cache_dir is None and use_cache:
        cache_dir = default_cache_dir(corpus_dir)
    if not use_cache:
        cache_dir = None
    entries = [e for e in manifest.get("models", []) if names is None or e["name"] in names]
    setups = resolve_tools(tools, aimet_python=aimet_python)

    def one(entry):
        declared = {k: list(v) for k, v in (entry.get("inputs") or {}).items()}
        record = compare_model(
            os.path.join(corpus_dir, entry["path"]),
            name=entry["name"],
            cache_dir=cache_dir,
            declared_shapes=declared,
            timeout=timeout,
            seed=seed,
            threads=threads,
            setups=setups,
            log=log,
        )
        record["entry"] = entry
        return record

    if jobs <= 1:
        return [one(entry) for entry in entries]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, entries))


# --------------------------------------------------------------------------------------------
# Report


def _cell(result, field="bn") -> str:
    status = result.get("status")
    if status in COUNTED_STATUSES:
        return str(result[field]) + ("?" if status == STATUS_UNVERIFIED else "")
    if status == STATUS_NOT_PORTABLE:
        return f"({result[field]})"
    return {STATUS_WRONG: "wrong", STATUS_ERROR: "error", STATUS_TIMEOUT: "timeout", STATUS_NA: "n/a"}.get(
        status, str(status)
    )


def format_table(records, tool_names, field="bn") -> str:
    """One row per model: the original's count, each tool's ("bn" or "nodes"), best other, marker."""
    if field == "bn":
        columns = ["model", "BN"] + list(tool_names) + ["best other", ""]
    else:
        columns = ["model", field] + list(tool_names) + ["", ""]
    rows = []
    for record in records:
        if record.get("error"):
            rows.append([record["name"], "error"] + [""] * len(tool_names) + ["", ""])
            continue
        cells = [_cell(record["tools"].get(t, {"status": STATUS_NA}), field) for t in tool_names]
        if field == "bn":
            best = record["best_other"]["bn"]
            marker = (
                "<< bnfold leaves more"
                if record["bnfold_more"]
                else "<< bnfold failed"
                if record["bnfold_failed"]
                else ""
            )
            tail = ["-" if best is None else str(best), marker]
        else:
            tail = ["", ""]
        rows.append([record["name"], str(record[f"{field}_original"])] + cells + tail)
    widths = [max(len(r[i]) for r in rows + [columns]) for i in range(len(columns))]
    lines = []
    for row in [columns] + rows:
        line = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:-1])]
        lines.append("  ".join(line + [row[-1]]).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_markdown(records, tool_names) -> str:
    """The BN table as Markdown (docs/corpus.md): one row per model, then the totals -- BNs in
    the files, BNs each tool removed in its correct outputs, and its outputs by status."""
    lines = ["| model | BN | " + " | ".join(tool_names) + " |", "|---" * (len(tool_names) + 2) + "|"]
    removed = dict.fromkeys(tool_names, 0)
    statuses = {t: {} for t in tool_names}
    total = 0
    for record in records:
        if record.get("error"):
            lines.append(f"| {record['name']} | error |" + " |" * len(tool_names))
            continue
        total += record["bn_original"]
        cells = []
        for tool in tool_names:
            result = record["tools"].get(tool, {"status": STATUS_NA})
            cell = _cell(result)
            if tool == UNDER_TEST and record.get("bnfold_more"):
                cell = f"**{cell}** (best other {record['best_other']['bn']})"
            cells.append(cell)
            statuses[tool][result.get("status")] = statuses[tool].get(result.get("status"), 0) + 1
            if result.get("status") in COUNTED_STATUSES + (STATUS_NOT_PORTABLE,):
                removed[tool] += record["bn_original"] - result["bn"]
        lines.append(f"| {record['name']} | {record['bn_original']} | " + " | ".join(cells) + " |")
    lines.append(f"| **BNs removed (of {total})** | | " + " | ".join(str(removed[t]) for t in tool_names) + " |")
    for status in (STATUS_WRONG, STATUS_ERROR, STATUS_TIMEOUT):
        lines.append(
            f"| outputs {status} | | " + " | ".join(str(statuses[t].get(status, 0)) for t in tool_names) + " |"
        )
    return "\n".join(lines)


def format_report(records, setups) -> str:
    tool_names = [t for t in TOOL_ORDER if t in setups]
    out = [format_table(records, tool_names), ""]
    out.append(
        "cells: BatchNormalization nodes left (all graphs); (n) = correct but uses "
        "non-standard operators, not counted as best; n? = not verified (the original "
        "does not run); wrong = output does not load or differs from the original; "
        "best other = fewest BNs among the other tools' correct, portable outputs"
    )
    # Fewer BNs is not always a smaller graph: a tool may replace a BN by run-time weight
    # arithmetic (onnxoptimizer's fuse_bn_into_conv on some files); the node counts show that.
    out += ["", "all nodes (all graphs):", format_table(records, tool_names, field="nodes")]
    # Decomposed BNs (Keras 3, FrozenBatchNorm2d): no BN node, and still foldable work.
    out += [
        "",
        "constant Add/Sub/Mul/Div fed by a layer with a constant weight (decomposed BNs, main graph):",
        format_table(records, tool_names, field="chains"),
    ]
    unavailable = [(t, s.reason) for t, s in setups.items() if not s.available]
    if unavailable:
        out += ["", "not available:"] + [f"  {t}: {reason}" for t, reason in unavailable]
    problems = []
    for record in records:
        if record.get("error"):
            problems.append(f"  {record['name']}: {record['error']}")
            continue
        reference = record.get("reference") or {}
        if reference.get("error"):
            problems.append(f"  {record['name']}: reference run failed: {reference['error']}")
        for tool in tool_names:
            result = record["tools"].get(tool, {})
            if result.get("status") in (STATUS_WRONG, STATUS_ERROR, STATUS_TIMEOUT):
                problems.append(f"  {record['name']} / {tool}: {result['status']}: {result.get('problem')}")
    if problems:
        out += ["", "errors and wrong outputs:"] + problems
    findings = [describe_finding(r) for r in records if r.get("bnfold_more")]
    if findings:
        out += ["", "models where bnfold leaves more BNs than another tool:"] + findings
    return "\n".join(out)


def describe_finding(record) -> str:
    """Which BNs bnfold left that a better tool removed, bnfold's reason, what the tool did."""
    ours = record["tools"].get(UNDER_TEST, {})
    lines = [
        f"  {record['name']}: bnfold {record['bnfold_bn']} BNs"
        + (f" ({ours.get('status')}: {ours.get('problem')})" if record["bnfold_failed"] else "")
        + f", best other {record['best_other']['bn']} ({', '.join(record['best_other']['tools'])})"
    ]
    reasons = {e["bn"]: e["reason"] for e in (ours.get("facts") or {}).get("remaining", [])}
    left_by_us = set(ours.get("left_bns") or [])
    for tool in record["best_other"]["tools"]:
        removed = record["tools"][tool].get("removed_bns") or {}
        for bn in sorted(left_by_us & set(removed)):
            lines.append(f"    {bn} (bnfold: {reasons.get(bn, '?')}) -- {tool}: {removed[bn]}")
    return "\n".join(lines)


def versions_summary(setups) -> dict:
    merged = {}
    for setup in setups.values():
        for name, version in setup.versions.items():
            label = name if setup.python == sys.executable else f"{name} [{setup.name} venv]"
            merged[label] = version
    return merged


# --------------------------------------------------------------------------------------------
# Command line


def _collect_targets(paths):
    """Positional arguments -> [(corpus_dir, None)] or [(None, model_path), ...]."""
    corpora, files = [], []
    for path in paths:
        if os.path.isdir(path):
            if not os.path.exists(os.path.join(path, "manifest.json")):
                raise ValueError(f"{path}: a directory without manifest.json")
            corpora.append(path)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or directory")
    return corpora, files


def _ensure_default_corpus(log):
    builder = _load_builder()
    if builder is None or not hasattr(builder, "ensure_corpus"):
        raise ValueError("no corpus given and tools/build_corpus.py is not there to build one")
    return builder.ensure_corpus(log=log)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--worker"]:
        return _worker_main(argv[1])
    parser = argparse.ArgumentParser(
        description="BatchNormalization nodes left by bnfold next to other ONNX optimizers.",
        epilog="Without a path: the default corpus of tools/build_corpus.py (built if needed).",
    )
    parser.add_argument("paths", nargs="*", help="corpus directories (with manifest.json) or .onnx files")
    parser.add_argument("--tools", help=f"comma-separated subset of: {','.join(TOOL_ORDER)} (bnfold is always run)")
    parser.add_argument("--models", help="comma-separated model names of the manifest to compare")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON")
    parser.add_argument("--markdown", metavar="OUT", help="write the BN table as Markdown")
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if bnfold leaves more BNs than the best other tool (or fails) on a model",
    )
    parser.add_argument(
        "--cache-dir",
        help="cache of other tools' results (default: <corpus dir>/.compare-cache, or beside each model file)",
    )
    parser.add_argument("--no-cache", action="store_true", help="run every tool afresh, write no cache")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds per tool per model (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the random inputs")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads in each check")
    parser.add_argument("--jobs", type=int, default=1, help="models compared at the same time")
    parser.add_argument("--aimet-python", help=f"interpreter with aimet-onnx (or ${AIMET_PYTHON_ENV})")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)

    def log(message):
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    try:
        tools = [t.strip() for t in args.tools.split(",") if t.strip()] if args.tools else None
        setups = resolve_tools(tools, aimet_python=args.aimet_python)
        corpora, files = _collect_targets(args.paths)
        if not corpora and not files:
            corpora = [_ensure_default_corpus(log)]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    names = set(args.models.split(",")) if args.models else None
    records, notes = [], []
    start = time.perf_counter()
    for corpus in corpora:
        manifest = _manifest(corpus)
        for kind in ("failed", "unavailable"):
            for item in manifest.get(kind, []):
                notes.append(f"{corpus}: {kind}: {_one_line(json.dumps(item), 200)}")
        cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir(corpus))
        log(f"{corpus}: {len(manifest.get('models', []))} models")
        by_name = {
            r["name"]: r
            for r in compare_manifest(
                corpus,
                cache_dir=cache_dir,
                use_cache=not args.no_cache,
                names=names,
                timeout=args.timeout,
                seed=args.seed,
                threads=args.threads,
                jobs=args.jobs,
                log=log,
                tools=list(setups),
                aimet_python=args.aimet_python,
            )
        }
        records += by_name.values()
    for path in files:
        cache_dir = (
            None
            if args.no_cache
            else (args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(path)), ".compare-cache"))
        )
        records.append(
            compare_model(
                path,
                cache_dir=cache_dir,
                timeout=args.timeout,
                seed=args.seed,
                threads=args.threads,
                setups=setups,
                log=log,
            )
        )
    elapsed = time.perf_counter() - start
    if not records:
        print("error: no models to compare", file=sys.stderr)
        return 2
    print(format_report(records, setups))
    if notes:
        print("\nnot in the corpus:\n" + "\n".join("  " + n for n in notes))
    cached = sum(r.get("cached", False) for rec in records for r in rec.get("tools", {}).values())
    run = sum(
        not r.get("cached", False) and r.get("status") != STATUS_NA
        for rec in records
        for r in rec.get("tools", {}).values()
    )
    versions = versions_summary(setups)
    print(
        f"\n{len(records)} models, {elapsed:.1f} s ({run} tool runs, {cached} from cache); "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    )
    if args.json:
        _write_json_atomic(
            args.json,
            {
                "versions": versions,
                "tools": {t: s.to_dict() for t, s in setups.items()},
                "seconds": elapsed,
                "models": records,
                "notes": notes,
            },
        )
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(format_markdown(records, [t for t in TOOL_ORDER if t in setups]) + "\n")
    if args.check:
        more = [r["name"] for r in records if r.get("bnfold_more")]
        failed = [r["name"] for r in records if r.get("bnfold_failed") and not r.get("bnfold_more")]
        # A model that could not even be read proves nothing either way: not a pass.
        unread = [r["name"] for r in records if r.get("error")]
        for label, names_ in (
            ("bnfold leaves more BNs than another tool", more),
            ("bnfold failed", failed),
            ("model could not be compared", unread),
        ):
            if names_:
                print(f"check failed: {label}: {', '.join(names_)}", file=sys.stderr)
        if more or failed or unread:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
