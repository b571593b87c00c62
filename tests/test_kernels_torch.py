"""bnfold kernels against PyTorch's F.batch_norm: forward, running-statistics update and
autograd backward, NCHW and channels-last, ranks 2..5, float32 and float64."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from bnfold import batch_norm_backward, batch_norm_infer, batch_norm_train, batch_stats  # noqa: E402

CASES = [
    ((9, 3), 1),
    ((6, 1), 1),
    ((4, 3, 7), 1),
    ((4, 7, 3), -1),
    ((3, 3, 5, 7), 1),
    ((3, 5, 7, 3), -1),
    ((1, 3, 6, 5), 1),
    ((1, 6, 5, 3), -1),
    ((7, 4, 1, 1), 1),
    ((2, 3, 3, 4, 5), 1),
    ((2, 3, 4, 5, 3), -1),
    ((4, 5, 33, 37), 1),
    ((4, 33, 37, 5), -1),
]


def _to_torch_channels_first(a, axis):
    """A torch tensor with the channel axis at dim 1, sharing a's memory (channels-last layout
    when the numpy channel axis is last)."""
    t = torch.from_numpy(a)
    if axis % a.ndim != 1:
        t = t.movedim(-1, 1)
    return t


def _from_torch(t, axis, ndim):
    if axis % ndim != 1:
        t = t.movedim(1, -1)
    return t.detach().contiguous().numpy()


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", CASES)
def test_forward_running_stats_and_backward_match_torch(shape, axis, dtype):
    rng = np.random.default_rng(0)
    C = shape[axis]
    x = (rng.standard_normal(shape) * 1.5 + 0.3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 2.0, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    rm = rng.standard_normal(C).astype(dtype)
    rv = rng.uniform(0.5, 2.0, C).astype(dtype)
    momentum, eps = 0.3, 1e-4

    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    tx = _to_torch_channels_first(x.copy(), axis).requires_grad_(True)
    tw = torch.from_numpy(w.copy()).requires_grad_(True)
    tb = torch.from_numpy(b.copy()).requires_grad_(True)
    ty = F.batch_norm(tx, trm, trv, tw, tb, training=True, momentum=momentum, eps=eps)
    ty.backward(_to_torch_channels_first(dy, axis))

    y, save_mean, save_invstd = batch_norm_train(x, w, b, rm, rv, momentum=momentum, eps=eps, axis=axis)
    np.testing.assert_allclose(y, _from_torch(ty, axis, x.ndim), **_tol(dtype))
    np.testing.assert_allclose(rm, trm.numpy(), **_tol(dtype))
    np.testing.assert_allclose(rv, trv.numpy(), **_tol(dtype))

    dx, dw, db = batch_norm_backward(dy, x, w, save_mean, save_invstd, axis=axis)
    np.testing.assert_allclose(dx, _from_torch(tx.grad, axis, x.ndim), **_tol(dtype))
    np.testing.assert_allclose(dw, tw.grad.numpy(), **_tol(dtype))
    np.testing.assert_allclose(db, tb.grad.numpy(), **_tol(dtype))

    yi = batch_norm_infer(x, w, b, rm, rv, eps=eps, axis=axis)
    tyi = F.batch_norm(
        _to_torch_channels_first(x, axis), trm, trv, torch.from_numpy(w), torch.from_numpy(b), training=False, eps=eps
    )
    np.testing.assert_allclose(yi, _from_torch(tyi, axis, x.ndim), **_tol(dtype))


@pytest.mark.parametrize("shape,axis", [((8, 3, 16, 16), 1), ((8, 16, 16, 3), -1), ((64, 10), 1)])
def test_batch_stats_match_torch_var_mean(shape, axis):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    dims = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    tvar, tmean = torch.var_mean(torch.from_numpy(x).double(), dim=dims, correction=0)
    mean, var = batch_stats(x, axis=axis)
    np.testing.assert_allclose(mean, tmean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, tvar.numpy(), rtol=1e-5)


def test_weight_and_bias_none_match_torch():
    x = np.random.default_rng(2).standard_normal((5, 4, 6)).astype(np.float64)
    ty = F.batch_norm(torch.from_numpy(x), None, None, None, None, training=True)
    y, _, _ = batch_norm_train(x, None, None, None, None)
    np.testing.assert_allclose(y, ty.numpy(), rtol=1e-10, atol=1e-10)


def test_torch_also_rejects_one_value_per_channel():
    x = np.ones((1, 3), np.float32)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        F.batch_norm(torch.from_numpy(x), None, None, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        batch_norm_train(x, None, None, None, None)
