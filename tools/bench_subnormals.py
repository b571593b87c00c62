"""What subnormal weights cost in onnxruntime on this machine: the figures behind the fold pass's
flush (docs/fold.md, Numerics).

Each case runs one model twice, with its weights mostly subnormal and with those weights zero (the
values a flush leaves), in onnxruntime on one thread, the two sessions taking turns in blocks, and
prints the fastest and median times and their ratios: a 128-channel 3x3 Conv on 56x56 (all or 90 % of its
weights subnormal), the depthwise variant, the same in float16 (whose subnormals bnfold does not
flush), and a per-channel Mul by a subnormal constant, whose results are subnormal too.

    python tools/bench_subnormals.py
    python tools/bench_subnormals.py --runs 50
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import helper, numpy_helper

BLOCKS = 6


def single_node_model(op: str, constant: np.ndarray, x_shape, **attrs) -> bytes:
    elem = helper.np_dtype_to_tensor_dtype(constant.dtype)
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "k"], ["y"], **attrs)],
        "bench",
        [helper.make_tensor_value_info("x", elem, x_shape)],
        [helper.make_tensor_value_info("y", elem, None)],
        [numpy_helper.from_array(constant, "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime reads
    return model.SerializeToString()


def session(model: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def times_ms(models: dict, feed: dict, runs: int) -> dict:
    """(fastest, median) run time of each model; the sessions alternate in blocks so machine noise
    hits both alike. The fastest run is the one least disturbed by other work on a shared machine."""
    sessions = {label: session(model) for label, model in models.items()}
    times = {label: [] for label in sessions}
    per_block = max(1, runs // BLOCKS)
    for _ in range(BLOCKS):
        for label, s in sessions.items():
            s.run(None, feed)  # warm-up of this block
            for _ in range(per_block):
                start = time.perf_counter()
                s.run(None, feed)
                times[label].append(time.perf_counter() - start)
    return {label: (min(t) * 1000, statistics.median(t) * 1000) for label, t in times.items()}


def conv_case(rng, dtype, group: int, fraction: float):
    """Conv weights with ``fraction`` of them scaled into the subnormals of ``dtype``, and zeroed."""
    tiny = 1e-39 if dtype == np.float32 else 1e-6  # both below the type's smallest normal number
    weight = rng.standard_normal((128, 128 // group, 3, 3))
    chosen = rng.random(weight.shape) < fraction
    subnormal = np.where(chosen, weight * tiny, weight).astype(dtype)
    zeroed = np.where(chosen, 0.0, weight).astype(dtype)
    x = rng.standard_normal((1, 128, 56, 56)).astype(dtype)
    attrs = {"pads": [1, 1, 1, 1], "group": group}
    return (
        {
            "subnormal": single_node_model("Conv", subnormal, x.shape, **attrs),
            "zero": single_node_model("Conv", zeroed, x.shape, **attrs),
        },
        {"x": x},
    )


def mul_case(rng):
    x = rng.standard_normal((1, 64, 256, 256)).astype(np.float32)
    return (
        {
            "subnormal": single_node_model("Mul", np.full((64, 1, 1), 1e-39, np.float32), x.shape),
            "zero": single_node_model("Mul", np.zeros((64, 1, 1), np.float32), x.shape),
        },
        {"x": x},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed runs of each model")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cases = {
        "float32 Conv 3x3, all weights subnormal": conv_case(rng, np.float32, 1, 1.0),
        "float32 Conv 3x3, 90 % subnormal": conv_case(rng, np.float32, 1, 0.9),
        "float32 depthwise Conv, 90 % subnormal": conv_case(rng, np.float32, 128, 0.9),
        "float16 Conv 3x3, all weights subnormal": conv_case(rng, np.float16, 1, 1.0),
        "float16 depthwise Conv, 90 % subnormal": conv_case(rng, np.float16, 128, 0.9),
        "float32 Mul by a subnormal per-channel constant": mul_case(rng),
    }
    print(f"onnxruntime {ort.__version__}, one thread, {args.runs} runs each: fastest / median")
    for name, (models, feed) in cases.items():
        (sub_min, sub_median), (zero_min, zero_median) = times_ms(models, feed, args.runs).values()
        print(
            f"{name}: subnormal {sub_min:.2f} / {sub_median:.2f} ms, zero {zero_min:.2f} / {zero_median:.2f} ms, "
            f"ratio {sub_min / zero_min:.2f}x / {sub_median / zero_median:.2f}x"
        )


if __name__ == "__main__":
    main()
