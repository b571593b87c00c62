"""Tests of bnfold.kernels against a float64 numpy reference: statistics, Moments merging,
training / inference forward, backward, batch renorm, thread-count independence, numerically hard
inputs and argument validation."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnfold
from bnfold import Moments, batch_norm_backward, batch_norm_infer, batch_norm_train, batch_renorm_train, batch_stats
from bnfold._threads import effective_n_threads

ALL_THREADS = effective_n_threads(None)

# (shape, axis): NCHW / NHWC, rank 2..5, C=1, C=3, spatial 1, N=1 with spatial > 1, odd sizes,
# and sizes large enough to cross the parallel threshold and the kernels' block / chunk sizes.
LAYOUTS = [
    ((7, 3), 1),
    ((5, 1), 1),
    ((4, 3, 5), 1),
    ((4, 5, 3), -1),
    ((3, 3, 5, 7), 1),
    ((3, 5, 7, 3), -1),
    ((5, 1, 4, 3), 1),
    ((6, 3, 1, 1), 1),
    ((6, 1, 1, 3), -1),
    ((1, 3, 5, 5), 1),
    ((1, 5, 5, 3), -1),
    ((2, 3, 3, 4, 5), 1),
    ((2, 3, 4, 5, 3), -1),
    ((2, 3, 67, 71), 1),  # rows longer than one 4096-element block
    ((4, 37, 41, 5), -1),
    ((600, 130), 1),  # many chunks, C not a divisor of the segment length
    ((2, 1, 9000), 1),
    ((9000, 1), 1),
    ((9, 4, 7), 1),  # short rows, many samples ("slabs" reductions)
    ((40, 33, 5, 5), 1),
    ((6, 16, 9, 11), 1),
    ((300, 1024), 1),  # wide channels-last: channel blocks kept in registers (C >= 960)
    ((37, 1037), 1),
    ((5, 7, 1000), -1),
]


def _other_axes(x, axis):
    axis %= x.ndim
    return tuple(i for i in range(x.ndim) if i != axis)


def _bshape(x, axis):
    """Broadcast shape for per-channel values."""
    shape = [1] * x.ndim
    shape[axis % x.ndim] = x.shape[axis % x.ndim]
    return shape


def _ref_stats(x, axis):
    x64 = x.astype(np.float64)
    ax = _other_axes(x, axis)
    return x64.mean(axis=ax), x64.var(axis=ax)


def _ref_train(x, w, b, axis, eps):
    x64 = x.astype(np.float64)
    mean, var = _ref_stats(x, axis)
    bs = _bshape(x, axis)
    xhat = (x64 - mean.reshape(bs)) / np.sqrt(var.reshape(bs) + eps)
    return xhat * w.reshape(bs) + b.reshape(bs), mean, var


def _ref_backward(dy, x, w, mean, invstd, axis):
    ax = _other_axes(x, axis)
    bs = _bshape(x, axis)
    g = dy.astype(np.float64)
    xhat = (x.astype(np.float64) - mean.reshape(bs)) * invstd.reshape(bs)
    n = x.size // x.shape[axis % x.ndim]
    dbias = g.sum(axis=ax)
    dweight = (g * xhat).sum(axis=ax)
    dx = (w * invstd).reshape(bs) * (g - (dbias / n).reshape(bs) - xhat * (dweight / n).reshape(bs))
    return dx, dweight, dbias


def _tol(dtype):
    return dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-11)


def _data(rng, shape, dtype, loc=0.5, scale=2.0):
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


# ----------------------------------------------------------------------------------------------
# statistics


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_batch_stats_matches_float64_reference(shape, axis, dtype):
    rng = np.random.default_rng(1)
    x = _data(rng, shape, dtype)
    mean, var = batch_stats(x, axis=axis)
    ref_mean, ref_var = _ref_stats(x, axis)
    assert mean.dtype == dtype and var.dtype == dtype
    assert mean.shape == (shape[axis],)
    np.testing.assert_allclose(mean, ref_mean, **_tol(dtype))
    np.testing.assert_allclose(var, ref_var, **_tol(dtype))


@pytest.mark.parametrize(
    "shape,axis", [((2, 3, 67, 71), 1), ((4, 37, 41, 5), -1), ((600, 130), 1), ((64, 40, 7, 7), 1)]
)
def test_moments_are_bitwise_independent_of_thread_count(shape, axis):
    x = _data(np.random.default_rng(2), shape, np.float32)
    one = Moments.from_array(x, axis=axis, n_threads=1)
    for n in {2, ALL_THREADS, 3}:
        many = Moments.from_array(x, axis=axis, n_threads=n)
        np.testing.assert_array_equal(one.mean, many.mean)
        np.testing.assert_array_equal(one.m2, many.m2)


@pytest.mark.parametrize("shape", [(16, 4, 33, 17), (64, 4, 7, 7)])  # rows, slabs
def test_float64_statistics_are_accurate_to_float64_precision(shape):
    rng = np.random.default_rng(3)
    # exact reference: integer-valued data scaled by a power of two, so the true mean and
    # variance are computable exactly with Python fractions-free integer arithmetic.
    ints = rng.integers(-(2**20), 2**20, size=shape)
    x = ints.astype(np.float64) * 2.0**-10 + 1e3
    n = ints.size // 4
    s = ints.sum(axis=(0, 2, 3), dtype=np.int64)
    ss = (ints.astype(object) ** 2).sum(axis=(0, 2, 3))
    true_var = np.array([float(ss[c] * n - int(s[c]) ** 2) / n**2 for c in range(4)]) * 2.0**-20
    true_mean = s / n * 2.0**-10 + 1e3
    mean, var = batch_stats(x)
    np.testing.assert_allclose(mean, true_mean, rtol=1e-15)
    np.testing.assert_allclose(var, true_var, rtol=1e-12)
    mean_l, var_l = batch_stats(np.ascontiguousarray(np.moveaxis(x, 1, -1)), axis=-1)
    np.testing.assert_allclose(mean_l, true_mean, rtol=1e-15)
    np.testing.assert_allclose(var_l, true_var, rtol=1e-12)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "wide2d", "slabs"])
def test_constant_channel_of_1e7_has_exactly_zero_variance(layout):
    rng = np.random.default_rng(4)
    shape = {"wide2d": (600, 1024), "slabs": (70, 3, 7, 7)}.get(layout, (8, 3, 20, 30))
    x = rng.standard_normal(shape).astype(np.float32)
    x[:, 1] = 1e7
    axis = 1
    if layout == "nhwc":
        x, axis = np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1
    for n_threads in (1, ALL_THREADS):
        mean, var = batch_stats(x, axis=axis, n_threads=n_threads)
        assert var[1] == 0.0
        assert mean[1] == np.float32(1e7)
        y, _, _ = batch_norm_train(x, None, None, None, None, axis=axis, n_threads=n_threads)
        assert np.all(y.take(1, axis=axis % x.ndim) == 0.0)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "2d", "wide2d", "slabs"])
def test_large_offset_small_spread_normalises_to_unit_variance(layout):
    rng = np.random.default_rng(5)
    shape = {
        "nchw": (16, 3, 24, 24),
        "nhwc": (16, 24, 24, 3),
        "2d": (5000, 3),
        "wide2d": (3000, 1024),
        "slabs": (300, 3, 7, 7),
    }[layout]
    axis = -1 if layout == "nhwc" else 1
    x = (3e4 + 1e-3 * rng.standard_normal(shape)).astype(np.float32)
    # naive float32 E[x^2] - E[x]^2 is useless here (float32 spacing at 3e4 is ~2e-3, so x
    # takes a few quantised values); check that it really is
    x32 = x.reshape(-1)
    naive = np.float32(np.mean(x32 * x32, dtype=np.float32) - np.mean(x32, dtype=np.float32) ** 2)
    true_var = x.astype(np.float64).var()
    assert abs(naive - true_var) > 0.5 * true_var
    mean, var = batch_stats(x, axis=axis)
    _, ref_var = _ref_stats(x, axis)
    np.testing.assert_allclose(var, ref_var, rtol=1e-4)
    y, _, _ = batch_norm_train(x, None, None, None, None, eps=0.0, axis=axis)
    y_var = y.astype(np.float64).var(axis=_other_axes(y, axis))
    y_mean = y.astype(np.float64).mean(axis=_other_axes(y, axis))
    np.testing.assert_allclose(y_var, 1.0, rtol=0.01)
    np.testing.assert_allclose(y_mean, 0.0, atol=0.01)


def test_moments_attributes_and_var():
    x = _data(np.random.default_rng(6), (10, 4, 3), np.float32)
    m = Moments.from_array(x)
    assert m.count == 30 and isinstance(m.count, int)
    assert m.mean.dtype == np.float64 and m.m2.dtype == np.float64 and m.m2.shape == (4,)
    _, ref_var = _ref_stats(x, 1)
    np.testing.assert_allclose(m.var(), ref_var, rtol=1e-6)
    np.testing.assert_allclose(m.var(ddof=1), ref_var * 30 / 29, rtol=1e-6)
    with pytest.raises(ValueError, match="ddof"):
        Moments.from_array(x[:1, :, :1]).var(ddof=1)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 40),
    c=st.integers(1, 5),
    spatial=st.sampled_from([(), (1,), (3,), (2, 5)]),
    channels_last=st.booleans(),
    n_splits=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_merging_moments_of_any_split_gives_whole_batch(n, c, spatial, channels_last, n_splits, seed, dtype):
    rng = np.random.default_rng(seed)
    if channels_last:
        shape, axis = (n, *spatial, c), -1
    else:
        shape, axis = (n, c, *spatial), 1
    x = _data(rng, shape, dtype, loc=rng.uniform(-100, 100), scale=rng.uniform(0.01, 10))
    cuts = sorted(rng.choice(np.arange(1, n), size=min(n_splits, n - 1), replace=False))
    parts = np.split(x, cuts, axis=0)
    merged = Moments.from_array(parts[0], axis=axis)
    for part in parts[1:]:
        merged = merged.merge(Moments.from_array(part, axis=axis))
    whole = Moments.from_array(x, axis=axis)
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-9, atol=1e-9 * whole.count)


def test_moments_merge_rejects_mismatched_channels_and_types():
    a = Moments.from_array(np.ones((2, 3), np.float32) + np.eye(2, 3, dtype=np.float32))
    b = Moments.from_array(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="channels"):
        a.merge(b)
    with pytest.raises(TypeError, match="Moments"):
        a.merge(np.ones(3))
    merged = a.merge(a)
    assert merged is not a and a.count == 2 and merged.count == 4


@pytest.mark.parametrize("shape, axis", [((2, 3, 4), 1), ((2, 4, 3), -1), ((2, 3), 1)])
def test_empty_part_of_a_split_is_the_merge_identity(shape, axis):
    x = _data(np.random.default_rng(61), shape, np.float32, loc=3.0)
    parts = np.array_split(x, 3)  # a batch of 2 in 3 parts: the last one is empty
    assert parts[-1].shape[0] == 0
    moments = [Moments.from_array(p, axis=axis) for p in parts]
    empty = moments[-1]
    C = x.shape[axis]
    assert empty.count == 0 and empty.channels == C
    np.testing.assert_array_equal(empty.mean, np.zeros(C))
    np.testing.assert_array_equal(empty.m2, np.zeros(C))
    merged = moments[0]
    for m in moments[1:]:
        merged = merged.merge(m)
    whole = Moments.from_array(x, axis=axis)
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-9, atol=1e-12)
    # either side, the other part comes back unchanged (bit for bit), as a new object
    for m in (empty.merge(whole), whole.merge(empty)):
        assert m is not whole and m.count == whole.count
        assert m.mean.tobytes() == whole.mean.tobytes() and m.m2.tobytes() == whole.m2.tobytes()
    # a hand-made empty part with any mean is ignored as well
    odd = Moments(0, np.full(C, 7.0), np.zeros(C))
    assert whole.merge(odd).mean.tobytes() == whole.mean.tobytes()
    assert empty.merge(empty).count == 0


def test_empty_moments_have_no_variance_and_counts_are_checked():
    empty = Moments.from_array(np.ones((0, 3, 2), np.float64))
    with pytest.raises(ValueError, match="empty"):
        empty.var()
    with pytest.raises(ValueError, match="count"):
        Moments(-1, np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="channels"):
        empty.merge(Moments.from_array(np.ones((2, 4), np.float32)))
    # an empty input is still an error where a statistic must come out
    with pytest.raises(ValueError, match="empty"):
        batch_stats(np.ones((0, 3, 2), np.float32))
    with pytest.raises(ValueError, match="n_threads"):
        Moments.from_array(np.ones((0, 3), np.float32), n_threads=0)
    with pytest.raises(TypeError, match="float32 or float64"):
        Moments.from_array(np.ones((0, 3), np.int64))


def test_moments_var_ddof_must_be_a_non_negative_int():
    m = Moments.from_array(_data(np.random.default_rng(62), (10, 4, 3), np.float64))
    for bad in (-1, np.int64(-2)):
        with pytest.raises(ValueError, match="ddof"):
            m.var(ddof=bad)
    for bad in (1.0, 0.5, True, "1", None):
        with pytest.raises(TypeError, match="ddof"):
            m.var(ddof=bad)
    np.testing.assert_array_equal(m.var(ddof=np.int64(1)), m.m2 / 29)
    np.testing.assert_array_equal(m.var(), m.m2 / 30)


# ----------------------------------------------------------------------------------------------
# forward / backward against the float64 reference


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_train_infer_backward_match_reference(shape, axis, dtype):
    rng = np.random.default_rng(7)
    C = shape[axis]
    x = _data(rng, shape, dtype)
    w = rng.uniform(0.5, 2, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    eps = 1e-3
    rm = rng.standard_normal(C).astype(dtype)
    rv = rng.uniform(0.5, 2, C).astype(dtype)
    rm0, rv0 = rm.astype(np.float64), rv.astype(np.float64)

    y, save_mean, save_invstd = batch_norm_train(x, w, b, rm, rv, momentum=0.2, eps=eps, axis=axis)
    ref_y, ref_mean, ref_var = _ref_train(x, w.astype(np.float64), b.astype(np.float64), axis, eps)
    assert y.dtype == dtype and y.shape == x.shape
    assert save_mean.dtype == dtype and save_invstd.dtype == dtype
    np.testing.assert_allclose(y, ref_y, **_tol(dtype))
    np.testing.assert_allclose(save_mean, ref_mean, **_tol(dtype))
    np.testing.assert_allclose(save_invstd, 1 / np.sqrt(ref_var + eps), **_tol(dtype))
    n = x.size // C
    np.testing.assert_allclose(rm, 0.8 * rm0 + 0.2 * ref_mean, **_tol(dtype))
    np.testing.assert_allclose(rv, 0.8 * rv0 + 0.2 * ref_var * n / (n - 1), **_tol(dtype))

    bs = _bshape(x, axis)
    yi = batch_norm_infer(x, w, b, rm, rv, eps=eps, axis=axis)
    ref_yi = (x.astype(np.float64) - rm.astype(np.float64).reshape(bs)) / np.sqrt(
        rv.astype(np.float64).reshape(bs) + eps
    ) * w.astype(np.float64).reshape(bs) + b.astype(np.float64).reshape(bs)
    assert yi.dtype == dtype
    np.testing.assert_allclose(yi, ref_yi, **_tol(dtype))

    dy = _data(rng, shape, dtype, loc=0.1, scale=1.0)
    dx, dw, db = batch_norm_backward(dy, x, w, save_mean, save_invstd, axis=axis)
    ref_dx, ref_dw, ref_db = _ref_backward(
        dy,
        x,
        w.astype(np.float64),
        save_mean.astype(np.float64),
        save_invstd.astype(np.float64),
        axis,
    )
    assert dx.dtype == dtype and dw.dtype == dtype and db.dtype == dtype
    scale = np.abs(ref_dx).max()
    np.testing.assert_allclose(dx, ref_dx, rtol=_tol(dtype)["rtol"] * 10, atol=_tol(dtype)["atol"] * 10 * scale)
    np.testing.assert_allclose(dw, ref_dw, rtol=_tol(dtype)["rtol"] * 10, atol=_tol(dtype)["atol"] * n)
    np.testing.assert_allclose(db, ref_db, rtol=_tol(dtype)["rtol"] * 10, atol=_tol(dtype)["atol"] * n)


@pytest.mark.parametrize(
    "shape,axis", [((4, 3, 67, 71), 1), ((4, 37, 41, 5), -1), ((300, 130), 1), ((64, 40, 7, 7), 1), ((300, 1024), 1)]
)
def test_one_thread_and_all_threads_agree(shape, axis):
    rng = np.random.default_rng(8)
    x = _data(rng, shape, np.float32)
    dy = _data(rng, shape, np.float32)
    C = shape[axis]
    w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
    results = []
    for n_threads in (1, max(2, ALL_THREADS)):
        y, m, s = batch_norm_train(x, w, b, None, None, axis=axis, n_threads=n_threads)
        yi = batch_norm_infer(x, w, b, m, s, axis=axis, n_threads=n_threads)
        grads = batch_norm_backward(dy, x, w, m, s, axis=axis, n_threads=n_threads)
        results.append((y, m, s, yi, *grads))
    for a, b_ in zip(*results):
        np.testing.assert_allclose(a, b_, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 3, 67, 71), (4, 1, 9000), (6, 16, 40, 40), (1, 5, 90, 90), (2, 9, 5000)])
def test_backward_is_bitwise_independent_of_thread_count(shape):
    # rows layout: channels owned by threads (C >= 4 * threads) or shared by all of them
    rng = np.random.default_rng(18)
    x = _data(rng, shape, np.float32)
    dy = _data(rng, shape, np.float32)
    w = rng.uniform(0.5, 2, shape[1])
    _, m, s = batch_norm_train(x, w, None, None, None, n_threads=1)
    one = batch_norm_backward(dy, x, w, m, s, n_threads=1)
    for n in {2, 3, ALL_THREADS}:
        many = batch_norm_backward(dy, x, w, m, s, n_threads=n)
        for a, b_ in zip(one, many):
            np.testing.assert_array_equal(a, b_)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 7, 41, 103), (5, 10, 17, 19), (2, 3, 300)])
def test_pipelined_backward_is_bitwise_independent_of_stage_size_and_threads(shape, dtype):
    # The rows backward reduces stage k while writing the dx of stage k - 1 (or reduces, then
    # transforms, each stage), with work taken between threads. Any stage size (C not a multiple of
    # it; 41 x 103 rows are longer than one unit, so items of two stages can differ in length) and
    # any thread count, including more
    # threads than cores, must give the same bits, and match the float64 formula.
    from bnfold.kernels import _k

    rng = np.random.default_rng(21)
    x = _data(rng, shape, dtype)
    dy = _data(rng, shape, dtype)
    outer, C, inner = shape[0], shape[1], int(np.prod(shape[2:]))
    w = rng.uniform(0.5, 2, C)
    _, m, s = batch_norm_train(x, w, None, None, None, n_threads=1)
    mean, invstd = m.astype(np.float64), s.astype(np.float64)

    def run(stage, n_threads, overlap):
        dx = np.full(x.size, np.nan, dtype)
        s1, s2 = np.full(C, np.nan), np.full(C, np.nan)
        _k.bwd_fused_rows(
            dy.reshape(-1), x.reshape(-1), outer, C, inner, mean, w, invstd, dx, s1, s2, n_threads, stage, overlap
        )
        return dx, s1, s2

    ref = run(1, 1, False)
    for stage in (1, 2, 3, C - 1, C):
        for n_threads in (1, 2, 3, 8):
            for overlap in (False, True):
                for a, b_ in zip(ref, run(stage, n_threads, overlap)):
                    np.testing.assert_array_equal(a, b_)
    x64, g64 = x.astype(np.float64), dy.astype(np.float64)
    axes = (0, 2) if x.ndim == 3 else (0, 2, 3)
    bshape = (1, C) + (1,) * (x.ndim - 2)
    xc = x64 - mean.reshape(bshape)
    sum_dy, sum_dyxc = g64.sum(axis=axes), (g64 * xc).sum(axis=axes)
    np.testing.assert_allclose(ref[1], sum_dy, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(ref[2], sum_dyxc, rtol=1e-10, atol=1e-9)
    n = outer * inner
    k = (w * invstd).reshape(bshape)
    expected = k * (g64 - (sum_dy / n).reshape(bshape) - xc * (invstd**2 * sum_dyxc / n).reshape(bshape))
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(ref[0].reshape(shape), expected, rtol=tol, atol=tol)


def test_pipelined_backward_rejects_a_bad_stage_size():
    from bnfold.kernels import _k

    x = np.ones((2, 3, 300), np.float32)
    args = (
        x.reshape(-1),
        x.reshape(-1),
        2,
        3,
        300,
        np.zeros(3),
        np.ones(3),
        np.ones(3),
        np.empty(x.size, np.float32),
        np.empty(3),
        np.empty(3),
        2,
    )
    for bad in (0, 4):
        with pytest.raises(ValueError, match="stage_channels"):
            _k.bwd_fused_rows(*args, bad, True)


def test_backward_offset_data_stays_accurate_in_float32():
    rng = np.random.default_rng(9)
    x = (3e4 + 1e-3 * rng.standard_normal((8, 3, 16, 16))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    _, m, s = batch_norm_train(x, None, None, None, None)
    dx, dw, db = batch_norm_backward(dy, x, None, m, s)
    ref_dx, ref_dw, _ = _ref_backward(dy, x, np.ones(3), m.astype(np.float64), s.astype(np.float64), 1)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-3, atol=1e-3 * np.abs(ref_dx).max())
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-3, atol=1e-2)


def test_none_parameters_and_no_running_stats():
    x = _data(np.random.default_rng(10), (6, 4, 5), np.float32)
    y, m, s = batch_norm_train(x, None, None, None, None)
    ref_y, _, _ = _ref_train(x, np.ones(4), np.zeros(4), 1, 1e-5)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        batch_norm_infer(x, None, None, m, 1 / s.astype(np.float64) ** 2, eps=0.0), ref_y, rtol=1e-4, atol=1e-4
    )


def test_out_argument_and_in_place():
    rng = np.random.default_rng(11)
    x = _data(rng, (5, 3, 4, 4), np.float32)
    expected, _, _ = batch_norm_train(x, None, None, None, None)
    out = np.empty_like(x)
    y, _, _ = batch_norm_train(x, None, None, None, None, out=out)
    assert y is out
    np.testing.assert_array_equal(out, expected)
    x2 = x.copy()
    batch_norm_train(x2, None, None, None, None, out=x2)
    np.testing.assert_array_equal(x2, expected)
    out_i = np.empty_like(x)
    assert batch_norm_infer(x, None, None, np.zeros(3), np.ones(3), out=out_i) is out_i


def test_non_contiguous_input_is_copied_not_misread():
    rng = np.random.default_rng(12)
    base = _data(rng, (6, 3, 8, 10), np.float64)
    for view in (base[:, :, ::2, :], base.transpose(0, 1, 3, 2), base[::2]):
        mean, var = batch_stats(view)
        ref_mean, ref_var = _ref_stats(view, 1)
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
        np.testing.assert_allclose(var, ref_var, rtol=1e-12)
    nchw_view = np.moveaxis(np.ascontiguousarray(np.moveaxis(base, 1, -1)), -1, 1)
    y, _, _ = batch_norm_train(nchw_view, None, None, None, None)
    ref_y, _, _ = _ref_train(nchw_view, np.ones(3), np.zeros(3), 1, 1e-5)
    np.testing.assert_allclose(y, ref_y, rtol=1e-10, atol=1e-10)


def test_big_endian_input_is_accepted():
    x = _data(np.random.default_rng(13), (4, 3, 5), np.float32).astype(">f4")
    mean, var = batch_stats(x)
    ref_mean, ref_var = _ref_stats(x.astype(np.float32), 1)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# batch renorm


@pytest.mark.parametrize("shape,axis", [((8, 3, 5, 5), 1), ((8, 5, 5, 3), -1), ((40, 6), 1)])
def test_batch_renorm_matches_reference(shape, axis):
    rng = np.random.default_rng(14)
    C = shape[axis]
    x = _data(rng, shape, np.float64, loc=1.0, scale=3.0)
    w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
    # running stats chosen so some channels clip r and d and others do not
    rm = np.linspace(-20, 1.5, C)
    rv = np.linspace(0.1, 50, C)
    rm0, rv0 = rm.copy(), rv.copy()
    eps, rmax, dmax = 1e-5, 2.0, 1.5
    y, m, s, r, d = batch_renorm_train(x, w, b, rm, rv, momentum=0.1, eps=eps, rmax=rmax, dmax=dmax, axis=axis)
    ref_mean, ref_var = _ref_stats(x, axis)
    sig_b, sig = np.sqrt(ref_var + eps), np.sqrt(rv0 + eps)
    ref_r = np.clip(sig_b / sig, 1 / rmax, rmax)
    ref_d = np.clip((ref_mean - rm0) / sig, -dmax, dmax)
    assert np.any(ref_r == rmax) or np.any(ref_r == 1 / rmax)
    assert np.any(np.abs(ref_d) == dmax) and np.any(np.abs(ref_d) < dmax)
    bs = _bshape(x, axis)
    xhat = (x - ref_mean.reshape(bs)) / sig_b.reshape(bs)
    ref_y = w.reshape(bs) * (xhat * ref_r.reshape(bs) + ref_d.reshape(bs)) + b.reshape(bs)
    np.testing.assert_allclose(y, ref_y, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(r, ref_r, rtol=1e-12)
    np.testing.assert_allclose(d, ref_d, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m, ref_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s, 1 / sig_b, rtol=1e-12)
    n = x.size // C
    np.testing.assert_allclose(rm, 0.9 * rm0 + 0.1 * ref_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rv, 0.9 * rv0 + 0.1 * ref_var * n / (n - 1), rtol=1e-12)


def test_batch_renorm_without_clipping_equals_batch_norm():
    rng = np.random.default_rng(15)
    x = _data(rng, (16, 4, 6), np.float64)
    mean, var = _ref_stats(x, 1)
    # running stats equal to the batch's: r = 1, d = 0
    y, *_, r, d = batch_renorm_train(x, None, None, mean.copy(), var.copy(), eps=0.0)
    y_bn, _, _ = batch_norm_train(x, None, None, None, None, eps=0.0)
    np.testing.assert_allclose(r, 1.0, rtol=1e-12)
    np.testing.assert_allclose(d, 0.0, atol=1e-12)
    np.testing.assert_allclose(y, y_bn, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# validation


def test_bad_dtypes_raise_type_error_naming_the_argument():
    with pytest.raises(TypeError, match="x must be float32 or float64, got int64"):
        batch_stats(np.ones((4, 3), dtype=np.int64))
    with pytest.raises(TypeError, match="float16"):
        Moments.from_array(np.ones((4, 3), dtype=np.float16))
    x = np.ones((4, 3), np.float32)
    with pytest.raises(TypeError, match="running_var must be float32 or float64"):
        batch_norm_train(x, None, None, None, np.ones(3, dtype=np.int32))
    with pytest.raises(TypeError, match="running_mean must be a numpy array"):
        batch_norm_train(x, None, None, [0.0, 0.0, 0.0], None)
    with pytest.raises(TypeError, match="weight"):
        batch_norm_train(x, np.array(["a", "b", "c"]), None, None, None)
    with pytest.raises(TypeError, match="dy must have the dtype of x"):
        batch_norm_backward(np.ones((4, 3), np.float64), x, None, np.zeros(3), np.ones(3))
    with pytest.raises(TypeError, match="momentum"):
        batch_norm_train(x + np.eye(4, 3, dtype=np.float32), None, None, None, None, momentum="a")
    with pytest.raises(TypeError, match="n_threads"):
        batch_stats(x, n_threads=1.5)


def test_thread_counts_above_the_cpus_are_reduced_to_them(monkeypatch):
    from bnfold import _threads

    cpus = _threads.available_cpus()
    assert 1 <= cpus <= (os.cpu_count() or cpus)
    if bnfold.openmp_enabled():
        assert effective_n_threads(cpus) == cpus
        assert effective_n_threads(10**6) == cpus
        monkeypatch.setattr(_threads, "available_cpus", lambda: 1)
        assert effective_n_threads(None) == 1 and effective_n_threads(8) == 1
    # a huge request neither fails to start threads nor changes the result
    rng = np.random.default_rng(22)
    x, dy = rng.standard_normal((2, 40, 30, 30)), rng.standard_normal((2, 40, 30, 30))
    _, m, s = batch_norm_train(x, None, None, None, None)
    for a, b_ in zip(
        batch_norm_backward(dy, x, None, m, s, n_threads=200_000), batch_norm_backward(dy, x, None, m, s, n_threads=1)
    ):
        np.testing.assert_array_equal(a, b_)


def test_bad_shapes_and_values_raise_value_error():
    x = np.random.default_rng(16).standard_normal((4, 3, 2)).astype(np.float32)
    with pytest.raises(ValueError, match="empty"):
        batch_stats(np.ones((0, 3), np.float32))
    with pytest.raises(ValueError, match="empty"):
        batch_norm_train(np.ones((0, 3, 4), np.float32), None, None, None, None)
    with pytest.raises(ValueError, match="rank >= 2"):
        batch_stats(np.ones(5, np.float32))
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        batch_stats(x, axis=3)
    with pytest.raises(ValueError, match="axis -4 is out of range"):
        batch_norm_infer(x, None, None, np.zeros(3), np.ones(3), axis=-4)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        batch_norm_train(x, np.ones(4), None, None, None)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        batch_norm_infer(x, None, np.ones((3, 1)), np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match=r"running_mean must have shape \(3,\)"):
        batch_norm_train(x, None, None, np.zeros(2), None)
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\)"):
        batch_norm_infer(x, None, None, np.zeros(3), np.ones(5))
    with pytest.raises(ValueError, match="running_var is required"):
        batch_norm_infer(x, None, None, np.zeros(3), None)
    with pytest.raises(ValueError, match=r"save_invstd must have shape \(3,\)"):
        batch_norm_backward(x, x, None, np.zeros(3), np.ones(2))
    with pytest.raises(ValueError, match="dy must have the shape of x"):
        batch_norm_backward(x[:2], x, None, np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="eps"):
        batch_norm_train(x, None, None, None, None, eps=-1.0)
    with pytest.raises(ValueError, match="n_threads"):
        batch_stats(x, n_threads=0)
    with pytest.raises(ValueError, match="rmax"):
        batch_renorm_train(x, None, None, np.zeros(3), np.ones(3), rmax=0.5)
    with pytest.raises(ValueError, match="running_mean and running_var"):
        batch_renorm_train(x, None, None, None, np.ones(3))
    with pytest.raises(ValueError, match="running_var_ddof"):
        batch_norm_train(x, None, None, None, None, running_var_ddof=2)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, -np.inf, np.inf, np.nan, np.float32("nan"), 10**400])
def test_momentum_outside_0_1_or_nan_is_refused(momentum):
    x = np.random.default_rng(63).standard_normal((4, 3, 2)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match="momentum"):
        batch_norm_train(x, None, None, rm, rv, momentum=momentum)
    with pytest.raises(ValueError, match="momentum"):
        batch_renorm_train(x, None, None, rm, rv, momentum=momentum)
    with pytest.raises(ValueError, match="momentum"):
        bnfold.onnx_momentum(momentum)
    # nothing was modified by the refused calls
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


def test_momentum_bounds_keep_or_replace_the_running_stats():
    x = np.random.default_rng(64).standard_normal((4, 3, 2)).astype(np.float64)
    mean, var = _ref_stats(x, 1)
    rm, rv = np.full(3, 5.0), np.full(3, 2.0)
    batch_norm_train(x, None, None, rm, rv, momentum=0)
    np.testing.assert_array_equal(rm, 5.0)
    np.testing.assert_array_equal(rv, 2.0)
    batch_norm_train(x, None, None, rm, rv, momentum=1, running_var_ddof=0)
    np.testing.assert_allclose(rm, mean, rtol=1e-12)
    np.testing.assert_allclose(rv, var, rtol=1e-12)
    assert bnfold.onnx_momentum(0) == 1.0 and bnfold.onnx_momentum(1) == 0.0


def test_scalar_parameters_the_math_cannot_mean_are_refused():
    x = np.random.default_rng(65).standard_normal((4, 3, 2)).astype(np.float32)
    stats = (np.zeros(3, np.float32), np.ones(3, np.float32))
    calls = {
        "train": lambda **kw: batch_norm_train(x, None, None, *stats, **kw),
        "infer": lambda **kw: batch_norm_infer(x, None, None, *stats, **kw),
        "renorm": lambda **kw: batch_renorm_train(x, None, None, *stats, **kw),
    }
    for call in calls.values():
        for eps in (-1e-9, np.nan, np.inf, -np.inf):  # sqrt(var + eps) undefined, or y = bias
            with pytest.raises(ValueError, match="eps"):
                call(eps=eps)
        with pytest.raises(TypeError, match="eps"):
            call(eps="1e-5")
        with pytest.raises(TypeError, match="eps"):
            call(eps=np.array([1e-5]))
        call(eps=0.0)  # plain standardisation, as PyTorch and ONNX allow
        call(eps=np.float32(1e-3))
    for rmax in (0.5, 0.0, -1.0, np.nan, -np.inf):
        with pytest.raises(ValueError, match="rmax"):
            calls["renorm"](rmax=rmax)
    for dmax in (-0.1, np.nan, -np.inf):
        with pytest.raises(ValueError, match="dmax"):
            calls["renorm"](dmax=dmax)
    for ddof in (2, -1, True, 1.0, "1", None):
        with pytest.raises(ValueError, match="running_var_ddof"):
            calls["train"](running_var_ddof=ddof)
        with pytest.raises(ValueError, match="running_var_ddof"):
            calls["renorm"](running_var_ddof=ddof)


def test_batch_renorm_with_infinite_bounds_does_not_clip():
    rng = np.random.default_rng(66)
    x = _data(rng, (16, 4, 6), np.float64)
    mean, var = _ref_stats(x, 1)
    rm, rv = np.full(4, 50.0), np.full(4, 1e-4)  # far from the batch: r and d far beyond 3 and 5
    sigma = np.sqrt(rv + 1e-5)
    _, _, _, r, d = batch_renorm_train(x, None, None, rm.copy(), rv.copy(), rmax=np.inf, dmax=float("inf"))
    np.testing.assert_allclose(r, np.sqrt(var + 1e-5) / sigma, rtol=1e-12)
    np.testing.assert_allclose(d, (mean - rm) / sigma, rtol=1e-12)
    assert r.min() > 3 and np.abs(d).min() > 5


def test_running_stats_must_be_updatable_in_place():
    x = np.random.default_rng(17).standard_normal((4, 3, 2)).astype(np.float32)
    strided = np.zeros(6, np.float32)[::2]
    with pytest.raises(ValueError, match="running_mean must be a writeable contiguous"):
        batch_norm_train(x, None, None, strided, None)
    ro = np.ones(3, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="running_var must be a writeable contiguous"):
        batch_norm_train(x, None, None, None, ro)
    # nothing was modified by a call that failed validation
    rm = np.zeros(3, np.float32)
    with pytest.raises(ValueError):
        batch_norm_train(x, None, None, rm, np.ones(4, np.float32))
    assert np.all(rm == 0)


def test_bad_out_arrays():
    x = np.random.default_rng(18).standard_normal((4, 3, 2)).astype(np.float32)
    with pytest.raises(ValueError, match="out must have the input's shape"):
        batch_norm_train(x, None, None, None, None, out=np.empty((4, 3, 3), np.float32))
    with pytest.raises(ValueError, match="out must have the input's shape"):
        batch_norm_infer(x, None, None, np.zeros(3), np.ones(3), out=np.empty_like(x, np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        batch_norm_train(x, None, None, None, None, out=np.empty((2, 4, 3), np.float32).transpose(1, 2, 0))
    with pytest.raises(TypeError, match="out must be a numpy array"):
        batch_norm_train(x, None, None, None, None, out=[1, 2])


@pytest.mark.parametrize("shape,axis", [((1, 3), 1), ((1, 3, 1, 1), 1), ((1, 1, 1, 3), -1)])
def test_one_value_per_channel_in_training_is_an_error(shape, axis):
    x = np.ones(shape, np.float32)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        batch_norm_train(x, None, None, None, None, axis=axis)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        batch_renorm_train(x, None, None, np.zeros(3), np.ones(3), axis=axis)
    # statistics and inference are fine with a single value
    mean, var = batch_stats(x, axis=axis)
    assert np.all(var == 0) and np.all(mean == 1)
    batch_norm_infer(x, None, None, np.zeros(3), np.ones(3), axis=axis)


def test_public_names_exported():
    for name in (
        "Moments",
        "batch_stats",
        "batch_norm_train",
        "batch_norm_infer",
        "batch_norm_backward",
        "batch_renorm_train",
        "onnx_momentum",
    ):
        assert name in bnfold.__all__ and hasattr(bnfold, name)


@pytest.mark.parametrize("shape,axis", [((4, 3, 67, 71), 1), ((40, 33, 5, 5), 1), ((4, 37, 41, 5), -1)])
def test_portable_and_avx2_builds_agree(shape, axis, monkeypatch):
    from bnfold import _bn_kernels, kernels

    if not kernels._cpu_has_avx2_fma():
        pytest.skip("this CPU has no AVX2/FMA, the AVX2 build is never used here")
    from bnfold import _bn_kernels_avx2

    rng = np.random.default_rng(19)
    x = _data(rng, shape, np.float64)
    dy = _data(rng, shape, np.float64)
    results = []
    for module in (_bn_kernels, _bn_kernels_avx2):
        monkeypatch.setattr(kernels, "_k", module)
        y, m, s = batch_norm_train(x, None, None, None, None, axis=axis)
        results.append((y, m, s, *batch_norm_backward(dy, x, None, m, s, axis=axis)))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_kernel_module_choice_follows_cpu(monkeypatch):
    from bnfold import kernels

    monkeypatch.delenv("BNFOLD_KERNELS", raising=False)
    expected = "bnfold._bn_kernels_avx2" if kernels._cpu_has_avx2_fma() else "bnfold._bn_kernels"
    assert kernels._select_kernels().__name__ == expected
    monkeypatch.setenv("BNFOLD_KERNELS", "baseline")
    assert kernels._select_kernels().__name__ == "bnfold._bn_kernels"


def test_large_outputs_never_share_memory_with_arrays_still_held():
    # outputs >= 1 MiB come from a cache of reusable buffers: a buffer may be handed out again
    # only once nothing refers to it any more (not even a view of a previous output)
    from bnfold import kernels

    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 64, 128, 128)).astype(np.float32)  # 16.8 MB
    C = x.shape[1]
    w, b, m, v = np.ones(C), np.zeros(C), np.zeros(C), np.ones(C)
    y1 = batch_norm_infer(x, w, b, m, v)
    expected = y1.copy()
    y2 = batch_norm_infer(x * 2, w, b, m, v)
    assert not np.shares_memory(y1, y2)
    view = y2[1:3]
    view_expected = view.copy()
    del y2
    y3, _, _ = batch_norm_train(x * 3, None, None, None, None)
    dx, _, _ = batch_norm_backward(x, x, w, np.zeros(C), np.ones(C))
    for held, value in ((y1, expected), (view, view_expected)):
        assert not np.shares_memory(held, y3) and not np.shares_memory(held, dx)
        np.testing.assert_array_equal(held, value)
    # once dropped, a buffer is reused and the new result is still right
    del y1, view
    y4 = batch_norm_infer(x, w, b, m, v)
    np.testing.assert_array_equal(y4, expected)
    kernels.clear_output_cache()


def test_output_cache_can_be_off(monkeypatch):
    from bnfold import kernels

    monkeypatch.setattr(kernels, "_CACHE_MAX_BYTES", 0)
    x = np.ones((4, 64, 128, 128), np.float32)
    C = x.shape[1]
    y = batch_norm_infer(x, None, None, np.zeros(C), np.ones(C))
    assert y.flags.owndata  # a plain np.empty, not a view of a cached buffer
