"""`bnfold fold` and `bnfold inspect` from the command line: exit codes, files written (or not),
what is printed, the --report JSON."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import onnx
import pytest

from bnfold.cli.app import main
from fold_testing import MM, assert_parity, count_bn


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "mixed.onnx"
    onnx.save_model(MM.mixed_small_cnn(), str(path))
    return path


def _run(capsys, *argv):
    code = main(list(map(str, argv)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_fold_writes_model_table_and_report(tmp_path, model_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    before = model_path.read_bytes()
    code, stdout, err = _run(capsys, "fold", model_path, "-o", out, "--report", report)
    assert code == 0, err
    assert model_path.read_bytes() == before
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    assert count_bn(folded) == 1
    assert_parity(MM.mixed_small_cnn(), folded, MM.random_feeds(folded), "cli")
    # the table: BN and the changed totals, the remaining BN with its reason, size, time, parity
    assert "BatchNormalization" in stdout and "total" in stdout
    assert "3 folded, 1 remaining" in stdout
    assert "bn2_after_relu" in stdout and "no_foldable_neighbour" in stdout
    assert "model size" in stdout and "fold time" in stdout
    assert "parity check: passed" in stdout and "max abs error" in stdout
    data = json.loads(report.read_text())
    text = json.dumps(data)
    for bn in ("bn1", "bn3", "bn4_before_fc", "bn2_after_relu"):
        assert bn in text
    assert "conv_bn" in text and "bn_gemm" in text and "no_foldable_neighbour" in text


def test_fold_no_check_skips_parity(tmp_path, model_path, capsys, monkeypatch):
    import bnfold.verify.parity

    def must_not_run(*a, **k):
        raise AssertionError("parity check ran despite --no-check")

    monkeypatch.setattr(bnfold.verify, "check", must_not_run)
    out = tmp_path / "out.onnx"
    code, stdout, err = _run(capsys, "fold", model_path, "-o", out, "--no-check")
    assert code == 0, err
    assert out.exists()
    assert "skipped" in stdout


def test_fold_shape_option_reaches_the_check(tmp_path, capsys, monkeypatch):
    import bnfold.verify.parity

    seen = {}
    real_check = bnfold.verify.parity.check

    def spy(reference, candidate, **kwargs):
        seen.update(kwargs)
        return real_check(reference, candidate, **kwargs)

    monkeypatch.setattr(bnfold.verify, "check", spy)
    model = MM.conv2d_bn()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"  # dynamic batch
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    src = tmp_path / "dyn.onnx"
    onnx.save_model(model, str(src))
    code, stdout, err = _run(capsys, "fold", src, "-o", tmp_path / "o.onnx", "--shape", "x:3x4x8x8", "--seed", "5")
    assert code == 0, err
    assert seen["shapes"] == {"x": (3, 4, 8, 8)}
    assert seen["seed"] == 5


def test_fold_bad_shape_spec_is_exit_2(tmp_path, model_path, capsys):
    code, _, err = _run(capsys, "fold", model_path, "-o", tmp_path / "o.onnx", "--shape", "x:axb")
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


class _FailedCheck:
    passed = False
    max_abs_error = 0.5
    warnings = ()

    def summary(self):
        return "FAIL: output 'y' (1.00% of elements differ, max abs error 0.5)"


def test_parity_failure_exit_1_nothing_written(tmp_path, model_path, capsys, monkeypatch):
    import bnfold.verify.parity

    monkeypatch.setattr(bnfold.verify, "check", lambda *a, **k: _FailedCheck())
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, err = _run(capsys, "fold", model_path, "-o", out, "--report", report)
    assert code == 1
    assert not out.exists() and not report.exists()
    assert "FAILED" in err and "nothing written" in err
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".bnfold-")], "no temp files left behind"


def test_parity_failure_with_force_writes(tmp_path, model_path, capsys, monkeypatch):
    import bnfold.verify.parity

    monkeypatch.setattr(bnfold.verify, "check", lambda *a, **k: _FailedCheck())
    out = tmp_path / "out.onnx"
    code, _, err = _run(capsys, "fold", model_path, "-o", out, "--force")
    assert code == 1
    assert out.exists()
    assert "--force" in err


def test_parity_failure_real_check(tmp_path, capsys, monkeypatch):
    """A fold that really changes the function (sabotaged weights) is caught by the real check."""
    import bnfold.folding.fold_pass
    from bnfold.folding.tensors import read_tensor, write_tensor

    real_run = bnfold.folding.fold_pass._run

    def broken_run(model, report, forward, payloads=None, keep=None):
        flushed = real_run(model, report, forward, payloads, keep)  # returned as _run returns it
        for t in model.graph.initializer:
            if len(t.dims) == 4:
                write_tensor(t, read_tensor(t, payloads) * 1.5, t.data_type, t.name, payloads)
        return flushed

    monkeypatch.setattr(bnfold.folding.fold_pass, "_run", broken_run)
    src = tmp_path / "m.onnx"
    onnx.save_model(MM.conv2d_bn(), str(src))
    code, stdout, err = _run(capsys, "fold", src, "-o", tmp_path / "o.onnx")
    assert code == 1
    assert "parity check: FAILED" in stdout
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(
    "builder, layer, value", [("saturating_model", "l1.conv", "l1.bn"), ("softmax_head_model", "head.fc", "logits")]
)
def test_wrong_fold_hidden_by_the_head_is_refused(tmp_path, capsys, monkeypatch, builder, layer, value):
    """One folded layer's weights x 1.01 behind a head that hides it from the outputs (a saturated
    sigmoid, a softmax of 1000 small probabilities): the check of the intermediate values refuses
    the fold and names the layer; a check of the outputs alone would have let it through."""
    import bnfold.folding.fold_pass
    import hidden_error_models
    from bnfold.folding.tensors import read_tensor, write_tensor

    real_run = bnfold.folding.fold_pass._run

    def one_layer_wrong(model, report, forward, payloads=None, keep=None):
        flushed = real_run(model, report, forward, payloads, keep)  # returned as _run returns it
        node = next(n for n in model.graph.node if n.name == layer)
        t = next(t for t in model.graph.initializer if t.name == node.input[1])
        write_tensor(t, read_tensor(t, payloads) * 1.01, t.data_type, t.name, payloads)
        return flushed

    src = tmp_path / "m.onnx"
    onnx.save_model(getattr(hidden_error_models, builder)(), str(src))
    code, stdout, err = _run(capsys, "fold", src, "-o", tmp_path / "correct.onnx")
    assert code == 0, err
    assert "intermediate values match" in stdout

    monkeypatch.setattr(bnfold.folding.fold_pass, "_run", one_layer_wrong)
    out = tmp_path / "o.onnx"
    code, stdout, err = _run(capsys, "fold", src, "-o", out)
    assert code == 1 and not out.exists()
    assert "parity check: FAILED" in stdout and f"intermediate value '{value}'" in stdout and layer in stdout
    assert "nothing written" in err
    code, _, _ = _run(capsys, "fold", src, "-o", out, "--force")
    assert code == 1 and out.exists()
    assert _run(capsys, "check", src, out)[0] == 0  # the outputs alone do not show it
    assert _run(capsys, "check", src, out, "--intermediates")[0] == 1


def test_missing_input_exit_2(tmp_path, capsys):
    code, _, err = _run(capsys, "fold", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx")
    assert code == 2
    assert "no such file" in err and len(err.strip().splitlines()) == 1


def test_corrupt_input_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    code, _, err = _run(capsys, "fold", bad, "-o", tmp_path / "o.onnx")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_text_file_exit_2(tmp_path, capsys):
    txt = tmp_path / "notes.txt"
    txt.write_text("this is not a model\n")
    code, _, err = _run(capsys, "fold", txt, "-o", tmp_path / "o.onnx")
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_output_in_missing_directory_exit_2(tmp_path, model_path, capsys):
    out = tmp_path / "missing" / "o.onnx"
    code, _, err = _run(capsys, "fold", model_path, "-o", out)
    assert code == 2 and "does not exist" in err
    assert not out.parent.exists()


def test_output_equal_to_input_refused(model_path, capsys):
    before = model_path.read_bytes()
    code, _, err = _run(capsys, "fold", model_path, "-o", model_path)
    assert code == 2 and "overwrite" in err
    assert model_path.read_bytes() == before


def test_output_same_file_by_other_spelling_refused(model_path, capsys, monkeypatch):
    before = model_path.read_bytes()
    monkeypatch.chdir(model_path.parent)
    code, _, err = _run(capsys, "fold", model_path, "-o", f"./{model_path.name}")
    assert code == 2
    assert model_path.read_bytes() == before


def test_external_data_input_stays_external(tmp_path, capsys):
    src = tmp_path / "ext.onnx"
    onnx.save_model(
        MM.conv_bn_external_data(),
        str(src),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=1024,
    )
    out = tmp_path / "folded.onnx"
    code, _, err = _run(capsys, "fold", src, "-o", out)
    assert code == 0, err
    assert (tmp_path / "folded.onnx.data").exists()
    assert os.path.getsize(out) < 20_000


def test_subprocess_python_m_bnfold(tmp_path, model_path):
    out = tmp_path / "sub.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "bnfold", "fold", str(model_path), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stdout, "no colour codes when piped"
    assert out.exists() and "parity check: passed" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "bnfold", "fold", str(tmp_path / "none.onnx"), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_help_shows_examples(capsys):
    for command in ("fold", "inspect"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        assert f"bnfold {command} model.onnx" in capsys.readouterr().out


def test_inspect_lists_every_bn_and_writes_nothing(tmp_path, model_path, capsys):
    listing_before = sorted(os.listdir(tmp_path))
    code, stdout, err = _run(capsys, "inspect", model_path)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == listing_before
    lines = stdout.splitlines()
    for bn, verdict in (
        ("bn1", "conv_bn"),
        ("bn3", "conv_bn"),
        ("bn4_before_fc", "bn_gemm"),
        ("bn2_after_relu", "no_foldable_neighbour"),
    ):
        row = next(line for line in lines if line.split()[:1] == [bn])
        assert verdict in row
        assert ("yes" if verdict != "no_foldable_neighbour" else "no") in row.split()
    assert "Relu -> BN -> Relu" in stdout


def test_inspect_subgraph_and_json(tmp_path, capsys):
    src = tmp_path / "if.onnx"
    onnx.save_model(MM.if_branches_bn(), str(src))
    js = tmp_path / "bn.json"
    code, stdout, err = _run(capsys, "inspect", src, "--json", js)
    assert code == 0, err
    assert "then_bn" in stdout and "else_bn" in stdout and "then_branch" in stdout
    assert "then_bn" in js.read_text()


def test_inspect_bad_file_exit_2(tmp_path, capsys):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    code, _, err = _run(capsys, "inspect", bad)
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_fold_shows_the_parity_checks_nan_warning(tmp_path, capsys):
    # Log of a folded Conv+BN output: NaN wherever the output is negative, on both sides
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((3, 3, 1, 1)).astype(np.float32), "W")]
    inits += [
        numpy_helper.from_array(a.astype(np.float32), n)
        for a, n in [(np.ones(3), "g"), (np.zeros(3), "b"), (np.zeros(3), "m"), (np.ones(3), "v")]
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W"], ["c"]),
            helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["d"]),
            helper.make_node("Log", ["d"], ["y"]),
        ],
        "log_of_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
        inits,
    )
    path = tmp_path / "log.onnx"
    onnx.save_model(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 15)]), str(path))
    code, stdout, err = _run(capsys, "fold", path, "-o", tmp_path / "out.onnx")
    assert code == 0, err
    assert "warning: output 'y': both models output NaN" in stdout


def test_parity_runs_on_the_written_file_before_it_is_moved_into_place(tmp_path, capsys, monkeypatch):
    import bnfold.verify.parity

    seen = {}
    real_check = bnfold.verify.parity.check
    out = tmp_path / "o.onnx"

    def spy(reference, candidate, **kwargs):
        seen["candidate"] = candidate
        seen["out_existed"] = out.exists()
        seen["candidate_model"] = onnx.load(candidate)
        return real_check(reference, candidate, **kwargs)

    monkeypatch.setattr(bnfold.verify, "check", spy)
    src = tmp_path / "m.onnx"
    onnx.save_model(MM.conv2d_bn(), str(src))
    code, stdout, err = _run(capsys, "fold", src, "-o", out)
    assert code == 0, err
    assert os.path.dirname(seen["candidate"]) == str(tmp_path) and seen["candidate"] != str(out)
    assert not seen["out_existed"]
    assert onnx.load(str(out)) == seen["candidate_model"]  # what was checked is what was written
    assert not os.path.exists(seen["candidate"])


def test_special_file_outputs_are_refused(tmp_path, model_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, _, err = _run(capsys, "fold", model_path, "-o", fifo)
    assert code == 2 and "not a regular file" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "fold", model_path, "-o", tmp_path / "o.onnx", "--report", fifo)
    assert code == 2 and "not a regular file" in err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert not (tmp_path / "o.onnx").exists()


def test_symlinked_output_rewrites_the_target_and_keeps_the_link(tmp_path, model_path, capsys):
    target = tmp_path / "real.onnx"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    code, _, err = _run(capsys, "fold", model_path, "-o", link)
    assert code == 0, err
    assert link.is_symlink() and onnx.load(str(target)).graph.node
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640  # the replaced file's permissions are kept


def test_report_aliasing_the_model_is_refused(tmp_path, model_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    code, _, err = _run(capsys, "fold", model_path, "-o", tmp_path / "alias" / "o.onnx", "--report", real / "o.onnx")
    assert code == 2 and "same file" in err
    code, _, err = _run(capsys, "fold", model_path, "-o", real / "o.onnx", "--report", real / "o.onnx.data")
    assert code == 2 and "external data" in err
    assert os.listdir(real) == []


def test_sigterm_during_the_check_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    import signal

    import bnfold.verify.parity

    def terminated_during_check(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM should have unwound the command")

    monkeypatch.setattr(bnfold.verify, "check", terminated_during_check)
    src = tmp_path / "m.onnx"
    onnx.save_model(MM.conv2d_bn(), str(src))
    previous = signal.getsignal(signal.SIGTERM)
    code, _, err = _run(capsys, "fold", src, "-o", tmp_path / "o.onnx")
    assert code == 143 and "terminated" in err
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    assert signal.getsignal(signal.SIGTERM) == previous  # the command's handler is gone again


def test_fold_writes_a_correct_fold_of_a_deep_noisy_model(tmp_path, capsys):
    """A deep float32 chain whose own rounding exceeds the fixed tolerance (tests/noisy_models.py):
    the fold is correct, so ``bnfold fold`` must write it, with the tolerance's origin printed."""
    import bnfold
    from noisy_models import deep_offset_chain

    path, out = tmp_path / "deep.onnx", tmp_path / "folded.onnx"
    onnx.save_model(deep_offset_chain(), str(path))
    code, stdout, err = _run(capsys, "fold", path, "-o", out)
    assert code == 0, err
    assert out.exists() and count_bn(onnx.load(str(out))) == 0
    assert "parity check: passed" in stdout and "the reference's own float noise on 1 of 1 output(s)" in stdout
    # The fixed tolerance alone would have refused this correct fold.
    assert not bnfold.check(str(path), str(out), measure_noise=False).passed


def _float16_chain(n_layers=6):
    """n float16 Conv -> BN pairs in a row (names bn0, bn1, ...)."""
    rng = np.random.default_rng(7)
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, x = [], [], "x"
    for k in range(n_layers):
        w = numpy_helper.from_array((rng.standard_normal((4, 4, 3, 3)) / 6).astype(np.float16), f"w{k}")
        params = [
            numpy_helper.from_array(a.astype(np.float16), f"{p}{k}")
            for p, a in (
                ("g", rng.uniform(0.5, 1.5, 4)),
                ("b", rng.normal(0, 0.2, 4)),
                ("m", rng.normal(0, 0.2, 4)),
                ("v", rng.uniform(0.5, 1.5, 4)),
            )
        ]
        inits += [w, *params]
        nodes += [
            helper.make_node("Conv", [x, w.name], [f"c{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", [f"c{k}", *[p.name for p in params]], [f"y{k}"], name=f"bn{k}"),
        ]
        x = f"y{k}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4, 8, 8])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT16, [1, 4, 8, 8])],
        inits,
    )
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 15)])


@pytest.mark.parametrize("needed", [1, 3, 6])
def test_float16_folds_that_fail_verify_leave_the_fewest_early_bns(tmp_path, needed):
    """fold_file bisects for the smallest prefix of float16 folds to leave unfolded: here a
    verify that accepts a result only when bn0..bn{needed-1} are still BatchNormalization nodes."""
    from bnfold.folding.fold_pass import fold_file

    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_float16_chain(), str(src))
    seen = []

    def verify(tmp):
        kept = {n.name for n in onnx.load(tmp).graph.node if n.op_type == "BatchNormalization"}
        seen.append(len(kept))
        return {f"bn{k}" for k in range(needed)} <= kept

    report = fold_file(src, out, verify=verify)
    left = sorted(r.bn for r in report.remaining)
    assert left == [f"bn{k}" for k in range(needed)]
    assert {r.reason for r in report.remaining} == {"would_lose_precision"}
    assert report.n_folded == 6 - needed and all(f.weight_type == "float16" for f in report.folded)
    assert count_bn(onnx.load(str(out))) == needed
    assert len(seen) <= 2 + 3 + 1  # all, none, bisection of 6, the final write


@pytest.mark.parametrize("needed, written_bns", [(2, 2), (None, 0)])
def test_write_refused_still_searches_and_writes_what_verify_saw_last(tmp_path, needed, written_bns):
    """--force (write_refused) must not cut the precision search short: where leaving two BNs
    makes verify pass, that fold is written (not the refused full fold); where nothing passes,
    the full fold is written anyway."""
    from bnfold.folding.fold_pass import fold_file

    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_float16_chain(), str(src))

    def verify(tmp):
        kept = {n.name for n in onnx.load(tmp).graph.node if n.op_type == "BatchNormalization"}
        return needed is not None and {f"bn{k}" for k in range(needed)} <= kept

    report = fold_file(src, out, verify=verify, write_refused=True)
    assert count_bn(onnx.load(str(out))) == written_bns == 6 - report.n_folded
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".bnfold-")]


def test_write_refused_writes_a_refused_float32_fold_once(tmp_path):
    from bnfold.folding.fold_pass import fold_file

    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(MM.CASES["conv2d_bn"][0](), str(src))
    calls = []
    report = fold_file(src, out, verify=lambda tmp: calls.append(tmp) and False, write_refused=True)
    assert len(calls) == 1 and report.n_folded == 1 and count_bn(onnx.load(str(out))) == 0


def test_float16_fold_left_whole_when_unfolding_does_not_help(tmp_path):
    from bnfold.folding.fold_pass import fold_file

    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_float16_chain(), str(src))
    report = fold_file(src, out, verify=lambda tmp: False)
    assert report.n_folded == 6 and not report.remaining
    assert not out.exists()


def test_float32_folds_are_never_searched(tmp_path):
    from bnfold.folding.fold_pass import fold_file

    model = _float16_chain()
    from onnx import TensorProto, numpy_helper

    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for v in list(model.graph.input) + list(model.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    calls = []
    report = fold_file(src, out, verify=lambda tmp: calls.append(tmp) and False)
    assert len(calls) == 1 and report.n_folded == 6
