"""Reproducers found by hostile testing of the fold rules, each kept as a test once fixed."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold

RNG = np.random.default_rng(11)


def _run(model, x):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _gemm_beta0_model(c_value, after):
    """x (3, 4) -> Gemm(B, C; beta = 0) -> ``after`` (a per-column Mul, or a BN) -> y."""
    m, k, n = 3, 4, 5
    inits = [
        numpy_helper.from_array(RNG.normal(size=(k, n)).astype(np.float32), "B"),
        numpy_helper.from_array(np.full((n,), c_value, np.float32), "C"),
    ]
    nodes = [helper.make_node("Gemm", ["x", "B", "C"], ["g"], beta=0.0, alpha=0.5)]
    if after == "Mul":
        inits.append(numpy_helper.from_array(RNG.uniform(0.5, 1.5, n).astype(np.float32), "s"))
        nodes.append(helper.make_node("Mul", ["g", "s"], ["y"]))
    else:
        for name, value in (
            ("gamma", RNG.uniform(0.5, 1.5, n)),
            ("beta", RNG.normal(size=n)),
            ("mean", RNG.normal(size=n)),
            ("var", RNG.uniform(0.5, 1.5, n)),
        ):
            inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        nodes.append(helper.make_node("BatchNormalization", ["g", "gamma", "beta", "mean", "var"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "gemm_beta0",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        inits,
    )
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 15)])


@pytest.mark.parametrize("after", ["Mul", "BatchNormalization"])
@pytest.mark.parametrize("c_value", [np.inf, np.nan, 3.0])
def test_gemm_beta_zero_ignores_c(after, c_value):
    """Gemm with beta = 0 adds nothing of C (onnxruntime, like BLAS, does not read it), so a C
    holding Inf / NaN must not make the folded C' = beta * C * s + t (0 * Inf) NaN."""
    model = _gemm_beta0_model(c_value, after)
    folded, report = bnfold.fold(model)
    onnx.checker.check_model(folded, full_check=True)
    assert len(report.folded) == 1
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    expected, got = _run(model, x), _run(folded, x)
    assert np.all(np.isfinite(expected))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(expected))))


@pytest.mark.parametrize("c_value", [np.inf, np.nan])
def test_gemm_beta_zero_ignores_c_forward(c_value):
    """The forward fold (BN -> Gemm with beta = 0) computes C'' = beta * C + t B: C must not enter it."""
    m, k, n = 3, 4, 5
    inits = [
        numpy_helper.from_array(RNG.normal(size=(k, n)).astype(np.float32), "B"),
        numpy_helper.from_array(np.full((1, n), c_value, np.float32), "C"),
    ]
    for name, value in (
        ("gamma", RNG.uniform(0.5, 1.5, k)),
        ("beta", RNG.normal(size=k)),
        ("mean", RNG.normal(size=k)),
        ("var", RNG.uniform(0.5, 1.5, k)),
    ):
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
    nodes = [
        helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["b"]),
        helper.make_node("Gemm", ["b", "B", "C"], ["y"], beta=0.0),
    ]
    graph = helper.make_graph(
        nodes,
        "bn_gemm_beta0",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        inits,
    )
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 15)])
    folded, report = bnfold.fold(model)
    onnx.checker.check_model(folded, full_check=True)
    assert [f.rule for f in report.folded] == ["bn_gemm"]
    x = RNG.normal(size=(m, k)).astype(np.float32)
    expected, got = _run(model, x), _run(folded, x)
    assert np.all(np.isfinite(expected))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(expected))))


def test_precision_search_leaves_folds_in_graph_order(tmp_path):
    """fold_file's precision search leaves "the first k" float16 folds unfolded, the early layers
    (whose rounding the rest amplify) first: a decomposed BN early in the graph comes before a BN
    node late in it, whatever their kinds."""
    channels = 4
    f16 = np.float16
    inits = [
        numpy_helper.from_array(RNG.normal(size=(channels, 3, 3, 3)).astype(f16), "W1"),
        numpy_helper.from_array(RNG.uniform(0.5, 1.5, (channels, 1, 1)).astype(f16), "s1"),
        numpy_helper.from_array(RNG.normal(size=(channels, 1, 1)).astype(f16), "t1"),
        numpy_helper.from_array(RNG.normal(size=(channels, channels, 1, 1)).astype(f16), "W2"),
    ]
    for name, value in (
        ("gamma", RNG.uniform(0.5, 1.5, channels)),
        ("beta", RNG.normal(size=channels)),
        ("mean", RNG.normal(size=channels)),
        ("var", RNG.uniform(0.5, 1.5, channels)),
    ):
        inits.append(numpy_helper.from_array(value.astype(f16), name))
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c1", "s1"], ["m1"], name="early_mul"),
        helper.make_node("Add", ["m1", "t1"], ["a1"], name="early_add"),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2"], ["c2"]),
        helper.make_node("BatchNormalization", ["c2", "gamma", "beta", "mean", "var"], ["y"], name="late_bn"),
    ]
    graph = helper.make_graph(
        nodes,
        "order",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, channels, 6, 6])],
        inits,
    )
    source = tmp_path / "in.onnx"
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 15)]), source)

    def verify(path):  # the early layer's fold is the one that costs precision
        return "early_add" in {n.name for n in onnx.load(path).graph.node}

    report = bnfold.fold_file(source, tmp_path / "out.onnx", verify=verify)
    assert [(r.bn, r.reason) for r in report.remaining] == [("early_add", "would_lose_precision")]
    assert [f.bn for f in report.folded] == ["late_bn"]
    assert "before it" not in report.remaining[0].message
