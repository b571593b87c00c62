"""`bnfold calibrate`: exit codes, nothing written on error, --report, --fold with parity."""

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.cli.app import main


def conv_bn_model(seed=0):
    """input (N, 3, 6, 6) -> Conv -> BN -> Relu -> Conv -> BN, stale statistics."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def t(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    x = "input"
    for i, (cin, cout) in enumerate(((3, 4), (4, 5))):
        nodes.append(
            helper.make_node(
                "Conv",
                [x, t(f"w{i}", rng.normal(0, 0.4, (cout, cin, 3, 3))), t(f"b{i}", rng.normal(0, 0.2, cout))],
                [f"conv{i}"],
                name=f"conv{i}",
                pads=[1, 1, 1, 1],
                kernel_shape=[3, 3],
            )
        )
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [
                    f"conv{i}",
                    t(f"s{i}", rng.uniform(0.5, 1.5, cout)),
                    t(f"beta{i}", rng.normal(0, 0.3, cout)),
                    t(f"m{i}", np.zeros(cout)),
                    t(f"v{i}", np.ones(cout)),
                ],
                [f"bn{i}"],
                name=f"bn{i}",
            )
        )
        x = f"bn{i}"
        if i == 0:
            nodes.append(helper.make_node("Relu", [x], ["relu0"], name="relu0"))
            x = "relu0"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 5, 6, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return model


@pytest.fixture
def files(tmp_path):
    model_path = tmp_path / "model.onnx"
    onnx.save(conv_bn_model(), model_path)
    data = np.random.default_rng(1).normal(3, 2, (10, 3, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=data)
    return model_path, tmp_path / "calib.npz", data, tmp_path


def stats(model):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {
        n.name: (inits[n.input[3]], inits[n.input[4]]) for n in model.graph.node if n.op_type == "BatchNormalization"
    }


def test_calibrate_writes_the_api_result(files, capsys):
    model_path, data_path, data, tmp = files
    out = tmp / "out.onnx"
    code = main(
        [
            "calibrate",
            str(model_path),
            "-o",
            str(out),
            "--data",
            str(data_path),
            "--batch-size",
            "4",
            "--mode",
            "sequential",
        ]
    )
    assert code == 0
    written = stats(onnx.load(out))
    want = stats(bnfold.calibrate(str(model_path), data, mode="sequential", batch_size=4)[0])
    for name in want:
        np.testing.assert_array_equal(written[name][1], want[name][1])
    text = capsys.readouterr().out
    assert "bn0" in text and "bn1" in text and "wrote" in text


def test_report_json(files):
    model_path, data_path, _, tmp = files
    out, report = tmp / "out.onnx", tmp / "r.json"
    assert (
        main(
            [
                "calibrate",
                str(model_path),
                "-o",
                str(out),
                "--data",
                str(data_path),
                "--max-batches",
                "2",
                "--batch-size",
                "3",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    loaded = json.loads(report.read_text())["calibration"]
    assert loaded["n_samples"] == 6 and [e["bn"] for e in loaded["bn"]] == ["bn0", "bn1"]
    assert all(e["samples"] == 6 and e["values_per_channel"] == 6 * 36 for e in loaded["bn"])


@pytest.mark.parametrize(
    "data_maker, message",
    [
        (lambda d: {"wrong": d}, "missing input(s) 'input'"),
        (lambda d: {"input": d[:, :2]}, "axis 1: expected 3, got 2"),
        (lambda d: {"input": d.astype(np.int64)}, "expected float32, got int64"),
        (lambda d: {"input": d[:0]}, "bad.npz: calibration data is empty (0 samples)"),
        (lambda d: {}, "bad.npz: the archive holds no arrays (no samples)"),
    ],
)
def test_bad_data_exit_2_nothing_written(files, capsys, data_maker, message):
    model_path, _, data, tmp = files
    bad = tmp / "bad.npz"
    np.savez(bad, **data_maker(data))
    out = tmp / "out.onnx"
    assert main(["calibrate", str(model_path), "-o", str(out), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_other_bad_inputs_exit_2(files, capsys):
    model_path, data_path, _, tmp = files
    out = tmp / "out.onnx"
    cases = [
        ["calibrate", str(model_path), "-o", str(model_path), "--data", str(data_path)],  # overwrite input
        ["calibrate", str(model_path), "-o", str(out), "--data", str(tmp / "nope.npz")],
        ["calibrate", str(tmp / "nope.onnx"), "-o", str(out), "--data", str(data_path)],
        ["calibrate", str(model_path), "-o", str(out), "--data", str(data_path), "--batch-size", "0"],
        ["calibrate", str(model_path), "-o", str(out), "--data", str(data_path), "--fold", "--shape", "input:bad"],
    ]
    before = model_path.read_bytes()
    for argv in cases:
        assert main(argv) == 2, argv
    assert not out.exists()
    assert model_path.read_bytes() == before


def test_fold_path(files, capsys):
    model_path, data_path, data, tmp = files
    out = tmp / "folded.onnx"
    assert (
        main(
            [
                "calibrate",
                str(model_path),
                "-o",
                str(out),
                "--data",
                str(data_path),
                "--fold",
                "--report",
                str(tmp / "r.json"),
            ]
        )
        == 0
    )
    folded = onnx.load(out)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    calibrated, _ = bnfold.calibrate(str(model_path), data)
    import onnxruntime as ort

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"input": data}
        )[0]

    np.testing.assert_allclose(run(folded), run(calibrated), rtol=1e-4, atol=1e-4)
    report = json.loads((tmp / "r.json").read_text())
    assert report["parity"]["passed"] is True and "fold" in report
    # The folded model is a fold by bnfold: its intermediate values are checked too.
    assert report["parity"]["intermediates"]["requested"] is True
    assert report["parity"]["intermediates"]["compared"] > 0
    stdout = capsys.readouterr().out
    assert "parity check passed" in stdout and "intermediate values match" in stdout


def test_fold_parity_failure_exit_1(files, capsys, monkeypatch):
    import bnfold.folding.fold_pass
    from bnfold.folding.tensors import read_tensor, write_tensor

    real_run = bnfold.folding.fold_pass._run

    def broken_run(model, report, forward, payloads=None, keep=None):
        flushed = real_run(model, report, forward, payloads, keep)  # returned as _run returns it
        w = model.graph.initializer[0]
        write_tensor(w, read_tensor(w, payloads) * 2, w.data_type, w.name, payloads)
        return flushed

    monkeypatch.setattr(bnfold.folding.fold_pass, "_run", broken_run)
    model_path, data_path, _, tmp = files
    out = tmp / "folded.onnx"
    assert main(["calibrate", str(model_path), "-o", str(out), "--data", str(data_path), "--fold"]) == 1
    assert "FAILED" in capsys.readouterr().err
    assert not out.exists()
    assert main(["calibrate", str(model_path), "-o", str(out), "--data", str(data_path), "--fold", "--force"]) == 1
    assert out.exists()
    assert not [p for p in os.listdir(tmp) if p.startswith(".bnfold")], "temporary files left behind"


def test_parameters_behind_identity_and_cast(tmp_path, capsys):
    """torch's TorchScript exporter writes deduplicated BN statistics as Identity(initializer); the
    report's table of old statistics used to average None (exit 3)."""
    model = conv_bn_model()
    inits = {t.name: t for t in model.graph.initializer}
    inits["v1"].CopyFrom(numpy_helper.from_array(np.full(5, 2.5), "v1"))  # float64 behind a Cast
    model.graph.node.insert(0, helper.make_node("Identity", ["m0"], ["m0.id"], name="m0.id"))
    model.graph.node.insert(0, helper.make_node("Identity", ["v0"], ["v0.id"], name="v0.id"))
    model.graph.node.insert(0, helper.make_node("Cast", ["v1"], ["v1.cast"], name="v1.cast", to=TensorProto.FLOAT))
    bn0, bn1 = (n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn0.input[3], bn0.input[4], bn1.input[4] = "m0.id", "v0.id", "v1.cast"
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    data = np.random.default_rng(1).normal(3, 2, (10, 3, 6, 6)).astype(np.float32)
    np.save(tmp_path / "calib.npy", data)
    for mode in ("batch", "sequential"):
        out, report = tmp_path / f"{mode}.onnx", tmp_path / f"{mode}.json"
        assert (
            main(
                [
                    "calibrate",
                    str(path),
                    "-o",
                    str(out),
                    "--data",
                    str(tmp_path / "calib.npy"),
                    "--mode",
                    mode,
                    "--report",
                    str(report),
                ]
            )
            == 0
        )
        table = capsys.readouterr().out
        assert "0 -> " in table and "2.5 -> " in table  # old averages of bn0's mean and bn1's var
        entries = {e["bn"]: e for e in json.loads(report.read_text())["calibration"]["bn"]}
        assert entries["bn0"]["old_mean"] == {"min": 0.0, "mean": 0.0, "max": 0.0}
        assert entries["bn1"]["old_var"] == {"min": 2.5, "mean": 2.5, "max": 2.5}
        written = stats(onnx.load(out))
        want = stats(bnfold.calibrate(model, data, mode=mode)[0])
        for name in want:
            np.testing.assert_allclose(written[name][1], want[name][1], rtol=1e-6)
        assert written["bn1"][1].dtype == np.float32


@pytest.mark.parametrize("mode_args", [[], ["--mode", "sequential"]])
def test_fixed_batch_model_with_default_options(tmp_path, capsys, mode_args):
    """torch.onnx.export's default fixes the batch at 1; default options used to exit 2 ("use batch
    size 1"). Now: exit 0, a note, statistics of the dynamic model, and --fold's parity check fed
    batches the model accepts."""
    dynamic = conv_bn_model()
    fixed = onnx.ModelProto()
    fixed.CopyFrom(dynamic)
    for vi in list(fixed.graph.input) + list(fixed.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    path = tmp_path / "fixed.onnx"
    onnx.save(fixed, path)
    data = np.random.default_rng(2).normal(1, 2, (12, 3, 6, 6)).astype(np.float32)
    np.save(tmp_path / "calib.npy", data)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    assert (
        main(
            [
                "calibrate",
                str(path),
                "-o",
                str(out),
                "--data",
                str(tmp_path / "calib.npy"),
                "--fold",
                "--report",
                str(report),
                *mode_args,
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "note: the model's batch dimension is fixed at 1: " in text and "parity check passed" in text
    loaded = json.loads(report.read_text())["calibration"]
    assert loaded["fixed_batch"] == 1 and loaded["n_samples"] == 12
    assert loaded["run_batch_size"] == (1 if mode_args else 32)
    mode = "sequential" if mode_args else "batch"
    calibrated, _ = bnfold.calibrate(dynamic, data, mode=mode)
    folded = onnx.load(out)
    assert folded.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    import onnxruntime as ort

    def run(m, x):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[
            0
        ]

    np.testing.assert_allclose(run(folded, data[:1]), run(calibrated, data[:1]), rtol=1e-4, atol=1e-4)


def test_non_finite_data_exit_2_nothing_written(files, capsys):
    model_path, _, data, tmp = files
    bad = data.copy()
    bad[7, 2, 1, 1] = np.nan
    np.savez(tmp / "nan.npz", input=bad)
    out = tmp / "out.onnx"
    assert main(["calibrate", str(model_path), "-o", str(out), "--data", str(tmp / "nan.npz"), "--fold"]) == 2
    err = capsys.readouterr().err
    assert "nan.npz:input: non-finite values (NaN) in sample 7" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_fold_of_a_deep_noisy_model_passes_its_parity_check(tmp_path, capsys):
    """calibrate --fold uses the same parity semantics as check: a deep float32 chain whose own
    rounding exceeds the fixed tolerance (tests/noisy_models.py) is calibrated, folded and written."""
    from noisy_models import deep_offset_chain

    path, out, data_path = tmp_path / "deep.onnx", tmp_path / "folded.onnx", tmp_path / "data.npy"
    onnx.save_model(deep_offset_chain(), str(path))
    np.save(data_path, np.random.default_rng(3).standard_normal((4, 3, 16, 16)).astype(np.float32))
    argv = [
        "calibrate",
        str(path),
        "-o",
        str(out),
        "--data",
        str(data_path),
        "--batch-size",
        "1",
        "--mode",
        "sequential",
        "--fold",
        "--report",
        str(tmp_path / "r.json"),
    ]
    assert main(argv) == 0
    assert "parity check passed" in capsys.readouterr().out
    parity = json.loads((tmp_path / "r.json").read_text())["parity"]
    assert parity["passed"] is True and parity["noise"]["measured"] is True
    out = parity["outputs"][0]
    assert out["atol_source"] == "noise" and out["noise"] > 0  # the measured noise set the atol
