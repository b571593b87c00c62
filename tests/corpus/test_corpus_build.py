"""The real-world corpus is what it claims to be: enough architectures, every exporter variant on
several models, a manifest that agrees with the files, and every file runnable in onnxruntime.

These tests check the corpus itself (tools/build_corpus.py), not bnfold on it.
"""

from __future__ import annotations

import collections
import os
import re

import numpy as np
import onnx
import onnxruntime as ort

ENTRY_FIELDS = {
    "name": str,
    "path": str,
    "source": str,
    "arch": str,
    "exporter": str,
    "variant": str,
    "opset": int,
    "batch": str,
    "float16": str,
    "external_data": bool,
    "fresh_stats": bool,
    "inputs": dict,
    "notes": str,
}
FLOAT16_KINDS = {"none", "half", "converter", "converter_keep_io"}
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
# Each exporter variant must show up on at least this many models to be a real test of it.
MIN_MODELS_PER_VARIANT = 3


# ---- the plan and the family-module interface (no corpus needed) -------------------------------


def test_plan_names_are_unique_and_filesystem_safe(corpus_builder):
    names = [name for job in corpus_builder.all_jobs() for name in job.entry_names]
    assert len(names) == len(set(names))
    assert all(SAFE_NAME.match(name) for name in names)
    jobs = [job.job_id for job in corpus_builder.all_jobs()]
    assert len(jobs) == len(set(jobs))
    assert len({(arch.source, arch.arch) for arch in corpus_builder.ARCHS}) >= 40


def test_family_module_that_raises_is_unavailable(corpus_builder, tmp_path):
    module = tmp_path / "corpus_broken.py"
    module.write_text(
        'FAMILY = "broken"\n'
        "def fingerprint_parts():\n    return []\n"
        "def build(out_dir, *, log=print):\n    raise RuntimeError('no toolchain here\\nsecond line')\n"
    )
    result = corpus_builder.build_family(str(module), str(tmp_path / "corpus"), lambda message: None)
    assert result["models"] == [] and result["failed"] == []
    assert result["unavailable"] == [{"family": "broken", "reason": "RuntimeError: no toolchain here"}]


def test_family_entries_get_the_family_folder(corpus_builder, tmp_path):
    module = tmp_path / "corpus_fake.py"
    module.write_text(
        'FAMILY = "fake"\n'
        "def fingerprint_parts():\n    return ['v1']\n"
        "def build(out_dir, *, log=print):\n"
        "    return {'models': [{'name': 'm', 'path': 'm.onnx'}], 'failed': [{'name': 'x', 'error': 'e'}],"
        " 'unavailable': []}\n"
    )
    result = corpus_builder.build_family(str(module), str(tmp_path / "corpus"), lambda message: None)
    assert result["models"] == [{"name": "m", "path": "fake/m.onnx"}]
    assert result["failed"] == [{"name": "x", "error": "e"}]
    assert (tmp_path / "corpus" / "fake").is_dir()


# ---- the built corpus --------------------------------------------------------------------------


def _onnx_model(corpus_dir, entry):
    return onnx.load(os.path.join(corpus_dir, entry["path"]), load_external_data=False)


def _is_torch_entry(entry):
    return entry["exporter"] in ("torchscript", "dynamo")


def test_at_least_40_architectures(corpus_manifest):
    architectures = {(entry["source"], entry["arch"]) for entry in corpus_manifest["models"]}
    assert len(architectures) >= 40, sorted(architectures)


def test_manifest_is_complete_and_current(corpus_manifest, corpus_builder):
    fingerprint, versions = corpus_builder.compute_fingerprint()
    assert corpus_manifest["fingerprint"] == fingerprint
    assert corpus_manifest["versions"] == versions
    assert corpus_manifest["complete"] is True
    for failure in corpus_manifest["failed"]:
        assert set(failure) >= {"name", "error"} and failure["error"], failure
    for family in corpus_manifest["unavailable"]:
        assert set(family) >= {"family", "reason"} and family["reason"], family


def test_second_ensure_uses_the_cache(corpus_dir, corpus_builder):
    messages = []
    assert corpus_builder.ensure_corpus(corpus_dir, log=messages.append) == corpus_dir
    assert messages == [], "a complete corpus was rebuilt"


def test_entry_fields(corpus_manifest, corpus_dir):
    names = collections.Counter(entry["name"] for entry in corpus_manifest["models"])
    assert not [name for name, count in names.items() if count > 1]
    for entry in corpus_manifest["models"]:
        for field, kind in ENTRY_FIELDS.items():
            assert isinstance(entry.get(field), kind), (entry["name"], field, entry.get(field))
        assert entry["bn_modules"] is None or isinstance(entry["bn_modules"], int)
        assert SAFE_NAME.match(entry["name"]), entry["name"]
        assert entry["batch"] in ("fixed", "dynamic")
        assert entry["float16"] in FLOAT16_KINDS
        path = os.path.normpath(entry["path"])
        assert not os.path.isabs(path) and not path.startswith(".."), entry["path"]
        assert path.endswith(".onnx") and os.path.isfile(os.path.join(corpus_dir, path)), entry["path"]
        assert entry["inputs"], entry["name"]


def test_entries_agree_with_their_files(corpus_manifest, corpus_dir):
    for entry in corpus_manifest["models"]:
        model = _onnx_model(corpus_dir, entry)
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert entry["opset"] == opset, entry["name"]
        initializers = {init.name for init in model.graph.initializer}
        inputs = [value for value in model.graph.input if value.name not in initializers]
        assert sorted(entry["inputs"]) == sorted(value.name for value in inputs), entry["name"]
        external = [init for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL]
        assert entry["external_data"] == bool(external), entry["name"]
        for init in external:
            location = {kv.key: kv.value for kv in init.external_data}["location"]
            assert os.path.isfile(os.path.join(corpus_dir, os.path.dirname(entry["path"]), location)), entry["name"]
        if not _is_torch_entry(entry):
            continue  # the family modules describe their own files
        first_dims = [entry["inputs"][value.name][0] for value in inputs]
        if entry["batch"] == "dynamic":
            assert all(isinstance(dim, str) for dim in first_dims), entry["name"]
        else:
            assert all(isinstance(dim, int) for dim in first_dims), entry["name"]
        input_types = {value.type.tensor_type.elem_type for value in inputs}
        weight_types = {init.data_type for init in model.graph.initializer if init.data_type in (1, 10)}
        if entry["float16"] in ("half", "converter"):
            assert input_types == {onnx.TensorProto.FLOAT16}, entry["name"]
        else:
            assert input_types == {onnx.TensorProto.FLOAT}, entry["name"]
        if entry["float16"] == "none":
            assert onnx.TensorProto.FLOAT16 not in weight_types, entry["name"]
        else:
            assert onnx.TensorProto.FLOAT16 in weight_types, entry["name"]
        expected_exporter = "ts" if entry["exporter"] == "torchscript" else "dynamo"
        assert entry["variant"].split("-")[0] == expected_exporter, entry["name"]
        assert entry["fresh_stats"] == ("fresh" in entry["variant"].split("-")), entry["name"]


def test_every_variant_is_spread_over_models(corpus_manifest):
    torch_entries = [entry for entry in corpus_manifest["models"] if _is_torch_entry(entry)]

    def count(predicate):
        return len({entry["arch"] for entry in torch_entries if predicate(entry)})

    tags = lambda entry: set(entry["variant"].split("-"))  # noqa: E731
    variants = {
        "torchscript defaults": lambda e: e["exporter"] == "torchscript" and not {"preserve"} & tags(e),
        "torchscript PRESERVE": lambda e: "preserve" in tags(e),
        "dynamo defaults": lambda e: e["exporter"] == "dynamo" and "noopt" not in tags(e),
        "dynamo optimize=False": lambda e: "noopt" in tags(e),
        "dynamic batch": lambda e: e["batch"] == "dynamic",
        "fixed batch": lambda e: e["batch"] == "fixed",
        "model.half()": lambda e: e["float16"] == "half",
        "float16 converter": lambda e: e["float16"] == "converter",
        "float16 converter keep_io_types": lambda e: e["float16"] == "converter_keep_io",
        "external data": lambda e: e["external_data"],
        "fresh statistics": lambda e: e["fresh_stats"],
    }
    thin = {
        label: count(predicate) for label, predicate in variants.items() if count(predicate) < MIN_MODELS_PER_VARIANT
    }
    if count(variants["fresh statistics"]) >= 2:
        thin.pop("fresh statistics", None)  # "a couple of models" is what fresh exports need
    assert not thin, thin
    torchscript_opsets = {e["opset"] for e in torch_entries if e["exporter"] == "torchscript"}
    assert set(range(11, 21)) <= torchscript_opsets, sorted(torchscript_opsets)
    assert {e["opset"] for e in torch_entries if e["exporter"] == "dynamo"} >= {18, 20}


def test_fresh_exports_have_identity_nodes(corpus_manifest, corpus_dir):
    # Equal fresh statistics make the TorchScript exporter deduplicate tensors into Identity nodes.
    fresh = [e for e in corpus_manifest["models"] if e["fresh_stats"] and e["exporter"] == "torchscript"]
    assert fresh
    with_identity = [e for e in fresh if any(n.op_type == "Identity" for n in _onnx_model(corpus_dir, e).graph.node)]
    assert with_identity, [e["name"] for e in fresh]


def test_batch_norms_are_present(corpus_manifest):
    # PRESERVE and optimize=False keep the BN nodes: the corpus must give bnfold something to fold.
    kept = [e for e in corpus_manifest["models"] if {"preserve", "noopt"} & set(e["variant"].split("-"))]
    assert kept and sum(1 for e in kept if e.get("bn_nodes")) >= 0.8 * len(kept)


_NUMPY_OF_ORT_TYPE = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def test_runs_in_onnxruntime_on_zeros(corpus_entry, corpus_dir):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        os.path.join(corpus_dir, corpus_entry["path"]), options, providers=["CPUExecutionProvider"]
    )
    examples = corpus_entry.get("example_inputs") or {}
    feeds = {}
    for value in session.get_inputs():
        declared = corpus_entry["inputs"][value.name]
        # Symbolic sizes: the entry's example (models with dynamic image sizes run only at some), else 1.
        shape = examples.get(value.name) or [dim if isinstance(dim, int) and dim > 0 else 1 for dim in declared]
        feeds[value.name] = np.zeros(shape, dtype=_NUMPY_OF_ORT_TYPE[value.type])
    outputs = session.run(None, feeds)
    assert outputs and all(
        np.isfinite(np.asarray(o, dtype=np.float64)).all() for o in outputs if np.asarray(o).dtype.kind == "f"
    )
