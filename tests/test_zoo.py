"""bnfold.demo.zoo: the built-in models are valid, deterministic, and their BN statistics are real."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from bnfold.demo import zoo


def _bn_stats(model):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {
        n.name: (inits[n.input[3]], inits[n.input[4]]) for n in model.graph.node if n.op_type == "BatchNormalization"
    }


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_demo_cnn_structure_and_calibrated_stats():
    model = zoo.build_demo_cnn(image_size=16, width=8, num_classes=5)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8 and model.opset_import[0].version == 17
    assert model.graph.input[0].name == "input"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("BatchNormalization") == 10
    assert any(
        n.op_type == "Conv" and any(a.name == "group" and a.i == 8 for a in n.attribute) for n in model.graph.node
    )
    assert ops.count("Add") == 2 and "Gemm" in ops
    stats = _bn_stats(model)
    # Statistics come from data: neither the 0/1 placeholders nor equal across channels.
    for name, (mean, var) in stats.items():
        assert np.all(var > 0), name
        assert not np.allclose(var, 1.0) and not np.allclose(mean, 0.0), name
    # The stem BN normalizes what it sees: its input, on fresh data, has about those statistics.
    x = np.random.default_rng(5).standard_normal((64, 3, 16, 16)).astype(np.float32)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info("stem.conv", onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    conv_out = session.run(["stem.conv"], {"input": x})[0]
    mean, var = stats["stem.bn"]
    np.testing.assert_allclose(conv_out.mean(axis=(0, 2, 3)), mean, atol=0.15 * np.sqrt(var.max()))
    np.testing.assert_allclose(conv_out.var(axis=(0, 2, 3)), var, rtol=0.15)


def test_demo_cnn_is_deterministic_and_seeded():
    a = zoo.build_demo_cnn(image_size=16, width=4, seed=1)
    b = zoo.build_demo_cnn(image_size=16, width=4, seed=1)
    c = zoo.build_demo_cnn(image_size=16, width=4, seed=2)
    assert a.SerializeToString() == b.SerializeToString()
    assert a.SerializeToString() != c.SerializeToString()
    uncalibrated = _bn_stats(zoo.build_demo_cnn(image_size=16, width=4, calibrate=False))
    assert all(np.all(m == 0) and np.all(v == 1) for m, v in uncalibrated.values())


@pytest.mark.parametrize("depth, n_conv_bn", [(18, 20), (50, 53)])
def test_resnet_structure(depth, n_conv_bn):
    model = zoo.build_resnet(depth=depth, image_size=32, num_classes=7, width=8)
    onnx.checker.check_model(model)
    nodes = {n.output[0]: n for n in model.graph.node}
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == n_conv_bn
    assert all(nodes[bn.input[0]].op_type == "Conv" for bn in bns)
    for _mean, var in _bn_stats(model).values():
        assert np.all(var > 0) and np.unique(var).size == var.size
    y = _run(model, np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    assert y.shape == (2, 7) and np.all(np.isfinite(y))
    # Random statistics sit at the scale of the BN inputs, so activations do not explode with depth.
    assert np.abs(y).max() < 1e3


def test_resnet50_size():
    model = zoo.build_resnet(depth=50)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer if "running" not in t.name)
    assert 25_000_000 < params < 26_000_000


def test_resnet_calibrated_stats_differ_from_random():
    random_stats = _bn_stats(zoo.build_resnet(depth=18, image_size=32, width=4))
    calibrated = _bn_stats(zoo.build_resnet(depth=18, image_size=32, width=4, stats="calibrated"))
    assert random_stats.keys() == calibrated.keys()
    assert any(not np.allclose(random_stats[k][1], calibrated[k][1]) for k in random_stats)
    assert all(np.all(v > 0) for _, v in calibrated.values())


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        zoo.build_resnet(depth=42)
    with pytest.raises(ValueError, match="stats"):
        zoo.build_resnet(depth=18, stats="zeros")
    with pytest.raises(ValueError, match="width"):
        zoo.build_demo_cnn(width=0)
