"""The options the subcommands share (bnfold.cli.options): one name each (--json, -o), the old
names still accepted and hidden from --help, the exit codes in every help, and the parity check of
`calibrate --fold` on the very file that is moved into place (bnfold.cli.checked_fold)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import pytest

from bnfold.cli.app import build_parser, main
from fold_testing import MM
from test_cli_calibrate import conv_bn_model

COMMANDS = ("fold", "inspect", "check", "bench", "calibrate", "demo")
REPORTING_COMMANDS = ("fold", "inspect", "check", "bench", "calibrate")


def help_text(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", REPORTING_COMMANDS)
def test_every_report_is_written_with_json_and_the_old_name_is_hidden(capsys, command):
    text = help_text(capsys, command)
    assert "--json PATH" in text
    assert "--report" not in text.replace("report.json", "")


@pytest.mark.parametrize("command", ("fold", "calibrate", "demo"))
def test_outputs_are_dash_o_and_dash_dash_output(capsys, command):
    text = help_text(capsys, command)
    assert "-o " in text and "--output " in text
    assert "--out " not in text and "--out\n" not in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_documents_the_exit_codes(capsys, command):
    text = " ".join(help_text(capsys, command).split())
    assert "exit status: 0 " in text
    assert "2 bad input" in text and "3 internal error" in text and "130 / 143 interrupted" in text


def test_main_help_documents_the_exit_codes(capsys):
    text = " ".join(help_text(capsys).split())
    for words in ("0 ok", "1 a parity check failed", "2 bad input or usage", "3 internal error", "130 / 143"):
        assert words in text


@pytest.mark.parametrize("command", ("fold", "calibrate"))
def test_report_is_an_alias_of_json(command):
    argv = [command, "in.onnx", "-o", "out.onnx"] + (["--data", "d.npz"] if command == "calibrate" else [])
    parser = build_parser()
    old, new, none = (parser.parse_args(argv + extra) for extra in (["--report", "r.json"], ["--json", "r.json"], []))
    assert old.json == new.json == "r.json" and none.json is None
    assert (old.json_option, new.json_option, none.json_option) == ("--report", "--json", "--json")


@pytest.mark.parametrize("option", ["-o", "--output", "--out"])
def test_demo_output_directory_spellings(option):
    assert build_parser().parse_args(["demo", option, "d"]).output == "d"


@pytest.mark.parametrize(
    "argv", [["-v", "fold", "a", "-o", "b"], ["fold", "a", "-o", "b", "-v"], ["-v", "check", "a", "b", "--verbose"]]
)
def test_verbose_before_or_after_the_command(argv):
    assert build_parser().parse_args(argv).verbose is True


def test_verbose_is_off_by_default():
    assert build_parser().parse_args(["fold", "a", "-o", "b"]).verbose is False


@pytest.mark.parametrize("option", ["--report", "--json"])
def test_a_refusal_names_the_option_as_typed(tmp_path, capsys, option):
    source = tmp_path / "m.onnx"
    onnx.save_model(MM.conv2d_bn(), str(source))
    assert main(["fold", str(source), "-o", str(tmp_path / "o.onnx"), option, str(source)]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite the input model" in err and f"({option})" in err


def test_demo_dash_o_writes_into_the_directory(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--image-size", "8", "--width", "2", "--quick"]) == 0
    assert {"original.onnx", "folded.onnx", "report.json"} <= set(os.listdir(out))


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def calibration_files(tmp_path):
    model_path = tmp_path / "model.onnx"
    onnx.save(conv_bn_model(), model_path)
    np.savez(tmp_path / "calib.npz", input=np.random.default_rng(1).normal(3, 2, (10, 3, 6, 6)).astype(np.float32))
    return model_path, tmp_path / "calib.npz", tmp_path


def test_calibrate_fold_checks_the_file_that_is_moved_into_place(calibration_files, capsys, monkeypatch):
    import bnfold.verify

    model_path, data_path, tmp = calibration_files
    out = tmp / "folded.onnx"
    real_check = bnfold.verify.check
    seen = []

    def spy(reference, candidate, **kwargs):
        seen.append(
            {
                "candidate": os.fspath(candidate),
                "digest": _digest(candidate),
                "out_existed": out.exists(),
                "kwargs": kwargs,
            }
        )
        return real_check(reference, candidate, **kwargs)

    monkeypatch.setattr(bnfold.verify, "check", spy)
    assert main(["calibrate", str(model_path), "-o", str(out), "--data", str(data_path), "--fold"]) == 0
    assert len(seen) == 1
    checked = seen[0]
    # a complete file beside OUT, then renamed to OUT: the bytes checked are the bytes written
    assert os.path.dirname(checked["candidate"]) == str(tmp) and checked["candidate"] != str(out)
    assert not checked["out_existed"] and not os.path.exists(checked["candidate"])
    assert _digest(out) == checked["digest"]
    assert checked["kwargs"]["intermediates"] is True and checked["kwargs"]["candidate_label"] == str(out)


class _FailedCheck:
    passed = False
    max_abs_error = 0.5
    warnings = ()
    tolerance_brief = "rtol 1e-4"
    intermediates_brief = "no intermediates"

    def summary(self):
        return "FAIL: output 'y' (1.00% of elements differ, max abs error 0.5)"

    def to_dict(self):
        return {"passed": False}


@pytest.mark.parametrize("command", ["fold", "calibrate"])
def test_a_parity_failure_that_blocks_the_write_is_one_line_exit_1(calibration_files, capsys, monkeypatch, command):
    import bnfold.verify

    model_path, data_path, tmp = calibration_files
    monkeypatch.setattr(bnfold.verify, "check", lambda *a, **k: _FailedCheck())
    out = tmp / "out.onnx"
    argv = [command, str(model_path), "-o", str(out), "-v"]
    argv += ["--data", str(data_path), "--fold"] if command == "calibrate" else []
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"bnfold {command}: parity check") and "FAILED; nothing written" in err
    assert "Traceback" not in err and "error:" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_parity_error_is_what_blocks_the_write(calibration_files, monkeypatch):
    import bnfold.verify
    from bnfold import ParityError
    from bnfold.cli import fold as fold_command

    model_path, _, tmp = calibration_files
    monkeypatch.setattr(bnfold.verify, "check", lambda *a, **k: _FailedCheck())
    args = build_parser().parse_args(["fold", str(model_path), "-o", str(tmp / "out.onnx")])
    with pytest.raises(ParityError, match="nothing written"):
        fold_command.run(args)


def test_an_abbreviation_of_one_option_spelled_two_ways_is_that_option(tmp_path):
    """``demo --ou`` matches ``--out`` (the old name) and ``--output``: one option, so no ambiguity;
    an abbreviation of two different options stays an error."""
    from bnfold.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--ou", str(out), "--quick", "--image-size", "8", "--width", "2"]) == 0
    assert (out / "folded.onnx").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "a.onnx", "b.onnx", "--s", "1"])
    assert exit_info.value.code == 2
