"""Latency of ONNX models in onnxruntime, side by side: what does folding buy at inference time?

``benchmark({"original": a, "folded": b}, opt_levels=("all",))`` creates one onnxruntime session
per model and optimization level, warms each up, then times single runs on the same inputs
(synthesized as in ``bnfold.check``, or given). Runs of the different sessions are interleaved
round by round, so a slow phase of the machine (another process, frequency scaling) hits every
model alike instead of biasing the ratio.

Each measurement reports the median latency and its spread (10th and 90th percentiles); with
more than one model, every model's speed-up relative to the first one (median / median) is given
per optimization level.

The default optimization level is ``"all"``: that is how onnxruntime runs a model in production,
so the figures say what a deployed model gains. onnxruntime already fuses Conv+BN itself at
``"basic"`` and above, so the gain there comes from what it cannot fuse (e.g. a BN before a
fully connected layer) and a smaller model; ``"disabled"`` shows the full cost of the BN nodes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np

from bnfold._threads import available_cpus
from bnfold.common import first_line, format_table
from bnfold.errors import ArgumentTypeError, InputError
from bnfold.io import write_json_atomic
from bnfold.progress import Progress
from bnfold.verify.inputs import check_seed, prepare_input_sets
from bnfold.verify.models import LoadedModel, check_model_argument, compare_interfaces, session_specs
from bnfold.verify.session import OPT_LEVELS
from bnfold.verify.shapes import validated_shapes

DEFAULT_WARMUP = 5
DEFAULT_TIME_BUDGET = 1.0  # seconds of timed runs per (model, optimization level)
MIN_RUNS = 5
MAX_RUNS = 100_000
BLOCK_SECONDS = 0.1


@dataclasses.dataclass
class BenchResult:
    """Latency of one model at one optimization level, in milliseconds."""

    model: str
    opt_level: str
    runs: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class BenchReport:
    """All measurements; ``models`` in the order given (the first is the baseline of ratios)."""

    models: list
    opt_levels: list
    threads: int
    warmup: int
    inputs: dict
    results: list

    def result(self, model: str, opt_level: str) -> BenchResult:
        for r in self.results:
            if r.model == model and r.opt_level == opt_level:
                return r
        raise KeyError((model, opt_level))

    def speedup(self, model: str, opt_level: str) -> float:
        """Median latency of the first model divided by this model's (> 1: this one is faster)."""
        base = self.result(self.models[0], opt_level).median_ms
        return base / self.result(model, opt_level).median_ms

    def to_dict(self) -> dict:
        speedups = {level: {m: self.speedup(m, level) for m in self.models[1:]} for level in self.opt_levels}
        return {
            "models": list(self.models),
            "baseline": self.models[0],
            "opt_levels": list(self.opt_levels),
            "threads": self.threads,
            "warmup": self.warmup,
            "inputs": self.inputs,
            "results": [r.to_dict() for r in self.results],
            "speedup_vs_baseline": speedups if len(self.models) > 1 else {},
        }

    def to_json(self, path) -> None:
        write_json_atomic(self.to_dict(), path)

    def format_table(self) -> str:
        header = ["opt level"] + [f"{m} ms (p10-p90)" for m in self.models]
        header += [f"{m} speed-up" for m in self.models[1:]]
        rows = []
        for level in self.opt_levels:
            row = [level]
            for m in self.models:
                r = self.result(m, level)
                row.append(f"{r.median_ms:.3f} ({r.p10_ms:.3f}-{r.p90_ms:.3f})")
            row += [f"{self.speedup(m, level):.2f}x" for m in self.models[1:]]
            rows.append(row)
        lines = format_table(header, rows)
        inputs = ", ".join(f"{n} {'x'.join(map(str, i['shape']))} {i['dtype']}" for n, i in self.inputs.items())
        runs = sorted({r.runs for r in self.results})
        run_text = f"{runs[0]}" if len(runs) == 1 else f"{runs[0]}-{runs[-1]}"
        lines.append("")
        lines.append(
            f"onnxruntime CPU, {self.threads} intra-op thread(s), {self.warmup} warm-up + {run_text} timed runs "
            f"per cell; inputs: {inputs or 'none'}"
        )
        if len(self.models) > 1:
            lines.append(f"speed-up = median latency of {self.models[0]} / median latency of the model (>1: faster)")
        return "\n".join(lines)


def _parse_opt_levels(opt_levels):
    if isinstance(opt_levels, str):
        opt_levels = [opt_levels]
    levels = []
    for level in opt_levels:
        for part in str(level).split(","):
            part = part.strip()
            if part not in OPT_LEVELS:
                raise InputError(f"unknown optimization level {part!r}; choose from {', '.join(OPT_LEVELS)}")
            if part not in levels:
                levels.append(part)
    if not levels:
        raise InputError("no optimization level given")
    return levels


def max_bench_threads() -> int:
    """The most onnxruntime intra-op threads a benchmark may ask for: enough to measure
    oversubscription, far from what exhausts a machine."""
    return max(64, 4 * available_cpus())


def _check_count(name, value, minimum):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")


def benchmark(
    models: dict,
    *,
    opt_levels=("all",),
    threads=None,
    warmup=DEFAULT_WARMUP,
    repeat=None,
    time_budget=None,
    shapes=None,
    inputs=None,
    seed=0,
    progress=None,
) -> BenchReport:
    """Time each model (name -> path or ModelProto) at each optimization level.

    ``threads``: onnxruntime intra-op threads (None: all cores). ``repeat``: exact number of timed
    runs per (model, level); otherwise runs continue until ``time_budget`` seconds (default 1.0)
    were spent per (model, level), at least 5 runs. ``shapes`` / ``inputs`` / ``seed``: as in
    ``bnfold.check`` (checked as there; synthesized inputs, one set, must fit in
    ``bnfold.verify.inputs.input_memory_limit()``). ``progress``: None shows a bar when stderr is a
    terminal, True/False force. All models must take the same inputs.
    """
    if not isinstance(models, dict) or not models:
        raise ArgumentTypeError("models must be a non-empty dict of name -> path or onnx.ModelProto")
    for name, model in models.items():
        check_model_argument(model, f"models[{name!r}]")
    check_seed(seed)
    shapes = validated_shapes(shapes)
    levels = _parse_opt_levels(opt_levels)
    _check_count("threads", threads, 1)
    if threads is not None and threads > max_bench_threads():
        # onnxruntime starts them all at session creation, in C++, where no signal reaches the
        # process: 100000 of them exhausted the machine's threads for half an hour.
        raise InputError(
            f"threads must be at most {max_bench_threads()} (this process may use {available_cpus()} "
            f"CPU(s)), got {threads}"
        )
    _check_count("warmup", warmup, 0)
    _check_count("repeat", repeat, 1)
    if repeat is not None and time_budget is not None:
        raise InputError("give either repeat or time_budget, not both")
    if time_budget is not None and (
        isinstance(time_budget, bool) or not isinstance(time_budget, (int, float, np.number))
    ):
        raise ArgumentTypeError(f"time_budget must be a number of seconds, got {time_budget!r}")
    if time_budget is not None and not (math.isfinite(float(time_budget)) and float(time_budget) > 0):
        raise InputError(f"time_budget must be a finite number of seconds > 0, got {time_budget!r}")
    budget = float(time_budget) if time_budget is not None else DEFAULT_TIME_BUDGET
    n_threads = threads or os.cpu_count() or 1

    loaded = {name: LoadedModel(model, str(name)) for name, model in models.items()}
    try:
        sessions = {}
        specs = None
        first = None
        for name, model in loaded.items():
            for level in levels:
                session = model.session(level, threads=n_threads)
                sessions[(name, level)] = session
                model_specs = session_specs(session, model.label)
                if specs is None:
                    specs, first = model_specs, model
                else:
                    compare_interfaces((specs[0], []), (model_specs[0], []), first.label, model.label)
        input_specs = specs[0]
        [feeds] = prepare_input_sets(input_specs, first.proto, inputs=inputs, shapes=shapes, seed=seed)

        keys = list(sessions)
        run_estimate = {}
        for key in keys:
            start = time.perf_counter()
            for _ in range(max(warmup, 1)):
                _run(sessions[key], feeds, key)
            run_estimate[key] = (time.perf_counter() - start) / max(warmup, 1)
        # Rounds of consecutive runs per session (about BLOCK_SECONDS each), each block preceded by
        # one untimed run: alternating sessions run by run would time each session against the
        # previous one's still-spinning intra-op threads.
        block = {key: int(min(max(BLOCK_SECONDS / max(run_estimate[key], 1e-9), 1), 1000)) for key in keys}
        times = {key: [] for key in keys}
        total = repeat * len(keys) if repeat is not None else budget * len(keys)
        spent = dict.fromkeys(keys, 0.0)
        with Progress(total, "benchmarking", enabled=progress) as bar:
            while True:
                active = [k for k in keys if not _done(times[k], spent[k], repeat, budget)]
                if not active:
                    break
                for key in active:
                    session = sessions[key]
                    _run(session, feeds, key)
                    n = block[key] if repeat is None else min(block[key], repeat - len(times[key]))
                    for _ in range(n):
                        start = time.perf_counter()
                        _run(session, feeds, key)
                        elapsed = time.perf_counter() - start
                        times[key].append(elapsed)
                        spent[key] += elapsed
                        bar.update(1 if repeat is not None else elapsed)
        results = [_summarize(name, level, times[(name, level)]) for name, level in keys]
        input_info = {n: {"dtype": str(a.dtype), "shape": list(a.shape)} for n, a in feeds.items()}
        return BenchReport(
            models=list(loaded),
            opt_levels=levels,
            threads=n_threads,
            warmup=warmup,
            inputs=input_info,
            results=results,
        )
    finally:
        for model in loaded.values():
            model.close()


def _done(times, spent, repeat, budget) -> bool:
    if repeat is not None:
        return len(times) >= repeat
    return len(times) >= MAX_RUNS or (len(times) >= MIN_RUNS and spent >= budget)


def _run(session, feeds, key):
    try:
        session.run(None, feeds)
    except Exception as e:  # noqa: BLE001 - any onnxruntime run failure becomes one InputError line
        hint = "; set dynamic dimensions with --shape NAME:D1xD2x..." if feeds else ""
        raise InputError(
            f"{key[0]} (opt level {key[1]}): onnxruntime failed to run the model ({first_line(e)}){hint}"
        ) from None


def _summarize(model, level, times) -> BenchResult:
    ms = np.asarray(times) * 1000.0
    return BenchResult(
        model=model,
        opt_level=level,
        runs=len(ms),
        median_ms=float(np.median(ms)),
        p10_ms=float(np.percentile(ms, 10)),
        p90_ms=float(np.percentile(ms, 90)),
        mean_ms=float(ms.mean()),
        min_ms=float(ms.min()),
    )
