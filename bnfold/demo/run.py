"""The ``bnfold demo`` pipeline: build a CNN, fold it, prove parity, measure, summarize.

``run_demo()`` needs no arguments and no downloads. It builds ``bnfold.demo.zoo.build_demo_cnn`` (BN
statistics computed from data), folds it with ``bnfold.fold``, checks the folded model against
the original with ``bnfold.check`` (outputs and every intermediate value), times both with
``bnfold.verify.bench.benchmark`` (onnxruntime optimizations disabled and all), writes ``original.onnx``,
``folded.onnx`` and ``report.json`` and returns a ``DemoResult`` whose ``summary`` is what the
command prints. A folded model that fails the parity check is not written.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

from bnfold.errors import InputError
from bnfold.io import save_model_atomic, write_json_atomic

BENCH_LEVELS = ("disabled", "all")


@dataclasses.dataclass
class DemoResult:
    out_dir: str
    files: dict  # label -> path of what was written
    fold_report: object
    check_report: object
    bench_report: object
    n_bn: int
    seconds: float
    summary: str

    @property
    def passed(self) -> bool:
        return self.check_report.passed


def run_demo(out_dir=None, *, image_size=64, width=16, quick=False, batch=1, threads=1, progress=None) -> DemoResult:
    """Run the whole pipeline; ``out_dir`` None -> a new temporary directory (kept, its path is
    in the summary). ``quick``: fewer parity samples and benchmark runs (for tests / CI).
    ``threads``: onnxruntime intra-op threads for the latency comparison; 1 by default because a
    sub-millisecond model's multi-threaded latency is mostly thread wake-up noise."""
    from bnfold.demo.zoo import build_demo_cnn
    from bnfold.folding import fold
    from bnfold.verify import benchmark, check

    start = time.perf_counter()
    original = build_demo_cnn(image_size=image_size, width=width)
    n_bn = sum(1 for n in original.graph.node if n.op_type == "BatchNormalization")
    folded, fold_report = fold(original)
    shapes = {"input": (batch, 3, image_size, image_size)}
    check_report = check(original, folded, shapes=shapes, samples=1 if quick else 3, intermediates=True)
    bench_options = dict(warmup=1, repeat=5) if quick else dict(warmup=5, time_budget=1.0)
    bench_report = benchmark(
        {"original": original, "folded": folded},
        opt_levels=BENCH_LEVELS,
        shapes=shapes,
        threads=threads,
        progress=progress,
        **bench_options,
    )
    out_dir = _prepare_out_dir(out_dir)  # only now: a run that fails leaves no empty folder
    files = {"original": os.path.join(out_dir, "original.onnx")}
    save_model_atomic(original, files["original"])
    if check_report.passed:
        files["folded"] = os.path.join(out_dir, "folded.onnx")
        save_model_atomic(folded, files["folded"])
    files["report"] = os.path.join(out_dir, "report.json")
    seconds = time.perf_counter() - start
    write_json_atomic(
        {
            "model": {"name": "bnfold demo CNN", "image_size": image_size, "width": width, "batch_norm_nodes": n_bn},
            "fold": fold_report.to_dict(),
            "check": check_report.to_dict(),
            "bench": bench_report.to_dict(),
            "files": files,
            "seconds": seconds,
        },
        files["report"],
    )
    result = DemoResult(out_dir, files, fold_report, check_report, bench_report, n_bn, seconds, "")
    result.summary = format_summary(result, image_size=image_size, batch=batch)
    return result


def _prepare_out_dir(out_dir) -> str:
    if out_dir is None:
        return tempfile.mkdtemp(prefix="bnfold-demo-")
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"output directory {out_dir} (-o): exists and is not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise InputError(f"output directory {out_dir} (-o): cannot create it ({e.strerror or e})") from None
    return out_dir


def format_summary(result: DemoResult, *, image_size: int, batch: int) -> str:
    fold_report, check_report, bench_report = result.fold_report, result.check_report, result.bench_report
    lines = [
        (
            f"bnfold demo: a CNN with {result.n_bn} BatchNormalization layers (residual, depthwise and "
            f"fully connected blocks; statistics computed from data), input {batch}x3x{image_size}x{image_size}"
        ),
        "",
        f"folded   {fold_report.n_folded} of {result.n_bn} BNs into their neighbours",
    ]
    by_rule: dict = {}
    for entry in fold_report.folded:
        by_rule.setdefault(entry.rule, []).append(f"{entry.bn} -> {entry.target}")
    for rule, entries in by_rule.items():
        shown = ", ".join(entries[:3]) + (f", ... ({len(entries) - 3} more)" if len(entries) > 3 else "")
        lines.append(f"           {rule:<10} {len(entries):>2}  {shown}")
    lines.append(f"left     {fold_report.n_remaining} BN{'s' if fold_report.n_remaining != 1 else ''}")
    for entry in fold_report.remaining:
        lines.append(f"           {entry.bn}: {entry.reason} - {entry.message}")
    verdict = "PASS" if check_report.passed else "FAIL"
    lines.append(
        f"parity   {verdict}: max abs error {check_report.max_abs_error:.2g}, max rel error "
        f"{check_report.max_rel_error:.2g} on {check_report.samples} random input(s) "
        f"(onnxruntime, both at opt level {check_report.opt_level}; {check_report.tolerance_brief})"
    )
    lines.append(f"           {check_report.intermediates_brief}")
    lines += [f"           warning: {w}" for w in check_report.warnings]
    if not check_report.passed:
        lines.append(f"           {check_report.summary()}")
    lines.append(f"latency  median of onnxruntime runs, {bench_report.threads} thread(s):")
    lines.append(f"           {'opt level':<10} {'original':>10} {'folded':>10} {'speed-up':>9}")
    for level in bench_report.opt_levels:
        a = bench_report.result("original", level).median_ms
        b = bench_report.result("folded", level).median_ms
        lines.append(f"           {level:<10} {a:>7.3f} ms {b:>7.3f} ms {a / b:>8.2f}x")
    lines.append("           ('all' includes onnxruntime's own Conv+BN fusion; 'disabled' is closer to a runtime")
    lines.append("           without it. Either way the folded model is the one with fewer ops to ship.)")
    lines.append("files    " + result.out_dir)
    for _label, path in result.files.items():
        size = os.path.getsize(path)
        lines.append(f"           {os.path.basename(path):<14} {_human_size(size)}")
    if "folded" not in result.files:
        lines.append("           (folded.onnx not written: it failed the parity check)")
    lines.append(f"done in {result.seconds:.1f} s. Next: bnfold inspect {result.files['original']}")
    return "\n".join(lines)


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
