"""Measure calibration throughput (samples/second) on a ResNet-style model at 224x224 and where the
time goes: the onnxruntime forward pass vs bnfold's statistics (Moments.from_array + merge), each
timed with time.perf_counter inside bnfold.calibrate. Target: statistics under 10% of the total.

Baseline in the same process: plain onnxruntime inference of the original model on the same
batches (what a forward pass costs without calibration), printed as a throughput ratio.

    python tools/bench_calibrate.py                          # ResNet-50, batch mode, 4 batches of 16
    python tools/bench_calibrate.py --depth 18 --mode sequential --batches 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort


def plain_inference_seconds(model, batches) -> float:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, batches[0])  # warm-up, like calibration's first batch is not excluded either
    start = time.perf_counter()
    for feeds in batches:
        session.run(None, feeds)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=50, help="ResNet depth (bnfold.demo.zoo.build_resnet), default 50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4, help="batches per pass")
    parser.add_argument("--mode", choices=("batch", "sequential"), default="batch")
    args = parser.parse_args(argv)

    from bnfold import calibrate
    from bnfold._openmp import max_threads
    from bnfold.demo.zoo import build_resnet

    model = build_resnet(depth=args.depth, image_size=args.image_size, seed=0)
    n_bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    rng = np.random.default_rng(0)
    n = args.batch_size * args.batches
    images = rng.standard_normal((n, 3, args.image_size, args.image_size), dtype=np.float32)
    print(
        f"ResNet-{args.depth} at {args.image_size}x{args.image_size}: {n_bn} BatchNormalization, "
        f"{args.batches} batches of {args.batch_size}, mode={args.mode}, OpenMP threads={max_threads()}"
    )

    _, report = calibrate(model, {"input": images}, mode=args.mode, batch_size=args.batch_size)
    total = report.seconds_total
    forward, stats = report.seconds_forward, report.seconds_statistics
    setup = total - forward - stats
    samples_processed = report.n_samples * report.passes
    print(f"calibration: {report.n_calibrated} BN calibrated in {report.passes} pass(es), {total:.2f} s total")
    print(f"  onnxruntime forward : {forward:8.3f} s  ({100 * forward / total:5.1f}%)")
    print(
        f"  statistics (Moments): {stats:8.3f} s  ({100 * stats / total:5.1f}%)   share of forward+statistics: "
        f"{100 * stats / (forward + stats):.1f}%"
    )
    print(f"  graph rewrite, sessions, data: {setup:8.3f} s  ({100 * setup / total:5.1f}%)")
    print(
        f"  throughput: {report.n_samples / total:.2f} calibration samples/s "
        f"({samples_processed / (forward + stats):.2f} forward+statistics samples/s over all passes)"
    )

    batches = [{"input": images[i : i + args.batch_size]} for i in range(0, n, args.batch_size)]
    plain = plain_inference_seconds(model, batches)
    print(f"baseline: plain onnxruntime inference {n / plain:.2f} samples/s")
    print(
        f"ratio: calibration forward+statistics per pass / plain inference time = "
        f"{(forward + stats) / report.passes / plain:.2f}x"
    )
    verdict = "meets" if stats / total < 0.10 else "MISSES"
    print(f"statistics share {100 * stats / total:.1f}% of the total {verdict} the <10% target")


if __name__ == "__main__":
    main()
