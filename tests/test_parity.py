"""bnfold.check / `bnfold check`: parity verdicts, input synthesis, tolerances and bad input."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

import bnfold
import bnfold.verify.noise
import bnfold.verify.parity
from bnfold.cli.app import main
from bnfold.errors import InputError
from bnfold.verify.inputs import load_inputs, synthesize_inputs
from bnfold.verify.models import TensorSpec
from bnfold.verify.shapes import parse_shape_specs, resolve_shapes
from bnfold.verify.tolerances import parse_tolerance_specs


def _model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _conv_bn_params(seed=0, cin=3, cout=4):
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((cout, cin, 3, 3)).astype(np.float32) * 0.5,
        "b": rng.standard_normal(cout).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, cout).astype(np.float32),
        "beta": rng.standard_normal(cout).astype(np.float32),
        "mean": rng.standard_normal(cout).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, cout).astype(np.float32),
    }


def conv_bn_model(p, input_name="x", output_name="y", out_channels=None):
    cout = p["w"].shape[0]
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", p["w"].shape[1], "H", "W"])
    y = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", out_channels or cout, "H", "W"])
    inits = [nh.from_array(p[k], k) for k in ("w", "b", "gamma", "beta", "mean", "var")]
    nodes = [
        helper.make_node("Conv", [input_name, "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], [output_name], epsilon=1e-5),
    ]
    return _model(nodes, [x], [y], inits)


def folded_conv_model(p, output_name="y"):
    """The Conv+BN above folded by hand, in float64: W' = W*s, b' = (b - mean)*s + beta."""
    s = p["gamma"].astype(np.float64) / np.sqrt(p["var"].astype(np.float64) + 1e-5)
    w = (p["w"] * s[:, None, None, None]).astype(np.float32)
    b = ((p["b"] - p["mean"]) * s + p["beta"]).astype(np.float32)
    cout = w.shape[0]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[1], "H", "W"])
    y = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", cout, "H", "W"])
    nodes = [helper.make_node("Conv", ["x", "w", "b"], [output_name], pads=[1, 1, 1, 1])]
    return _model(nodes, [x], [y], [nh.from_array(w, "w"), nh.from_array(b, "b")])


def two_output_model(scale_b=1.0):
    """y1 = x * 2, y2 = x * (3 * scale_b): lets a test perturb one output only."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 5]) for n in ("y1", "y2")]
    inits = [nh.from_array(np.array(2.0, np.float32), "k1"), nh.from_array(np.array(3.0 * scale_b, np.float32), "k2")]
    nodes = [helper.make_node("Mul", ["x", "k1"], ["y1"]), helper.make_node("Mul", ["x", "k2"], ["y2"])]
    return _model(nodes, [x], outs, inits)


def gather_where_model(table_rows=5):
    """Gather rows of a constant table by an int64 input, then Where on a bool input."""
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 3])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, ["N", 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4])
    table = np.arange(table_rows * 4, dtype=np.float32).reshape(table_rows, 4)
    inits = [nh.from_array(table, "table"), nh.from_array(np.array(-1.0, np.float32), "neg")]
    nodes = [
        helper.make_node("Gather", ["table", "idx"], ["rows"], axis=0),
        helper.make_node("Where", ["cond", "rows", "neg"], ["y"]),
    ]
    return _model(nodes, [idx, cond], [y], inits)


def unary_model(op_types, input_name="x"):
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [4, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6])
    names = [input_name] + [f"t{i}" for i in range(len(op_types) - 1)] + ["y"]
    nodes = [helper.make_node(op, [names[i]], [names[i + 1]]) for i, op in enumerate(op_types)]
    return _model(nodes, [x], [y])


@pytest.fixture()
def params():
    return _conv_bn_params()


def _save(model, path):
    onnx.save(model, str(path))
    return str(path)


# ---------------------------------------------------------------- verdicts


def test_identical_models_pass_api_and_cli(tmp_path, params, capsys):
    path = _save(conv_bn_model(params), tmp_path / "a.onnx")
    report = bnfold.check(path, conv_bn_model(params), samples=2, seed=3)
    assert isinstance(report, bnfold.CheckReport)
    assert report.passed and report.samples == 2
    assert [o.name for o in report.outputs] == ["y"]
    assert report.outputs[0].shape == (1, 4, 32, 32)  # defaults: batch 1, other dynamic dims 32
    assert report.outputs[0].mismatch_fraction == 0.0
    assert main(["check", path, path]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "y" in out


def test_hand_folded_model_passes(tmp_path, params):
    reference = _save(conv_bn_model(params), tmp_path / "a.onnx")
    candidate = _save(folded_conv_model(params), tmp_path / "b.onnx")
    report = bnfold.check(reference, candidate, shapes={"x": (2, 3, 9, 7)}, samples=3)
    assert report.passed, report.format_table()
    assert report.inputs["x"]["shape"] == [2, 3, 9, 7]
    # The outputs are computed differently, so a real comparison happened.
    assert 0.0 < report.max_abs_error < 1e-4


def test_folded_with_bnfold_fold_passes(tmp_path, params):
    model = conv_bn_model(params)
    folded, fold_report = bnfold.fold(model)
    assert fold_report.n_folded == 1
    assert bnfold.check(model, folded).passed


def test_perturbed_weight_fails_naming_the_output(tmp_path, params, capsys):
    reference = _save(conv_bn_model(params, output_name="features"), tmp_path / "a.onnx")
    perturbed = dict(params)
    perturbed["w"] = params["w"].copy()
    perturbed["w"][2, 1, 1, 1] += 0.05
    candidate = _save(conv_bn_model(perturbed, output_name="features"), tmp_path / "b.onnx")
    report = bnfold.check(reference, candidate)
    assert not report.passed and report.failed_outputs == ["features"]
    assert 0 < report.outputs[0].mismatch_fraction < 1  # only channel 2 is affected
    assert main(["check", reference, candidate]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out
    assert "features" in captured.err and "FAIL" in captured.err


# ---------------------------------------------------------------- bad input: exit 2


def test_mismatched_input_names(tmp_path, params, capsys):
    a = _save(conv_bn_model(params, input_name="x"), tmp_path / "a.onnx")
    b = _save(conv_bn_model(params, input_name="image"), tmp_path / "b.onnx")
    assert main(["check", a, b]) == 2
    err = capsys.readouterr().err
    assert "input names differ" in err and "image" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(InputError, match="input names differ"):
        bnfold.check(a, b)


def test_mismatched_output_names(tmp_path, params, capsys):
    a = _save(conv_bn_model(params, output_name="y"), tmp_path / "a.onnx")
    b = _save(conv_bn_model(params, output_name="logits"), tmp_path / "b.onnx")
    assert main(["check", a, b]) == 2
    err = capsys.readouterr().err
    assert "output names differ" in err and "logits" in err


def test_mismatched_shapes(tmp_path, capsys):
    a = _save(conv_bn_model(_conv_bn_params(cout=4)), tmp_path / "a.onnx")
    b = _save(conv_bn_model(_conv_bn_params(cout=6)), tmp_path / "b.onnx")
    assert main(["check", a, b]) == 2
    err = capsys.readouterr().err
    assert "output 'y': shape" in err and "Nx4xHxW" in err and "Nx6xHxW" in err


def test_corrupt_and_missing_files(tmp_path, params, capsys):
    good = _save(conv_bn_model(params), tmp_path / "a.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07 this is not protobuf \xff\xfe")
    assert main(["check", good, str(corrupt)]) == 2
    assert "corrupt.onnx" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "missing.onnx"), good]) == 2
    assert "no such file" in capsys.readouterr().err


def test_bad_shape_specs(tmp_path, params, capsys):
    path = _save(conv_bn_model(params), tmp_path / "a.onnx")
    for spec in ("x=1x3x8x8", "x:1x3x8", "nope:1x3x8x8", "x:1x4x8x8", "x:1xax8"):
        assert main(["check", path, path, "--shape", spec]) == 2, spec
        assert capsys.readouterr().err.count("\n") == 1


def test_parse_shape_specs():
    assert parse_shape_specs(["input:1x3x224x224", "a:b:7", "s:5"]) == {
        "input": (1, 3, 224, 224),
        "a:b": (7,),
        "s": (5,),
    }
    assert parse_shape_specs(None) == {}
    for bad in (["x"], ["x:"], [":1x2"], ["x:1x-2"], ["x:1x2", "x:1x3"]):
        with pytest.raises(InputError):
            parse_shape_specs(bad)


def empty_output_model():
    """y = x[0:0]: an empty output whatever the input, so no element can ever be compared."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [0, 5])
    inits = [nh.from_array(np.array([0], np.int64), n) for n in ("start", "end", "axis")]
    return _model([helper.make_node("Slice", ["x", "start", "end", "axis"], ["y"])], [x], [y], inits)


def test_zero_size_inputs_are_rejected_not_passed(tmp_path, params, capsys):
    reference = _save(conv_bn_model(params), tmp_path / "a.onnx")
    broken = dict(params)
    broken["w"] = params["w"] * 0 + 7  # differs on every element with real inputs
    candidate = _save(conv_bn_model(broken), tmp_path / "b.onnx")
    assert main(["check", reference, candidate]) == 1
    capsys.readouterr()
    with pytest.raises(InputError, match=r"'x' has size 0 in dimension 0"):
        parse_shape_specs(["x:0x3x8x8"])
    assert main(["check", reference, candidate, "--shape", "x:0x3x8x8"]) == 2
    err = capsys.readouterr().err
    assert "'x'" in err and "dimension 0" in err and "PASS" not in err
    with pytest.raises(InputError, match=r"'x' has size 0 in dimension 2"):
        bnfold.check(reference, candidate, shapes={"x": (1, 3, 0, 8)})
    np.savez(tmp_path / "n0.npz", x=np.zeros((0, 3, 8, 8), np.float32))
    assert main(["check", reference, candidate, "--inputs", str(tmp_path / "n0.npz")]) == 2
    captured = capsys.readouterr()
    assert "n0.npz" in captured.err and "'x'" in captured.err and "dimension 0" in captured.err
    assert "PASS" not in captured.out
    with pytest.raises(InputError, match="dimension 3"):
        bnfold.check(reference, candidate, inputs={"x": np.zeros((1, 3, 8, 0), np.float32)})
    # fold's automatic check takes its --shape through the same parser.
    assert main(["fold", reference, "-o", str(tmp_path / "f.onnx"), "--shape", "x:0x3x8x8"]) == 2
    assert not (tmp_path / "f.onnx").exists()


def test_outputs_all_empty_is_not_a_pass(tmp_path, capsys):
    model = empty_output_model()
    with pytest.raises(InputError, match="nothing was compared"):
        bnfold.check(model, model)
    path = _save(model, tmp_path / "e.onnx")
    assert main(["check", path, path]) == 2
    captured = capsys.readouterr()
    assert "nothing was compared" in captured.err and "PASS" not in captured.out


# ---------------------------------------------------------------- inputs


def test_npz_round_trip_matches_arrays(tmp_path, params):
    reference, candidate = conv_bn_model(params), folded_conv_model(params)
    rng = np.random.default_rng(11)
    feeds = {"x": rng.standard_normal((3, 3, 10, 12)).astype(np.float32)}
    npz = tmp_path / "inputs.npz"
    np.savez(npz, **feeds)
    from_dict = bnfold.check(reference, candidate, inputs=feeds)
    from_file = bnfold.check(reference, candidate, inputs=str(npz))
    assert from_dict.passed and from_file.passed
    assert from_file.inputs == {"x": {"dtype": "float32", "shape": [3, 3, 10, 12]}}
    assert from_dict.max_abs_error == from_file.max_abs_error
    assert from_dict.outputs[0].max_rel == from_file.outputs[0].max_rel


def test_bad_npz_inputs(tmp_path, params, capsys):
    path = _save(conv_bn_model(params), tmp_path / "a.onnx")
    cases = {
        "wrong_dtype.npz": ({"x": np.zeros((1, 3, 8, 8), np.float64)}, "dtype float64"),
        "wrong_name.npz": ({"image": np.zeros((1, 3, 8, 8), np.float32)}, "missing 'x'"),
        "wrong_rank.npz": ({"x": np.zeros((3, 8, 8), np.float32)}, "shape 3x8x8"),
        "wrong_channels.npz": ({"x": np.zeros((1, 5, 8, 8), np.float32)}, "Nx3xHxW"),
    }
    for filename, (arrays, expected) in cases.items():
        np.savez(tmp_path / filename, **arrays)
        assert main(["check", path, path, "--inputs", str(tmp_path / filename)]) == 2
        assert expected in capsys.readouterr().err, filename
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert main(["check", path, path, "--inputs", str(tmp_path / "junk.npz")]) == 2
    assert "junk.npz" in capsys.readouterr().err


def test_invalid_npz_files_say_so_in_one_line(tmp_path, params, capsys):
    import zipfile

    path = _save(conv_bn_model(params), tmp_path / "a.onnx")
    (tmp_path / "text.npz").write_text("x = 1, 2, 3\n")
    (tmp_path / "empty.npz").write_bytes(b"")
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    with zipfile.ZipFile(tmp_path / "plain.npz", "w") as archive:
        archive.writestr("x.txt", "hello")
    np.save(tmp_path / "single.npy", np.zeros((1, 3, 8, 8), np.float32))
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    cases = {
        "text.npz": "not a valid .npz file (not a zip archive",
        "empty.npz": "not a valid .npz file (the file is empty)",
        "objects.npz": "not a valid .npz file (array 'x' holds Python objects",
        "plain.npz": "not a valid .npz file (member 'x.txt' is not an .npy array)",
        "single.npz": "expected an .npz archive of arrays named by input, got a single .npy array",
    }
    for filename, expected in cases.items():
        file = str(tmp_path / filename)
        assert main(["check", path, path, "--inputs", file]) == 2, filename
        err = capsys.readouterr().err
        assert f"{file}: {expected}" in err, (filename, err)
        assert "allow_pickle" not in err and "pickled" not in err, filename
        assert len(err.strip().splitlines()) == 1, filename


def test_int_and_bool_inputs_get_valid_values(tmp_path):
    model = gather_where_model(table_rows=5)
    report = bnfold.check(model, model, shapes={"idx": (4, 3)}, samples=4)
    assert report.passed
    assert report.inputs["cond"] == {"dtype": "bool", "shape": [4, 3, 4]}  # "N" shared by name
    specs = [TensorSpec("idx", "int64", ("N", 3)), TensorSpec("cond", "bool", ("N", 3, 4))]
    shapes = resolve_shapes(specs, {"idx": (50, 3)})
    feeds = synthesize_inputs(specs, shapes, np.random.default_rng(0), {"idx": 5})
    assert feeds["idx"].dtype == np.int64 and feeds["idx"].min() >= 0 and feeds["idx"].max() == 4
    assert feeds["cond"].dtype == np.bool_ and feeds["cond"].shape == (50, 3, 4)
    assert 0 < feeds["cond"].mean() < 1
    # The bound comes from the model: out-of-range indices would make onnxruntime fail (exit 2).
    assert main(["check", _save(model, tmp_path / "g.onnx"), str(tmp_path / "g.onnx")]) == 0


def test_given_inputs_validated_by_name():
    specs = [TensorSpec("a", "float32", (2,)), TensorSpec("b", "int64", ("N",))]
    ok = load_inputs({"a": np.zeros(2, np.float32), "b": np.arange(7)}, specs)
    assert list(ok) == ["a", "b"] and ok["b"].shape == (7,)
    with pytest.raises(InputError, match="not model inputs: 'c'"):
        load_inputs({"a": np.zeros(2, np.float32), "b": np.arange(7), "c": np.zeros(1)}, specs)


# ---------------------------------------------------------------- tolerances and non-finite values


def test_per_output_tolerances(tmp_path, capsys):
    reference = _save(two_output_model(), tmp_path / "a.onnx")
    candidate = _save(two_output_model(scale_b=1.001), tmp_path / "b.onnx")
    report = bnfold.check(reference, candidate)
    assert report.failed_outputs == ["y2"]
    assert [o.passed for o in report.outputs] == [True, False]
    assert bnfold.check(reference, candidate, rtol={"y2": 2e-3}).passed
    assert not bnfold.check(reference, candidate, rtol={"y1": 2e-3}).passed
    assert main(["check", reference, candidate]) == 1
    assert "y2" in capsys.readouterr().err
    assert main(["check", reference, candidate, "--rtol", "y2:2e-3"]) == 0
    assert main(["check", reference, candidate, "--rtol", "2e-3"]) == 0
    capsys.readouterr()
    assert main(["check", reference, candidate, "--rtol", "nope:1"]) == 2
    assert "not a model output" in capsys.readouterr().err
    assert main(["check", reference, candidate, "--atol", "y2:abc"]) == 2


def test_parse_tolerance_specs():
    assert parse_tolerance_specs(None, "rtol") is None
    assert parse_tolerance_specs(["1e-3"], "rtol") == 1e-3
    tol = parse_tolerance_specs(["1e-3", "out:0.5"], "atol")
    assert tol.get("out") == 0.5 and tol.get("other") == 1e-3
    with pytest.raises(InputError):
        parse_tolerance_specs(["-1"], "rtol")


def test_nan_on_one_side_fails_and_is_reported(tmp_path):
    reference = unary_model(["Abs", "Sqrt"])  # sqrt(|x|): finite everywhere
    candidate = unary_model(["Sqrt"])  # NaN where x < 0
    report = bnfold.check(reference, candidate)
    result = report.outputs[0]
    assert not report.passed
    assert result.nonfinite_mismatch > 0 and "non-finite" in result.message
    # NaN in the same places on both sides is agreement, not a mismatch.
    assert bnfold.check(candidate, unary_model(["Sqrt"])).passed


def test_nan_on_both_sides_is_agreement_but_counted_and_warned(tmp_path, capsys):
    sqrt = unary_model(["Sqrt"])  # NaN exactly where x < 0, in both models
    x = np.random.default_rng(5).standard_normal((4, 6)).astype(np.float32)
    report = bnfold.check(sqrt, unary_model(["Sqrt"]), inputs={"x": x})
    result = report.outputs[0]
    n_negative = int((x < 0).sum())
    assert report.passed and 0 < n_negative < x.size
    assert result.shared_nan == n_negative and result.shared_inf == 0
    assert result.nonfinite_mismatch == 0
    warning = f"both models output NaN at {n_negative} positions"
    assert report.warnings == [f"output 'y': {warning}"]
    assert warning in report.summary() and warning in report.format_table()
    data = report.to_dict()
    assert data["outputs"][0]["shared_nan"] == n_negative and data["outputs"][0]["warning"] == warning
    assert data["warnings"] == report.warnings
    # The same Inf on both sides: counted as Inf.
    x[0, :3] = 0.0
    inf_report = bnfold.check(unary_model(["Reciprocal"]), unary_model(["Reciprocal"]), inputs={"x": x})
    assert inf_report.passed and inf_report.outputs[0].shared_inf == 3
    assert "both models output Inf at 3 positions" in inf_report.summary()
    path = _save(sqrt, tmp_path / "sqrt.onnx")
    assert main(["check", path, path]) == 0
    assert "both models output NaN at" in capsys.readouterr().out


def test_output_non_finite_everywhere_on_both_sides_does_not_pass(tmp_path, capsys):
    all_nan = unary_model(["Abs", "Reciprocal", "Neg", "Sqrt"])  # sqrt(-1/|x|): NaN at every element
    report = bnfold.check(all_nan, unary_model(["Abs", "Reciprocal", "Neg", "Sqrt"]))
    result = report.outputs[0]
    assert not report.passed and report.failed_outputs == ["y"]
    assert result.shared_nan == result.elements == 24 and result.mismatches == 0
    assert "nothing real was compared" in result.message
    path = _save(all_nan, tmp_path / "nan.onnx")
    assert main(["check", path, path]) == 1
    assert "nothing real was compared" in capsys.readouterr().err


def test_json_result(tmp_path, params):
    a = _save(conv_bn_model(params), tmp_path / "a.onnx")
    b = _save(folded_conv_model(params), tmp_path / "b.onnx")
    out = tmp_path / "result.json"
    assert main(["check", a, b, "--json", str(out), "--samples", "2", "--opt-level", "basic"]) == 0
    data = json.loads(out.read_text())
    assert data["passed"] is True and data["samples"] == 2 and data["opt_level"] == "basic"
    assert data["outputs"][0]["name"] == "y" and data["outputs"][0]["elements"] == 2 * 4 * 32 * 32


def test_bad_json_path_fails_before_the_check(tmp_path, params, capsys, monkeypatch):
    import bnfold.cli.check as check_command

    path = _save(conv_bn_model(params), tmp_path / "a.onnx")

    def must_not_run(*args, **kwargs):
        raise AssertionError("the check ran although --json cannot be written")

    monkeypatch.setattr(check_command, "check", must_not_run)
    assert main(["check", path, path, "--json", str(tmp_path / "missing" / "x.json")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "does not exist" in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_in_memory_model_too_big_for_protobuf_goes_through_a_file(monkeypatch, params):
    import bnfold.verify.models as models

    model = conv_bn_model(params)
    before = model.SerializeToString()
    monkeypatch.setattr(models, "fits_in_one_message", lambda m: False)  # pretend it exceeds 2 GB
    report = bnfold.check(model, folded_conv_model(params))
    assert report.passed and report.max_abs_error > 0
    assert model.SerializeToString() == before  # the caller's model is not modified


def test_scalar_inputs_are_synthesized_as_arrays(tmp_path):
    """A rank-0 bool (an If condition) and rank-0 float/int inputs get 0-d arrays onnxruntime takes."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    then_g = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["t"])], "t", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])]
    )
    else_g = helper.make_graph(
        [helper.make_node("Abs", ["x"], ["e"])], "e", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])]
    )
    nodes = [
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Mul", ["y", "s"], ["z"]),
        helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["z", "kf"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            x,
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("k", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    path = str(tmp_path / "scalar.onnx")
    onnx.save_model(model, path)
    report = bnfold.check(path, path)
    assert report.passed


def _mixed_precision_model(seed=5):
    """float32 in/out, float16 inside (as converters write with keep_io_types)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    bn = [
        numpy_helper.from_array(v.astype(np.float16), n)
        for v, n in zip(
            (rng.uniform(0.5, 1.5, 128), rng.uniform(-1, 1, 128), rng.uniform(-1, 1, 128), rng.uniform(0.5, 2, 128)),
            ("s", "b", "m", "v"),
        )
    ]
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
        helper.make_node("Conv", ["x16", "W"], ["c"], pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["b16"]),
        helper.make_node("Cast", ["b16"], ["y"], to=TensorProto.FLOAT),
    ]
    w = numpy_helper.from_array((rng.standard_normal((128, 64, 3, 3)) * 0.05).astype(np.float16), "W")
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128, 8, 8])],
        [w] + bn,
    )
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


def test_mixed_precision_model_is_judged_by_its_float16_rounding(tmp_path):
    from bnfold.verify.tolerances import working_precision

    model = _mixed_precision_model()
    assert working_precision(model) == "float16"
    folded, report = bnfold.fold(model)
    assert report.n_folded == 1
    result = bnfold.check(model, folded)
    assert result.passed, result.summary()
    assert result.outputs[0].rtol == 1e-2  # float16's, not float32's 1e-4
    broken = onnx.ModelProto()
    broken.CopyFrom(folded)
    for t in broken.graph.initializer:
        if len(t.dims) == 4:
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * np.float16(1.1), t.name))
    assert not bnfold.check(model, broken).passed  # float16 tolerance still catches a wrong fold


# ---------------------------------------------------------------- the reference's own float noise
#
# tests/noisy_models.py builds a deep chain whose float32 rounding exceeds the fixed default
# tolerance, as deep real exports do: a correct fold differs from the reference by more than
# 1e-5 x scale, and so does the reference from itself between onnxruntime's levels.


@pytest.fixture(scope="module")
def deep():
    from noisy_models import deep_offset_chain

    model = deep_offset_chain()
    folded, fold_report = bnfold.fold(model)
    assert fold_report.n_folded == 12 and fold_report.n_remaining == 0
    return model, folded


def test_deep_model_is_noisier_than_the_fixed_tolerance(deep):
    model, folded = deep
    # The old semantics (reference disabled, candidate all, fixed tolerance): the model fails
    # against itself ...
    old = bnfold.check(model, model, opt_level="disabled", candidate_opt_level="all", measure_noise=False)
    assert not old.passed and old.outputs[0].atol_source == "default"
    # ... and at one level with the fixed tolerance, the correct fold still fails: the same level
    # alone is not enough.
    fixed = bnfold.check(model, folded, measure_noise=False)
    assert not fixed.passed and fixed.noise_opt_level is None
    assert fixed.max_abs_error > fixed.outputs[0].atol


def test_model_against_itself_passes_at_one_level(deep, tmp_path, capsys):
    model, _ = deep
    report = bnfold.check(model, model)
    assert report.passed and report.opt_level == report.candidate_opt_level == "disabled"
    assert report.max_abs_error == 0.0  # the same session kind on the same inputs: the same bits
    path = _save(model, tmp_path / "deep.onnx")
    assert main(["check", path, path]) == 0
    # The old pair of levels with the fixed tolerance is the false failure real models showed.
    assert main(["check", path, path, "--candidate-opt-level", "all", "--no-noise"]) == 1
    assert "FAIL" in capsys.readouterr().err


def test_correct_fold_of_deep_model_passes_by_its_measured_noise(deep):
    model, folded = deep
    report = bnfold.check(model, folded)
    assert report.passed, report.format_table()
    out = report.outputs[0]
    assert report.noise_opt_level == "all" and out.atol_source == "noise" and not out.noise_capped
    # The fold's error is of the order of the reference's own noise, well inside k x noise.
    assert out.noise > 0 and out.max_abs < out.atol == pytest.approx(bnfold.verify.noise.NOISE_FACTOR * out.noise)
    fixed_atol = bnfold.check(model, folded, measure_noise=False).outputs[0].atol
    assert fixed_atol < out.max_abs  # above the fixed default: the noise floor was needed


def _folded_perturbation(model, folded, kind, layer):
    """A wrong fold of ``model``: ``folded`` with one layer changed, or ``model`` folded after one
    BN's variance was changed."""
    from noisy_models import conv_inputs, initializer, with_initializer

    conv = f"conv{layer}"
    weight, bias = conv_inputs(folded, conv)
    if kind == "weight x 1.01":
        return with_initializer(folded, weight, initializer(folded, weight) * 1.01)
    if kind == "bias + 0.01":
        return with_initializer(folded, bias, initializer(folded, bias) + 0.01)
    if kind == "variance x 1.1":
        wrong_var = with_initializer(model, f"bn{layer}.var", initializer(model, f"bn{layer}.var") * 1.1)
        return bnfold.fold(wrong_var)[0]
    raise ValueError(kind)


@pytest.mark.parametrize("layer", [0, 6, 11])
@pytest.mark.parametrize("kind", ["weight x 1.01", "bias + 0.01", "variance x 1.1"])
def test_wrong_folds_of_deep_model_fail_with_the_noise_tolerance(deep, kind, layer):
    model, folded = deep
    wrong = _folded_perturbation(model, folded, kind, layer)
    report = bnfold.check(model, wrong)
    out = report.outputs[0]
    assert not report.passed, f"{kind} at layer {layer} passed: {report.summary()}"
    assert out.atol_source == "noise"  # failing although the tolerance was raised to the noise floor
    assert out.max_abs > 5 * out.atol  # not a near miss
    assert "tolerance" in report.summary() and "(noise)" in report.summary()


def test_explicit_tolerances_are_literal(deep):
    model, folded = deep
    given = bnfold.check(model, folded, atol=1e-5)
    out = given.outputs[0]
    assert out.atol == 1e-5 and out.atol_source == "given" and out.noise is None
    assert given.noise_opt_level is None  # every float atol given: the noise run is skipped
    assert not given.passed
    # rtol given, atol defaulted: the rtol is literal, the default atol still follows the noise.
    mixed = bnfold.check(model, folded, rtol=1e-6)
    out = mixed.outputs[0]
    assert out.rtol == 1e-6 and out.rtol_source == "given" and out.atol_source == "noise"
    assert "rtol given, atol noise" in out.tolerance_text
    assert bnfold.check(model, folded, atol=1e-3).passed


def test_report_says_where_the_tolerance_came_from(deep, tmp_path, capsys):
    model, folded = deep
    a, b = _save(model, tmp_path / "a.onnx"), _save(folded, tmp_path / "b.onnx")
    out_json = tmp_path / "r.json"
    assert main(["check", a, b, "--json", str(out_json)]) == 0
    table = capsys.readouterr().out
    assert "(noise)" in table and "reference at opt level all, inputs moved by one ulp" in table
    assert "reference disabled, candidate disabled" in table
    data = json.loads(out_json.read_text())
    assert data["noise"]["measured"] is True and data["noise"]["opt_level"] == "all"
    assert data["noise"]["factor"] == bnfold.verify.noise.NOISE_FACTOR
    o = data["outputs"][0]
    assert o["atol_source"] == "noise" and o["rtol_source"] == "default" and o["noise"] > 0
    assert o["atol"] == pytest.approx(o["noise_atol"]) and "noise" in data["tolerance"]
    assert main(["check", a, b, "--no-noise", "--json", str(out_json)]) == 1
    data = json.loads(out_json.read_text())
    assert data["noise"]["measured"] is False and data["outputs"][0]["atol_source"] == "default"
    assert "noise not measured" in data["tolerance"]


def test_noise_check_is_deterministic(deep):
    model, folded = deep
    first = bnfold.check(model, folded, samples=2).to_dict()
    assert first == bnfold.check(model, folded, samples=2).to_dict()


def test_shallow_model_keeps_the_default_tolerance(params):
    # The hand-folded Conv+BN: onnxruntime's levels differ by far less than the default atol.
    report = bnfold.check(conv_bn_model(params), folded_conv_model(params))
    out = report.outputs[0]
    assert report.passed and report.noise_opt_level == "all"
    assert out.atol_source == "default" and out.noise is not None and out.noise_atol < out.atol


def test_noise_run_at_all_uses_disabled_instead(params):
    report = bnfold.check(conv_bn_model(params), folded_conv_model(params), opt_level="all")
    assert report.opt_level == report.candidate_opt_level == "all" and report.noise_opt_level == "disabled"
    assert report.passed


def test_nudge_moves_float_inputs_by_one_ulp_only():
    from bnfold.verify.noise import nudge_inputs

    rng_values = np.random.default_rng(0)
    feeds = {
        "f32": rng_values.standard_normal((50, 40)).astype(np.float32),
        "f16": rng_values.standard_normal(300).astype(np.float16),
        "special": np.array([0.0, np.inf, -np.inf, np.nan, 1.0], np.float32),
        "idx": np.arange(6, dtype=np.int64),
        "mask": np.array([True, False]),
    }
    moved = nudge_inputs(feeds, np.random.default_rng(1))
    for name in ("f32", "f16"):
        x, y = feeds[name], moved[name]
        assert y.dtype == x.dtype and y.shape == x.shape
        assert np.all((y == np.nextafter(x, x.dtype.type(np.inf))) | (y == np.nextafter(x, x.dtype.type(-np.inf))))
        assert np.all(y != x)
        up = (y > x).mean()
        assert 0.3 < up < 0.7  # both directions, not a bias in one
    s = moved["special"]
    assert s[0] != 0.0 and abs(s[0]) < 1e-44  # zero moves to the smallest subnormal
    assert s[1] == np.inf and s[2] == -np.inf and np.isnan(s[3])
    assert np.array_equal(moved["idx"], feeds["idx"]) and np.array_equal(moved["mask"], feeds["mask"])
    again = nudge_inputs(feeds, np.random.default_rng(1))
    assert all(np.array_equal(again[k], moved[k], equal_nan=True) for k in feeds)


def test_noise_tolerance_is_capped():
    from bnfold.verify.noise import NOISE_CAP_OF_SCALE, NOISE_CAP_OVER_DEFAULT, NOISE_FACTOR, noise_tolerance

    assert noise_tolerance(1e-6, 1e-5, 1.0) == (NOISE_FACTOR * 1e-6, False)
    atol, capped = noise_tolerance(1.0, 1e-5, 2.0)
    assert capped and atol == NOISE_CAP_OVER_DEFAULT * 1e-5 * 2.0
    atol, capped = noise_tolerance(1.0, 1e-3, 3.0)  # float16's default: 1% of the scale is the cap
    assert capped and atol == NOISE_CAP_OF_SCALE * 3.0


def _chaotic_model(shift=0.0):
    """y = sin(x * 1e6) + shift: a one-ulp change of x moves y by up to ~0.1."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])
    inits = [nh.from_array(np.array(1e6, np.float32), "k"), nh.from_array(np.array(shift, np.float32), "s")]
    nodes = [
        helper.make_node("Mul", ["x", "k"], ["t"]),
        helper.make_node("Sin", ["t"], ["u"]),
        helper.make_node("Add", ["u", "s"], ["y"]),
    ]
    return _model(nodes, [x], [y], inits)


def test_a_reference_too_noisy_to_trust_gets_a_capped_tolerance():
    reference = _chaotic_model()
    itself = bnfold.check(reference, _chaotic_model())
    out = itself.outputs[0]
    assert itself.passed and out.noise_capped and out.noise > 0.01
    assert out.atol == pytest.approx(bnfold.verify.noise.NOISE_CAP_OVER_DEFAULT * 1e-5)  # scale 1: |sin| <= 1
    assert "capped" in itself.tolerance_note and "capped" in out.tolerance_text
    # A 5% shift passes no check, however noisy the reference is.
    assert not bnfold.check(reference, _chaotic_model(shift=0.05)).passed


def test_intermediate_values_noisier_than_the_cap_follow_their_noise_and_outputs_keep_the_cap():
    """An intermediate value can only add failures, so its tolerance is not capped: capping it
    fails correct folds of float16 models, whose values are often noisier than 1 % of their
    scale. The outputs keep the cap, so a noisy reference still opens the check to nothing."""
    reference = _chaotic_model()
    itself = bnfold.check(reference, _chaotic_model(), intermediates=True)
    assert itself.passed
    sine = next(v for v in itself.intermediates if v.name == "u")
    assert sine.noise_over_cap and not sine.noise_capped and sine.noise > 0.01
    assert sine.atol == pytest.approx(bnfold.verify.noise.NOISE_FACTOR * sine.noise)
    assert sine.atol > itself.outputs[0].atol  # the output's tolerance is capped, the value's is not
    assert "above the outputs' cap" in sine.tolerance_text
    assert itself.to_dict()["intermediates"]["noise_over_cap"] == 1
    shifted = bnfold.check(reference, _chaotic_model(shift=0.05), intermediates=True)
    assert not shifted.passed and shifted.failed_outputs == ["y"] and not shifted.failed_intermediates


def test_failed_noise_run_falls_back_to_the_defaults(monkeypatch, params):
    from bnfold.verify import models

    real_session = models.LoadedModel.session

    def no_all_level(self, opt_level, **kwargs):
        if opt_level == "all":
            raise InputError(f"{self.label}: onnxruntime cannot load the model (injected)")
        return real_session(self, opt_level, **kwargs)

    monkeypatch.setattr(models.LoadedModel, "session", no_all_level)
    report = bnfold.check(conv_bn_model(params), folded_conv_model(params))
    assert report.passed and report.noise_opt_level is None
    assert "the noise run failed" in report.noise_note and "injected" in report.tolerance_note
    assert report.outputs[0].atol_source == "default" and report.outputs[0].noise is None


def test_integer_outputs_stay_exact_and_unmeasured(tmp_path):
    report = bnfold.check(gather_where_model(), gather_where_model())
    assert report.passed and report.outputs[0].atol_source == "default"  # float output y
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])
    idx = helper.make_tensor_value_info("i", TensorProto.INT64, [3])
    argmax = _model([helper.make_node("ArgMax", ["x"], ["i"], axis=1, keepdims=0)], [x], [idx])
    report = bnfold.check(argmax, argmax)
    out = report.outputs[0]
    assert report.passed and out.atol_source == out.rtol_source == "exact" and out.noise is None
    assert report.noise_opt_level is None and report.tolerance_note == "integer and bool outputs compared exactly"
    assert "exact" in report.format_table()


# ---------------------------------------------------------------- intermediate values
#
# check(intermediates=True) also compares every float value both models produce under one name;
# tests/hidden_error_models.py builds heads that hide a wrong fold from the outputs.


def _hidden_error_cases():
    from hidden_error_models import saturating_model, softmax_head_model

    return {
        "saturated sigmoid": (saturating_model, {"l1.bn": "l1.conv", "l2.bn": "l2.conv"}),
        "softmax of 1000": (softmax_head_model, {"stem.bn": "stem.conv", "logits": "head.fc"}),
    }


@pytest.mark.parametrize("case", ["saturated sigmoid", "softmax of 1000"])
def test_wrong_fold_hidden_by_the_head_fails_with_intermediates(case):
    from hidden_error_models import wrong_fold

    build, layers = _hidden_error_cases()[case]
    model = build()
    folded, fold_report = bnfold.fold(model)
    assert fold_report.n_folded == 2 and fold_report.n_remaining == 0
    correct = bnfold.check(model, folded, intermediates=True)
    assert correct.passed, correct.format_table()
    assert len(correct.intermediates) >= 3 and correct.intermediates_note == ""
    for value, layer in layers.items():
        wrong = wrong_fold(folded, value)
        outputs_only = bnfold.check(model, wrong)
        assert outputs_only.passed, f"{case}: the head no longer hides the error of {layer}"
        report = bnfold.check(model, wrong, intermediates=True)
        assert not report.passed and report.failed_outputs == []
        first = report.failed_intermediates[0]
        # The first failing value in node order is the wrong layer's own output.
        assert first.name == value and first.producer.endswith(f"'{layer}'")
        assert f"intermediate value '{value}'" in report.summary() and layer in report.summary()
        # The outputs are judged exactly as without intermediates.
        assert [o.to_dict() for o in report.outputs] == [o.to_dict() for o in outputs_only.outputs]


def test_first_failing_intermediate_names_the_folded_layer_and_the_bn_it_replaced():
    from hidden_error_models import saturating_model, wrong_fold

    model = saturating_model()
    folded, _ = bnfold.fold(model)
    report = bnfold.check(model, wrong_fold(folded, "l1.bn"), intermediates=True)
    first = report.failed_intermediates[0]
    assert first.producer == "Conv 'l1.conv'" and first.reference_producer == "BatchNormalization 'l1.bn'"
    assert "Conv 'l1.conv'; BatchNormalization 'l1.bn' in the reference" in report.summary()
    assert first.error_over_tolerance > 10 and first.mismatches > 0


@pytest.mark.parametrize("kind", ["weight x 1.01", "bias + 0.01", "variance x 1.1"])
def test_wrong_folds_of_deep_model_fail_at_the_wrong_layer(deep, kind):
    model, folded = deep
    correct = bnfold.check(model, folded, intermediates=True)
    assert correct.passed, correct.format_table()
    for layer in (0, 6, 11):
        report = bnfold.check(model, _folded_perturbation(model, folded, kind, layer), intermediates=True)
        assert not report.passed
        if layer < 11:  # bn11 is the graph output y, compared as an output
            first = report.failed_intermediates[0]
            assert first.name == f"bn{layer}" and first.producer == f"Conv 'conv{layer}'", report.summary()


def test_intermediates_get_the_outputs_tolerance_rule_with_their_own_noise(deep, tmp_path):
    model, folded = deep
    report = bnfold.check(model, folded, intermediates=True)
    assert report.intermediates_noise_measured
    names = [v.name for v in report.intermediates]
    # Every Conv+BN+Relu value the two models share, in node order; y is an output, not repeated.
    assert names == [n for i in range(12) for n in (f"bn{i}", f"relu{i}")][:-1] and "y" not in names
    for v in report.intermediates:
        assert v.noise is not None and v.noise_atol is not None and v.rtol == 1e-4 and v.passed
        assert v.atol_source in ("default", "noise") and v.error_over_tolerance < 1
        if v.atol_source == "noise":
            assert v.atol == pytest.approx(bnfold.verify.noise.NOISE_FACTOR * v.noise)
        else:  # the noise floor stayed below the default, scaled by this value's own max|ref|
            assert v.noise_atol <= v.atol and v.atol >= 1e-5
    # Deep layers are noisier than the first: their tolerances follow their own noise.
    assert report.intermediates[-1].noise > 10 * report.intermediates[0].noise
    assert report.intermediates[-1].atol_source == "noise"
    data = report.to_dict()["intermediates"]
    assert data["requested"] and data["compared"] == len(names) and data["passed"] and data["failed"] == 0
    assert data["noise_measured"] and data["atol_from_noise"] >= 1 and data["failures"] == []
    worst = data["worst"]
    for key in (
        "noise",
        "noise_atol",
        "noise_capped",
        "atol_source",
        "rtol_source",
        "error_over_tolerance",
        "producer",
        "reference_producer",
    ):
        assert key in worst
    assert worst["error_over_tolerance"] == max(v.error_over_tolerance for v in report.intermediates)
    path = tmp_path / "r.json"
    report.to_json(path)
    assert json.loads(path.read_text())["intermediates"]["compared"] == len(names)


def test_without_noise_intermediates_keep_the_fixed_defaults(deep):
    model, folded = deep
    report = bnfold.check(model, folded, intermediates=True, measure_noise=False)
    assert not report.intermediates_noise_measured
    assert all(v.noise is None and v.atol_source == "default" for v in report.intermediates)
    assert not report.passed  # the deep chain is noisier than the fixed tolerance, as its output is


def test_many_failing_intermediates_are_summarized_not_listed(deep, capsys, tmp_path):
    model, folded = deep
    wrong = _folded_perturbation(model, folded, "weight x 1.01", 0)
    report = bnfold.check(model, wrong, intermediates=True)
    failed = report.failed_intermediates
    assert len(failed) > bnfold.verify.parity.INTERMEDIATE_ROWS
    data = report.to_dict()["intermediates"]
    assert data["failed"] == len(failed) and len(data["failures"]) == bnfold.verify.parity.INTERMEDIATE_ROWS
    assert data["failures_left_off"] == len(failed) - bnfold.verify.parity.INTERMEDIATE_ROWS
    assert data["failures"][0]["name"] == "bn0"
    table = report.format_table()
    assert f"and {len(failed) - bnfold.verify.parity.INTERMEDIATE_ROWS} more failing" in table
    assert (
        sum(line.startswith(("  bn", "  relu")) for line in table.splitlines())
        == bnfold.verify.parity.INTERMEDIATE_ROWS
    )


def test_cli_check_intermediates_is_off_by_default(tmp_path, capsys):
    from hidden_error_models import saturating_model, wrong_fold

    model = saturating_model()
    folded, _ = bnfold.fold(model)
    a = _save(model, tmp_path / "a.onnx")
    b = _save(wrong_fold(folded, "l2.bn"), tmp_path / "b.onnx")
    assert main(["check", a, b]) == 0
    assert "intermediate" not in capsys.readouterr().out
    out_json = tmp_path / "r.json"
    assert main(["check", a, b, "--intermediates", "--json", str(out_json)]) == 1
    captured = capsys.readouterr()
    assert "intermediate values: 3 compared" in captured.out and "l2.conv" in captured.out
    assert "intermediate value 'l2.bn'" in captured.err
    data = json.loads(out_json.read_text())
    assert data["passed"] is False and data["failed_outputs"] == []
    assert data["intermediates"]["failures"][0]["name"] == "l2.bn"


def test_unrelated_models_reusing_a_name_are_why_intermediates_are_opt_in():
    """Two models with the same output but a value 't' that means different things: the default
    check passes them, the intermediate check cannot (it assumes one name, one quantity)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    two = nh.from_array(np.array(2.0, np.float32), "two")
    doubled_first = _model(
        [helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Relu", ["t"], ["y"])], [x], [y], [two]
    )
    relu_first = _model(
        [helper.make_node("Relu", ["x"], ["t"]), helper.make_node("Mul", ["t", "two"], ["y"])], [x], [y], [two]
    )
    assert bnfold.check(doubled_first, relu_first).passed
    report = bnfold.check(doubled_first, relu_first, intermediates=True)
    assert not report.passed and report.failed_intermediates[0].name == "t"


def test_every_fold_case_passes_with_intermediates():
    """tools/make_models.py: every fold case onnxruntime runs passes check(original, folded,
    intermediates=True) - no value both models produce changes its meaning in a fold."""
    from fold_testing import MM

    compared, not_runnable = 0, []
    for name, (builder, _) in MM.CASES.items():
        original = builder()
        folded, _ = bnfold.fold(original)
        for feeds in MM.random_feeds(original):
            try:
                report = bnfold.check(original, folded, inputs=feeds, intermediates=True)
            except InputError as e:
                # Only what onnxruntime cannot run at all (float64 Conv, bfloat16, BN opset 1/6),
                # and then without intermediates too.
                assert "onnxruntime cannot load the model" in str(e), (name, str(e))
                with pytest.raises(InputError):
                    bnfold.check(original, folded, inputs=feeds)
                not_runnable.append(name)
                continue
            assert report.passed, f"{name}: {report.summary()}"
            assert report.intermediates_requested
            compared += len(report.intermediates)
    assert compared >= 50
    assert len(not_runnable) <= 7, not_runnable


def test_select_skips_constants_random_values_and_other_types():
    from bnfold.verify.intermediates import select

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    outs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
        helper.make_tensor_value_info("n", TensorProto.FLOAT, [2, 3]),
    ]
    inits = [nh.from_array(np.ones((2, 3), np.float32), "w")]
    nodes = [
        helper.make_node("Identity", ["w"], ["w_alias"]),  # a parameter behind Identity: constant
        helper.make_node("Mul", ["x", "w_alias"], ["scaled"]),  # depends on x: compared
        helper.make_node("Shape", ["scaled"], ["shape"]),  # int64: not compared
        helper.make_node("RandomNormalLike", ["scaled"], ["noise"]),  # random: differs run to run
        helper.make_node("Add", ["scaled", "noise"], ["n"]),
        helper.make_node("Relu", ["scaled"], ["y"]),
        helper.make_node("Add", ["scaled", "noise"], ["noisy"]),  # downstream of random: skipped
        helper.make_node("Relu", ["noisy"], ["unused"]),
    ]
    model = _model(nodes, [x], outs, inits)
    selection = select(model, model)
    assert [v.name for v in selection.values] == ["scaled"]
    assert selection.values[0].producer == "Mul 'Mul#1'" and selection.values[0].dtype == "float32"


def _fold_pair(tmp_path):
    from hidden_error_models import saturating_model, wrong_fold

    model = saturating_model()
    folded, _ = bnfold.fold(model)
    return model, folded, wrong_fold(folded, "l1.bn")


def test_too_many_intermediate_values_fall_back_to_outputs(monkeypatch, tmp_path):
    import bnfold.verify.intermediates

    model, _, wrong = _fold_pair(tmp_path)
    monkeypatch.setattr(bnfold.verify.intermediates, "MAX_VALUES", 2)
    report = bnfold.check(model, wrong, intermediates=True)
    assert report.passed and report.intermediates == []  # the outputs cannot see the wrong layer
    assert "more than the 2 compared at most" in report.intermediates_note
    assert "intermediate values not compared" in report.summary()
    assert "intermediate values: not compared" in report.format_table()
    data = report.to_dict()["intermediates"]
    assert data["requested"] and data["compared"] == 0 and "more than" in data["note"]


def test_intermediates_too_large_for_memory_fall_back_to_outputs(monkeypatch, tmp_path):
    import bnfold.verify.intermediates
    from bnfold.verify import parity

    model, _, wrong = _fold_pair(tmp_path)
    # l1.bn, l1.relu (1x8x16x16) and l2.bn (1x4x16x16) float32: 20480 bytes per sample.
    monkeypatch.setattr(bnfold.verify.intermediates, "MAX_BYTES", 2 * 20480 - 1)
    report = bnfold.check(model, wrong, intermediates=True)
    assert report.intermediates == [] and "(estimated)" in report.intermediates_note
    assert "MiB per sample" in report.intermediates_note and report.passed
    # When shape inference cannot size them, the first run measures them.
    monkeypatch.setattr(parity, "estimate_bytes", lambda *args: (0, 3))
    report = bnfold.check(model, wrong, intermediates=True)
    assert report.intermediates == [] and "(measured)" in report.intermediates_note
    monkeypatch.setattr(bnfold.verify.intermediates, "MAX_BYTES", 2 * 20480)
    assert not bnfold.check(model, wrong, intermediates=True).passed


def test_intermediates_of_model_files_leave_the_files_untouched(tmp_path):
    from hidden_error_models import saturating_model

    model, folded, wrong = _fold_pair(tmp_path)
    a, b = _save(model, tmp_path / "a.onnx"), _save(wrong, tmp_path / "b.onnx")
    external = tmp_path / "ext"
    external.mkdir()
    c = str(external / "c.onnx")
    onnx.save(wrong, c, save_as_external_data=True, location="c.onnx.data", size_threshold=0)
    before = {p: pathlib.Path(p).read_bytes() for p in (a, b, c, c + ".data")}
    for candidate in (b, c):
        report = bnfold.check(a, candidate, intermediates=True)
        assert len(report.intermediates) == 3 and not report.passed, report.intermediates_note
        assert report.failed_intermediates[0].name == "l1.bn"
    assert bnfold.check(a, _save(folded, tmp_path / "f.onnx"), intermediates=True).passed
    assert {p: pathlib.Path(p).read_bytes() for p in before} == before
    assert saturating_model().SerializeToString() == model.SerializeToString()


def test_intermediates_of_an_in_memory_model_too_big_for_one_message(monkeypatch, tmp_path):
    import bnfold.verify.models as models

    model, folded, wrong = _fold_pair(tmp_path)
    monkeypatch.setattr(models, "fits_in_one_message", lambda m: False)  # pretend it exceeds 2 GB
    report = bnfold.check(model, wrong, intermediates=True)
    assert len(report.intermediates) == 3 and report.failed_intermediates[0].name == "l1.bn"
    assert bnfold.check(model, folded, intermediates=True).passed


def test_a_model_too_large_to_expose_falls_back_to_outputs(monkeypatch, tmp_path):
    import bnfold.verify.models as models

    model, _, wrong = _fold_pair(tmp_path)
    monkeypatch.setattr(models, "PROTOBUF_LIMIT", 100)
    report = bnfold.check(model, wrong, intermediates=True)
    assert report.intermediates == [] and report.passed
    assert "too large" in report.intermediates_note and "2 GiB" in report.intermediates_note


def test_exposure_onnxruntime_refuses_falls_back_to_outputs(monkeypatch, tmp_path):
    from bnfold.verify import models

    model, _, wrong = _fold_pair(tmp_path)
    real_session = models.LoadedModel.session

    def refuse_exposed(self, opt_level, **kwargs):
        if kwargs.get("exposed"):
            raise InputError(
                f"{self.label}: onnxruntime cannot load the model with its intermediate values as outputs (injected)"
            )
        return real_session(self, opt_level, **kwargs)

    monkeypatch.setattr(models.LoadedModel, "session", refuse_exposed)
    report = bnfold.check(model, wrong, intermediates=True)
    assert report.intermediates == [] and "injected" in report.intermediates_note and report.passed


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_fast_comparison_of_finite_values_agrees_with_the_general_one(dtype):
    """Finite arrays take a shorter path (a third of the passes over the data); a NaN shared by
    both sides sends the same values through the general one: the verdicts must be identical."""
    from bnfold.verify.compare import OutputResult, compare_into

    rng = np.random.default_rng(1)
    for trial in range(12):
        ref = (rng.standard_normal(500) * rng.uniform(0.01, 100)).astype(dtype)
        cand = (ref * (1 + rng.normal(0, 1e-4 * rng.uniform(0, 5), ref.shape))).astype(dtype)
        ref[:7], cand[:3] = 0, 0  # zeros on one or both sides: rtol gives nothing there
        for atol, scaled, noise in ((1e-5, True, None), (1e-3, True, 5e-3), (0.0, False, None), (1e-4, False, None)):
            fast = OutputResult("y", "float32", (), 1e-4, atol)
            compare_into(fast, ref, cand, atol, scaled, noise)
            general = OutputResult("y", "float32", (), 1e-4, atol)
            compare_into(
                general,
                np.append(ref, np.nan).astype(dtype),
                np.append(cand, np.nan).astype(dtype),
                atol,
                scaled,
                noise,
            )
            for key in ("max_abs", "max_rel", "mismatches", "atol", "error_over_tolerance", "passed"):
                assert getattr(fast, key) == pytest.approx(getattr(general, key), rel=1e-12), (trial, atol, key)
            assert general.shared_nan == 1 and fast.shared_nan == 0


def _float16_clip_model(seed=0):
    """float16 Conv -> BN -> Clip(0, 6) -> Conv: onnxruntime keeps the Clip's result in float32
    for the second Conv, unless the Clip's output is a graph output (then it is float16)."""
    rng = np.random.default_rng(seed)

    def f16(a, name):
        return nh.from_array(np.asarray(a).astype(np.float16), name)

    inits = [
        f16(rng.standard_normal((16, 8, 3, 3)) * 0.3, "w1"),
        f16(rng.standard_normal((8, 16, 3, 3)) * 0.2, "w2"),
        f16(rng.uniform(0.5, 1.5, 16), "g"),
        f16(rng.normal(0, 0.3, 16), "b"),
        f16(rng.normal(0, 0.3, 16), "m"),
        f16(rng.uniform(0.5, 2, 16), "v"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4, name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn1"], name="bn1"),
        helper.make_node("Constant", [], ["lo"], value=f16(0.0, "lo")),
        helper.make_node("Constant", [], ["hi"], value=f16(6.0, "hi")),
        helper.make_node("Clip", ["bn1", "lo", "hi"], ["clip1"], name="clip1"),
        helper.make_node("Conv", ["clip1", "w2"], ["y"], pads=[1] * 4, name="conv2"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 8, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 8, 16, 16])
    return _model(nodes, [x], [y], inits)


def test_exposing_values_never_changes_how_the_outputs_are_judged():
    """Where exposing a value changes what onnxruntime computes - a float16 model (its float32
    islands), or any level above disabled (fusions) - the outputs come from the plain models."""
    import onnxruntime as ort

    from bnfold.verify.intermediates import exposure_suffix, select

    model = _float16_clip_model()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 8, 16, 16)).astype(np.float16)}
    raw = model.SerializeToString()
    plain_y = ort.InferenceSession(raw, options, providers=["CPUExecutionProvider"]).run(["y"], feeds)[0]
    exposed = raw + exposure_suffix(select(model, model).values)
    exposed_y = ort.InferenceSession(exposed, options, providers=["CPUExecutionProvider"]).run(["y"], feeds)[0]
    assert not np.array_equal(plain_y, exposed_y)  # what the check must not let into the outputs
    folded, _ = bnfold.fold(model)
    outputs_only = bnfold.check(model, folded)
    with_values = bnfold.check(model, folded, intermediates=True)
    assert [o.to_dict() for o in with_values.outputs] == [o.to_dict() for o in outputs_only.outputs]
    assert [v.name for v in with_values.intermediates] == ["bn1", "clip1"] and with_values.passed


def test_outputs_at_level_all_are_judged_as_without_intermediates():
    """At level all, exposed values change which nodes onnxruntime fuses, and so how the
    outputs of a residual network round: the outputs come from the plain models."""
    from bnfold.demo.zoo import build_resnet

    model = build_resnet(18, image_size=32, width=8, num_classes=10)
    folded, _ = bnfold.fold(model)
    outputs_only = bnfold.check(model, folded, opt_level="all")
    with_values = bnfold.check(model, folded, opt_level="all", intermediates=True)
    assert [o.to_dict() for o in with_values.outputs] == [o.to_dict() for o in outputs_only.outputs]
    assert len(with_values.intermediates) > 40 and with_values.passed


def test_scalar_outputs_and_values_are_compared(tmp_path):
    """0-d float values (a ReduceSum to a scalar, as dynamo exports of attention write) are
    compared like any other; numpy returns scalars for 0-d operands (found on a real export)."""
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Mul", ["total", "two"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [nh.from_array(np.array(2.0, np.float32), "two")],
    )
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 11)])
    path = tmp_path / "scalar.onnx"
    onnx.save(model, str(path))
    report = bnfold.check(str(path), str(path), intermediates=True)
    assert report.passed and report.outputs[0].elements == 1
    wrong = onnx.ModelProto()
    wrong.CopyFrom(model)
    wrong.graph.initializer[0].CopyFrom(nh.from_array(np.array(2.1, np.float32), "two"))
    assert not bnfold.check(str(path), wrong, intermediates=True).passed
