"""Proof and measurement: onnxruntime sessions, parity of two models (outputs and intermediate
values) and latency benchmarks."""

# What other stages use (they import from the package, never from its modules).
from bnfold.verify.bench import (
    DEFAULT_TIME_BUDGET,
    DEFAULT_WARMUP,
    benchmark,
    max_bench_threads,
)
from bnfold.verify.inputs import MAX_SAMPLES
from bnfold.verify.noise import NOISE_FACTOR
from bnfold.verify.parity import DEFAULT_OPT_LEVEL, CheckReport, check
from bnfold.verify.session import OPT_LEVELS, create_session
from bnfold.verify.shapes import parse_shape_specs
from bnfold.verify.tolerances import parse_tolerance_specs

__all__ = [
    "create_session",
    "CheckReport",
    "DEFAULT_OPT_LEVEL",
    "DEFAULT_TIME_BUDGET",
    "DEFAULT_WARMUP",
    "MAX_SAMPLES",
    "NOISE_FACTOR",
    "OPT_LEVELS",
    "benchmark",
    "check",
    "max_bench_threads",
    "parse_shape_specs",
    "parse_tolerance_specs",
]
