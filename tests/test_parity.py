"""bnfold.check / `bnfold check`: parity verdicts, input synthesis, tolerances and bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

import bnfold
from bnfold.cli import main
from bnfold.errors import InputError
from bnfold.parity import TensorSpec, load_inputs, parse_shape_specs, parse_tolerance_specs, resolve_shapes, synthesize_inputs


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
    import bnfold.commands.check as check_command

    path = _save(conv_bn_model(params), tmp_path / "a.onnx")

    def must_not_run(*args, **kwargs):
        raise AssertionError("the check ran although --json cannot be written")

    monkeypatch.setattr(check_command, "check", must_not_run)
    assert main(["check", path, path, "--json", str(tmp_path / "missing" / "x.json")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "does not exist" in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_in_memory_model_too_big_for_protobuf_goes_through_a_file(monkeypatch, params):
    import bnfold.parity as parity

    model = conv_bn_model(params)
    before = model.SerializeToString()
    monkeypatch.setattr(parity, "fits_in_one_message", lambda m: False)  # pretend it exceeds 2 GB
    report = bnfold.check(model, folded_conv_model(params))
    assert report.passed and report.max_abs_error > 0
    assert model.SerializeToString() == before  # the caller's model is not modified


def test_scalar_inputs_are_synthesized_as_arrays(tmp_path):
    """A rank-0 bool (an If condition) and rank-0 float/int inputs get 0-d arrays onnxruntime takes."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    then_g = helper.make_graph([helper.make_node("Neg", ["x"], ["t"])], "t", [],
                              [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    else_g = helper.make_graph([helper.make_node("Abs", ["x"], ["e"])], "e", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Mul", ["y", "s"], ["z"]), helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["z", "kf"], ["out"])]
    graph = helper.make_graph(nodes, "g", [x, helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                           helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
                                           helper.make_tensor_value_info("k", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    path = str(tmp_path / "scalar.onnx")
    onnx.save_model(model, path)
    report = bnfold.check(path, path)
    assert report.passed


def _mixed_precision_model(seed=5):
    """float32 in/out, float16 inside (as converters write with keep_io_types)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    bn = [numpy_helper.from_array(v.astype(np.float16), n) for v, n in
          zip((rng.uniform(.5, 1.5, 128), rng.uniform(-1, 1, 128), rng.uniform(-1, 1, 128), rng.uniform(.5, 2, 128)),
              ("s", "b", "m", "v"))]
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
             helper.make_node("Conv", ["x16", "W"], ["c"], pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["b16"]),
             helper.make_node("Cast", ["b16"], ["y"], to=TensorProto.FLOAT)]
    w = numpy_helper.from_array((rng.standard_normal((128, 64, 3, 3)) * .05).astype(np.float16), "W")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128, 8, 8])], [w] + bn)
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


def test_mixed_precision_model_is_judged_by_its_float16_rounding(tmp_path):
    from bnfold.parity import working_precision

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
