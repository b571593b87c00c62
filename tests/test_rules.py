"""Unit tests of the fold rules and the driver on tiny hand-built graphs.

Positive tests: the BN is gone, onnx.checker (full check) passes, and onnxruntime (graph
optimizations disabled, so its own fusion cannot hide a wrong fold) gives the same outputs as the
original within 1e-5 relative for float32. Negative tests: the BN stays with the expected reason.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.folding.fold_pass import REASON_CODES, RULE_CODES
from bnfold.io import load_model, save_model_atomic

F = TensorProto.FLOAT
ort.set_default_logger_severity(3)


# ----- builders ------------------------------------------------------------------------------
class G:
    """Tiny graph builder: random float constants, nodes, and a model with a fixed IR version."""

    def __init__(self, seed=0, elem=F):
        self.rng = np.random.default_rng(seed)
        self.elem = elem
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []

    def const(self, name, shape, positive=False, elem=None, array=None):
        value = array if array is not None else self.rng.standard_normal(shape)
        if positive:
            value = np.abs(value) + 0.5
        elem = elem or self.elem
        np_type = ml_dtypes.bfloat16 if elem == TensorProto.BFLOAT16 else helper.tensor_dtype_to_np_dtype(elem)
        self.inits.append(numpy_helper.from_array(np.asarray(value).astype(np_type), name))
        return name

    def node(self, op, inputs, outputs, name=None, **attrs):
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def bn(self, x, y, c, name="bn", params_elem=None, **attrs):
        p = [
            self.const(f"{name}_{k}", (c,), positive=k in ("scale", "var"), elem=params_elem)
            for k in ("scale", "B", "mean", "var")
        ]
        return self.node("BatchNormalization", [x] + p, [y], name=name, **attrs)

    def input(self, name, shape, elem=None):
        self.inputs.append(helper.make_tensor_value_info(name, elem or self.elem, shape))
        return name

    def model(self, outputs, opset=17, ir_version=8):
        outs = [helper.make_tensor_value_info(name, self.elem, shape) for name, shape in outputs]
        graph = helper.make_graph(self.nodes, "g", self.inputs, outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = ir_version
        if ir_version < 4:  # IR 3 lists every initializer as a graph input too
            model.graph.input.extend(
                helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in model.graph.initializer
            )
        # The full checker wants output shapes: take the ones onnx infers where none were given.
        inferred = onnx.shape_inference.infer_shapes(model)
        known = {
            v.name: v
            for v in list(inferred.graph.value_info) + list(inferred.graph.output)
            if v.type.tensor_type.HasField("shape")
        }
        for out in model.graph.output:
            if not out.type.tensor_type.HasField("shape") and out.name in known:
                out.CopyFrom(known[out.name])
        return model


def feeds_for(model, seed=1):
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        shape = [d.dim_value or 1 for d in t.shape.dim]
        np_type = helper.tensor_dtype_to_np_dtype(t.elem_type)
        feeds[i.name] = (rng.random(shape) < 0.5) if np_type == np.bool_ else rng.standard_normal(shape).astype(np_type)
    return feeds


def run(model, feeds, engine="ort"):
    if engine == "reference":
        from onnx.reference import ReferenceEvaluator

        return [np.asarray(o) for o in ReferenceEvaluator(model).run(None, feeds)]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_same(reference, candidate, rtol):
    for r, c in zip(reference, candidate):
        assert r.shape == c.shape and r.dtype == c.dtype
        r64, c64 = np.asarray(r, np.float64), np.asarray(c, np.float64)
        scale = np.max(np.abs(r64))
        assert np.max(np.abs(r64 - c64)) <= rtol * scale, (np.max(np.abs(r64 - c64)), scale)


def fold_and_check(model, *, n_folded, rule=None, engine="ort", rtol=1e-5, forward=True):
    """Fold; assert checker, parity, kept interface, idempotence and the original untouched."""
    before = model.SerializeToString()
    folded, report = bnfold.fold(model, forward=forward)
    assert model.SerializeToString() == before, "fold must not mutate the caller's model"
    assert report.n_folded == n_folded, report.to_dict()
    if rule is not None:
        assert {f.rule for f in report.folded} == {rule}
    bn_left = sum(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert bn_left == report.n_remaining or any(
        n.attribute and n.op_type in ("If", "Loop", "Scan") for n in folded.graph.node
    )
    onnx.checker.check_model(folded, full_check=True)
    assert folded.ir_version == model.ir_version
    assert [(o.domain, o.version) for o in folded.opset_import] == [(o.domain, o.version) for o in model.opset_import]
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    feeds = feeds_for(model)
    assert_same(run(model, feeds, engine), run(folded, feeds, engine), rtol)
    again, second = bnfold.fold(folded, forward=forward)
    assert second.n_folded == 0
    assert again.SerializeToString() == folded.SerializeToString(), "a second fold must change nothing"
    return folded, report


def remaining_reason(model, **kwargs):
    folded, report = bnfold.fold(model, **kwargs)
    assert report.n_folded == 0 and report.n_remaining == 1, report.to_dict()
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == 1
    entry = report.remaining[0]
    assert entry.reason in REASON_CODES and entry.message
    return entry.reason


# ----- backward rules ------------------------------------------------------------------------
CONV_CASES = [
    dict(spatial=(5,), kernel=(3,), attrs=dict(pads=[1, 1])),
    dict(spatial=(6, 5), kernel=(3, 3), attrs=dict(strides=[2, 1], dilations=[1, 2], pads=[0, 1, 2, 0])),
    dict(spatial=(4, 4, 3), kernel=(2, 2, 1), attrs=dict(auto_pad="SAME_UPPER")),
    dict(spatial=(5, 5), kernel=(3, 3), group=2, bias=False, attrs=dict(auto_pad="VALID")),
    dict(spatial=(5, 5), kernel=(3, 3), group=4, cout=4, attrs=dict(pads=[1, 1, 1, 1])),  # depthwise
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_bn(case):
    g = G()
    cin, cout, group = 4, case.get("cout", 6), case.get("group", 1)
    x = g.input("x", [2, cin, *case["spatial"]])
    inputs = [x, g.const("W", (cout, cin // group, *case["kernel"]))]
    if case.get("bias", True):
        inputs.append(g.const("b", (cout,)))
    g.node("Conv", inputs, ["c"], name="conv", group=group, **case["attrs"])
    g.bn("c", "y", cout)
    folded, report = fold_and_check(g.model([("y", None)]), n_folded=1, rule="conv_bn")
    assert report.folded[0].target == "conv"
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


def test_conv_bn_math_matches_the_formula():
    g = G(3)
    g.input("x", [1, 2, 3, 3])
    g.node("Conv", ["x", g.const("W", (3, 2, 1, 1)), g.const("b", (3,))], ["c"], name="conv")
    g.bn("c", "y", 3, epsilon=1e-3)
    model = g.model([("y", [1, 3, 3, 3])])
    folded, _ = bnfold.fold(model)
    value = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    s = value["bn_scale"] / np.sqrt(value["bn_var"] + 1e-3)
    new = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    conv = folded.graph.node[0]
    np.testing.assert_allclose(new[conv.input[1]], (value["W"] * s[:, None, None, None]).astype(np.float32), rtol=1e-7)
    np.testing.assert_allclose(
        new[conv.input[2]], ((value["b"] - value["bn_mean"]) * s + value["bn_B"]).astype(np.float32), rtol=1e-7
    )


@pytest.mark.parametrize(
    "group,bias,spatial,attrs",
    [
        (1, True, (4, 4), {}),
        (2, True, (3, 4), dict(strides=[2, 2], output_padding=[1, 0])),
        (2, False, (5,), dict(strides=[2], pads=[1, 0])),
    ],
)
def test_convtranspose_bn(group, bias, spatial, attrs):
    g = G(1)
    cin, cout_g = 4, 3
    g.input("x", [1, cin, *spatial])
    inputs = ["x", g.const("W", (cin, cout_g, *([2] * len(spatial))))]
    if bias:
        inputs.append(g.const("b", (cout_g * group,)))
    g.node("ConvTranspose", inputs, ["c"], name="deconv", group=group, **attrs)
    g.bn("c", "y", cout_g * group)
    fold_and_check(g.model([("y", None)]), n_folded=1, rule="convtranspose_bn")


@pytest.mark.parametrize(
    "trans_a,trans_b,alpha,beta,c_shape",
    [
        (0, 0, 1.0, 1.0, None),
        (1, 0, 0.5, 2.0, (4,)),
        (0, 1, 1.5, 0.25, (1, 4)),
        (1, 1, 2.0, 3.0, (3, 4)),
        (0, 1, 1.0, -1.0, (3, 1)),
        (0, 0, 0.7, 1.3, ()),
    ],
)
def test_gemm_bn(trans_a, trans_b, alpha, beta, c_shape):
    g = G(2)
    m, k, n = 3, 5, 4
    g.input("a", [k, m] if trans_a else [m, k])
    inputs = ["a", g.const("B", (n, k) if trans_b else (k, n))]
    if c_shape is not None:
        inputs.append(g.const("C", c_shape))
    g.node("Gemm", inputs, ["z"], name="fc", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    g.bn("z", "y", n)
    folded, _ = fold_and_check(g.model([("y", [m, n])]), n_folded=1, rule="gemm_bn")
    gemm = folded.graph.node[0]
    assert {a.name for a in gemm.attribute} <= {"transA", "transB"}  # alpha and beta absorbed


def test_matmul_bn_becomes_gemm():
    g = G(4)
    g.input("a", [3, 5])
    g.node("MatMul", ["a", g.const("B", (5, 4))], ["z"], name="mm")
    g.bn("z", "y", 4)
    folded, report = fold_and_check(g.model([("y", [3, 4])]), n_folded=1, rule="matmul_bn")
    assert [n.op_type for n in folded.graph.node] == ["Gemm"] and report.folded[0].target == "mm"


def test_per_channel_chain_is_absorbed():
    g = G(5)
    g.input("x", [1, 3, 4, 4])
    g.node("Conv", ["x", g.const("W", (3, 3, 1, 1))], ["c"], name="conv")
    g.node("Mul", ["c", g.const("k", ())], ["c1"], name="mul_scalar")
    g.node("Add", [g.const("bias", (3, 1, 1)), "c1"], ["c2"], name="add_first")
    g.node("Sub", ["c2", g.const("off", (1, 3, 1, 1))], ["c3"], name="sub")
    g.node("Sub", [g.const("flip", (3, 1, 1)), "c3"], ["c4"], name="sub_flip")
    g.node("Div", ["c4", g.const("d", (3, 1, 1), positive=True)], ["c5"], name="div")
    g.bn("c5", "y", 3)
    folded, report = fold_and_check(g.model([("y", None)]), n_folded=1, rule="conv_bn")
    assert report.folded[0].absorbed == ("mul_scalar", "add_first", "sub", "sub_flip", "div")
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


def test_vector_constant_is_per_channel_for_rank2_outputs_only():
    g = G(6)
    g.input("a", [3, 5])
    g.node("Gemm", ["a", g.const("B", (5, 4))], ["z"], name="fc")
    g.node("Add", ["z", g.const("v", (4,))], ["z2"], name="add")
    g.bn("z2", "y", 4)
    fold_and_check(g.model([("y", [3, 4])]), n_folded=1, rule="gemm_bn")


def test_bn_chain_folds_to_a_fixed_point():
    g = G(7)
    g.input("x", [1, 3, 4, 4])
    g.node("Conv", ["x", g.const("W", (3, 3, 3, 3))], ["c"], name="conv", pads=[1, 1, 1, 1])
    g.bn("c", "b1", 3, name="bn1")
    g.bn("b1", "b2", 3, name="bn2")
    fold_and_check(g.model([("b2", None)]), n_folded=2, rule="conv_bn")


# ----- forward rules -------------------------------------------------------------------------
@pytest.mark.parametrize("trans_b,alpha,beta,with_c", [(0, 1.0, 1.0, False), (1, 0.5, 2.0, True), (0, 2.0, 0.3, True)])
def test_bn_gemm(trans_b, alpha, beta, with_c):
    g = G(8)
    g.input("x", [3, 5])
    g.bn("x", "n", 5)
    inputs = ["n", g.const("B", (4, 5) if trans_b else (5, 4))] + ([g.const("C", (4,))] if with_c else [])
    g.node("Gemm", inputs, ["y"], name="fc", transB=trans_b, alpha=alpha, beta=beta)
    fold_and_check(g.model([("y", [3, 4])]), n_folded=1, rule="bn_gemm")


def test_bn_matmul_and_chained_forward_folds():
    g = G(9)
    g.input("x", [3, 5])
    g.bn("x", "n1", 5, name="bn1")
    g.bn("n1", "n2", 5, name="bn2")  # bn1 can fold only after bn2 has folded into the MatMul
    g.node("MatMul", ["n2", g.const("B", (5, 4))], ["y"], name="mm")
    folded, report = fold_and_check(g.model([("y", [3, 4])]), n_folded=2)
    assert [(f.bn, f.rule) for f in report.folded] == [("bn1", "bn_gemm"), ("bn2", "bn_matmul")]
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]


@pytest.mark.parametrize("group,attrs", [(1, {}), (2, dict(auto_pad="VALID", strides=[2, 2])), (4, dict(pads=[0] * 4))])
def test_bn_conv_without_padding(group, attrs):
    g = G(10)
    g.input("x", [1, 4, 5, 5])
    g.bn("x", "n", 4)
    g.node(
        "Conv",
        ["n", g.const("W", (6 if group != 4 else 4, 4 // group, 3, 3)), g.const("b", (6 if group != 4 else 4,))],
        ["y"],
        name="conv",
        group=group,
        **attrs,
    )
    fold_and_check(g.model([("y", None)]), n_folded=1, rule="bn_conv")


def test_forward_false_keeps_forward_candidates():
    g = G(11)
    g.input("x", [3, 5])
    g.bn("x", "n", 5)
    g.node("Gemm", ["n", g.const("B", (5, 4))], ["y"], name="fc")
    assert remaining_reason(g.model([("y", [3, 4])]), forward=False) == "no_foldable_neighbour"


# ----- negative conditions -------------------------------------------------------------------
def conv_then_bn(g, c=3, **bn_attrs):
    g.input("x", [1, 3, 4, 4])
    g.node("Conv", ["x", g.const("W", (c, 3, 1, 1))], ["c"], name="conv")
    return g.bn("c", "y", c, **bn_attrs)


def test_training_mode_variants():
    g = G()
    conv_then_bn(g, training_mode=1)
    assert remaining_reason(g.model([("y", None)], opset=15)) == "training_mode"
    g = G()
    g.input("x", [1, 3, 4, 4])
    g.node("Conv", ["x", g.const("W", (3, 3, 1, 1))], ["c"], name="conv")
    p = [g.const(f"p{k}", (3,), positive=True) for k in range(4)]
    g.node("BatchNormalization", ["c", *p], ["y", "rm", "rv"], name="bn")
    assert remaining_reason(g.model([("y", None)], opset=9)) == "training_mode"
    g = G()
    conv_then_bn(g, is_test=0)
    assert remaining_reason(g.model([("y", None)], opset=6, ir_version=3)) == "training_mode"


def test_spatial_zero():
    g = G()
    conv_then_bn(g, spatial=0)
    assert remaining_reason(g.model([("y", None)], opset=7, ir_version=3)) == "spatial_mode"


def test_bn_params_must_be_constants():
    g = G()
    g.input("x", [1, 3, 4, 4])
    g.node("Conv", ["x", g.const("W", (3, 3, 1, 1))], ["c"], name="conv")
    p = [g.const(f"p{k}", (3,), positive=True) for k in range(3)] + [g.input("var", [3])]
    g.node("BatchNormalization", ["c", *p], ["y"], name="bn")
    assert remaining_reason(g.model([("y", None)])) == "non_constant_params"


def test_overridable_initializer_is_not_a_constant():
    g = G()
    conv_then_bn(g)
    model = g.model([("y", None)])
    model.graph.input.append(helper.make_tensor_value_info("W", F, [3, 3, 1, 1]))  # caller may replace W
    assert remaining_reason(model) == "non_constant_weight"


def test_conv_output_that_is_a_graph_output():
    g = G()
    conv_then_bn(g)
    assert remaining_reason(g.model([("y", None), ("c", None)])) == "graph_output"


def test_conv_output_with_another_reader():
    g = G()
    conv_then_bn(g)
    g.node("Relu", ["c"], ["r"], name="relu3")
    folded, report = bnfold.fold(g.model([("y", None), ("r", None)]))
    entry = report.remaining[0]
    assert entry.reason == "multiple_consumers"
    assert "'conv'" in entry.message and "'relu3'" in entry.message


def test_conv_output_read_inside_an_if_body():
    g = G()
    conv_then_bn(g)
    body = helper.make_graph(
        [helper.make_node("Relu", ["c"], ["r_in"])], "b", [], [helper.make_tensor_value_info("r_in", F, None)]
    )
    g.input("cond", [], TensorProto.BOOL)
    g.node("If", ["cond"], ["r"], name="if0", then_branch=body, else_branch=body)
    assert remaining_reason(g.model([("y", None), ("r", None)])) == "multiple_consumers"


def test_bn_output_with_two_forward_readers():
    g = G()
    g.input("x", [3, 5])
    g.bn("x", "n", 5)
    g.node("Gemm", ["n", g.const("B1", (5, 4))], ["y1"], name="fc1")
    g.node("Gemm", ["n", g.const("B2", (5, 4))], ["y2"], name="fc2")
    assert remaining_reason(g.model([("y1", [3, 4]), ("y2", [3, 4])])) == "multiple_consumers"


@pytest.mark.parametrize("shape", [(3,), (1, 1, 1, 4), (1, 1, 3, 1, 1), (2, 3, 1, 1)])
def test_constant_not_along_the_channel_axis(shape):
    g = G()
    g.input("x", [2, 3, 4, 4])
    g.node("Conv", ["x", g.const("W", (3, 3, 1, 1))], ["c"], name="conv")
    g.node("Add", ["c", g.const("v", shape)], ["c2"], name="add")
    g.bn("c2", "y", 3)
    # (3,) lines up with the last axis (W = 4 here would not even broadcast: use W = 3)
    model = g.model([("y", None)])
    if shape == (3,):
        model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 3
    assert remaining_reason(model) == "not_per_channel"


def test_padded_conv_forward():
    for attrs in (dict(pads=[1, 0, 1, 0]), dict(auto_pad="SAME_UPPER")):
        g = G()
        g.input("x", [1, 4, 5, 5])
        g.bn("x", "n", 4)
        g.node("Conv", ["n", g.const("W", (2, 4, 3, 3))], ["y"], name="conv", **attrs)
        assert remaining_reason(g.model([("y", None)])) == "padded_conv"


def test_matmul_layouts():
    g = G()
    g.input("a", [2, 3, 5])  # BN axis 1 is 3 (time), not the product's last axis
    g.node("MatMul", ["a", g.const("B", (5, 3))], ["z"], name="mm")
    g.bn("z", "y", 3)
    assert remaining_reason(g.model([("y", None)])) == "matmul_layout"
    g = G()
    g.input("a", [3, 5])
    g.node("MatMul", ["a", g.const("B", (2, 5, 4))], ["z"], name="mm")
    g.bn("z", "y", 4)
    assert remaining_reason(g.model([("y", None)])) == "matmul_layout"
    g = G()
    g.input("x", [5, 3])
    g.bn("x", "n", 3)
    g.node("Gemm", ["n", g.const("B", (5, 4))], ["y"], name="fc", transA=1)
    assert remaining_reason(g.model([("y", None)])) == "matmul_layout"


def test_unknown_rank():
    g = G()
    g.input("a", None)
    g.node("MatMul", ["a", g.const("B", (5, 4))], ["z"], name="mm")
    g.bn("z", "y", 4)
    assert remaining_reason(g.model([("y", None)])) == "unknown_rank"


def test_non_finite_folded_parameters_are_refused():
    g = G()
    g.input("x", [1, 3, 4, 4])
    g.node("Conv", ["x", g.const("W", (3, 3, 1, 1))], ["c"], name="conv")
    p = [g.const(f"p{k}", (3,)) for k in range(3)] + [g.const("var", (3,), array=np.array([1.0, -1.0, 1.0]))]
    g.node("BatchNormalization", ["c", *p], ["y"], name="bn")
    assert remaining_reason(g.model([("y", None)])) == "invalid_statistics"


def test_no_foldable_neighbour():
    g = G()
    g.input("x", [1, 3, 4, 4])
    g.node("Relu", ["x"], ["r"], name="relu")
    g.bn("r", "n", 3)
    g.node("Relu", ["n"], ["y"], name="relu2")
    assert remaining_reason(g.model([("y", None)])) == "no_foldable_neighbour"


# ----- safety, names, subgraphs, dtypes, opsets ----------------------------------------------
def test_shared_weight_is_cloned_per_fold_and_the_plain_reader_keeps_it():
    g = G(12)
    g.input("x", [1, 3, 4, 4])
    w = g.const("W", (3, 3, 1, 1))
    g.node("Conv", ["x", w], ["a"], name="conv_a")
    g.bn("a", "ya", 3, name="bn_a")
    g.node("Conv", ["x", w], ["b"], name="conv_b")
    g.bn("b", "yb", 3, name="bn_b")
    g.node("Conv", ["x", w], ["yc"], name="conv_plain")
    model = g.model([("ya", None), ("yb", None), ("yc", None)])
    folded, _ = fold_and_check(model, n_folded=2, rule="conv_bn")
    by_name = {n.name: n for n in folded.graph.node}
    weights = {by_name[k].input[1] for k in ("conv_a", "conv_b", "conv_plain")}
    assert len(weights) == 3 and by_name["conv_plain"].input[1] == "W"
    original = numpy_helper.to_array(model.graph.initializer[0])
    kept = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}["W"]
    np.testing.assert_array_equal(kept, original)


def test_unnamed_nodes_get_labels_and_unique_new_names():
    g = G(13)
    g.input("x", [1, 3, 4, 4])
    for k in range(2):
        g.node("Conv", ["x" if k == 0 else "y0", g.const(f"W{k}", (3, 3, 1, 1))], [f"c{k}"])
        p = [g.const(f"p{k}_{j}", (3,), positive=True) for j in range(4)]
        g.node("BatchNormalization", [f"c{k}", *p], [f"y{k}"])
    g.const("c0_bias_bnfold", (3,))  # a name the pass would otherwise pick
    model = g.model([("y1", None)])
    folded, report = fold_and_check(model, n_folded=2, rule="conv_bn")
    assert [f.bn for f in report.folded] == ["BatchNormalization#1", "BatchNormalization#3"]
    assert [f.target for f in report.folded] == ["Conv#0", "Conv#2"]
    names = [t.name for t in folded.graph.initializer]
    assert len(names) == len(set(names))


def test_bn_inside_if_branch_with_outer_scope_weight():
    g = G(14)
    g.input("x", [1, 3, 4, 4])
    g.input("cond", [], TensorProto.BOOL)
    w = g.const("W", (3, 3, 1, 1))
    body = G(15)
    body.node("Conv", ["x", w], ["bc"], name="body_conv")
    body.bn("bc", "by", 3, name="body_bn")
    then_branch = helper.make_graph(body.nodes, "then", [], [helper.make_tensor_value_info("by", F, None)], body.inits)
    else_branch = helper.make_graph(
        [helper.make_node("Conv", ["x", w], ["ey"])], "else", [], [helper.make_tensor_value_info("ey", F, None)]
    )
    g.node("If", ["cond"], ["y"], name="if0", then_branch=then_branch, else_branch=else_branch)
    model = g.model([("y", None)])
    folded, report = bnfold.fold(model)
    assert report.folded[0].graph == "if0/then_branch" and report.folded[0].target == "body_conv"
    onnx.checker.check_model(folded, full_check=True)
    for cond in (True, False):
        feeds = feeds_for(model)
        feeds["cond"] = np.array(cond)
        assert_same(run(model, feeds), run(folded, feeds), 1e-5)
    assert "W" in {t.name for t in folded.graph.initializer}  # still read by the else branch


@pytest.mark.parametrize(
    "elem,engine,rtol",
    [
        (TensorProto.FLOAT16, "ort", 2e-3),
        (TensorProto.DOUBLE, "ort", 1e-10),
        (TensorProto.BFLOAT16, "reference", 2e-2),
    ],
)
def test_weight_dtypes_round_trip(elem, engine, rtol):
    g = G(16, elem=elem)
    g.input("a", [3, 5])
    g.node("Gemm", ["a", g.const("B", (5, 4)), g.const("C", (4,))], ["z"], name="fc", alpha=0.5)
    g.bn("z", "y", 4)
    folded, _ = fold_and_check(g.model([("y", [3, 4])]), n_folded=1, rule="gemm_bn", engine=engine, rtol=rtol)
    assert {t.data_type for t in folded.graph.initializer} == {elem}


def test_opset15_mixed_parameter_dtypes():
    g = G(17, elem=TensorProto.FLOAT16)
    g.input("x", [1, 3, 4, 4])
    g.node("Conv", ["x", g.const("W", (3, 3, 1, 1))], ["c"], name="conv")
    s = [g.const(f"s{k}", (3,), positive=True, elem=F) for k in range(2)]
    m = [g.const(f"m{k}", (3,), positive=True, elem=TensorProto.DOUBLE) for k in range(2)]
    g.node("BatchNormalization", ["c", *s, *m], ["y"], name="bn")
    folded, _ = fold_and_check(g.model([("y", None)], opset=15), n_folded=1, engine="reference", rtol=2e-3)
    assert {t.data_type for t in folded.graph.initializer} == {TensorProto.FLOAT16}


@pytest.mark.parametrize("opset,ir_version,engine", [(6, 3, "reference"), (7, 3, "ort"), (9, 4, "ort"), (14, 8, "ort")])
def test_bn_opsets(opset, ir_version, engine):
    g = G(18)
    attrs = dict(is_test=1) if opset <= 6 else {}
    conv_then_bn(g, **attrs)  # no epsilon attribute: 1e-5 by default
    model = g.model([("y", [1, 3, 4, 4])], opset=opset, ir_version=ir_version)
    folded, _ = fold_and_check(model, n_folded=1, rule="conv_bn", engine=engine)
    if ir_version < 4:
        declared = {i.name for i in folded.graph.input}
        assert {t.name for t in folded.graph.initializer} <= declared
        assert not {f"bn_{k}" for k in ("scale", "B", "mean", "var")} & declared


def test_bn_params_from_constant_nodes_and_constant_subgraph_are_removed():
    g = G(19)
    conv_then_bn(g)
    bn = g.nodes[-1]
    g.nodes.insert(
        0,
        helper.make_node(
            "Constant", [], ["mean_c"], value=numpy_helper.from_array(np.array([0.1, -0.2, 0.3], np.float32))
        ),
    )
    g.nodes.insert(0, helper.make_node("Cast", ["var16"], ["var_c"], to=F))
    g.const("var16", (3,), positive=True, elem=TensorProto.FLOAT16)
    bn.input[3], bn.input[4] = "mean_c", "var_c"
    g.inits = [t for t in g.inits if t.name not in ("bn_mean", "bn_var")]
    folded, _ = fold_and_check(g.model([("y", None)]), n_folded=1, rule="conv_bn")
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert {t.name for t in folded.graph.initializer} == {"W", "c_bias_bnfold"}


def test_report_lists_every_bn_once_and_serialises(tmp_path):
    g = G(20)
    conv_then_bn(g, name="bn_ok")
    g.node("Relu", ["y"], ["r"], name="relu")
    g.bn("r", "z", 3, name="bn_stuck")
    g.node("Relu", ["z"], ["out"], name="relu_out")
    model = g.model([("out", None)])
    report = bnfold.inspect(model)
    assert [f.bn for f in report.folded] == ["bn_ok"] and [r.bn for r in report.remaining] == ["bn_stuck"]
    assert report.folded[0].rule in RULE_CODES
    info = {b.bn: b for b in report.bn_nodes}
    assert info["bn_ok"].producer == "conv" and info["bn_ok"].consumers == ("relu",) and info["bn_ok"].foldable
    assert info["bn_stuck"].rule_or_reason == "no_foldable_neighbour" and not info["bn_stuck"].foldable
    path = tmp_path / "report.json"
    report.to_json(path)
    data = json.loads(path.read_text())
    assert data["n_folded"] == 1 and data["n_remaining"] == 1 and len(data["bn_nodes"]) == 2


def test_external_data_round_trip(tmp_path):
    g = G(21)
    g.input("x", [1, 8, 4, 4])
    g.node("Conv", ["x", g.const("W", (64, 8, 3, 3))], ["c"], name="conv", pads=[1, 1, 1, 1])
    g.bn("c", "y", 64)
    model = g.model([("y", None)])
    source = tmp_path / "in.onnx"
    to_save = onnx.ModelProto()
    to_save.CopyFrom(model)  # saving as external data rewrites the proto it is given
    onnx.save_model(to_save, source, save_as_external_data=True, location="in.onnx.data", size_threshold=1024)
    assert os.path.exists(tmp_path / "in.onnx.data")
    folded, report = bnfold.fold(source)
    assert report.n_folded == 1
    out = tmp_path / "out.onnx"
    save_model_atomic(folded, out, source_path=source, external_data=True)
    assert os.path.exists(tmp_path / "out.onnx.data")
    reloaded = load_model(out)
    feeds = feeds_for(model)
    assert_same(run(model, feeds), run(reloaded, feeds), 1e-5)


# ----- reason codes and BN screening ----------------------------------------------------------
def test_reason_members_are_their_plain_codes(tmp_path):
    """Failure reasons are Reason members; everything that shows them shows the plain code."""
    import re

    from bnfold.folding.rules.protocol import Failure, Reason

    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "fold.md"), encoding="utf-8") as f:
        table_codes = re.findall(r"^\| `([a-z_]+)` \|", f.read(), re.M)  # the rule table, then the reason table
    documented = [code for code in table_codes if code not in RULE_CODES]
    assert list(REASON_CODES) == documented == [reason.value for reason in Reason]
    for reason in Reason:
        assert reason == reason.value and reason.value == reason and hash(reason) == hash(reason.value)
        assert f"{reason}" == str(reason) == f"{reason}" == reason.value
        assert json.dumps({"reason": reason}) == json.dumps({"reason": reason.value})
    assert Failure("padded_conv", "m").reason is Reason.PADDED_CONV
    with pytest.raises(ValueError):
        Failure("no_such_reason", "m")

    g = G(30)
    g.input("x", [1, 3, 4, 4])
    g.bn("x", "y", 3, name="bn_stuck")
    g.node("Relu", ["y"], ["out"], name="relu")
    report = bnfold.inspect(g.model([("out", None)]))
    entry = report.remaining[0]
    assert type(entry.reason) is str and entry.reason == "no_foldable_neighbour"
    assert type(report.bn_nodes[0].rule_or_reason) is str
    path = tmp_path / "report.json"
    report.to_json(path)
    assert json.loads(path.read_text())["remaining"][0]["reason"] == "no_foldable_neighbour"
    assert path.read_text() == json.dumps(report.to_dict(), indent=2) + "\n"


def test_screen_batch_norm_is_the_fold_pass_screen():
    """screen_batch_norm gives the Failure the fold pass reports; for calibration (statistics
    replaced) only the mode matters: NaN, fed or column-shaped statistics pass, training mode does not."""
    from bnfold.folding import GraphView, ModelContext, screen_batch_norm

    g = G(31)
    g.input("x", [1, 3, 4, 4])
    g.input("fed_mean", [3])
    nan = np.full(3, np.nan, np.float32)
    p = lambda name: [g.const(f"{name}_s", (3,), positive=True), g.const(f"{name}_b", (3,))]  # noqa: E731
    g.node(
        "BatchNormalization",
        ["x"] + p("nan") + [g.const("nan_m", None, array=nan), g.const("nan_v", None, array=nan)],
        ["y0"],
        name="bn_nan",
    )
    g.node(
        "BatchNormalization",
        ["y0"] + p("fed") + ["fed_mean", g.const("fed_v", (3,), positive=True)],
        ["y1"],
        name="bn_fed",
    )
    g.node(
        "BatchNormalization",
        ["y1"] + p("col") + [g.const("col_m", (3, 1)), g.const("col_v", (3, 1), positive=True)],
        ["y2"],
        name="bn_column",
    )
    g.bn("y2", "y3", 3, name="bn_training", training_mode=1)
    g.bn("y3", "y4", 3, name="bn_fine")
    g.node("Relu", ["y4"], ["out"], name="relu")
    model = g.model([("out", None)])
    view = GraphView(model.graph, ModelContext(model))
    expected = {
        "bn_nan": "invalid_statistics",
        "bn_fed": "non_constant_params",
        "bn_column": "not_per_channel",
        "bn_training": "training_mode",
        "bn_fine": None,
    }
    report = {r.bn: r for r in bnfold.inspect(model).remaining}
    for index, label in enumerate(view.labels[:5]):
        failure = screen_batch_norm(view, index)
        assert (failure and failure.reason) == expected[label]
        if failure is not None:
            assert (failure.reason, failure.message) == (report[label].reason, report[label].message)
        lenient = screen_batch_norm(view, index, statistics_replaced=True)
        assert (lenient and lenient.reason) == ("training_mode" if label == "bn_training" else None)
