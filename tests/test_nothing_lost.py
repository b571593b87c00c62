"""The command line never loses a user's file: no command overwrites one of its inputs, outputs are
replaced as a unit even by a crash, hostile inputs are refused in one line within seconds, and
temporary files a killed run leaves are removed by the next. Through subprocesses, since the
exit codes and the files on disk are the promise (docs/safety.md lists them)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.io import load_model, save_model_atomic
from bnfold.io.paths import source_files

ENV = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}


def conv_bn_model(seed: int, channels: int = 16) -> onnx.ModelProto:
    """Conv -> BN with weights big enough (9 KiB) to go to an external data file."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((channels, channels, 3, 3)).astype(np.float32), "w")]
    for name, offset in (("scale", 1.0), ("bias", 0.0), ("mean", 0.0), ("var", 1.5)):
        inits.append(numpy_helper.from_array((rng.random(channels) + offset).astype(np.float32), name))
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return model


def save_external(model, path, location=None):
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location or os.path.basename(str(path)) + ".data",
        size_threshold=0,
    )


def bnfold(*argv, cwd=None, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "bnfold", *map(str, argv)],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        env=env or ENV,
        timeout=timeout,
    )


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def digests(*paths) -> dict:
    return {str(p): digest(p) for p in paths}


def assert_one_line_exit_2(result):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def run_model(path, seed=0):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return session.run(None, {"x": x})[0]


def hidden_temporaries(directory):
    return sorted(n for n in os.listdir(directory) if n.startswith(".bnfold-"))


@pytest.fixture
def two_models(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save_model(conv_bn_model(0), str(a))
    onnx.save_model(conv_bn_model(0), str(b))
    return a, b


# --- no command overwrites its inputs -------------------------------------------------------


@pytest.mark.parametrize("target", ["a", "b", "inputs"])
def test_check_json_never_overwrites_an_input(tmp_path, two_models, target):
    a, b = two_models
    inputs = tmp_path / "in.npz"
    np.savez(inputs, x=np.zeros((1, 16, 8, 8), np.float32))
    before = digests(a, b, inputs)
    json_path = {"a": a, "b": b, "inputs": inputs}[target]
    line = assert_one_line_exit_2(bnfold("check", a, b, "--inputs", inputs, "--json", json_path))
    assert "refusing to overwrite" in line
    assert digests(a, b, inputs) == before


def test_check_json_never_overwrites_the_external_data_of_an_input(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save_model(conv_bn_model(0), str(a))
    save_external(conv_bn_model(0), b, "weights.bin")
    before = digests(a, b, tmp_path / "weights.bin")
    line = assert_one_line_exit_2(bnfold("check", a, b, "--json", tmp_path / "weights.bin"))
    assert "external data" in line
    assert digests(a, b, tmp_path / "weights.bin") == before


@pytest.mark.parametrize("target", ["model", "other"])
def test_bench_json_never_overwrites_a_model(tmp_path, two_models, target):
    a, b = two_models
    before = digests(a, b)
    argv = ["bench", a] + ([b] if target == "other" else []) + ["--repeat", "1", "--warmup", "0"]
    line = assert_one_line_exit_2(bnfold(*argv, "--json", b if target == "other" else a))
    assert "refusing to overwrite" in line
    assert digests(a, b) == before


def test_inspect_json_never_overwrites_the_model(two_models):
    a, _ = two_models
    before = digest(a)
    assert_one_line_exit_2(bnfold("inspect", a, "--json", a))
    assert digest(a) == before


@pytest.mark.parametrize("option", ["-o", "--report"])
def test_calibrate_never_overwrites_its_data(tmp_path, two_models, option):
    a, _ = two_models
    data = tmp_path / "calib.npy"
    np.save(data, np.random.default_rng(0).standard_normal((8, 16, 8, 8)).astype(np.float32))
    before = digests(a, data)
    argv = ["calibrate", a, "--data", data, "-o", data if option == "-o" else tmp_path / "out.onnx"]
    if option == "--report":
        argv += ["--report", data]
    line = assert_one_line_exit_2(bnfold(*argv))
    assert "refusing to overwrite the input" in line
    assert digests(a, data) == before


def test_calibrate_refuses_a_report_inside_its_data_directory(tmp_path, two_models):
    a, _ = two_models
    data = tmp_path / "calib"
    data.mkdir()
    np.save(data / "part0.npy", np.random.default_rng(0).standard_normal((8, 16, 8, 8)).astype(np.float32))
    line = assert_one_line_exit_2(
        bnfold("calibrate", a, "--data", data, "-o", tmp_path / "out.onnx", "--report", data / "new.npz")
    )
    assert "data directory" in line
    assert sorted(os.listdir(data)) == ["part0.npy"]


def test_fold_report_on_the_output_or_its_data_file_is_refused(tmp_path, two_models):
    a, _ = two_models
    out = tmp_path / "out.onnx"
    assert "same file" in assert_one_line_exit_2(bnfold("fold", a, "-o", out, "--report", out))
    for data_name in ("out.onnx.data", "out.onnx.1.data"):
        assert "external data" in assert_one_line_exit_2(bnfold("fold", a, "-o", out, "--report", tmp_path / data_name))
    assert not out.exists()


# --- external-data pairs are replaced as a unit ---------------------------------------------

# Kills the process (as power loss or the OOM killer would) right after a rename or hard link
# of a temporary whose destination ends with $BNFOLD_TEST_KILL_AFTER_RENAME_TO.
KILL_AFTER_RENAME = textwrap.dedent("""
    import os, signal
    _suffix = os.environ.get("BNFOLD_TEST_KILL_AFTER_RENAME_TO")
    if _suffix:
        def _then_die(move):
            def moved(src, dst, *args, **kwargs):
                move(src, dst, *args, **kwargs)
                if os.fspath(dst).endswith(_suffix) and ".bnfold-" in os.path.basename(os.fspath(src)):
                    os.kill(os.getpid(), signal.SIGKILL)
            return moved
        os.replace, os.rename, os.link = _then_die(os.replace), _then_die(os.rename), _then_die(os.link)
""")


def killing_env(tmp_path, suffix):
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(KILL_AFTER_RENAME)
    path = os.pathsep.join([str(hooks)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return {**ENV, "PYTHONPATH": path, "BNFOLD_TEST_KILL_AFTER_RENAME_TO": suffix}


def initializers(path):
    return {t.name: numpy_helper.to_array(t) for t in load_model(path).graph.initializer}


@pytest.mark.parametrize("killed_after", [".data", "out.onnx"])
def test_a_crash_while_replacing_an_external_data_pair_leaves_the_old_or_the_new_model(tmp_path, killed_after):
    old_in, new_in, out = tmp_path / "old.onnx", tmp_path / "new.onnx", tmp_path / "out.onnx"
    save_external(conv_bn_model(1), old_in)
    save_external(conv_bn_model(2), new_in)
    assert bnfold("fold", old_in, "-o", out).returncode == 0
    old_weights, old_result = initializers(out), run_model(out)
    assert len(source_files(out)) == 2  # out.onnx and its data file

    killed = bnfold("fold", new_in, "-o", out, env=killing_env(tmp_path, killed_after))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    weights = initializers(out)  # loads: the .onnx and the data file it names agree
    result = run_model(out)
    if killed_after == ".data":  # the new data is in place, the .onnx is still the old one
        expected_weights, expected_result = old_weights, old_result
    else:
        assert bnfold("fold", new_in, "-o", tmp_path / "reference.onnx").returncode == 0
        expected_weights, expected_result = (
            initializers(tmp_path / "reference.onnx"),
            run_model(tmp_path / "reference.onnx"),
        )
    assert weights.keys() == expected_weights.keys()
    assert all(np.array_equal(weights[k], expected_weights[k]) for k in weights)
    np.testing.assert_array_equal(result, expected_result)

    # The killed run's temporaries go with the next write there; a data file it had put in
    # place but no model refers to stays (bnfold cannot prove that no model of yours uses it)
    # and is never read or overwritten.
    def data_files():
        return {
            os.path.join(tmp_path, n) for n in os.listdir(tmp_path) if n.startswith("out.onnx") and n.endswith(".data")
        }

    orphans = data_files() - (source_files(out) - {str(out)})
    # (killed after the data went in place: the new data; after the .onnx: the replaced data)
    assert len(orphans) == 1
    orphan_digests = digests(*orphans)
    time.sleep(0.05)
    again = bnfold("fold", new_in, "-o", out)
    assert again.returncode == 0, again.stderr
    assert hidden_temporaries(tmp_path) == []
    assert data_files() == (source_files(out) - {str(out)}) | orphans
    assert digests(*orphans) == orphan_digests


def test_rewriting_an_external_data_output_alternates_data_file_names_and_removes_the_old(tmp_path):
    out = tmp_path / "out.onnx"
    names = []
    for seed in range(3):
        save_model_atomic(conv_bn_model(seed), out, external_data=True)
        names.append(sorted(os.path.basename(p) for p in source_files(out) if p != str(out)))
        assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".data")) == names[-1]
        assert np.array_equal(initializers(out)["w"], numpy_helper.to_array(conv_bn_model(seed).graph.initializer[0]))
    assert names == [["out.onnx.data"], ["out.onnx.1.data"], ["out.onnx.data"]]


def test_a_data_file_the_user_named_is_never_removed(tmp_path):
    out = tmp_path / "out.onnx"
    save_external(conv_bn_model(0), out, "my_weights.bin")
    before = digest(tmp_path / "my_weights.bin")
    save_model_atomic(conv_bn_model(1), out, external_data=True)
    assert digest(tmp_path / "my_weights.bin") == before


# --- temporaries a killed run leaves ---------------------------------------------------------


def test_stale_temporaries_are_removed_but_live_ones_kept(tmp_path, two_models):
    import fcntl

    a, _ = two_models
    stale = tmp_path / ".bnfold-dead.onnx.tmp"
    stale_data = tmp_path / ".bnfold-dead.data.tmp"
    live = tmp_path / ".bnfold-live.onnx.tmp"
    orphan_data = tmp_path / ".bnfold-orphan.data.tmp"
    foreign = tmp_path / ".bnfold-notes.txt"
    for path in (stale, stale_data, live, orphan_data, foreign):
        path.write_bytes(b"x" * 100)
        os.utime(path, (time.time() - 60, time.time() - 60))
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # a bnfold run still writing it
        result = bnfold("fold", a, "-o", tmp_path / "out.onnx")
        assert result.returncode == 0, result.stderr
        assert "removed 3 stale temporary file(s)" in result.stderr
        assert live.exists() and foreign.exists()
        assert not stale.exists() and not stale_data.exists() and not orphan_data.exists()


def test_temporaries_newer_than_the_process_are_kept(tmp_path):
    from bnfold.io.temporaries import remove_stale_temporaries

    fresh = tmp_path / ".bnfold-new.onnx.tmp"
    fresh.write_bytes(b"x")
    assert remove_stale_temporaries(str(tmp_path)) == []
    assert fresh.exists()


# --- hostile inputs: one line, exit 2, within seconds ----------------------------------------


@pytest.mark.parametrize("command", ["fold", "inspect", "check", "calibrate", "bench"])
def test_a_fifo_as_input_is_refused_without_blocking(tmp_path, command):
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    argv = {
        "fold": ["fold", fifo, "-o", tmp_path / "o.onnx"],
        "inspect": ["inspect", fifo],
        "check": ["check", fifo, fifo],
        "bench": ["bench", fifo],
        "calibrate": ["calibrate", fifo, "-o", tmp_path / "o.onnx", "--data", tmp_path / "d.npy"],
    }[command]
    line = assert_one_line_exit_2(bnfold(*argv, timeout=60))  # a hang fails by the timeout
    assert "regular file" in line or "not" in line


def test_a_fifo_as_external_data_is_refused_without_blocking(tmp_path):
    model = tmp_path / "m.onnx"
    save_external(conv_bn_model(0), model, "weights.bin")
    os.unlink(tmp_path / "weights.bin")
    os.mkfifo(tmp_path / "weights.bin")
    for argv in (["inspect", model], ["fold", model, "-o", tmp_path / "o.onnx"]):
        assert "not a regular file" in assert_one_line_exit_2(bnfold(*argv, timeout=60))


def test_a_truncated_external_data_file_is_refused(tmp_path):
    model = tmp_path / "m.onnx"
    proto = conv_bn_model(0)
    save_external(conv_bn_model(0), model, "weights.bin")
    # One tensor, no length key: a short file gives a short payload, which only dims can tell.
    loaded = onnx.load(str(model), load_external_data=False)
    for tensor in loaded.graph.initializer:
        del tensor.external_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value=f"{tensor.name}.bin")
        data = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == tensor.name)).tobytes()
        (tmp_path / f"{tensor.name}.bin").write_bytes(data[:10] if tensor.name == "w" else data)
    onnx.save_model(loaded, str(model))
    for argv in (["inspect", model], ["fold", model, "-o", tmp_path / "o.onnx"]):
        line = assert_one_line_exit_2(bnfold(*argv))
        assert "'w'" in line and "10 bytes" in line
    assert not (tmp_path / "o.onnx").exists()


def test_a_model_whose_external_tensors_are_all_tiny_folds(tmp_path):
    model, out = tmp_path / "tiny.onnx", tmp_path / "out.onnx"
    save_external(conv_bn_model(0, channels=2), model)
    assert os.path.getsize(tmp_path / "tiny.onnx.data") < 1024 * 2
    result = bnfold("fold", model, "-o", out)
    assert result.returncode == 0, result.stderr
    assert onnx.checker.check_model(str(out)) is None


# --- signals ---------------------------------------------------------------------------------

# Sends a signal to the process itself at a named moment of start-up.
SIGNAL_AT = textwrap.dedent("""
    import os, signal, sys
    _moment, _signal = os.environ.get("BNFOLD_TEST_SIGNAL_AT", ":").split(":")
    if _moment == "parse":
        import argparse
        _parse = argparse.ArgumentParser.parse_args
        def _parse_then_signal(self, *args, **kwargs):
            os.kill(os.getpid(), getattr(signal, _signal))
            return _parse(self, *args, **kwargs)
        argparse.ArgumentParser.parse_args = _parse_then_signal
    elif _moment == "extension":  # while a compiled module of bnfold initializes
        import importlib.abc
        class _Signaller(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "bnfold._fold_math":
                    sys.meta_path.remove(self)
                    os.kill(os.getpid(), getattr(signal, _signal))
                return None
        sys.meta_path.insert(0, _Signaller())
""")


@pytest.mark.parametrize("moment", ["parse", "extension"])
@pytest.mark.parametrize("signame, code, word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_a_signal_during_start_up_is_one_line_and_its_exit_code(tmp_path, two_models, moment, signame, code, word):
    a, _ = two_models
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SIGNAL_AT)
    env = {**ENV, "PYTHONPATH": str(hooks), "BNFOLD_TEST_SIGNAL_AT": f"{moment}:{signame}"}
    result = bnfold("fold", a, "-o", tmp_path / "out.onnx", env=env)
    assert result.returncode == code, result.stderr
    assert result.stderr.strip() == f"bnfold: {word}"
    assert not (tmp_path / "out.onnx").exists()
    assert hidden_temporaries(tmp_path) == []


def test_signals_at_random_moments_of_a_fold(tmp_path):
    """SIGINT/SIGTERM at random moments of `bnfold fold` of an external-data model: the exit is
    0 (finished first), 130 or 143 with one line, never a traceback; nothing hidden is left; the
    output is absent or the complete folded model; the input is unchanged."""
    model = tmp_path / "m.onnx"
    save_external(conv_bn_model(3, channels=64), model)
    before = digests(*source_files(model))
    rng = np.random.default_rng(11)
    outcomes = set()
    for trial in range(8):
        out = tmp_path / f"out{trial}.onnx"
        process = subprocess.Popen(
            [sys.executable, "-m", "bnfold", "fold", str(model), "-o", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        # (Not in the first 0.3 s: until the interpreter has imported bnfold.cli.app, no bnfold code
        # runs and Python's defaults apply: a KeyboardInterrupt traceback or death by SIGTERM,
        # with nothing written yet. The test above covers the moments after that.)
        time.sleep(float(rng.uniform(0.3, 2.5)))
        process.send_signal(signal.SIGINT if trial % 2 else signal.SIGTERM)
        _, err = process.communicate(timeout=120)
        outcomes.add(process.returncode)
        # Death by the signal itself, silently, is Python's default before bnfold.cli.app has
        # installed its handlers: on a loaded machine interpreter start-up can outlast 0.3 s.
        before_handlers = process.returncode in (-signal.SIGTERM, -signal.SIGINT) and not err.strip()
        assert process.returncode in (0, 130, 143) or before_handlers, err
        assert "Traceback" not in err, err
        if process.returncode in (130, 143):
            assert err.strip().splitlines()[-1] in ("bnfold: interrupted", "bnfold: terminated"), err
        if out.exists():
            assert onnx.checker.check_model(str(out)) is None
            run_model(out)
        assert hidden_temporaries(tmp_path) == []
    assert digests(*source_files(model)) == before


def test_a_signal_swallowed_by_a_finalizer_still_ends_the_command():
    """Python prints and drops an exception raised in ``__del__``; a SIGTERM handled there must
    still unwind the command (exit 143, one line), not leave an "Exception ignored" traceback
    and carry on."""
    script = textwrap.dedent("""
        import argparse, os, signal, sys, time
        from bnfold.cli import app as cli

        class Finalized:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(1000))  # the handler runs here, inside the finalizer

        def command(args):
            Finalized()
            time.sleep(2)
            print("finished")
            return 0

        def parser():
            p = argparse.ArgumentParser()
            p.set_defaults(func=command, command="test")
            return p

        cli.build_parser = parser
        sys.exit(cli.main([]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (143, "", "bnfold: terminated\n")


def _write_repeatedly(path, seed, times):
    for _ in range(times):
        save_model_atomic(conv_bn_model(seed), path, external_data=True)


def test_concurrent_writers_of_one_external_data_output_never_mix(tmp_path):
    """Two processes replace the same external-data output over and over while this one reads
    it: every read is model A or model B whole (or, when it lands just as a data file is
    removed, a clean load error), and what is left at the end is one of them."""
    import multiprocessing

    out = tmp_path / "out.onnx"
    save_model_atomic(conv_bn_model(5), out, external_data=True)
    weights = {seed: numpy_helper.to_array(conv_bn_model(seed).graph.initializer[0]) for seed in (5, 6, 7)}
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_repeatedly, args=(str(out), seed, 15)) for seed in (6, 7)]
    for writer in writers:
        writer.start()
    seen = set()
    while any(w.is_alive() for w in writers):
        try:
            w = initializers(out)["w"]
        except Exception:  # noqa: BLE001 - a data file removed between reading the .onnx and its data
            continue
        match = [seed for seed, expected in weights.items() if np.array_equal(w, expected)]
        assert match, "a read mixed one model's .onnx with another's weights"
        seen.add(match[0])
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    final = initializers(out)["w"]
    assert any(np.array_equal(final, weights[seed]) for seed in (6, 7))
    assert hidden_temporaries(tmp_path) == []


def test_a_users_model_whose_data_file_has_a_bnfold_name_is_never_touched(tmp_path):
    """other.onnx (the user's) keeps its weights in out.onnx.data / out.onnx.1.data: writing
    out.onnx, now and over an existing bnfold output, takes names no file has."""
    other = tmp_path / "other.onnx"
    save_external(conv_bn_model(6), other, "out.onnx.data")
    source = tmp_path / "in.onnx"
    save_external(conv_bn_model(7), source)
    before = digest(tmp_path / "out.onnx.data")
    time.sleep(0.05)
    out = tmp_path / "out.onnx"
    for _ in range(3):
        assert bnfold("fold", source, "-o", out, "--no-check").returncode == 0
        assert digest(tmp_path / "out.onnx.data") == before
        run_model(other)
        run_model(out)


def test_report_on_the_data_file_of_a_symlinked_output_is_refused(tmp_path):
    source = tmp_path / "ext.onnx"
    save_external(conv_bn_model(0), source)
    (tmp_path / "sub").mkdir()
    os.symlink("sub/o.onnx", tmp_path / "link.onnx")
    for data_name in ("o.onnx.data", "o.onnx.1.data"):
        line = assert_one_line_exit_2(
            bnfold("fold", source, "-o", tmp_path / "link.onnx", "--report", tmp_path / "sub" / data_name)
        )
        assert "external data" in line
    assert os.listdir(tmp_path / "sub") == []


def test_calibrate_never_overwrites_a_data_file_linked_into_its_data_directory(tmp_path, two_models):
    a, _ = two_models
    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    real = tmp_path / "elsewhere" / "real.npy"
    np.save(real, np.random.default_rng(0).standard_normal((8, 16, 8, 8)).astype(np.float32))
    os.symlink("../elsewhere/real.npy", tmp_path / "data" / "a.npy")
    before = digest(real)
    for argv in (["-o", tmp_path / "data" / "a.npy"], ["-o", real], ["-o", tmp_path / "out.onnx", "--report", real]):
        line = assert_one_line_exit_2(bnfold("calibrate", a, "--data", tmp_path / "data", "--no-progress", *argv))
        assert "refusing to overwrite the input" in line
    assert digest(real) == before


def test_concurrent_fold_commands_into_one_output_leave_a_whole_model(tmp_path):
    """Five `bnfold fold` of different models into one external-data output at once, three
    rounds: when they are done, out.onnx loads and is exactly one of them."""
    sources = []
    for seed in range(5):
        sources.append(tmp_path / f"in{seed}.onnx")
        save_external(conv_bn_model(seed, channels=32), sources[-1])
    expected = {}
    for source in sources:
        reference = tmp_path / f"ref-{source.name}"
        assert bnfold("fold", source, "-o", reference, "--no-check").returncode == 0
        expected[source.name] = run_model(reference)
    out = tmp_path / "out.onnx"
    for _ in range(3):
        writers = [
            subprocess.Popen(
                [sys.executable, "-m", "bnfold", "fold", str(s), "-o", str(out), "--no-check"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=ENV,
            )
            for s in sources
        ]
        for writer in writers:
            assert writer.wait(timeout=120) == 0, writer.stderr.read()
        result = run_model(out)
        assert any(np.array_equal(result, e) for e in expected.values())
        assert hidden_temporaries(tmp_path) == []


@pytest.mark.parametrize(
    "argv", [["fold", "--bogus"], ["nope"], ["check", "a.onnx"], ["bench", "m.onnx", "--threads", "x"]]
)
def test_usage_errors_are_one_line(tmp_path, argv):
    line = assert_one_line_exit_2(bnfold(*argv, cwd=tmp_path))
    assert line.startswith("bnfold") and "--help" in line


@pytest.mark.parametrize("option", [["--image-size", "100000"], ["--width", "100000"], ["--threads", "100000"]])
def test_demo_sizes_are_bounded_and_a_refused_demo_leaves_no_folder(tmp_path, option):
    out = tmp_path / "demo"
    assert_one_line_exit_2(bnfold("demo", "--quick", "--out", out, *option))
    assert not out.exists()


def test_a_memory_error_is_bad_input_in_one_line(monkeypatch, capsys, two_models, tmp_path):
    import bnfold.folding.fold_pass
    from bnfold.cli.app import main

    def out_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 3.49 TiB")

    monkeypatch.setattr(bnfold.folding, "fold_file", out_of_memory)
    assert main(["fold", str(two_models[0]), "-o", str(tmp_path / "o.onnx")]) == 2
    assert (
        capsys.readouterr().err
        == "bnfold fold: error: not enough memory (Unable to allocate 3.49 TiB); try smaller inputs\n"
    )


def test_a_failure_between_placing_the_data_and_the_model_removes_the_new_data(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    save_model_atomic(conv_bn_model(0), out, external_data=True)
    before = {n: digest(tmp_path / n) for n in os.listdir(tmp_path)}
    real_replace = os.replace

    def failing_replace(src, dst, *args, **kwargs):
        if os.fspath(dst) == str(out):
            raise KeyboardInterrupt  # as Ctrl-C would, between the two renames
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        save_model_atomic(conv_bn_model(1), out, external_data=True)
    assert {n: digest(tmp_path / n) for n in os.listdir(tmp_path)} == before


def test_an_unbuilt_checkout_says_how_to_build(two_models):
    """A source checkout imported without building: the missing compiled module is named with
    the command that builds it, in the API and in the command line."""
    hide = "import sys; sys.modules['bnfold._openmp'] = None; "
    api = subprocess.run(
        [sys.executable, "-c", hide + "import bnfold; bnfold.batch_stats"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert api.returncode == 1 and "ImportError: bnfold's compiled module bnfold._openmp is not built" in api.stderr
    cli = subprocess.run(
        [
            sys.executable,
            "-c",
            hide + "from bnfold.cli.app import main; raise SystemExit(main())",
            "inspect",
            str(two_models[0]),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert cli.returncode == 3 and cli.stderr.count("\n") == 1, cli.stderr
    assert "bnfold._openmp is not built" in cli.stderr and "pip install -e ." in cli.stderr


def test_an_external_data_output_through_a_link_into_another_folder_is_refused(tmp_path):
    source = tmp_path / "ext.onnx"
    save_external(conv_bn_model(0), source)
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    os.symlink("../B/real.onnx", tmp_path / "A" / "link.onnx")
    assert "give the target path" in assert_one_line_exit_2(bnfold("fold", source, "-o", tmp_path / "A" / "link.onnx"))
    assert os.listdir(tmp_path / "B") == []


def test_a_signal_as_the_model_is_renamed_leaves_a_loadable_model(tmp_path, monkeypatch, capsys):
    """SIGTERM arriving while the final rename runs (its handler runs right after the call)
    is held until the pair is complete: the new model, loadable."""
    from bnfold.cli.app import main

    source, out = tmp_path / "a.onnx", tmp_path / "out.onnx"
    save_external(conv_bn_model(1), source)
    save_model_atomic(conv_bn_model(2), out, external_data=True)
    real_replace = os.replace

    def replace_then_sigterm(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if os.fspath(dst) == str(out):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(os, "replace", replace_then_sigterm)
    assert main(["fold", str(source), "-o", str(out), "--no-check"]) == 143
    run_model(out)
    assert len(source_files(out)) == 2


def test_the_data_of_a_model_bnfold_did_not_write_is_never_removed(tmp_path):
    """out.onnx is the user's own (not a bnfold output), sharing out.onnx.data with u.onnx:
    replacing out.onnx leaves that data file alone."""
    save_external(conv_bn_model(3), tmp_path / "out.onnx")
    save_external(conv_bn_model(3), tmp_path / "u.onnx", "out.onnx.data")
    before = digest(tmp_path / "out.onnx.data")
    save_model_atomic(conv_bn_model(4), tmp_path / "out.onnx", external_data=True)
    assert digest(tmp_path / "out.onnx.data") == before
    run_model(tmp_path / "u.onnx")
    run_model(tmp_path / "out.onnx")
