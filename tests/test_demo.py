"""`bnfold demo` end to end at a small size: summary content and written files."""

from __future__ import annotations

import json
import shutil

import onnx

import bnfold
from bnfold.cli.app import main
from bnfold.demo.run import run_demo


def test_demo_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo_out"
    assert main(["demo", "--out", str(out), "--image-size", "16", "--width", "4", "--quick"]) == 0
    summary = capsys.readouterr().out
    assert "10 BatchNormalization layers" in summary
    assert "folded   9 of 10 BNs" in summary and "bn_gemm" in summary and "conv_bn" in summary
    assert "preact.bn: padded_conv" in summary
    assert "parity   PASS" in summary
    assert "disabled" in summary and "speed-up" in summary and "ms" in summary
    assert str(out) in summary and "folded.onnx" in summary and "report.json" in summary
    assert "\x1b" not in summary  # piped: no colour codes
    original = onnx.load(str(out / "original.onnx"))
    folded = onnx.load(str(out / "folded.onnx"))
    onnx.checker.check_model(folded, full_check=True)
    assert sum(n.op_type == "BatchNormalization" for n in original.graph.node) == 10
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == 1
    assert bnfold.check(original, folded).passed  # the written files are the checked pair
    report = json.loads((out / "report.json").read_text())
    assert report["check"]["passed"] is True
    # 9 folded layers and what follows them: compared value by value, not only at the logits.
    assert report["check"]["intermediates"]["compared"] >= 9 and report["check"]["intermediates"]["passed"]
    assert "intermediate values match" in summary
    assert len(report["fold"]["folded"]) == 9 and report["fold"]["remaining"][0]["reason"] == "padded_conv"
    assert {r["opt_level"] for r in report["bench"]["results"]} == {"disabled", "all"}
    assert report["files"]["folded"].endswith("folded.onnx")


def test_run_demo_default_directory_and_bad_out(tmp_path, capsys):
    result = run_demo(image_size=8, width=2, quick=True, progress=False)
    assert result.passed and result.out_dir.startswith("/") and "bnfold-demo-" in result.out_dir
    assert set(result.files) == {"original", "folded", "report"}
    shutil.rmtree(result.out_dir)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["demo", "--out", str(blocker), "--quick", "--image-size", "8"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["demo", "--image-size", "2"]) == 2
