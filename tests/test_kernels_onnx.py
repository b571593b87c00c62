"""bnfold kernels against ONNX BatchNormalization semantics (onnx.reference.ReferenceEvaluator,
opset 15): inference mode, and training mode's output and running statistics after the documented
conversion (momentum -> onnx_momentum(momentum), running_var_ddof=0)."""

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from bnfold import batch_norm_infer, batch_norm_train, onnx_momentum

ONNX_DTYPES = {np.float32: TensorProto.FLOAT, np.float64: TensorProto.DOUBLE}


def _bn_model(rank, dtype, training, momentum=0.9, epsilon=1e-5):
    elem = ONNX_DTYPES[dtype]
    inputs = [helper.make_tensor_value_info("X", elem, [None] * rank)] + [
        helper.make_tensor_value_info(name, elem, [None]) for name in ("scale", "B", "input_mean", "input_var")
    ]
    outputs = [helper.make_tensor_value_info("Y", elem, [None] * rank)]
    node_outputs = ["Y"]
    if training:
        node_outputs += ["running_mean", "running_var"]
        outputs += [helper.make_tensor_value_info(n, elem, [None]) for n in node_outputs[1:]]
    node = helper.make_node(
        "BatchNormalization",
        ["X", "scale", "B", "input_mean", "input_var"],
        node_outputs,
        epsilon=epsilon,
        momentum=momentum,
        training_mode=int(training),
    )
    graph = helper.make_graph([node], "bn", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return model


def _params(rng, C, dtype):
    return (
        rng.uniform(0.5, 2.0, C).astype(dtype),
        rng.standard_normal(C).astype(dtype),
        rng.standard_normal(C).astype(dtype),
        rng.uniform(0.5, 2.0, C).astype(dtype),
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 5), (2, 4, 5, 7), (1, 3, 2, 3, 4), (3, 1, 1, 1)])
def test_inference_matches_onnx_reference(shape, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    scale, bias, mean, var = _params(rng, shape[1], dtype)
    (ref,) = ReferenceEvaluator(_bn_model(len(shape), dtype, training=False)).run(
        None, {"X": x, "scale": scale, "B": bias, "input_mean": mean, "input_var": var}
    )
    y = batch_norm_infer(x, scale, bias, mean, var, eps=1e-5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, ref, **tol)
    # channels-last input gives the same numbers
    y_last = batch_norm_infer(np.ascontiguousarray(np.moveaxis(x, 1, -1)), scale, bias, mean, var, eps=1e-5, axis=-1)
    np.testing.assert_allclose(np.moveaxis(y_last, -1, 1), ref, **tol)


@pytest.mark.parametrize("onnx_m", [0.9, 0.3])
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5, 6), (2, 2, 3, 4, 2)])
def test_training_running_stats_match_onnx_after_conversion(shape, onnx_m):
    rng = np.random.default_rng(1)
    dtype = np.float64
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    scale, bias, mean, var = _params(rng, shape[1], dtype)
    ref_y, ref_rm, ref_rv = ReferenceEvaluator(_bn_model(len(shape), dtype, training=True, momentum=onnx_m)).run(
        None, {"X": x, "scale": scale, "B": bias, "input_mean": mean, "input_var": var}
    )

    # ONNX stores float attributes as float32: use the value the node really holds.
    onnx_m = float(np.float32(onnx_m))
    rm, rv = mean.copy(), var.copy()
    y, _, _ = batch_norm_train(
        x, scale, bias, rm, rv, momentum=onnx_momentum(onnx_m), eps=float(np.float32(1e-5)), running_var_ddof=0
    )
    np.testing.assert_allclose(y, ref_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rm, ref_rm, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rv, ref_rv, rtol=1e-12, atol=1e-12)

    # The PyTorch default (unbiased running_var) differs from ONNX by the Bessel factor on the
    # batch term, which is why the conversion needs running_var_ddof=0.
    rm2, rv2 = mean.copy(), var.copy()
    batch_norm_train(x, scale, bias, rm2, rv2, momentum=onnx_momentum(onnx_m))
    n = x.size // shape[1]
    np.testing.assert_allclose(rm2, ref_rm, rtol=1e-12, atol=1e-12)
    batch_var = (ref_rv - onnx_m * var) / (1 - onnx_m)
    np.testing.assert_allclose(rv2, onnx_m * var + (1 - onnx_m) * batch_var * n / (n - 1), rtol=1e-12)
    assert not np.allclose(rv2, ref_rv, rtol=1e-6)


def test_onnx_momentum_is_its_own_inverse():
    assert onnx_momentum(0.1) == pytest.approx(0.9)
    assert onnx_momentum(onnx_momentum(0.25)) == pytest.approx(0.25)
    with pytest.raises(TypeError, match="momentum"):
        onnx_momentum(None)
