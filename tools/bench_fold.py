"""Time bnfold's load + fold + save against onnxruntime's own offline optimizer on a ResNet-50-sized
model (53 Conv + BN, ~25M random parameters), both in this process, and print the ratio.

bnfold is timed as ``bnfold fold --no-check`` runs it: ``bnfold.fold_file(IN, OUT)`` (the weights
stay in the memory-mapped input; new ones go straight to the output). The Python API route that
hands out a complete ModelProto, ``bnfold.fold(path)`` + ``bnfold.io.save_model_atomic``, is timed
too, for reference.

onnxruntime's baseline: an InferenceSession created with ``graph_optimization_level=ORT_ENABLE_BASIC``
and ``optimized_model_filepath`` set, i.e. load + basic graph rewrites (including its Conv+BN
fusion) + writing the optimized model; the time is the session creation.

Each tool runs in blocks of consecutive runs (``--block``, default 3), the blocks of the three
alternating, so machine-wide noise hits all of them alike while no tool times its run right after
another tool's ~300 MB of memory and page-cache churn (on this VM freed memory is handed back to
the host and the next first touch is slow, which made interleaved single runs bimodal).

    python tools/bench_fold.py                 # 9 runs of each, median
    python tools/bench_fold.py --repeats 3 --profile   # also cProfile one bnfold run
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import os
import pathlib
import pstats
import statistics
import sys
import tempfile
import time

import onnx
import onnxruntime as ort


def build_model():
    from bnfold.demo.zoo import build_resnet

    return build_resnet(depth=50, image_size=224, num_classes=1000, seed=0)


def op_counts(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def n_params(model) -> int:
    total = 0
    for t in model.graph.initializer:
        size = 1
        for d in t.dims:
            size *= d
        total += size
    return total


def run_bnfold(src, dst):
    """bnfold.fold_file: load (input checker included), fold, atomic save."""
    from bnfold.folding.fold_pass import fold_file

    return fold_file(src, dst)


def run_bnfold_api(src, dst):
    """bnfold.fold(path) -> complete ModelProto, then bnfold.io.save_model_atomic."""
    from bnfold.folding.fold_pass import fold
    from bnfold.io import save_model_atomic

    folded, report = fold(src)
    save_model_atomic(folded, dst, source_path=src)
    return report


def run_ort(src, dst):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = dst
    ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=9, help="timed runs of each tool")
    parser.add_argument("--block", type=int, default=3, help="consecutive runs of one tool per block")
    parser.add_argument("--profile", action="store_true", help="cProfile one bnfold run, print the top entries")
    args = parser.parse_args(argv)
    ort.set_default_logger_severity(3)

    with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as tmp:
        src = os.path.join(tmp, "resnet50.onnx")
        model = build_model()
        onnx.save_model(model, src)
        counts = op_counts(model)
        print(
            f"model: ResNet-50, {counts['Conv']} Conv, {counts['BatchNormalization']} BN, "
            f"{n_params(model) / 1e6:.1f}M parameters, {os.path.getsize(src) / 2**20:.1f} MiB"
        )
        del model

        bn_times, api_times, ort_times = [], [], []
        report = None
        # warm-up of all (imports, page cache), then alternating blocks of consecutive runs
        tools = [
            (run_bnfold, "bnfold.onnx", bn_times),
            (run_bnfold_api, "bnfold-api.onnx", api_times),
            (run_ort, "ort.onnx", ort_times),
        ]
        for fn, out, _ in tools:
            fn(src, os.path.join(tmp, out))
        while len(bn_times) < args.repeats:
            n = min(args.block, args.repeats - len(bn_times))
            for fn, out, times in tools:
                for _ in range(n):
                    t, result = timed(fn, src, os.path.join(tmp, out))
                    times.append(t)
                    if fn is run_bnfold:
                        report = result

        ours = onnx.load(os.path.join(tmp, "bnfold.onnx"))
        theirs = onnx.load(os.path.join(tmp, "ort.onnx"))
        print(
            f"bnfold fold_file      : median {statistics.median(bn_times) * 1000:8.1f} ms "
            f"(runs: {', '.join(f'{t * 1000:.0f}' for t in bn_times)}); "
            f"{report.n_folded} folded, {op_counts(ours)['BatchNormalization']} BN left"
        )
        same = pathlib.Path(tmp, "bnfold.onnx").read_bytes() == pathlib.Path(tmp, "bnfold-api.onnx").read_bytes()
        print(
            f"bnfold fold+save (API): median {statistics.median(api_times) * 1000:8.1f} ms "
            f"(runs: {', '.join(f'{t * 1000:.0f}' for t in api_times)}); "
            f"output {'byte-identical to' if same else 'DIFFERENT from'} fold_file's"
        )
        print(
            f"onnxruntime BASIC opt : median {statistics.median(ort_times) * 1000:8.1f} ms "
            f"(runs: {', '.join(f'{t * 1000:.0f}' for t in ort_times)}); "
            f"{op_counts(theirs)['BatchNormalization']} BN left"
        )
        ratio = statistics.median(ort_times) / statistics.median(bn_times)
        print(
            f"ratio (onnxruntime time / bnfold time): {ratio:.2f}x "
            f"({'bnfold faster' if ratio >= 1 else 'bnfold SLOWER'})"
        )

        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            run_bnfold(src, os.path.join(tmp, "bnfold.onnx"))
            profiler.disable()
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
