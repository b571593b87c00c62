"""Batch-norm kernels for numpy arrays: validation and dispatch to the compiled OpenMP loops.

Every public function here checks its arguments (raising TypeError / ValueError that name the
argument), brings the input into a C-contiguous (outer, C, inner) view, does the per-channel
parameter math in float64, and calls bnfold._bn_kernels, which never raises. See docs/kernels.md.

Conventions (PyTorch's, see ``onnx_momentum`` for ONNX):
* ``momentum`` weighs the new batch: running = (1 - momentum) * running + momentum * batch.
* running_var is updated with the unbiased batch variance (``running_var_ddof=1``); the
  normalisation itself uses the biased variance.
* Results come back in the input's dtype; ``Moments`` keeps float64.

Threads: ``n_threads`` is resolved by bnfold._threads, which also keeps kernels working in a
process forked after they had started OpenMP threads (there they run single-threaded, with the
same results, and say so once with a BnfoldWarning).
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import threading
from typing import NamedTuple

import numpy as np

from bnfold import _bn_kernels as _k_baseline
from bnfold._threads import effective_n_threads

__all__ = [
    "Moments",
    "batch_stats",
    "batch_norm_train",
    "batch_norm_infer",
    "batch_norm_backward",
    "batch_renorm_train",
    "onnx_momentum",
    "clear_output_cache",
]

# Below this many elements a single thread wins (starting a parallel region costs ~ microseconds).
_PARALLEL_MIN_ELEMENTS = 1 << 15
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# Rows shorter than this (with enough samples) use the "slabs" reductions, whose partial buffer
# is per chunk of samples instead of per row.
_SHORT_ROW = 256
_SLAB_MIN_OUTER = 8
# A thread's share of one stage of the rows backward (see _bwd_schedule).
_BWD_STAGE_BYTES = 256 << 10


def _cpu_has_avx2_fma() -> bool:
    """Whether this CPU runs AVX2 + FMA code (numpy's runtime CPU detection; False if unknown)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2 or a different layout: stay on the portable build
        return False
    return bool(features.get("AVX2")) and bool(features.get("FMA3"))


def _select_kernels():
    """The compiled kernel module to use: the AVX2 + FMA build on CPUs that support it (about
    1.5-2x faster in the float64 reductions), otherwise the portable build. Set
    BNFOLD_KERNELS=baseline to force the portable one."""
    if os.environ.get("BNFOLD_KERNELS", "").lower() == "baseline" or not _cpu_has_avx2_fma():
        return _k_baseline
    try:
        from bnfold import _bn_kernels_avx2 as k_avx2
    except ImportError:
        return _k_baseline
    return k_avx2 if k_avx2.TARGET_AVX2 else _k_baseline


_k = _select_kernels()
#: Name of the compiled kernel module in use ("bnfold._bn_kernels" or "bnfold._bn_kernels_avx2").
KERNEL_MODULE = _k.__name__


class _Layout(NamedTuple):
    """x viewed as (outer, C, inner) around the channel axis."""

    outer: int
    C: int
    inner: int
    axis: int

    @property
    def count(self) -> int:
        """Values per channel."""
        return self.outer * self.inner


# ----------------------------------------------------------------------------------------------
# Validation helpers


def _float_input(x, name: str) -> np.ndarray:
    """x as a C-contiguous float32/float64 array in native byte order (copied only if needed)."""
    arr = np.asarray(x)
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (4, 8):
        raise TypeError(f"{name} must be float32 or float64, got {arr.dtype}")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return np.ascontiguousarray(arr)


def _layout(x: np.ndarray, axis, name: str = "x", allow_empty: bool = False) -> _Layout:
    if x.ndim < 2:
        raise ValueError(f"{name} must have rank >= 2 (batch and channel axes), got shape {x.shape}")
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for {name} of rank {x.ndim}")
    axis = int(axis) % x.ndim
    if x.size == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (shape {x.shape}): need at least one value per channel")
    outer = math.prod(x.shape[:axis])
    inner = math.prod(x.shape[axis + 1 :])
    return _Layout(outer, int(x.shape[axis]), inner, axis)


def _channel_param(p, name: str, C: int, default: float | None) -> np.ndarray:
    """A per-channel parameter as float64 (C,); None -> ``default`` (or an error if no default)."""
    if p is None:
        if default is None:
            raise ValueError(f"{name} is required here, got None")
        return np.full(C, default, dtype=np.float64)
    arr = np.asarray(p)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real float or integer array, got {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] != C:
        raise ValueError(f"{name} must have shape ({C},) to match the {C} channels, got {arr.shape}")
    return arr.astype(np.float64)


def _running_stat(p, name: str, C: int) -> np.ndarray | None:
    """A running statistic updated in place: None, or a writeable contiguous float (C,) array."""
    if p is None:
        return None
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{name} must be a numpy array (it is updated in place), got {type(p).__name__}")
    if p.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {p.dtype}")
    if p.ndim != 1 or p.shape[0] != C:
        raise ValueError(f"{name} must have shape ({C},) to match the {C} channels, got {p.shape}")
    if not p.flags.c_contiguous or not p.flags.writeable:
        raise ValueError(f"{name} must be a writeable contiguous array (it is updated in place)")
    return p


# ----------------------------------------------------------------------------------------------
# Output buffers
#
# A fresh output of tens of MB costs a page fault per page (or per 2 MB huge page) on its first
# write, and on a VM whose free memory is handed back to the host (virtio-balloon free page
# reporting) that first touch costs several times the kernel itself (256x2048x7x7 backward: ~25 ms
# of work, 70-140 ms with a fresh dx). Large outputs therefore come from a small cache of flat
# buffers: a buffer that only the cache still references (its caller dropped every array made
# from it) is handed out again, already resident. The cache holds at most _CACHE_MAX_BYTES.
# Mid-sized outputs are cached too: whether malloc hands back resident memory for them depends on
# what else the process allocated and freed (16x128x28x28 backward right after PyTorch's: ~270
# page faults and 1.0-1.6 ms per call with a fresh dx, 16 faults and 0.85 ms from the cache).

_CACHE_MIN_BYTES = 1 << 20
# BNFOLD_OUTPUT_CACHE_MB=0 turns the cache off (every output a fresh np.empty).
_CACHE_MAX_BYTES = int(float(os.environ.get("BNFOLD_OUTPUT_CACHE_MB", "256")) * (1 << 20))
_cache: list[np.ndarray] = []
_cache_lock = threading.Lock()


def _measure_free_refcount():
    """sys.getrefcount of a cache entry nobody else holds, as this interpreter reports it, or
    None when a held view does not show up in the count (then "free" cannot be told apart from
    "in use" and the cache stays off). Measured, not assumed: how getrefcount counts its own
    argument and borrowed references differs between Python versions."""
    probe = [np.empty(8, np.uint8)]
    free = sys.getrefcount(probe[0])
    held = probe[0].view(np.float32)
    in_use = sys.getrefcount(probe[0])
    del held
    return free if in_use > free and sys.getrefcount(probe[0]) == free else None


_FREE_REFCOUNT = _measure_free_refcount()


def _is_free(i: int) -> bool:
    return sys.getrefcount(_cache[i]) == _FREE_REFCOUNT


def _cached_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array, from the output cache when it is large."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _CACHE_MIN_BYTES or _FREE_REFCOUNT is None or nbytes > _CACHE_MAX_BYTES:
        return np.empty(shape, dtype)
    with _cache_lock:
        for i in range(len(_cache)):
            if _cache[i].nbytes == nbytes and _is_free(i):
                buf = _cache.pop(i)
                _cache.append(buf)  # most recently used last
                return buf.view(dtype).reshape(shape)
        total = sum(b.nbytes for b in _cache)
        i = 0
        while total + nbytes > _CACHE_MAX_BYTES and i < len(_cache):
            if _is_free(i):
                total -= _cache.pop(i).nbytes
            else:
                i += 1
        if total + nbytes > _CACHE_MAX_BYTES:
            return np.empty(shape, dtype)
        buf = np.empty(nbytes, np.uint8)
        _cache.append(buf)
        return buf.view(dtype).reshape(shape)


def clear_output_cache() -> None:
    """Drop the cached output buffers that no array refers to any more (returns their memory)."""
    with _cache_lock:
        i = 0
        while i < len(_cache):
            if _is_free(i):
                _cache.pop(i)
            else:
                i += 1


def _out_array(out, x: np.ndarray) -> np.ndarray:
    if out is None:
        return _cached_empty(x.shape, x.dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"out must have the input's shape {x.shape} and dtype {x.dtype}, got {out.shape} {out.dtype}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be a writeable C-contiguous array")
    return out


def _real(value, name: str, *, minimum: float | None = None, allow_inf: bool = False) -> float:
    """A scalar parameter as a float. Not a real number (a string, a bool, an array) ->
    TypeError. NaN, an infinity, or a value below ``minimum`` -> ValueError; NaN is tested first
    because it compares false with every bound and would slip through a range check.
    ``allow_inf`` admits +inf, for a bound where it means "no bound"."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond float range
        v = math.inf if value > 0 else -math.inf
    if math.isnan(v) or (math.isinf(v) and not (allow_inf and v > 0)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return v


def _momentum(value) -> float:
    """The weight of the new batch in a running-statistics update, in [0, 1] (0: keep the
    running statistics, 1: replace them); outside that the update extrapolates."""
    v = _real(value, "momentum")
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {value!r}")
    return v


def _running_var_ddof(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value not in (0, 1):
        raise ValueError(f"running_var_ddof must be 0 or 1, got {value!r}")
    return int(value)


def _threads_for(size: int, n_threads) -> int:
    # n_threads is validated even for inputs too small to be worth a second thread
    return effective_n_threads(n_threads, parallel=size >= _PARALLEL_MIN_ELEMENTS)


def _prepare(x, axis, name="x"):
    arr = _float_input(x, name)
    return arr, _layout(arr, axis, name)


# ----------------------------------------------------------------------------------------------
# Dispatch to the compiled loops (arguments already validated)


def _tile(values: np.ndarray, C: int, dtype) -> np.ndarray:
    """Per-channel values repeated over one cols-layout segment (k rows of C)."""
    return np.ascontiguousarray(np.tile(values.astype(dtype), _k.cols_segment_rows(C)))


def _l2_cache_bytes() -> int:
    """Size of one core's L2 cache as Linux reports it, else 1 MiB (a common size today)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in sorted(os.listdir(base)):
            d = os.path.join(base, index)
            with open(os.path.join(d, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(d, "type")) as f:
                kind = f.read().strip()
            if level == "2" and kind in ("Unified", "Data"):
                with open(os.path.join(d, "size")) as f:
                    text = f.read().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
                return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return 1 << 20


_L2_BYTES = _l2_cache_bytes()


def _bwd_schedule(L: _Layout, itemsize: int, nt: int) -> tuple[int, bool]:
    """(channels per stage, overlap) for the rows backward. A thread's share of a stage's dy and
    x is about _BWD_STAGE_BYTES (at least one channel). Overlapping a stage's reduction with the
    previous stage's dx keeps two stages in L2 at once, so it is used only where they fit."""
    per_channel = 2 * itemsize * L.outer * L.inner / nt
    stage = int(min(L.C, max(1, _BWD_STAGE_BYTES // per_channel)))
    return stage, 2 * stage * per_channel <= _L2_BYTES


def _use_slabs(L: _Layout) -> bool:
    return 1 < L.inner < _SHORT_ROW and L.outer >= _SLAB_MIN_OUTER


def _raw_moments(x: np.ndarray, L: _Layout, nt: int) -> tuple[np.ndarray, np.ndarray]:
    mean = np.empty(L.C, dtype=np.float64)
    m2 = np.empty(L.C, dtype=np.float64)
    flat = x.reshape(-1)
    if _use_slabs(L):
        _k.moments_slabs(flat, L.outer, L.C, L.inner, mean, m2, nt)
    elif L.inner > 1:
        _k.moments_rows(flat, L.outer, L.C, L.inner, 0, L.C, mean, m2, nt)
    else:
        _k.moments_cols(flat, L.outer, L.C, mean, m2, nt)
    return mean, m2


def _affine_params(mean, scale, bias, dtype):
    """(m_hi, s, t) in ``dtype`` for the kernels' out = (x - m_hi) * s + t, equal to
    (x - mean) * scale + bias: m_hi is the mean rounded to dtype (so x - m_hi is exact for x near
    the mean) and the rounding residue goes into t, computed in float64."""
    m_hi = mean.astype(dtype)
    shift = bias + (m_hi.astype(np.float64) - mean) * scale
    return m_hi, scale.astype(dtype), shift.astype(dtype)


def _affine(x, L: _Layout, mean, scale, bias, out, nt) -> None:
    """out = (x - mean) * scale + bias per channel (float64 parameters)."""
    m_hi, s, t = _affine_params(mean, scale, bias, x.dtype)
    xf, of = x.reshape(-1), out.reshape(-1)
    if L.inner > 1:
        _k.affine_rows(xf, L.outer, L.C, L.inner, 0, L.C, m_hi, s, t, of, nt)
    else:
        dt = x.dtype
        _k.affine_cols(xf, L.outer, L.C, _tile(m_hi, L.C, dt), _tile(s, L.C, dt), _tile(t, L.C, dt), of, nt)


def _train_forward(x, L: _Layout, w, b, eps, y, nt):
    """Training forward into y: statistics pass, then one affine pass. Returns the batch
    (mean, biased var), float64."""
    mean, m2 = _raw_moments(x, L, nt)
    var = m2 / L.count
    _affine(x, L, mean, w * (1.0 / np.sqrt(var + eps)), b, y, nt)
    return mean, var


def _backward_coefficients(sum_dy, sum_dyxc, w, mean, invstd, n, dtype):
    """(m_hi, a, bcoef, d) in dtype for dx = a*dy + bcoef*(x - m_hi) + d (float64 math in the
    compiled bwd_coefficients, the same code the fused rows backward uses)."""
    m_hi, a, bcoef, d = (np.empty(len(mean), dtype) for _ in range(4))
    _k.bwd_coefficients(sum_dy, sum_dyxc, w, mean, invstd, n, m_hi, a, bcoef, d)
    return m_hi, a, bcoef, d


def _update_running(running_mean, running_var, mean, var, count, momentum, ddof) -> None:
    if running_mean is not None:
        running_mean[...] = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean
    if running_var is not None:
        batch_var = var * (count / (count - ddof))
        running_var[...] = (1.0 - momentum) * running_var.astype(np.float64) + momentum * batch_var


def _training_count(L: _Layout, x: np.ndarray) -> int:
    if L.count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input of shape {x.shape}")
    return L.count


# ----------------------------------------------------------------------------------------------
# Public API


class Moments:
    """Mergeable per-channel moments of a batch: ``count`` values per channel, their ``mean`` and
    ``m2`` (sum of squared deviations from the mean), both float64 (C,).

    ``a.merge(b)`` uses Chan's parallel formula, so the moments of any split of a batch merge into
    the moments of the whole batch; ``var(ddof)`` = m2 / (count - ddof).

    An empty part (``count == 0``, e.g. one of ``np.array_split(x, 3)`` for a batch of 2) has
    mean and m2 0 and is the identity of ``merge``: merged with a part, it gives that part's
    moments unchanged. It has no variance (``var()`` raises ValueError).
    """

    __slots__ = ("count", "mean", "m2")

    def __init__(self, count: int, mean, m2):
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(f"count must be a non-negative int, got {count!r}")
        mean = np.array(mean, dtype=np.float64).reshape(-1)
        m2 = np.array(m2, dtype=np.float64).reshape(-1)
        if mean.shape != m2.shape:
            raise ValueError(f"mean and m2 must have the same length, got {mean.shape} and {m2.shape}")
        self.count = int(count)
        self.mean = mean
        self.m2 = m2

    @classmethod
    def from_array(cls, x, axis=1, n_threads=None) -> Moments:
        """Moments of every channel (axis ``axis``) of a float32/float64 batch; an empty batch
        (no values per channel) gives the empty moments, count 0."""
        arr = _float_input(x, "x")
        L = _layout(arr, axis, allow_empty=True)
        nt = _threads_for(arr.size, n_threads)  # validates n_threads even when nothing is computed
        if arr.size == 0:
            return cls(L.count, np.zeros(L.C), np.zeros(L.C))
        mean, m2 = _raw_moments(arr, L, nt)
        return cls(L.count, mean, m2)

    def merge(self, other: Moments) -> Moments:
        """Moments of the union of both batches (a new object; neither input changes)."""
        if not isinstance(other, Moments):
            raise TypeError(f"can only merge Moments with Moments, got {type(other).__name__}")
        if other.mean.shape != self.mean.shape:
            raise ValueError(f"cannot merge moments of {self.mean.shape[0]} and {other.mean.shape[0]} channels")
        # The empty part is the identity exactly: Chan's formula would give it too (its mean is 0)
        # except for two empty parts (0 / 0), and a hand-made Moments(0, ...) may hold any mean.
        if other.count == 0:
            return Moments(self.count, self.mean, self.m2)
        if self.count == 0:
            return Moments(other.count, other.mean, other.m2)
        na, nb = float(self.count), float(other.count)
        n = na + nb
        delta = other.mean - self.mean
        mean = self.mean + delta * (nb / n)
        m2 = self.m2 + other.m2 + delta * delta * (na * nb / n)
        return Moments(self.count + other.count, mean, m2)

    def var(self, ddof: int = 0) -> np.ndarray:
        """Per-channel variance m2 / (count - ddof), float64; ddof is a non-negative int smaller
        than count (0: biased, 1: unbiased)."""
        if isinstance(ddof, bool) or not isinstance(ddof, numbers.Integral):
            raise TypeError(f"ddof must be a non-negative int, got {ddof!r}")
        if ddof < 0:
            raise ValueError(f"ddof must be a non-negative int, got {ddof}")
        ddof = int(ddof)
        if self.count == 0:
            raise ValueError("the moments are empty (count 0): no variance")
        if self.count - ddof <= 0:
            raise ValueError(f"ddof={ddof} needs more than {ddof} values, have {self.count}")
        return self.m2 / (self.count - ddof)

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    def __repr__(self) -> str:
        return f"Moments(count={self.count}, channels={self.channels})"


def batch_stats(x, axis=1, n_threads=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance of ``x`` (channel axis ``axis``), in x's dtype."""
    arr, L = _prepare(x, axis)
    mean, m2 = _raw_moments(arr, L, _threads_for(arr.size, n_threads))
    return mean.astype(arr.dtype), (m2 / L.count).astype(arr.dtype)


def batch_norm_train(
    x,
    weight,
    bias,
    running_mean,
    running_var,
    momentum=0.1,
    eps=1e-5,
    axis=1,
    out=None,
    n_threads=None,
    *,
    running_var_ddof=1,
):
    """Training-mode batch norm: normalise with the batch statistics and update the running
    statistics in place (PyTorch convention; ``running_var_ddof=0`` stores the biased variance as
    ONNX does). weight/bias/running_mean/running_var may be None.

    Returns (y, save_mean, save_invstd), all in x's dtype; save_invstd = 1/sqrt(var + eps).
    """
    arr, L = _prepare(x, axis)
    w = _channel_param(weight, "weight", L.C, 1.0)
    b = _channel_param(bias, "bias", L.C, 0.0)
    rm = _running_stat(running_mean, "running_mean", L.C)
    rv = _running_stat(running_var, "running_var", L.C)
    momentum = _momentum(momentum)
    eps = _real(eps, "eps", minimum=0.0)
    running_var_ddof = _running_var_ddof(running_var_ddof)
    count = _training_count(L, arr)
    y = _out_array(out, arr)
    nt = _threads_for(arr.size, n_threads)

    mean, var = _train_forward(arr, L, w, b, eps, y, nt)
    invstd = 1.0 / np.sqrt(var + eps)
    _update_running(rm, rv, mean, var, count, momentum, running_var_ddof)
    return y, mean.astype(arr.dtype), invstd.astype(arr.dtype)


def batch_norm_infer(
    x, weight, bias, running_mean, running_var, eps=1e-5, axis=1, out=None, n_threads=None
) -> np.ndarray:
    """Inference-mode batch norm: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias.
    weight/bias may be None; running_mean/running_var are required."""
    arr, L = _prepare(x, axis)
    w = _channel_param(weight, "weight", L.C, 1.0)
    b = _channel_param(bias, "bias", L.C, 0.0)
    mean = _channel_param(running_mean, "running_mean", L.C, None)
    var = _channel_param(running_var, "running_var", L.C, None)
    eps = _real(eps, "eps", minimum=0.0)
    y = _out_array(out, arr)
    _affine(arr, L, mean, w / np.sqrt(var + eps), b, y, _threads_for(arr.size, n_threads))
    return y


def batch_norm_backward(dy, x, weight, save_mean, save_invstd, axis=1, n_threads=None):
    """Gradients of training-mode batch norm given the forward's save_mean / save_invstd.

    Returns (dx, dweight, dbias) in x's dtype (dweight/dbias are returned even if weight is None).
    """
    arr, L = _prepare(x, axis)
    g = _float_input(dy, "dy")
    if g.shape != arr.shape:
        raise ValueError(f"dy must have the shape of x {arr.shape}, got {g.shape}")
    if g.dtype != arr.dtype:
        raise TypeError(f"dy must have the dtype of x ({arr.dtype}), got {g.dtype}")
    w = _channel_param(weight, "weight", L.C, 1.0)
    mean = _channel_param(save_mean, "save_mean", L.C, None)
    invstd = _channel_param(save_invstd, "save_invstd", L.C, None)
    nt = _threads_for(arr.size, n_threads)

    sum_dy = np.empty(L.C, dtype=np.float64)
    sum_dyxc = np.empty(L.C, dtype=np.float64)
    gf, xf = g.reshape(-1), arr.reshape(-1)
    n = float(L.count)
    dt = arr.dtype
    dx = _cached_empty(arr.shape, dt)
    dxf = dx.reshape(-1)
    if L.inner > 1 and not _use_slabs(L):
        # reduction and dx in one parallel region, by stages of channels (dx while dy, x are cached)
        _k.bwd_fused_rows(
            gf,
            xf,
            L.outer,
            L.C,
            L.inner,
            mean,
            w,
            invstd,
            dxf,
            sum_dy,
            sum_dyxc,
            nt,
            *_bwd_schedule(L, dt.itemsize, nt),
        )
    else:
        if _use_slabs(L):
            _k.dot_slabs(gf, xf, L.outer, L.C, L.inner, mean, sum_dy, sum_dyxc, nt)
        else:
            _k.dot_cols(gf, xf, L.outer, L.C, _tile(mean, L.C, np.float64), sum_dy, sum_dyxc, nt)
        m_hi, a, bcoef, d = _backward_coefficients(sum_dy, sum_dyxc, w, mean, invstd, n, dt)
        if L.inner > 1:
            _k.bwd_rows(gf, xf, L.outer, L.C, L.inner, 0, L.C, m_hi, a, bcoef, d, dxf, nt)
        else:
            _k.bwd_cols(
                gf,
                xf,
                L.outer,
                L.C,
                _tile(m_hi, L.C, dt),
                _tile(a, L.C, dt),
                _tile(bcoef, L.C, dt),
                _tile(d, L.C, dt),
                dxf,
                nt,
            )
    return dx, (sum_dyxc * invstd).astype(dt), sum_dy.astype(dt)


def batch_renorm_train(
    x,
    weight,
    bias,
    running_mean,
    running_var,
    momentum=0.1,
    eps=1e-5,
    rmax=3.0,
    dmax=5.0,
    axis=1,
    out=None,
    n_threads=None,
    *,
    running_var_ddof=1,
):
    """Batch Renormalization (Ioffe 2017), training forward.

    With sigma_B = sqrt(var_B + eps) and sigma = sqrt(running_var + eps) (running stats *before*
    this batch): r = clip(sigma_B / sigma, 1/rmax, rmax), d = clip((mean_B - running_mean) / sigma,
    -dmax, dmax), y = weight * (xhat * r + d) + bias with xhat = (x - mean_B) / sigma_B.
    r and d are constants for the backward pass (no gradient flows through them), so
    batch_norm_backward with weight*r gives dx. Running statistics are updated as in
    batch_norm_train; here they are required.

    Returns (y, save_mean, save_invstd, r, d), all in x's dtype.
    """
    arr, L = _prepare(x, axis)
    w = _channel_param(weight, "weight", L.C, 1.0)
    b = _channel_param(bias, "bias", L.C, 0.0)
    if running_mean is None or running_var is None:
        raise ValueError("batch_renorm_train needs running_mean and running_var (got None)")
    rm = _running_stat(running_mean, "running_mean", L.C)
    rv = _running_stat(running_var, "running_var", L.C)
    momentum = _momentum(momentum)
    eps = _real(eps, "eps", minimum=0.0)
    # +inf: no clipping (r and d as computed)
    rmax = _real(rmax, "rmax", minimum=1.0, allow_inf=True)
    dmax = _real(dmax, "dmax", minimum=0.0, allow_inf=True)
    running_var_ddof = _running_var_ddof(running_var_ddof)
    count = _training_count(L, arr)
    y = _out_array(out, arr)
    nt = _threads_for(arr.size, n_threads)

    mean, m2 = _raw_moments(arr, L, nt)
    var = m2 / count
    sigma_b = np.sqrt(var + eps)
    sigma_run = np.sqrt(rv.astype(np.float64) + eps)
    r = np.clip(sigma_b / sigma_run, 1.0 / rmax, rmax)
    d = np.clip((mean - rm.astype(np.float64)) / sigma_run, -dmax, dmax)
    invstd = 1.0 / sigma_b
    _affine(arr, L, mean, w * r * invstd, w * d + b, y, nt)
    _update_running(rm, rv, mean, var, count, momentum, running_var_ddof)
    dt = arr.dtype
    return y, mean.astype(dt), invstd.astype(dt), r.astype(dt), d.astype(dt)


def onnx_momentum(momentum: float) -> float:
    """Convert between PyTorch's and ONNX's BatchNormalization momentum (the map is its own
    inverse): ONNX computes running = running*momentum + batch*(1 - momentum).

    To reproduce an ONNX training-mode node (opset 14/15) with momentum m_onnx, call
    ``batch_norm_train(..., momentum=onnx_momentum(m_onnx), running_var_ddof=0)``: ONNX stores
    the *biased* batch variance in running_var, PyTorch the unbiased one.
    """
    return 1.0 - _momentum(momentum)
