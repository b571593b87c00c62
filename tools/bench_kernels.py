"""Benchmark bnfold's batch-norm kernels against PyTorch's CPU batch norm, in one process.

For every shape (float32) it prints, as torch time / bnfold time (> 1 means bnfold is faster):
  stats     torch.var_mean over the non-channel dims  vs  bnfold.batch_stats
  fwd-train F.batch_norm(training=True)               vs  bnfold.batch_norm_train
  backward  autograd backward of F.batch_norm         vs  bnfold.batch_norm_backward
            (only the backward is timed; each library's training forward runs untimed right
            before its own backward, as in a training step)
  infer     F.batch_norm(training=False)              vs  bnfold.batch_norm_infer
and "stats/floor" = bnfold.batch_stats time / numpy x.sum() time (the one-read floor; target <= 2).
Channels-last shapes are given to torch as channels_last tensors (a permuted view of the NHWC
array), so both libraries read the same memory. The absolute medians follow the ratios:
torch's time swings with whether its allocator hands it fresh pages (a page fault per 4 KiB of
output on first write), which bnfold's output cache avoids.

Usage:  python tools/bench_kernels.py [--quick] [--threads 2] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - the bench extra installs torch
    raise SystemExit("tools/bench_kernels.py needs torch: pip install -e '.[bench]'") from None

import bnfold

# (label, shape, channel axis)
SHAPES = [
    ("32x64x56x56 NCHW", (32, 64, 56, 56), 1),
    ("256x2048x7x7 NCHW", (256, 2048, 7, 7), 1),
    ("8x3x224x224 NCHW", (8, 3, 224, 224), 1),
    ("4096x1024", (4096, 1024), 1),
    ("32x56x56x64 NHWC", (32, 56, 56, 64), -1),
    ("32x224x224x3 NHWC", (32, 224, 224, 3), -1),
]


def median_times(fns, repeats: int, setups=None) -> list[float]:
    """Median wall time of each fn over ``repeats`` runs after one warm-up. The functions are
    run interleaved (a, b, a, b, ...) so that load from other processes hits both alike;
    setups[i]() (if given) runs untimed before each call of fns[i]."""
    times = [[] for _ in fns]
    for i in range(repeats + 1):
        for k, fn in enumerate(fns):
            if setups is not None and setups[k] is not None:
                setups[k]()
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
            if i:
                times[k].append(t)
    return [statistics.median(ts) for ts in times]


def load_average() -> str:
    """The 1-minute load average (timings of a 2-thread run are only meaningful when it is low)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "unknown"


def torch_view(a: np.ndarray, axis: int):
    """Torch tensor with channels at dim 1 sharing a's memory (channels_last for NHWC)."""
    t = torch.from_numpy(a)
    return t if axis == 1 else t.movedim(-1, 1)


def bench_shape(label, shape, axis, repeats, n_threads):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    C = shape[axis]
    w = rng.uniform(0.5, 2.0, C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    tx, tdy = torch_view(x, axis), torch_view(dy, axis)
    tw, tb = torch.from_numpy(w), torch.from_numpy(b)
    trm, trv = torch.zeros(C), torch.ones(C)
    dims = [d for d in range(x.ndim) if d != 1]
    t = {}

    t["floor"], t["stats_torch"], t["stats_bnfold"] = median_times(
        [
            lambda: x.sum(),
            lambda: torch.var_mean(tx, dim=dims, correction=0),
            lambda: bnfold.batch_stats(x, axis, n_threads=n_threads),
        ],
        repeats,
    )

    def torch_fwd():
        with torch.no_grad():
            F.batch_norm(tx, trm, trv, tw, tb, training=True, momentum=0.1)

    t["fwd_torch"], t["fwd_bnfold"] = median_times(
        [torch_fwd, lambda: bnfold.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5, axis, n_threads=n_threads)], repeats
    )

    # backward: before each timed backward its own library's forward runs untimed (torch: the
    # autograd graph is rebuilt; bnfold: batch_norm_train gives save_mean / save_invstd)
    txg = tx.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    twg, tbg = tw.clone().requires_grad_(True), tb.clone().requires_grad_(True)
    graph = {}

    def build():
        txg.grad = twg.grad = tbg.grad = None
        graph["y"] = F.batch_norm(txg, None, None, twg, tbg, training=True)

    saved = {}

    def forward():
        _, saved["mean"], saved["invstd"] = bnfold.batch_norm_train(x, w, b, None, None, axis=axis, n_threads=n_threads)

    t["bwd_torch"], t["bwd_bnfold"] = median_times(
        [
            lambda: graph["y"].backward(tdy),
            lambda: bnfold.batch_norm_backward(dy, x, w, saved["mean"], saved["invstd"], axis, n_threads=n_threads),
        ],
        repeats,
        setups=[build, forward],
    )
    graph.clear()

    def torch_infer():
        with torch.no_grad():
            F.batch_norm(tx, trm, trv, tw, tb, training=False)

    t["inf_torch"], t["inf_bnfold"] = median_times(
        [torch_infer, lambda: bnfold.batch_norm_infer(x, w, b, rm, rv, 1e-5, axis, n_threads=n_threads)], repeats
    )
    return t


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a rough look)")
    parser.add_argument("--threads", type=int, default=2, help="threads for both libraries")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement")
    parser.add_argument("--only", default=None, help="run only shapes whose label contains this")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 15)
    torch.set_num_threads(args.threads)
    from bnfold.kernels import KERNEL_MODULE

    print(
        f"bnfold {bnfold.__version__} ({KERNEL_MODULE}, OpenMP: {bnfold.openmp_enabled()}), torch "
        f"{torch.__version__}, {args.threads} threads, float32, median of {repeats}"
    )
    print(
        "ratios are torch time / bnfold time (higher is better for bnfold); stats/floor = bnfold stats / numpy x.sum()"
    )
    print(f"load average before: {load_average()}")
    header = (
        f"{'shape':<20}{'x.sum ms':>9}{'stats':>8}{'fwd-train':>10}{'backward':>10}"
        f"{'infer':>8}{'stats/floor':>12}   bnfold ms: stats/fwd/bwd/infer"
        "   torch ms: stats/fwd/bwd/infer"
    )
    print(header)
    for label, shape, axis in SHAPES:
        if args.only and args.only not in label:
            continue
        t = bench_shape(label, shape, axis, repeats, args.threads)
        ms = lambda k, t=t: 1e3 * t[k]  # noqa: E731
        print(
            f"{label:<20}{ms('floor'):>9.2f}"
            f"{t['stats_torch'] / t['stats_bnfold']:>8.2f}"
            f"{t['fwd_torch'] / t['fwd_bnfold']:>10.2f}"
            f"{t['bwd_torch'] / t['bwd_bnfold']:>10.2f}"
            f"{t['inf_torch'] / t['inf_bnfold']:>8.2f}"
            f"{t['stats_bnfold'] / t['floor']:>12.2f}"
            f"   {ms('stats_bnfold'):.2f}/{ms('fwd_bnfold'):.2f}/{ms('bwd_bnfold'):.2f}/"
            f"{ms('inf_bnfold'):.2f}   {ms('stats_torch'):.2f}/{ms('fwd_torch'):.2f}/"
            f"{ms('bwd_torch'):.2f}/{ms('inf_torch'):.2f}",
            flush=True,
        )
    print(f"load average after: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
