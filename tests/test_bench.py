"""bnfold.verify.bench / `bnfold bench`: report structure and options (never a time)."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest

from bnfold.cli.app import main
from bnfold.demo.zoo import build_demo_cnn
from bnfold.errors import InputError
from bnfold.progress import Progress
from bnfold.verify.bench import BenchReport, benchmark


@pytest.fixture(scope="module")
def demo_model():
    return build_demo_cnn(image_size=8, width=4)


def test_benchmark_report_structure(demo_model):
    report = benchmark(
        {"original": demo_model, "same": demo_model},
        opt_levels=("disabled", "all"),
        threads=1,
        warmup=1,
        repeat=4,
        progress=False,
    )
    assert isinstance(report, BenchReport)
    assert report.models == ["original", "same"] and report.opt_levels == ["disabled", "all"]
    assert report.threads == 1 and report.inputs == {"input": {"dtype": "float32", "shape": [1, 3, 8, 8]}}
    assert len(report.results) == 4
    for r in report.results:
        assert r.runs == 4
        assert 0 < r.min_ms <= r.p10_ms <= r.median_ms <= r.p90_ms
    ratio = report.speedup("same", "all")
    assert ratio == report.result("original", "all").median_ms / report.result("same", "all").median_ms
    data = report.to_dict()
    assert set(data["speedup_vs_baseline"]) == {"disabled", "all"}
    json.dumps(data)  # serialisable
    table = report.format_table()
    assert "same speed-up" in table and "disabled" in table and "\x1b" not in table


def test_time_budget_runs_at_least_the_minimum(demo_model):
    report = benchmark({"m": demo_model}, warmup=0, time_budget=0.01, shapes={"input": (2, 3, 8, 8)}, progress=False)
    assert report.results[0].runs >= 5 and report.inputs["input"]["shape"] == [2, 3, 8, 8]
    assert "speed-up" not in report.format_table()


def test_bad_options(demo_model):
    with pytest.raises(InputError, match="optimization level"):
        benchmark({"m": demo_model}, opt_levels=("fast",))
    with pytest.raises(InputError, match="threads"):
        benchmark({"m": demo_model}, threads=0)
    with pytest.raises(InputError, match="either"):
        benchmark({"m": demo_model}, repeat=3, time_budget=1.0)
    with pytest.raises(TypeError):
        benchmark([demo_model])


def test_cli_one_model_folds_in_memory(tmp_path, demo_model, capsys):
    path = tmp_path / "demo.onnx"
    onnx.save(demo_model, str(path))
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            str(path),
            "--repeat",
            "3",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--opt-level",
            "disabled,all",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "9 BN(s) folded, 1 left" in printed and "folded speed-up" in printed
    data = json.loads(out.read_text())
    assert data["models"] == ["original", "folded"] and data["baseline"] == "original"
    assert {(r["model"], r["opt_level"]) for r in data["results"]} == {
        (m, level) for m in ("original", "folded") for level in ("disabled", "all")
    }
    assert all(r["runs"] == 3 for r in data["results"])


def test_cli_two_models_and_errors(tmp_path, demo_model, capsys):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(demo_model, str(a))
    onnx.save(demo_model, str(b))
    assert main(["bench", str(a), str(b), "--repeat", "2", "--warmup", "0"]) == 0
    assert "b.onnx speed-up" in capsys.readouterr().out
    np.savez(tmp_path / "x.npz", input=np.zeros((3, 3, 8, 8), np.float32))
    assert main(["bench", str(a), str(b), "--repeat", "2", "--inputs", str(tmp_path / "x.npz")]) == 0
    assert "input 3x3x8x8" in capsys.readouterr().out
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    assert main(["bench", str(tmp_path / "bad.onnx")]) == 2
    assert main(["bench", str(a), "--shape", "input:1x3"]) == 2
    assert main(["bench", str(a), "--opt-level", "turbo"]) == 2
    err = capsys.readouterr().err
    assert "bad.onnx" in err and "turbo" in err


def test_cli_options_rejected_under_their_cli_names_before_any_work(tmp_path, demo_model, capsys, monkeypatch):
    import bnfold.cli.bench as bench_command

    path = tmp_path / "demo.onnx"
    onnx.save(demo_model, str(path))

    def must_not_run(*args, **kwargs):
        raise AssertionError("benchmark ran although an option was bad")

    monkeypatch.setattr(bench_command, "benchmark", must_not_run)
    cases = {
        ("--time", "0"): "--time must be a finite number of seconds > 0, got 0",
        ("--time", "-1"): "--time must be",
        ("--time", "inf"): "--time must be",
        ("--threads", "0"): "--threads must be between 1 and",
        ("--warmup", "-1"): "--warmup must be >= 0, got -1",
        ("--repeat", "0"): "--repeat must be >= 1, got 0",
        ("--json", str(tmp_path / "missing" / "b.json")): "does not exist",
    }
    for option, expected in cases.items():
        assert main(["bench", str(path), *option]) == 2, option
        captured = capsys.readouterr()
        assert expected in captured.err, option
        assert "time_budget" not in captured.err and "folded in memory" not in captured.out, option
    with pytest.raises(InputError, match="time_budget"):
        benchmark({"m": demo_model}, time_budget=float("inf"))


def test_progress_bar_only_when_enabled():
    quiet = io.StringIO()  # not a terminal: nothing drawn by default
    with Progress(10, "work", stream=quiet) as p:
        p.update(10)
    assert quiet.getvalue() == ""
    forced = io.StringIO()
    with Progress(4, "work", stream=forced, enabled=True) as p:
        for _ in range(4):
            p.update(1)
    text = forced.getvalue()
    assert "work [" in text and "100%" in text and "\x1b" not in text and text.endswith("\n")
    unknown = io.StringIO()
    with Progress(None, "items", stream=unknown, enabled=True) as p:
        p.update(3)
    assert "items" in unknown.getvalue()


# ------------------------------------------------------------------------------------------------
# Arguments and synthesized inputs are bounded as in bnfold.check (issue 11)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, named",
    [
        ({"seed": -1}, ValueError, "seed must be a non-negative integer"),
        ({"seed": 0.5}, TypeError, "seed"),
        ({"shapes": {"input": (-1, 3, 8, 8)}}, ValueError, "shapes['input']: dimension 0 is -1"),
        ({"shapes": {"input": (1.0, 3, 8, 8)}}, TypeError, "shapes['input']: dimension 0 must be an integer"),
        ({"time_budget": "1"}, TypeError, "time_budget"),
    ],
)
def test_argument_errors_name_the_argument(demo_model, kwargs, error, named):
    with pytest.raises(error) as raised:
        benchmark({"m": demo_model}, progress=False, **kwargs)
    assert named in str(raised.value) and isinstance(raised.value, InputError)


def test_a_model_that_is_neither_path_nor_proto_is_named(demo_model):
    with pytest.raises(TypeError, match=r"models\['b'\] must be a path or an onnx.ModelProto, got NoneType"):
        benchmark({"a": demo_model, "b": None})


def test_synthesized_inputs_beyond_the_memory_limit_are_refused_before_drawing(demo_model, monkeypatch):
    from bnfold.verify import inputs

    monkeypatch.setattr(inputs, "available_memory", lambda: (64 << 20, "memory available"))  # a 16 MiB limit

    def no_drawing(*args, **kwargs):
        raise AssertionError("inputs were drawn")

    monkeypatch.setattr(inputs, "synthesize_inputs", no_drawing)
    with pytest.raises(
        InputError,
        match=r"would take 36 MiB, more than the limit of 16 MiB \(25% of the 64 MiB of "
        r"memory available\): input 'input' of shape 16384x3x8x8 float32 takes 12 MiB",
    ):
        benchmark({"m": demo_model}, shapes={"input": (16384, 3, 8, 8)}, repeat=1, progress=False)


def _bench_cli(*args):
    import subprocess
    import sys
    import time

    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bnfold", "bench", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    return done.returncode, done.stderr.splitlines(), time.monotonic() - start


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--shape", "input:99999999999x3x8x8"], "input 'input' of shape 99999999999x3x8x8 float32"),
    ],
)
def test_cli_bad_values_exit_2_in_one_line(tmp_path, demo_model, options, expected):
    path = tmp_path / "demo.onnx"
    onnx.save(demo_model, str(path))
    code, err, seconds = _bench_cli(path, path, "--repeat", "1", *options)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("bnfold bench: error: ") and expected in err[0], err


def test_cli_huge_static_input_exits_2(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 100000, 100000])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 100000, 100000])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )
    path = tmp_path / "huge.onnx"
    onnx.save(model, str(path))
    code, err, _ = _bench_cli(path, path, "--repeat", "1")
    assert code == 2 and len(err) == 1 and "input 'x' of shape 1x3x100000x100000 float32" in err[0], err


def test_thread_counts_beyond_the_machine_are_refused_before_any_session(tmp_path, demo_model):
    """onnxruntime starts every intra-op thread at session creation, in C++ where no signal
    reaches the process; --threads 100000 exhausted the machine's threads for half an hour."""
    from bnfold.verify.bench import max_bench_threads

    path = tmp_path / "demo.onnx"
    onnx.save(demo_model, str(path))
    with pytest.raises(InputError, match=f"threads must be at most {max_bench_threads()}"):
        benchmark({"a": str(path)}, threads=100000, repeat=1, warmup=0)
    code, lines, _ = _bench_cli(path, "--threads", "100000", "--repeat", "1")
    assert code == 2 and len(lines) == 1 and "--threads must be between 1 and" in lines[0], lines
