"""bnfold.check refuses, in one line and before any allocation, what it cannot do: arguments of the
wrong type or value (errors name the argument), more samples than MAX_SAMPLES, synthesized inputs
beyond the memory limit or int64; and it emits no numpy RuntimeWarning on non-finite or extreme
values (issue 11). The CLI promises exit 2 with one line on stderr within seconds: tested through
``python -m bnfold`` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

import bnfold
from bnfold.errors import ArgumentTypeError, InputError
from bnfold.verify import inputs as verify_inputs
from bnfold.verify.inputs import MAX_SAMPLES, check_input_budget
from bnfold.verify.intermediates import Intermediate, estimate_bytes
from bnfold.verify.models import TensorSpec
from bnfold.verify.noise import nudge_inputs, rounded_once_more

# A refusal takes an interpreter start and an import of onnx/onnxruntime (2-3 s here); the
# repros it replaces ran for minutes or died in a MemoryError.
CLI_SECONDS = 20


def _model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def relu_model(shape, elem_type=TensorProto.FLOAT):
    """x -> Relu -> h -> Relu -> y: one intermediate value, ``h``."""
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", elem_type, shape)],
        [helper.make_tensor_value_info("y", elem_type, shape)],
    )


def matmul_model(weights, dtype=np.float32, batch=1):
    """x (batch, 4) @ w (4, 4): the weights decide what the outputs hold (NaN, Inf, 1e308)."""
    elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w = np.asarray(weights, dtype=np.float64).reshape(4, 4)
    with np.errstate(over="ignore"):  # a test's own extreme weights, cast on purpose
        w = w.astype(dtype)
    return _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", elem_type, [batch, 4])],
        [helper.make_tensor_value_info("y", elem_type, [batch, 4])],
        [nh.from_array(w, "w")],
    )


@pytest.fixture
def small():
    return relu_model(["N", 4])


def _save(model, path):
    onnx.save(model, path)
    return str(path)


def run_cli(*args):
    """``(exit code, stdout, stderr lines, seconds)`` of ``python -m bnfold ARGS``."""
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bnfold", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    return done.returncode, done.stdout, done.stderr.splitlines(), time.monotonic() - start


def assert_refused_in_one_line(args, *expected):
    code, stdout, err, seconds = run_cli(*args)
    assert code == 2, (code, stdout, err)
    assert len(err) == 1, err
    assert err[0].startswith("bnfold check: error: ") or err[0].startswith("bnfold bench: error: "), err
    assert "internal error" not in err[0] and "Traceback" not in err[0]
    for text in expected:
        assert text in err[0], (text, err[0])
    return err[0]


def _available(monkeypatch, nbytes):
    monkeypatch.setattr(verify_inputs, "available_memory", lambda: (nbytes, "memory available"))


# --------------------------------------------------------------------------------------------
# Arguments: errors name them (TypeError / ValueError for API users, InputError for the CLI)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, named",
    [
        ({"candidate": None}, TypeError, "candidate"),
        ({"candidate": 3.5}, TypeError, "candidate"),
        ({"reference": None}, TypeError, "reference"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"seed": True}, TypeError, "seed"),
        ({"seed": None}, TypeError, "seed"),
        ({"samples": 0}, ValueError, "samples"),
        ({"samples": -3}, ValueError, "samples"),
        ({"samples": 2.0}, TypeError, "samples"),
        ({"samples": "3"}, TypeError, "samples"),
        ({"samples": MAX_SAMPLES + 1}, ValueError, f"samples must be at most {MAX_SAMPLES}"),
        ({"shapes": {"x": (-1, 4)}}, ValueError, "shapes['x']: dimension 0 is -1"),
        ({"shapes": {"x": (1, 0)}}, ValueError, "shapes: input 'x' has size 0 in dimension 1"),
        ({"shapes": {"x": (1.5, 4)}}, TypeError, "shapes['x']: dimension 0 must be an integer"),
        ({"shapes": {"x": "1x4"}}, TypeError, "shapes['x']"),
        ({"shapes": {"x": 4}}, TypeError, "shapes['x']"),
        ({"shapes": [("x", (1, 4))]}, TypeError, "shapes must be a dict"),
        ({"shapes": {3: (1, 4)}}, TypeError, "shapes: keys must be input names"),
        ({"inputs": 5}, TypeError, "inputs must be"),
        ({"opt_level": 3}, TypeError, "opt_level"),
        ({"opt_level": "fast"}, ValueError, "unknown optimization level 'fast'"),
        ({"candidate_opt_level": None, "opt_level": None}, TypeError, "opt_level"),
        ({"candidate_label": 7}, TypeError, "candidate_label"),
    ],
)
def test_check_argument_errors_name_the_argument(small, kwargs, error, named):
    arguments = {"reference": small, "candidate": small, **kwargs}
    with pytest.raises(error, match=None) as raised:
        bnfold.check(arguments.pop("reference"), arguments.pop("candidate"), **arguments)
    assert named in str(raised.value)
    # Also an InputError: a CLI path that passes such a value on exits 2, not 3.
    assert isinstance(raised.value, InputError)
    assert len(str(raised.value).splitlines()) == 1


def test_argument_type_error_is_both_type_error_and_input_error():
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, InputError)
    assert issubclass(InputError, ValueError)


def test_valid_arguments_in_numpy_types_are_taken(small):
    report = bnfold.check(small, small, seed=np.uint64(2**63 + 5), samples=np.int64(2), shapes={"x": np.array([2, 4])})
    assert report.passed and report.samples == 2 and report.inputs["x"]["shape"] == [2, 4]


def test_huge_seed_is_what_numpy_takes(small):
    assert bnfold.check(small, small, seed=2**100).passed


# --------------------------------------------------------------------------------------------
# What synthesized inputs may take
# --------------------------------------------------------------------------------------------


def test_huge_static_input_is_refused_before_allocating(monkeypatch):
    model = relu_model([1, 3, 100000, 100000])

    def no_drawing(*args, **kwargs):
        raise AssertionError("inputs were drawn")

    monkeypatch.setattr(verify_inputs, "synthesize_inputs", no_drawing)
    with pytest.raises(InputError) as raised:
        bnfold.check(model, model)
    message = str(raised.value)
    # The input, its shape, dtype and size, and the limit with how it was chosen.
    for text in (
        "input 'x' of shape 1x3x100000x100000 float32",
        "112 GiB per sample",
        "more than the limit of",
        "of memory available",
        "static shape",
    ):
        assert text in message, (text, message)
    assert len(message.splitlines()) == 1


def test_samples_are_counted_and_the_message_says_how_many_fit(monkeypatch, small):
    _available(monkeypatch, 400 << 20)  # a limit of 100 MiB
    # One sample of 1M x 4 float32: 16 MiB kept + 32 MiB while drawn in float64.
    assert bnfold.check(small, small, shapes={"x": (1 << 20, 4)}, measure_noise=False).passed
    with pytest.raises(
        InputError,
        match=r"input 'x' of shape 1048576x4 float32 takes 16 MiB per sample \(10 sample"
        r".*; 4 sample\(s\) would fit",
    ):
        bnfold.check(small, small, shapes={"x": (1 << 20, 4)}, samples=10)


def test_dynamic_input_too_big_suggests_smaller_dimensions(monkeypatch, small):
    _available(monkeypatch, 1 << 30)
    with pytest.raises(InputError, match=r"give smaller dimensions, e\.g\. --shape x:"):
        bnfold.check(small, small, shapes={"x": (99999999999, 4)})


def test_element_count_beyond_int64_is_refused():
    model = relu_model(["N", "M"])
    with pytest.raises(
        InputError,
        match=r"input 'x' of shape 4294967296x4294967296 has 1.84e\+19 elements, more than "
        r"int64 can count",
    ):
        bnfold.check(model, model, shapes={"x": (2**32, 2**32)})


def test_unknown_available_memory_falls_back_to_a_fixed_limit(monkeypatch):
    monkeypatch.setattr(verify_inputs, "available_memory", lambda: (None, ""))
    limit, how = verify_inputs.input_memory_limit()
    assert limit == verify_inputs.INPUT_MEMORY_FALLBACK and "fixed" in how
    specs = [TensorSpec("x", "float32", (None, 4))]
    with pytest.raises(InputError, match=r"limit of 4 GiB \(a fixed 4 GiB, the available memory being unknown\)"):
        check_input_budget(specs, {"x": (1 << 30, 4)})
    check_input_budget(specs, {"x": (1 << 20, 4)})  # 16 MiB: fine


def test_available_memory_is_read_on_linux():
    available, source = verify_inputs.available_memory()
    if os.path.exists("/proc/meminfo"):
        assert available > 0 and source
    limit, how = verify_inputs.input_memory_limit()
    assert limit > 0 and how


def test_intermediate_sizes_do_not_wrap_around_int64():
    model = relu_model(["N", "M"])
    value = Intermediate("h", "float32", "Relu", "Relu", 0)
    size, unknown = estimate_bytes(model, [value], {"x": (2**32, 2**32)})
    assert (size, unknown) == (2**64 * 4, 0)  # an int64 product is 0 here


# --------------------------------------------------------------------------------------------
# The CLI: exit 2, one line, within seconds (the repros of issue 11)
# --------------------------------------------------------------------------------------------


def test_cli_huge_static_input(tmp_path):
    path = _save(relu_model([1, 3, 100000, 100000]), tmp_path / "huge.onnx")
    assert_refused_in_one_line(["check", path, path], "input 'x' of shape 1x3x100000x100000 float32", "limit")


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--samples", "100000000"], [f"--samples must be between 1 and {MAX_SAMPLES}", "100000000"]),
        (["--seed", "-1"], ["--seed must be >= 0", "-1"]),
        (["--shape", "x:99999999999x4"], ["input 'x' of shape 99999999999x4 float32", "limit"]),
        (["--shape", "x:9999999999999999999999x4"], ["more than int64 can count"]),
    ],
)
def test_cli_check_bad_values(tmp_path, small, options, expected):
    path = _save(small, tmp_path / "small.onnx")
    assert_refused_in_one_line(["check", path, path, *options], *expected)


# --------------------------------------------------------------------------------------------
# No numpy RuntimeWarning on non-finite or extreme values
# --------------------------------------------------------------------------------------------


def _check_quietly(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        report = bnfold.check(*args, **kwargs)
        report.to_dict()
        report.format_table()
    return report


BASE = np.arange(16.0)


def _with(position, value):
    weights = BASE.copy()
    weights[position] = value
    return weights


@pytest.mark.parametrize(
    "reference, candidate",
    [
        (_with(3, np.nan), BASE),
        (BASE, _with(3, np.nan)),
        (_with(3, np.nan), _with(3, np.nan)),
        (_with(3, np.inf), _with(3, -np.inf)),
        (_with(3, np.inf), _with(5, np.nan)),
        (np.full(16, np.nan), np.full(16, np.nan)),
    ],
)
@pytest.mark.parametrize(
    "options", [{}, {"intermediates": True, "samples": 2}, {"atol": 1e-3, "rtol": 0.0}, {"opt_level": "all"}]
)
def test_non_finite_outputs_give_no_runtime_warning(reference, candidate, options):
    _check_quietly(matmul_model(reference), matmul_model(candidate), **options)


def test_float64_outputs_far_apart_near_the_limit_fail_without_warning():
    # Weights of +-1e308 make outputs of opposite sign near float64's limit: the difference
    # overflows to Inf, which is a mismatch, not a warning.
    reference = matmul_model(_with(3, 1e308), np.float64, batch=4)
    candidate = matmul_model(_with(3, -1e308), np.float64, batch=4)
    for options in ({}, {"atol": 1e-3, "rtol": 0.0}, {"measure_noise": False}):
        report = _check_quietly(reference, candidate, seed=1, **options)
        assert not report.passed


def test_float16_weights_at_the_limit_give_no_runtime_warning():
    model = matmul_model(_with(3, 60000.0), np.float16)
    _check_quietly(model, model, intermediates=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again = rounded_once_more(model)
    rounded = nh.to_array(again.graph.initializer[0])
    assert np.isfinite(rounded).all()  # the weight that would overflow when scaled stays as it was
    assert rounded.reshape(-1)[3] == np.float16(60000.0)


def test_inputs_at_the_dtype_limit_stay_finite_when_nudged():
    top = np.finfo(np.float32).max
    feeds = {"x": np.array([[top, -top, 1.0, np.inf]], np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        nudged = nudge_inputs(feeds, np.random.default_rng(0))["x"]
    assert np.isfinite(nudged[0, :3]).all() and nudged[0, 3] == np.inf
    assert nudged[0, 0] == np.nextafter(top, np.float32(0)) and nudged[0, 1] == -nudged[0, 0]
    _check_quietly(matmul_model(BASE), matmul_model(BASE), inputs=feeds)


def test_cli_nan_weights_print_no_runtime_warning(tmp_path):
    path = _save(matmul_model(np.full(16, np.nan)), tmp_path / "nan.onnx")
    code, stdout, err, _ = run_cli("check", path, path, "--intermediates")
    assert code == 1, (stdout, err)  # nothing real compared: not a pass
    assert len(err) == 1 and err[0].startswith("bnfold check: FAIL"), err
    assert "RuntimeWarning" not in "\n".join(err)


def bad_bias_model():
    """Valid for onnx.checker, but onnxruntime's Conv refuses its 5-element bias at run time."""
    weights, bias = nh.from_array(np.ones((8, 3, 3, 3), np.float32), "w"), nh.from_array(np.ones(5, np.float32), "b")
    return _model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 6, 6])],
        [weights, bias],
    )


@pytest.mark.parametrize("command", [["check"], ["bench", "--repeat", "1"]])
def test_cli_model_onnxruntime_cannot_run_is_one_line_not_two(tmp_path, command):
    # onnxruntime logs a failed run on stderr itself unless its log level is fatal-only; the
    # InputError already quotes its message.
    path = _save(bad_bias_model(), tmp_path / "bad_bias.onnx")
    name, *options = command
    assert_refused_in_one_line(
        [name, path, path, *options], "onnxruntime failed to run the model", "bias must be a 1D tensor"
    )
