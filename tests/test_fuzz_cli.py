"""Seeded fuzzing of the command line with mutated models: `bnfold fold`, `inspect` and `check` on
damaged copies of a few models never exit with anything but 0, 1 or 2, never print a traceback
or an internal error, never change their input and never leave a temporary file.

Mutations are both blind (flipped, dropped and inserted bytes; truncation) and structural (dims,
element types, payload sizes, attributes, node wiring, opset and IR versions, external data
entries), so that the cases reach past the protobuf parser into the checker, the fold rules,
the writer and onnxruntime. Cases run in-process through ``bnfold.cli.app`` (a few through a
subprocess) within a fixed time budget; the seed makes every run the same cases in the same
order, and a failure names its case so that it can be replayed with ``BNFOLD_FUZZ_CASE``.
"""

from __future__ import annotations

import faulthandler
import hashlib
import io
import os
import subprocess
import sys
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.cli.app import main

SEED = 20261201
TIME_BUDGET = float(os.environ.get("BNFOLD_FUZZ_SECONDS", "30"))
MAX_CASES = 2000
ALLOWED_EXIT_CODES = (0, 1, 2)


def _model(nodes, inputs, outputs, inits, opset=15):
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", opset)]
    )
    model.ir_version = 8
    return model


def _bn_params(rng, channels, prefix="bn"):
    return [
        numpy_helper.from_array((rng.random(channels) + offset).astype(np.float32), f"{prefix}_{name}")
        for name, offset in (("scale", 0.5), ("bias", -0.5), ("mean", -0.5), ("var", 0.5))
    ]


def _bn(input_name, output, prefix="bn"):
    return helper.make_node(
        "BatchNormalization", [input_name] + [f"{prefix}_{n}" for n in ("scale", "bias", "mean", "var")], [output]
    )


def conv_bn(rng, channels=8, big=False):
    cin = 64 if big else 3
    inits = [
        numpy_helper.from_array(rng.standard_normal((channels if not big else 64, cin, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(channels if not big else 64).astype(np.float32), "b"),
    ]
    c = 64 if big else channels
    inits += _bn_params(rng, c)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        _bn("c", "bn_out"),
        helper.make_node("Relu", ["bn_out"], ["y"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 6, 6])],
        inits,
    )


def gemm_bn(rng):
    inits = [
        numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b"),
    ] + _bn_params(rng, 5)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1), _bn("g", "y")]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
        inits,
    )


def bn_matmul(rng):
    inits = _bn_params(rng, 6) + [numpy_helper.from_array(rng.standard_normal((6, 3)).astype(np.float32), "w")]
    nodes = [_bn("x", "n"), helper.make_node("MatMul", ["n", "w"], ["y"])]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        inits,
    )


def seed_models():
    rng = np.random.default_rng(SEED)
    return {
        "conv_bn": conv_bn(rng),
        "conv_bn_big": conv_bn(rng, big=True),
        "gemm_bn": gemm_bn(rng),
        "bn_matmul": bn_matmul(rng),
    }


# --- mutations -------------------------------------------------------------------------------


def blind_mutation(data: bytes, rng) -> bytes:
    data = bytearray(data)
    kind = rng.integers(4)
    if kind == 0:  # flip a few bytes
        for _ in range(int(rng.integers(1, 8))):
            data[int(rng.integers(len(data)))] ^= int(rng.integers(1, 256))
    elif kind == 1:  # truncate
        del data[int(rng.integers(len(data))) :]
    elif kind == 2:  # drop a run of bytes
        start = int(rng.integers(len(data)))
        del data[start : start + int(rng.integers(1, 64))]
    else:  # insert random bytes
        start = int(rng.integers(len(data)))
        data[start:start] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
    return bytes(data)


def _any_int(rng):
    return int(rng.choice([-(2**63), -(2**31), -7, -1, 0, 1, 2, 3, 7, 1000, 2**31, 2**40]))


def structural_mutation(model: onnx.ModelProto, rng) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    kind = int(rng.integers(12))
    if kind == 0 and graph.initializer:  # dims
        tensor = graph.initializer[int(rng.integers(len(graph.initializer)))]
        dims = list(tensor.dims)
        if dims and rng.random() < 0.5:
            dims[int(rng.integers(len(dims)))] = _any_int(rng)
        elif dims and rng.random() < 0.5:
            dims = [-d for d in dims] if len(dims) % 2 == 0 else dims[::-1]
        else:
            dims.append(int(rng.integers(0, 3)))
        del tensor.dims[:]
        tensor.dims.extend(dims)
    elif kind == 1 and graph.initializer:  # element type
        tensor = graph.initializer[int(rng.integers(len(graph.initializer)))]
        tensor.data_type = int(rng.integers(0, 27))
    elif kind == 2 and graph.initializer:  # payload size
        tensor = graph.initializer[int(rng.integers(len(graph.initializer)))]
        raw = tensor.raw_data
        tensor.raw_data = raw[: int(rng.integers(len(raw) + 1))] if rng.random() < 0.5 else raw + b"\0" * 4
    elif kind == 3:  # attributes
        node = graph.node[int(rng.integers(len(graph.node)))]
        name = str(
            rng.choice(
                [
                    "pads",
                    "strides",
                    "dilations",
                    "group",
                    "epsilon",
                    "momentum",
                    "transB",
                    "kernel_shape",
                    "training_mode",
                    "axis",
                ]
            )
        )
        for a in list(node.attribute):
            if a.name == name:
                node.attribute.remove(a)
        if name == "epsilon" or name == "momentum":
            value = float(rng.choice([-1.0, 0.0, np.inf, np.nan, 1e30]))
        elif name in ("pads", "strides", "dilations", "kernel_shape"):
            value = [_any_int(rng) for _ in range(int(rng.integers(1, 5)))]
        else:
            value = _any_int(rng)
        node.attribute.append(helper.make_attribute(name, value))
    elif kind == 4:  # rewire a node input
        node = graph.node[int(rng.integers(len(graph.node)))]
        names = (
            [i.name for i in graph.input]
            + [t.name for t in graph.initializer]
            + [o for n in graph.node for o in n.output]
        )
        if node.input:
            node.input[int(rng.integers(len(node.input)))] = str(rng.choice(names + ["", "missing"]))
    elif kind == 5:  # opset / IR version
        if rng.random() < 0.5:
            model.opset_import[0].version = int(rng.choice([1, 6, 7, 9, 14, 22, 30, 1000]))
        else:
            model.ir_version = int(rng.choice([0, 1, 3, 4, 11, 12, 99]))
    elif kind == 6 and graph.initializer:  # point a tensor at external data that is not there
        tensor = graph.initializer[int(rng.integers(len(graph.initializer)))]
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        location = str(rng.choice(["missing.bin", "../escape.bin", "/etc/passwd", "model.onnx", "", "fifo"]))
        tensor.external_data.add(key="location", value=location)
        if rng.random() < 0.5:
            tensor.external_data.add(key="length", value=str(_any_int(rng)))
        if rng.random() < 0.5:
            tensor.external_data.add(key="offset", value=str(_any_int(rng)))
    elif kind == 7:  # value info: shapes that disagree with the data
        for value in list(graph.input) + list(graph.output):
            if value.type.tensor_type.HasField("shape") and rng.random() < 0.7:
                for d in value.type.tensor_type.shape.dim:
                    if rng.random() < 0.5:
                        d.dim_value = int(rng.choice([0, 1, 3, 2**31]))
            if rng.random() < 0.3:
                value.type.tensor_type.elem_type = int(rng.integers(0, 17))
    elif kind == 8:  # op types
        node = graph.node[int(rng.integers(len(graph.node)))]
        node.op_type = str(rng.choice(["BatchNormalization", "Conv", "Gemm", "MatMul", "Identity", "Nope"]))
        if rng.random() < 0.3:
            node.domain = str(rng.choice(["com.microsoft", "ai.onnx.ml", "x"]))
    elif kind == 10 and graph.initializer:  # same payload, another shape: reaches the fold rules
        tensor = graph.initializer[int(rng.integers(len(graph.initializer)))]
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        divisors = [d for d in range(1, count + 1) if count % d == 0]
        first = int(rng.choice(divisors))
        shape = [first, count // first] if rng.random() < 0.5 else [count]
        if rng.random() < 0.5:
            shape = shape + [1] * int(rng.integers(1, 3))
        del tensor.dims[:]
        tensor.dims.extend(shape)
    elif kind == 11 and len(graph.initializer) > 1:  # two parameters trade places
        i, j = rng.choice(len(graph.initializer), 2, replace=False)
        a, b = graph.initializer[int(i)], graph.initializer[int(j)]
        a.name, b.name = b.name, a.name
    else:  # duplicate or drop things
        if rng.random() < 0.5 and graph.node:
            graph.node.append(graph.node[int(rng.integers(len(graph.node)))])
        elif graph.initializer:
            del graph.initializer[int(rng.integers(len(graph.initializer)))]
    return model


def make_case(index: int, models: dict, rng):
    name = list(models)[index % len(models)]
    base = models[name]
    if rng.random() < 0.35:
        data = blind_mutation(base.SerializeToString(), rng)
        return f"{name}/blind", data
    model = base
    for _ in range(int(rng.integers(1, 3))):
        model = structural_mutation(model, rng)
    try:
        return f"{name}/structural", model.SerializeToString()
    except Exception:  # noqa: BLE001 - a mutation protobuf cannot encode: use the original bytes
        return f"{name}/structural", base.SerializeToString()


# --- the test --------------------------------------------------------------------------------


def run_in_process(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


def commands_for(path, other, directory):
    out = os.path.join(directory, "out.onnx")
    return [
        ["fold", path, "-o", out],
        ["inspect", path],
        ["check", other, path, "--no-noise"],
        ["fold", path, "-o", out, "--no-check"],
    ]


def check_outcome(label, code, err, directory, model_path, digest_before):
    assert code in ALLOWED_EXIT_CODES, f"{label}: exit {code}: {err}"
    assert "Traceback" not in err and "internal error" not in err, f"{label}: {err}"
    with open(model_path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest_before, f"{label}: input changed"
    leftovers = [n for n in os.listdir(directory) if n.startswith(".bnfold-")]
    assert not leftovers, f"{label}: temporaries left: {leftovers}"


def test_mutated_models_through_fold_inspect_check(tmp_path):
    models = seed_models()
    reference = tmp_path / "reference.onnx"
    onnx.save_model(models["conv_bn"], str(reference))
    os.mkfifo(tmp_path / "fifo")
    rng = np.random.default_rng(SEED)
    only = os.environ.get("BNFOLD_FUZZ_CASE")
    faulthandler.dump_traceback_later(TIME_BUDGET + 240, exit=True)  # a hang fails, not blocks
    try:
        start, cases, codes = time.monotonic(), 0, {}
        for index in range(MAX_CASES):
            label, data = make_case(index, models, rng)
            label = f"case {index} ({label})"
            if only is not None and str(index) != only:
                continue
            if only is None and time.monotonic() - start > TIME_BUDGET:
                break
            work = tmp_path / f"case{index}"
            work.mkdir()
            os.symlink(tmp_path / "fifo", work / "fifo")
            path = work / "model.onnx"
            path.write_bytes(data)
            digest_before = hashlib.sha256(data).hexdigest()
            for argv in commands_for(path, reference, str(work))[index % 2 :: 2]:
                code, _, err = run_in_process(argv)
                codes[code] = codes.get(code, 0) + 1
                check_outcome(f"{label}: bnfold {' '.join(map(str, argv))}", code, err, str(work), path, digest_before)
            cases += 1
    finally:
        faulthandler.cancel_dump_traceback_later()
    if only is None:
        assert cases >= 50, f"only {cases} cases ran in {TIME_BUDGET:g} s"
        # The mutations must reach past the parser: some cases fold, some are refused.
        assert codes.get(0, 0) > 0 and codes.get(2, 0) > 0, codes


@pytest.mark.parametrize("index", range(3))
def test_mutated_models_through_the_real_command_line(tmp_path, index):
    """A few cases as users run them: a separate process, nothing caught by a test harness."""
    models = seed_models()
    rng = np.random.default_rng(SEED + 1 + index)
    _, data = make_case(index, models, rng)
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    digest_before = hashlib.sha256(data).hexdigest()
    for argv in (["fold", path, "-o", tmp_path / "out.onnx"], ["inspect", path]):
        result = subprocess.run(
            [sys.executable, "-m", "bnfold", *map(str, argv)], capture_output=True, text=True, check=False, timeout=120
        )
        check_outcome(" ".join(map(str, argv)), result.returncode, result.stderr, str(tmp_path), path, digest_before)
