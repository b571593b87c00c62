"""Decomposed BNs: per-channel constant Mul / Add / Sub / Div chains without a BatchNormalization
node (Keras 3 via tf2onnx, FrozenBatchNorm2d, Paddle biases, caffe2 Scale layers), folded into the
layer before them (``conv_affine`` ...) or merged into a neighbouring BN (``bn_affine``,
``affine_bn``); and the chains that must stay."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.cli.app import main as bnfold_main
from fold_testing import assert_parity, count_bn

RNG = np.random.default_rng(7)


class Graph:
    """A small graph under construction: named constants and nodes, one float input ``x``."""

    def __init__(self, shape):
        self.shape = list(shape)
        self.nodes, self.inits = [], []
        self.count = 0

    def const(self, value, dtype=np.float32):
        self.count += 1
        name = f"c{self.count}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(self, op, inputs, **attrs):
        self.count += 1
        out = f"{op.lower()}{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{self.count}", **attrs))
        return out

    def bn(self, x, channels):
        return self.node(
            "BatchNormalization",
            [
                x,
                self.const(RNG.uniform(0.5, 1.5, channels)),
                self.const(RNG.normal(0, 0.5, channels)),
                self.const(RNG.normal(0, 0.5, channels)),
                self.const(RNG.uniform(0.5, 2.0, channels)),
            ],
        )

    def model(self, outputs, opset=15, input_shape=None):
        graph = helper.make_graph(
            self.nodes,
            "affine",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape or self.shape)],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            self.inits,
        )
        model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", opset)])
        inferred = onnx.shape_inference.infer_shapes(model)
        for out, described in zip(model.graph.output, inferred.graph.output):
            out.type.CopyFrom(described.type)
        return model


def feeds(shape):
    return [{"x": RNG.normal(0, 1, shape).astype(np.float32)} for _ in range(2)]


def ops(model):
    return [n.op_type for n in model.graph.node]


def folded_and_checked(model, shape):
    folded, report = bnfold.fold(model)
    onnx.checker.check_model(folded, full_check=True)
    assert_parity(model, folded, feeds(shape))
    again, report2 = bnfold.fold(folded)
    assert report2.n_chains_folded == 0 and report2.n_folded == 0
    return folded, report


def conv(g, x, cin, cout, k=3, group=1, bias=True):
    w = g.const(RNG.normal(0, 0.5, (cout, cin // group, k, k)))
    inputs = [x, w] + ([g.const(RNG.normal(0, 0.3, cout))] if bias else [])
    return g.node("Conv", inputs, pads=[k // 2] * 4, group=group)


def test_frozen_batch_norm_conv_mul_add_folds_into_the_conv():
    g = Graph([2, 3, 8, 8])
    y = conv(g, "x", 3, 4, bias=False)
    y = g.node("Mul", [y, g.const(RNG.uniform(0.5, 2, (1, 4, 1, 1)))])
    y = g.node("Add", [y, g.const(RNG.normal(0, 1, (1, 4, 1, 1)))])
    model = g.model([y])
    folded, report = folded_and_checked(model, g.shape)
    assert ops(folded) == ["Conv"]
    assert [(f.rule, f.kind, len(f.absorbed)) for f in report.folded] == [("conv_affine", "affine_chain", 1)]
    assert report.n_folded == 0 and report.n_chains_folded == 1 and report.n_remaining == 0
    assert folded.graph.output[0].name == y


@pytest.mark.parametrize(
    "chain",
    [
        [("Add", (4, 1, 1))],  # Paddle's Conv -> Add bias
        [("Add", ())],  # timm MobileOne's `out = 0; out += branch`
        [("Div", (1, 4, 1, 1)), ("Sub", (4, 1, 1))],
        [("SubFrom", (1, 4, 1, 1)), ("Mul", (1,))],  # constant - x: a negative scale
        [("Mul", (1, 4, 1, 1)), ("Identity", None), ("Add", (1, 4, 1, 1))],
    ],
)
def test_chains_of_every_op_fold_into_a_conv(chain):
    g = Graph([1, 3, 6, 6])
    y = conv(g, "x", 3, 4)
    for op, shape in chain:
        if op == "Identity":
            y = g.node("Identity", [y])
        elif op == "SubFrom":
            y = g.node("Sub", [g.const(RNG.normal(0, 1, shape)), y])
        else:
            value = RNG.uniform(0.5, 2, shape) if op in ("Mul", "Div") else RNG.normal(0, 1, shape)
            y = g.node(op, [y, g.const(value)])
    folded, report = folded_and_checked(g.model([y]), g.shape)
    assert ops(folded) == ["Conv"], ops(folded)
    assert [f.rule for f in report.folded] == ["conv_affine"]


def test_grouped_conv_transpose_mul_add():
    g = Graph([1, 4, 5, 5])
    w = g.const(RNG.normal(0, 0.5, (4, 3, 2, 2)))  # group 2: 6 output channels
    y = g.node("ConvTranspose", ["x", w], group=2, strides=[2, 2])
    y = g.node("Mul", [y, g.const(RNG.uniform(0.5, 2, (1, 6, 1, 1)))])
    y = g.node("Add", [y, g.const(RNG.normal(0, 1, (6, 1, 1)))])
    folded, report = folded_and_checked(g.model([y]), g.shape)
    assert ops(folded) == ["ConvTranspose"]
    assert [f.rule for f in report.folded] == ["convtranspose_affine"]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_and_matmul_with_mul_add(trans_b):
    g = Graph([3, 5])
    w = g.const(RNG.normal(0, 0.5, (4, 5) if trans_b else (5, 4)))
    y = g.node("Gemm", ["x", w, g.const(RNG.normal(0, 1, 4))], transB=trans_b, alpha=0.7)
    y = g.node("Mul", [y, g.const(RNG.uniform(0.5, 2, 4))])
    y = g.node("Add", [y, g.const(RNG.normal(0, 1, (1, 4)))])
    z = g.node("MatMul", [y, g.const(RNG.normal(0, 0.5, (4, 2)))])
    z = g.node("Add", [z, g.const(RNG.normal(0, 1, 2))])
    folded, report = folded_and_checked(g.model([z]), g.shape)
    assert ops(folded) == ["Gemm", "Gemm"]
    assert sorted(f.rule for f in report.folded) == ["gemm_affine", "matmul_affine"]


def test_caffe2_scale_layer_after_a_lone_bn_merges_into_it():
    g = Graph([2, 3, 4, 4])
    y = g.node("Relu", ["x"])
    y = g.bn(y, 3)
    y = g.node("Mul", [y, g.const(RNG.uniform(0.5, 2, (1, 3, 1, 1)))])
    y = g.node("Add", [y, g.const(RNG.normal(0, 1, (1, 3, 1, 1)))])
    folded, report = folded_and_checked(g.model([y]), g.shape)
    assert ops(folded) == ["Relu", "BatchNormalization"]
    assert [f.rule for f in report.folded] == ["bn_affine"]
    assert [r.reason for r in report.remaining] == ["no_foldable_neighbour"]


def test_bn_then_scale_then_gemm_folds_completely():
    g = Graph([3, 4])
    y = g.node("Relu", ["x"])
    y = g.bn(y, 4)
    y = g.node("Mul", [y, g.const(RNG.uniform(0.5, 2, 4))])
    y = g.node("Gemm", [y, g.const(RNG.normal(0, 0.5, (4, 2)))])
    folded, report = folded_and_checked(g.model([y]), g.shape)
    assert ops(folded) == ["Relu", "Gemm"]
    assert sorted(f.rule for f in report.folded) == ["bn_affine", "bn_gemm"]


@pytest.mark.parametrize("constant_shape", [(), (1, 1, 1, 1), (1, 3, 1, 1)])
def test_chain_before_a_lone_bn_merges_into_it(constant_shape):
    g = Graph([2, 3, 4, 4])
    y = conv(g, "x", 3, 3)
    y = g.node("Relu", [y])  # x's 3 channels are proven through the Relu
    y = g.node("Mul", [y, g.const(RNG.uniform(0.5, 2, constant_shape))])
    y = g.node("Sub", [y, g.const(RNG.normal(0, 1, constant_shape))])
    y = g.bn(y, 3)
    folded, report = folded_and_checked(g.model([y]), g.shape)
    assert ops(folded) == ["Conv", "Relu", "BatchNormalization"]
    assert [f.rule for f in report.folded] == ["affine_bn"]
    assert report.folded[0].target == "BatchNormalization_" + str(int(y[len("batchnormalization") :]))


def test_a_constant_that_widens_the_channels_is_not_merged_into_the_bn():
    """x has one channel; Mul by a (1, 3, 1, 1) constant makes three: the BN after it cannot take it."""
    g = Graph([2, 1, 4, 4])
    y = g.node("Relu", ["x"])
    y = g.node("Mul", [y, g.const(RNG.uniform(0.5, 2, (1, 3, 1, 1)))])
    y = g.bn(y, 3)
    model = g.model([y])
    folded, report = bnfold.fold(model)
    assert ops(folded) == ops(model)
    assert report.n_chains_folded == 0
    assert_parity(model, folded, feeds(g.shape))


@pytest.mark.parametrize(
    "case",
    [
        "spatial_constant",
        "last_axis_constant",
        "second_reader",
        "layer_output_is_graph_output",
        "divides_by_zero",
        "integer_constant",
        "non_constant_operand",
        "activation_matmul",
        "rank3_matmul",
    ],
)
def test_chains_that_must_stay(case):
    g = Graph([1, 3, 5, 5] if case not in ("activation_matmul", "rank3_matmul") else [2, 3, 4])
    outputs = []
    extra_inputs = []
    if case == "activation_matmul":
        y = g.node("MatMul", ["x", g.node("Transpose", ["x"], perm=[0, 2, 1])])
        y = g.node("Mul", [y, g.const(0.5)])
    elif case == "rank3_matmul":
        y = g.node("MatMul", ["x", g.const(RNG.normal(0, 1, (4, 2)))])
        y = g.node("Add", [y, g.const(RNG.normal(0, 1, 2))])
    else:
        y = conv(g, "x", 3, 3)
        if case == "spatial_constant":
            y = g.node("Mul", [y, g.const(RNG.uniform(0.5, 2, (1, 1, 5, 5)))])
        elif case == "last_axis_constant":  # (C,) lines up with W, not with the channels
            y = g.node("Add", [y, g.const(RNG.normal(0, 1, 5))])
        elif case == "second_reader":
            outputs.append(g.node("Relu", [y]))
            y = g.node("Mul", [y, g.const(RNG.uniform(0.5, 2, (1, 3, 1, 1)))])
        elif case == "layer_output_is_graph_output":
            outputs.append(y)
            y = g.node("Mul", [y, g.const(RNG.uniform(0.5, 2, (1, 3, 1, 1)))])
        elif case == "divides_by_zero":
            y = g.node("Div", [y, g.const(np.array([1.0, 0.0, 2.0]).reshape(3, 1, 1))])
        elif case == "integer_constant":
            y = g.node("Cast", [y], to=TensorProto.INT64)
            y = g.node("Mul", [y, g.const(np.full((1, 3, 1, 1), 2), np.int64)])
            y = g.node("Cast", [y], to=TensorProto.FLOAT)
        elif case == "non_constant_operand":
            extra_inputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 3, 1, 1]))
            y = g.node("Mul", [y, "s"])
    model = g.model(outputs + [y])
    model.graph.input.extend(extra_inputs)
    folded, report = bnfold.fold(model)
    assert report.n_chains_folded == 0, report.to_dict()
    assert ops(folded) == ops(model)


def test_float16_conv_whose_fold_would_overflow_keeps_its_chain():
    g = Graph([1, 2, 4, 4])
    w = g.const(np.full((2, 2, 1, 1), 100.0), np.float16)
    y = g.node("Conv", ["x", w])
    y = g.node("Mul", [y, g.const(np.full((1, 2, 1, 1), 1000.0), np.float16)])
    model = g.model([y])
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    folded, report = bnfold.fold(model)
    assert report.n_chains_folded == 0
    assert ops(folded) == ["Conv", "Mul"]


def test_inspect_and_the_cli_list_decomposed_bns(tmp_path, capsys):
    g = Graph([2, 3, 6, 6])
    y = conv(g, "x", 3, 4)
    y = g.node("Mul", [y, g.const(RNG.uniform(0.5, 2, (1, 4, 1, 1)))])
    y = g.node("Add", [y, g.const(RNG.normal(0, 1, (1, 4, 1, 1)))])
    y = g.bn(g.node("Relu", [y]), 4)
    path = tmp_path / "m.onnx"
    onnx.save(g.model([y]), path)
    report = bnfold.inspect(str(path))
    chains = [b for b in report.bn_nodes if b.kind == "affine_chain"]
    assert [(b.producer_op, b.rule_or_reason, b.foldable) for b in chains] == [("Conv", "conv_affine", True)]
    assert bnfold_main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "Conv -> affine chain -> Relu" in text and "1 BatchNormalization node(s)" in text
    assert "1 decomposed BN(s)" in text
    out, report_json = tmp_path / "out.onnx", tmp_path / "fold.json"
    assert bnfold_main(["fold", str(path), "-o", str(out), "--json", str(report_json)]) == 0
    assert "decomposed BN (per-channel Mul/Add chains without a BN node): 1 folded" in capsys.readouterr().out
    written = json.loads(report_json.read_text())
    assert written["n_chains_folded"] == 1 and written["n_folded"] == 0 and written["n_remaining"] == 1
    assert count_bn(onnx.load(str(out))) == 1
    assert ops(onnx.load(str(out))) == ["Conv", "Relu", "BatchNormalization"]


def test_input_normalization_before_a_dense_layer_folds_forward():
    """Keras' Normalization layer, (x - mean) / std, before a Dense layer: into the Gemm's B and C."""
    g = Graph([4, 5])
    y = g.node("Sub", ["x", g.const(RNG.normal(0, 1, 5))])
    y = g.node("Div", [y, g.const(RNG.uniform(0.5, 2, 5))])
    y = g.node("Gemm", [y, g.const(RNG.normal(0, 0.5, (3, 5))), g.const(RNG.normal(0, 1, 3))], transB=1)
    folded, report = folded_and_checked(g.model([y]), g.shape)
    assert ops(folded) == ["Gemm"]
    assert [f.rule for f in report.folded] == ["affine_gemm", "affine_gemm"]
    _, without_forward = bnfold.fold(g.model([y]), forward=False)
    assert without_forward.n_chains_folded == 0


def test_scale_before_an_unpadded_conv_and_a_matmul():
    g = Graph([1, 3, 6, 6])
    y = g.node("Mul", ["x", g.const(0.25)])
    y = conv(g, y, 3, 4, k=1)
    z = g.node("Flatten", [g.node("GlobalAveragePool", [y])])
    z = g.node("Mul", [z, g.const(RNG.uniform(0.5, 2, 4))])  # z's 4 channels are not proven
    z = g.node("MatMul", [z, g.const(RNG.normal(0, 0.5, (4, 2)))])
    folded, report = folded_and_checked(g.model([z]), g.shape)
    assert [f.rule for f in report.folded] == ["affine_conv"]
    assert ops(folded) == ["Conv", "GlobalAveragePool", "Flatten", "Mul", "MatMul"]


def test_a_forward_constant_that_would_widen_the_layer_input_stays():
    """x has one column; Mul by a (3,) constant makes three for the Gemm: B cannot take it."""
    g = Graph([4, 1])
    y = g.node("Mul", ["x", g.const(RNG.uniform(0.5, 2, 3))])
    y = g.node("Gemm", [y, g.const(RNG.normal(0, 0.5, (3, 2)))])
    model = g.model([y])
    folded, report = bnfold.fold(model)
    assert report.n_chains_folded == 0 and ops(folded) == ["Mul", "Gemm"]
    assert_parity(model, folded, feeds(g.shape))


def test_a_scale_before_a_padded_conv_stays():
    g = Graph([1, 3, 6, 6])
    y = g.node("Add", ["x", g.const(0.5)])
    y = conv(g, y, 3, 4, k=3)
    folded, report = bnfold.fold(g.model([y]))
    assert report.n_chains_folded == 0 and ops(folded) == ["Add", "Conv"]
