"""Hand-built ONNX models for every BatchNormalization fold case of issue 3.

Each builder returns an ``onnx.ModelProto`` (fixed ``ir_version``; opset 15 unless the case needs
another) built deterministically with onnx.helper and a fixed numpy seed, with realistic BN
statistics (variance well away from 0, gamma not all 1, some gammas negative).

``CASES`` maps a case name to ``(builder, expected)``: ``expected`` is a tuple of ``Fold`` (this BN
must be folded with that rule) and ``Remain`` (this BN must stay, with that reason code) entries,
one per BatchNormalization node in the model (subgraphs included). ``bn=None`` means the node has
no name (the pass labels it itself); ``graph`` is "" for the main graph, else ``"<holder node>/
<attribute>"`` as in FoldReport.

Run ``python tools/make_models.py OUT_DIR`` to write every case to ``OUT_DIR/<name>.onnx`` (cases in
``SAVE_WITH_EXTERNAL_DATA`` are written with their tensors in an external data file).
Tests import this file by path (it is not part of the installed package).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import namedtuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSET = 15

Fold = namedtuple("Fold", "bn rule graph", defaults=("",))
Remain = namedtuple("Remain", "bn reason graph", defaults=("",))

_NP_OF = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.DOUBLE: np.float64,
    TensorProto.INT64: np.int64,
    TensorProto.BOOL: np.bool_,
}


def _bfloat16():
    import ml_dtypes  # shipped with onnx >= 1.16 as a dependency

    return ml_dtypes.bfloat16


def numpy_dtype(elem_type: int):
    """numpy dtype of an ONNX tensor element type (bfloat16 through ml_dtypes)."""
    if elem_type == TensorProto.BFLOAT16:
        return np.dtype(_bfloat16())
    return np.dtype(_NP_OF[elem_type])


def tensor(name: str, array, elem_type: int = TensorProto.FLOAT) -> onnx.TensorProto:
    """An initializer of ``elem_type`` holding ``array`` (values given in float64)."""
    return numpy_helper.from_array(np.asarray(array).astype(numpy_dtype(elem_type)), name)


class _Builder:
    """Accumulates nodes and initializers of one graph; ``model()`` finishes it."""

    def __init__(self, seed: int, elem_type: int = TensorProto.FLOAT, name: str = "g"):
        self.rng = np.random.default_rng(seed)
        self.elem_type = elem_type
        self.name = name
        self.nodes: list = []
        self.inits: list = []
        self.inputs: list = []
        self.outputs: list = []

    # ---- values -------------------------------------------------------------------------
    def input(self, name, shape, elem_type=None):
        self.inputs.append(helper.make_tensor_value_info(name, elem_type or self.elem_type, shape))
        return name

    def output(self, name, elem_type=None, shape=None):
        self.outputs.append(helper.make_tensor_value_info(name, elem_type or self.elem_type, shape))
        return name

    def init(self, name, array, elem_type=None):
        self.inits.append(tensor(name, array, elem_type or self.elem_type))
        return name

    def const_node(self, name, array, elem_type=None):
        """The value as a Constant node instead of an initializer."""
        t = tensor(name + "_value", array, elem_type or self.elem_type)
        self.nodes.append(helper.make_node("Constant", [], [name], name=name + "_const", value=t))
        return name

    def weight(self, shape, fan_in=None):
        fan_in = fan_in or int(np.prod(shape[1:]))
        return self.rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), size=shape)

    def node(self, op, inputs, outputs, name=None, **attrs):
        if isinstance(outputs, str):
            outputs = [outputs]
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, **attrs))
        return outputs[0]

    # ---- BN -----------------------------------------------------------------------------
    def bn_stats(self, channels):
        """Realistic trained BN parameters: (gamma, beta, mean, var), float64."""
        gamma = self.rng.uniform(0.5, 1.8, channels) * np.where(self.rng.random(channels) < 0.2, -1, 1)
        beta = self.rng.normal(0.0, 0.5, channels)
        mean = self.rng.normal(0.0, 0.5, channels)
        var = self.rng.uniform(0.4, 2.5, channels)
        return gamma, beta, mean, var

    def bn(
        self,
        x,
        channels,
        out,
        name,
        *,
        epsilon=1e-5,
        opset_attrs=None,
        param_types=None,
        as_constant_nodes=False,
        **attrs,
    ):
        """BatchNormalization of ``x`` with fresh parameters stored as initializers (or Constant nodes)."""
        gamma, beta, mean, var = self.bn_stats(channels)
        types = param_types or (None, None, None, None)
        make = self.const_node if as_constant_nodes else self.init
        prefix = name or f"p{len(self.nodes)}"  # an unnamed BN still needs distinct parameter names
        params = [
            make(f"{prefix}_{suffix}", value, t)
            for suffix, value, t in zip(("scale", "bias", "mean", "var"), (gamma, beta, mean, var), types)
        ]
        if epsilon is not None:
            attrs["epsilon"] = epsilon
        attrs.update(opset_attrs or {})
        return self.node("BatchNormalization", [x, *params], out, name=name, **attrs)

    def graph(self):
        return helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)

    def model(self, opset=OPSET, ir_version=IR_VERSION, infer_outputs=True):
        model = helper.make_model(
            self.graph(),
            ir_version=ir_version,
            opset_imports=[helper.make_opsetid("", opset)],
            producer_name="bnfold-tools-make_models",
        )
        if infer_outputs:
            _fill_output_shapes(model)
        return model


def _fill_output_shapes(model):
    """Give graph outputs declared without a shape the shape onnx infers (the checker wants one)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    by_name = {v.name: v for v in inferred.graph.output}
    for value in model.graph.output:
        if not value.type.tensor_type.HasField("shape") and value.name in by_name:
            value.type.CopyFrom(by_name[value.name].type)


# ==== Conv -> BN ================================================================================


def _conv_bn(
    seed,
    *,
    spatial,
    cin=4,
    cout=6,
    group=1,
    bias=True,
    elem_type=TensorProto.FLOAT,
    opset=OPSET,
    ir_version=IR_VERSION,
    bn_kwargs=None,
    **conv_attrs,
):
    b = _Builder(seed, elem_type)
    x = b.input("x", [2, cin, *spatial])
    k = [3] * len(spatial)
    w = b.init("conv_W", b.weight([cout, cin // group, *k]))
    inputs = [x, w]
    if bias:
        inputs.append(b.init("conv_B", b.rng.normal(0, 0.3, cout)))
    if group != 1:
        conv_attrs["group"] = group
    y = b.node("Conv", inputs, "conv_out", name="conv", **conv_attrs)
    b.bn(y, cout, "y", "bn", **(bn_kwargs or {}))
    b.output("y")
    return b.model(opset=opset, ir_version=ir_version)


def conv1d_bn():
    return _conv_bn(1, spatial=[9], pads=[1, 1])


def conv2d_bn():
    return _conv_bn(2, spatial=[8, 8], strides=[2, 2], pads=[1, 1, 1, 1])


def conv2d_nobias_bn():
    return _conv_bn(3, spatial=[7, 7], bias=False, pads=[0, 1, 1, 0])


def conv3d_bn():
    return _conv_bn(4, spatial=[5, 6, 5], pads=[1, 1, 1, 1, 1, 1], strides=[1, 2, 1])


def conv2d_grouped_bn():
    return _conv_bn(5, spatial=[6, 6], cin=4, cout=6, group=2)


def conv2d_depthwise_bn():
    return _conv_bn(6, spatial=[6, 6], cin=5, cout=5, group=5, pads=[1, 1, 1, 1], bias=False)


def conv2d_autopad_same_upper_bn():
    return _conv_bn(7, spatial=[7, 8], auto_pad="SAME_UPPER", strides=[2, 2])


def conv2d_strided_dilated_bn():
    return _conv_bn(8, spatial=[11, 10], strides=[2, 1], dilations=[2, 2], pads=[2, 1, 0, 2])


# ==== ConvTranspose -> BN =======================================================================


def _convtranspose_bn(seed, *, spatial, cin=4, cout=6, group=1, bias=True, add_bias=False, identities=False, **attrs):
    b = _Builder(seed)
    x = b.input("x", [2, cin, *spatial])
    k = [3] * len(spatial)
    # ConvTranspose weight layout: (Cin, Cout / group, k...).
    w = b.init("deconv_W", b.weight([cin, cout // group, *k], fan_in=cin * 9))
    inputs = [x, w]
    if bias:
        inputs.append(b.init("deconv_B", b.rng.normal(0, 0.3, cout)))
    if group != 1:
        attrs["group"] = group
    y = b.node("ConvTranspose", inputs, "deconv_out", name="deconv", **attrs)
    if identities:
        y = b.node("Identity", [y], "identity1_out", name="identity1")
    if add_bias:  # as PyTorch exporters emit it: a separate Add of a (C, 1, 1) bias
        bias_shape = [cout] + [1] * len(spatial)
        y = b.node("Add", [y, b.init("deconv_add_bias", b.rng.normal(0, 0.3, bias_shape))], "add_out", name="bias_add")
    if identities:
        y = b.node("Identity", [y], "identity2_out", name="identity2")
    b.bn(y, cout, "y", "bn")
    b.output("y")
    return b.model()


def convtranspose2d_bn():
    return _convtranspose_bn(11, spatial=[5, 5], bias=False, strides=[2, 2], pads=[1, 1, 1, 1])


def convtranspose2d_grouped_outpad_bias_bn():
    return _convtranspose_bn(12, spatial=[4, 5], cin=4, cout=6, group=2, strides=[2, 2], output_padding=[1, 1])


def convtranspose1d_bn():
    return _convtranspose_bn(13, spatial=[7], cin=3, cout=4, bias=True, strides=[2])


def convtranspose2d_add_bias_bn():
    return _convtranspose_bn(14, spatial=[4, 4], bias=False, add_bias=True, strides=[2, 2])


def convtranspose2d_identity_add_identity_bn():
    """As paddle2onnx writes it (PP-OCRv5 det): ConvTranspose -> Identity -> Add -> Identity -> BN."""
    return _convtranspose_bn(15, spatial=[4, 4], bias=False, add_bias=True, identities=True, strides=[2, 2])


# ==== Add / Mul chains between layer and BN =====================================================


def conv_add_vector_bn():
    """Conv -> Add(const of shape (C,)) -> BN on a 4-D output: the (C,) constant broadcasts along
    the LAST axis (width == C here so the model is valid), not the channel axis."""
    b = _Builder(21)
    c = 6
    x = b.input("x", [2, 3, 8, c + 2])
    y = b.node(
        "Conv",
        [x, b.init("conv_W", b.weight([c, 3, 3, 3])), b.init("conv_B", b.rng.normal(0, 0.3, c))],
        "conv_out",
        name="conv",
    )
    y = b.node("Add", [y, b.init("add_vec", b.rng.normal(0, 1.0, c))], "add_out", name="add_last_axis")
    b.bn(y, c, "y", "bn")
    b.output("y")
    return b.model()


def conv_mul_add_bn():
    """Conv -> Mul(scalar) -> Add((1, C, 1, 1)) -> BN: the whole chain is absorbed."""
    b = _Builder(22)
    c = 5
    x = b.input("x", [2, 3, 7, 7])
    y = b.node("Conv", [x, b.init("conv_W", b.weight([c, 3, 3, 3]))], "conv_out", name="conv", pads=[1, 1, 1, 1])
    y = b.node("Mul", [y, b.init("mul_scalar", np.array(1.7))], "mul_out", name="mul_scalar")
    y = b.node("Add", [y, b.init("add_chan", b.rng.normal(0, 1.0, (1, c, 1, 1)))], "add_out", name="add_channel")
    b.bn(y, c, "y", "bn")
    b.output("y")
    return b.model()


# ==== Gemm / MatMul -> BN =======================================================================


def _gemm_bn(
    seed,
    *,
    trans_a=0,
    trans_b=1,
    alpha=None,
    beta=None,
    c_shape="vector",
    n=4,
    k=6,
    m=5,
    elem_type=TensorProto.FLOAT,
    bn_param_types=None,
):
    b = _Builder(seed, elem_type)
    x = b.input("x", [k, n] if trans_a else [n, k])
    w = b.init("fc_W", b.weight([m, k] if trans_b else [k, m], fan_in=k))
    inputs = [x, w]
    if c_shape == "vector":
        inputs.append(b.init("fc_C", b.rng.normal(0, 0.3, m)))
    elif c_shape == "row":
        inputs.append(b.init("fc_C", b.rng.normal(0, 0.3, (1, m))))
    attrs = {"transA": trans_a, "transB": trans_b}
    if alpha is not None:
        attrs["alpha"] = alpha
    if beta is not None:
        attrs["beta"] = beta
    y = b.node("Gemm", inputs, "fc_out", name="fc", **attrs)
    b.bn(y, m, "y", "bn", param_types=bn_param_types)
    b.output("y")
    return b.model()


def gemm_bn():
    return _gemm_bn(31)


def gemm_transa_alpha_beta_row_c_bn():
    return _gemm_bn(32, trans_a=1, trans_b=0, alpha=0.7, beta=1.3, c_shape="row")


def gemm_transab_beta_vector_c_bn():
    return _gemm_bn(33, trans_a=1, trans_b=1, alpha=1.0, beta=0.5, c_shape="vector")


def gemm_no_c_alpha_bn():
    return _gemm_bn(34, trans_b=0, alpha=2.0, c_shape=None)


def matmul_bn():
    b = _Builder(35)
    x = b.input("x", [4, 6])
    y = b.node("MatMul", [x, b.init("mm_W", b.weight([6, 5], fan_in=6))], "mm_out", name="matmul")
    b.bn(y, 5, "y", "bn")
    b.output("y")
    return b.model()


def matmul_rank3_bn():
    """MatMul of a rank-3 X: the product's channel axis (1) is not its last axis -> matmul_layout."""
    b = _Builder(36)
    x = b.input("x", [2, 4, 6])
    y = b.node("MatMul", [x, b.init("mm_W", b.weight([6, 5], fan_in=6))], "mm_out", name="matmul")
    b.bn(y, 4, "y", "bn")  # channel axis of (2, 4, 5) is axis 1 (size 4)
    b.output("y")
    return b.model()


# ==== BN -> layer (forward fold) ================================================================


def bn_gemm():
    b = _Builder(41)
    x = b.input("x", [3, 6])
    y = b.bn(x, 6, "bn_out", "bn")
    b.node(
        "Gemm",
        [y, b.init("fc_W", b.weight([5, 6])), b.init("fc_C", b.rng.normal(0, 0.3, 5))],
        "y",
        name="fc",
        transB=1,
        alpha=0.9,
        beta=1.1,
    )
    b.output("y")
    return b.model()


def bn_matmul():
    b = _Builder(42)
    x = b.input("x", [3, 6])
    y = b.bn(x, 6, "bn_out", "bn")
    b.node("MatMul", [y, b.init("mm_W", b.weight([6, 4], fan_in=6))], "y", name="matmul")
    b.output("y")
    return b.model()


def bn_conv_nopad():
    b = _Builder(43)
    x = b.input("x", [2, 4, 7, 7])
    y = b.bn(x, 4, "bn_out", "bn")
    b.node(
        "Conv",
        [y, b.init("conv_W", b.weight([6, 4, 3, 3])), b.init("conv_B", b.rng.normal(0, 0.3, 6))],
        "y",
        name="conv",
        strides=[2, 2],
    )
    b.output("y")
    return b.model()


def bn_conv_grouped_nopad():
    b = _Builder(44)
    x = b.input("x", [2, 4, 6, 6])
    y = b.bn(x, 4, "bn_out", "bn")
    b.node("Conv", [y, b.init("conv_W", b.weight([6, 2, 3, 3]))], "y", name="conv", group=2)
    b.output("y")
    return b.model()


def bn_conv_padded():
    b = _Builder(45)
    x = b.input("x", [2, 4, 6, 6])
    y = b.bn(x, 4, "bn_out", "bn")
    b.node("Conv", [y, b.init("conv_W", b.weight([6, 4, 3, 3]))], "y", name="conv", pads=[1, 1, 1, 1])
    b.output("y")
    return b.model()


# ==== parameters as Constant nodes / constant subgraphs =========================================


def conv_bn_constant_nodes():
    """Conv weight, bias and every BN parameter come from Constant nodes, not initializers."""
    b = _Builder(51)
    x = b.input("x", [2, 3, 6, 6])
    w = b.const_node("conv_W", b.weight([4, 3, 3, 3]))
    cb = b.const_node("conv_B", b.rng.normal(0, 0.3, 4))
    y = b.node("Conv", [x, w, cb], "conv_out", name="conv", pads=[1, 1, 1, 1])
    b.bn(y, 4, "y", "bn", as_constant_nodes=True)
    b.output("y")
    return b.model()


def conv_bn_constant_subgraph():
    """BN scale and mean come out of Constant -> Reshape (a constant folder resolves them)."""
    b = _Builder(52)
    c = 4
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Conv", [x, b.init("conv_W", b.weight([c, 3, 3, 3]))], "conv_out", name="conv")
    gamma, beta, mean, var = b.bn_stats(c)
    shape = b.const_node("flat_shape", np.array([c]), TensorProto.INT64)
    scale_2d = b.const_node("bn_scale_2d", gamma.reshape(1, c))
    scale = b.node("Reshape", [scale_2d, shape], "bn_scale", name="reshape_scale")
    mean_2d = b.const_node("bn_mean_2d", mean.reshape(c, 1))
    mean_v = b.node("Reshape", [mean_2d, shape], "bn_mean", name="reshape_mean")
    b.node(
        "BatchNormalization",
        [y, scale, b.init("bn_bias", beta), mean_v, b.init("bn_var", var)],
        "y",
        name="bn",
        epsilon=1e-3,
    )
    b.output("y")
    return b.model()


def conv_bn_bias_from_shape():
    """What torch's dynamo exporter writes with optimize=False: a bias-less Conv gets a zero bias
    Expand(CastLike(0, x), Expand(Shape(W, end=1), [1])) and BN parameters behind Identity."""
    b = _Builder(53)
    c = 4
    x = b.input("x", [1, 3, 6, 6])
    w = b.init("conv_W", b.weight([c, 3, 3, 3]))
    channels = b.node("Shape", [w], "w_channels", name="shape_w", end=1)
    one = b.const_node("one", np.array([1]), TensorProto.INT64)
    bias_shape = b.node("Expand", [channels, one], "bias_shape", name="expand_shape")
    zero = b.const_node("zero", np.array(0.0))
    zero_like_x = b.node("CastLike", [zero, x], "zero_like_x", name="castlike")
    bias = b.node("Expand", [zero_like_x, bias_shape], "conv_bias", name="expand_bias")
    y = b.node("Conv", [x, w, bias], "conv_out", name="conv", pads=[1, 1, 1, 1])
    gamma, beta, mean, var = b.bn_stats(c)
    scale = b.node("Identity", [b.init("bn_scale_stored", gamma)], "bn_scale", name="identity_scale")
    b.node(
        "BatchNormalization",
        [y, scale, b.init("bn_bias", beta), b.init("bn_mean", mean), b.init("bn_var", var)],
        "y",
        name="bn",
    )
    b.output("y")
    return b.model(opset=18)


def conv_bn_bias_from_overridable_size():
    """The zero-bias pattern of conv_bn_bias_from_shape, but counting an initializer that is also
    a graph input (IR >= 4: a default the caller may replace with any length): Size(p) is not a
    constant, so the bias is not either."""
    b = _Builder(54)
    c = 4
    x = b.input("x", [1, 3, 6, 6])
    b.inputs.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, ["n"]))
    p = b.init("p", np.zeros(3))
    size = b.node("Size", [p], "p_size", name="size_p")
    size_f = b.node("Cast", [size], "p_size_f", name="cast_size", to=TensorProto.FLOAT)
    bias = b.node(
        "Expand", [size_f, b.init("bias_shape", np.array([c]), TensorProto.INT64)], "conv_bias", name="expand_bias"
    )
    y = b.node("Conv", [x, b.init("conv_W", b.weight([c, 3, 3, 3])), bias], "conv_out", name="conv", pads=[1, 1, 1, 1])
    b.bn(y, c, "y", "bn")
    b.output("y")
    return b.model(opset=18)


def conv_bn_bias_from_declared_shape():
    """A bias built from Shape of a computed value whose shape is only declared (value_info, here
    truthfully): onnxruntime never enforces such declarations and onnx shape inference is wrong
    for a few operators, so the shape is not taken as a constant."""
    b = _Builder(55)
    c = 4
    x = b.input("x", [1, 3, 6, 6])
    r = b.node("Relu", [x], "x_relu", name="relu")
    dims = b.node("Shape", [r], "relu_shape", name="shape_relu", start=1, end=2)
    channels = b.node("Cast", [dims], "relu_channels", name="cast_dims", to=TensorProto.FLOAT)
    bias = b.node(
        "Expand", [channels, b.init("bias_shape", np.array([c]), TensorProto.INT64)], "conv_bias", name="expand_bias"
    )
    y = b.node("Conv", [r, b.init("conv_W", b.weight([c, 3, 3, 3])), bias], "conv_out", name="conv", pads=[1, 1, 1, 1])
    b.bn(y, c, "y", "bn")
    b.output("y")
    model = b.model(opset=18)
    model.graph.value_info.append(helper.make_tensor_value_info("x_relu", TensorProto.FLOAT, [1, 3, 6, 6]))
    return model


def duplicate_bn_then_conv_bn():
    """Conv -> x read by two BNs with the same parameter tensors (an untrained FastViT RepMixer's
    mixer(x) - norm(x), exported by TorchScript, which shares equal tensors): the second BN is the
    first one again and goes; then x has one reader and the first BN folds into the Conv."""
    b = _Builder(56)
    c = 4
    x = b.input("x", [1, 3, 6, 6])
    h = b.node("Conv", [x, b.init("conv_W", b.weight([c, 3, 3, 3]))], "h", name="conv", pads=[1, 1, 1, 1])
    params = [b.init(f"shared_{k}", v) for k, v in zip(("scale", "bias", "mean", "var"), b.bn_stats(c))]
    first = b.node("BatchNormalization", [h, *params], "mixed", name="bn_mixer")
    second = b.node("BatchNormalization", [h, *params], "normed", name="bn_norm")
    b.node("Sub", [first, second], "y", name="sub")
    b.output("y")
    return b.model()


def duplicate_bn_with_equal_copies():
    """The same, with the second BN's parameters equal copies (not the same tensors) and the BN
    output read twice; a third BN with one different variance is not a duplicate."""
    b = _Builder(57)
    c = 4
    x = b.input("x", [1, c, 5, 5])
    stats = b.bn_stats(c)
    first = b.node("BatchNormalization", [x, *[b.init(f"a_{k}", v) for k, v in enumerate(stats)]], "a", name="bn_a")
    second = b.node("BatchNormalization", [x, *[b.init(f"b_{k}", v) for k, v in enumerate(stats)]], "bb", name="bn_b")
    other_var = stats[3].copy()
    other_var[0] *= 1.5
    third = b.node(
        "BatchNormalization",
        [x, *[b.init(f"c_{k}", v) for k, v in enumerate(stats[:3] + (other_var,))]],
        "cc",
        name="bn_c",
    )
    twice = b.node("Mul", [second, second], "sq", name="square")
    b.node("Add", [b.node("Add", [first, twice], "s1", name="add1"), third], "y", name="add2")
    b.output("y")
    return b.model()


# ==== dtypes ====================================================================================


def conv_bn_float16():
    return _conv_bn(61, spatial=[6, 6], elem_type=TensorProto.FLOAT16, pads=[1, 1, 1, 1])


def conv_bn_float16_overflow():
    """float16 Conv -> BN whose scale (gamma / sqrt(var + eps)) is ~3e4 on weights of ~2-3: the
    folded weights (~9e4) would not fit float16 (largest finite 65504)."""
    model = _conv_bn(64, spatial=[6, 6], elem_type=TensorProto.FLOAT16, pads=[1, 1, 1, 1])
    for t in model.graph.initializer:
        if t.name == "conv_W":
            w = numpy_helper.to_array(t).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array((np.sign(w) + w * 0.1 + 2.0).astype(np.float16), t.name))
        if t.name == "bn_scale":
            t.CopyFrom(numpy_helper.from_array(np.full(t.dims, 100.0, np.float16), t.name))
        if t.name == "bn_var":
            t.CopyFrom(numpy_helper.from_array(np.zeros(t.dims, np.float16), t.name))
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            for a in node.attribute:
                if a.name == "epsilon":
                    a.f = 1e-5
    return model


def conv_bn_float16_underflow():
    """Two float16 Conv -> BN pairs. The first BN's scale is ~4e-6 (gamma ~1e-3 on a variance of
    6e4): its folded weights (~1e-6) would be float16 subnormals, rounded with a few % error where
    the original multiplies by the stored weights exactly, so it stays (would_lose_precision). The
    second, ordinary one folds."""
    b = _Builder(65, TensorProto.FLOAT16)
    c = 4
    x = b.input("x", [1, 3, 6, 6])
    h = b.node("Conv", [x, b.init("conv1_W", b.weight([c, 3, 3, 3]))], "conv1_out", name="conv1", pads=[1, 1, 1, 1])
    gamma, beta, mean, _ = b.bn_stats(c)
    params = [
        b.init("bn1_scale", np.abs(gamma) * 1e-3),
        b.init("bn1_bias", beta),
        b.init("bn1_mean", mean),
        b.init("bn1_var", np.full(c, 6e4)),
    ]
    h = b.node("BatchNormalization", [h, *params], "bn1_out", name="bn1")
    h = b.node("Conv", [h, b.init("conv2_W", b.weight([c, c, 3, 3]))], "conv2_out", name="conv2", pads=[1, 1, 1, 1])
    b.bn(h, c, "y", "bn2")
    b.output("y")
    return b.model()


def conv_bn_float64():
    """Whole model in float64 (onnxruntime has no double Conv on CPU: parity via onnx.reference)."""
    return _conv_bn(62, spatial=[6, 6], elem_type=TensorProto.DOUBLE, pads=[1, 1, 1, 1])


def gemm_bn_float64():
    return _gemm_bn(63, elem_type=TensorProto.DOUBLE, alpha=0.8)


def gemm_bn_bfloat16():
    """Whole model in bfloat16 (Gemm and BN allow it at opset 15; parity via onnx.reference)."""
    return _gemm_bn(64, elem_type=TensorProto.BFLOAT16)


def conv_bn_bfloat16_opset22():
    """Conv accepts bfloat16 only from opset 22 (IR 10)."""
    return _conv_bn(65, spatial=[5, 5], elem_type=TensorProto.BFLOAT16, opset=22, ir_version=10)


def conv_bn_float16_mixed_param_dtypes():
    """Opset-15 BN with float16 data and float32 scale/bias/mean/var (T, T1, T2 differ)."""
    f = TensorProto.FLOAT
    return _conv_bn(66, spatial=[6, 6], elem_type=TensorProto.FLOAT16, bn_kwargs={"param_types": (f, f, f, f)})


# ==== BatchNormalization opsets =================================================================


def conv_bn_opset14():
    return _conv_bn(71, spatial=[6, 6], opset=14)


def conv_bn_opset9_default_epsilon():
    return _conv_bn(72, spatial=[6, 6], opset=9, bn_kwargs={"epsilon": None})


def conv_bn_opset7_spatial1():
    return _conv_bn(73, spatial=[6, 6], opset=7, bn_kwargs={"opset_attrs": {"spatial": 1}})


def conv_bn_opset7_spatial0():
    """spatial=0: per-activation statistics (C*H*W of them) cannot fold per channel."""
    b = _Builder(74)
    x = b.input("x", [2, 3, 4, 4])
    y = b.node("Conv", [x, b.init("conv_W", b.weight([2, 3, 3, 3]))], "conv_out", name="conv", pads=[1, 1, 1, 1])
    gamma, beta, mean, var = (
        b.rng.uniform(0.5, 1.5, (2, 4, 4)),
        b.rng.normal(0, 0.5, (2, 4, 4)),
        b.rng.normal(0, 0.5, (2, 4, 4)),
        b.rng.uniform(0.5, 2, (2, 4, 4)),
    )
    params = [b.init(f"bn_{n}", v) for n, v in zip(("scale", "bias", "mean", "var"), (gamma, beta, mean, var))]
    b.node("BatchNormalization", [y, *params], "y", name="bn", spatial=0, epsilon=1e-5)
    b.output("y")
    return b.model(opset=7)


def _old_opset_conv_bn(seed, opset, is_test=1):
    # IR 3 (the IR of that era): every initializer must also be declared as a graph input.
    attrs = {"is_test": is_test}
    if opset == 1:
        attrs["consumed_inputs"] = [0, 0, 0, 1, 1]
    model = _conv_bn(seed, spatial=[6, 6], opset=opset, ir_version=3, bn_kwargs={"opset_attrs": attrs})
    g = model.graph
    # onnx's shape inference does not cover these opsets: take the output type of the opset-15 twin
    twin = _conv_bn(seed, spatial=[6, 6])
    g.output[0].type.CopyFrom(twin.graph.output[0].type)
    g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer)
    return model


def conv_bn_opset6():
    return _old_opset_conv_bn(75, 6)


def conv_bn_opset1():
    return _old_opset_conv_bn(76, 1)


def conv_bn_opset6_is_test0():
    return _old_opset_conv_bn(77, 6, is_test=0)


# ==== BNs inside subgraphs ======================================================================


def _conv_bn_body(b: _Builder, prefix, x, c, out, weight_name=None):
    w = weight_name or b.init(f"{prefix}_conv_W", b.weight([c, c, 3, 3]))
    y = b.node("Conv", [x, w], f"{prefix}_conv_out", name=f"{prefix}_conv", pads=[1, 1, 1, 1])
    return b.bn(y, c, out, f"{prefix}_bn")


def if_branches_bn():
    """If: Conv -> BN in both branches. The then-branch keeps its weights inside the branch; the
    else-branch reads its Conv weight from the outer graph (outer-scope initializer)."""
    c = 3
    outer = _Builder(81)
    x = outer.input("x", [1, c, 5, 5])
    cond = outer.input("cond", [], TensorProto.BOOL)
    outer_w = outer.init("outer_conv_W", outer.weight([c, c, 3, 3]))

    then_b = _Builder(82, name="then_body")
    _conv_bn_body(then_b, "then", x, c, "then_y")
    then_b.output("then_y", shape=[1, c, 5, 5])
    else_b = _Builder(83, name="else_body")
    _conv_bn_body(else_b, "else", x, c, "else_y", weight_name=outer_w)
    else_b.output("else_y", shape=[1, c, 5, 5])

    outer.node("If", [cond], "y", name="if0", then_branch=then_b.graph(), else_branch=else_b.graph())
    outer.output("y", shape=[1, c, 5, 5])
    return outer.model(infer_outputs=False)


def loop_body_bn():
    """Loop (2 iterations) whose body applies Conv -> BN to the loop-carried tensor."""
    c = 3
    outer = _Builder(84)
    x = outer.input("x", [1, c, 5, 5])
    trip = outer.init("trip_count", np.array(2), TensorProto.INT64)
    cond = outer.init("loop_cond", np.array(True), TensorProto.BOOL)
    body = _Builder(85, name="loop_body")
    body.input("iter", [], TensorProto.INT64)
    body.input("cond_in", [], TensorProto.BOOL)
    body.input("state_in", [1, c, 5, 5])
    body.node("Identity", ["cond_in"], "cond_out", name="keep_going")
    _conv_bn_body(body, "body", "state_in", c, "state_out")
    body.output("cond_out", TensorProto.BOOL, [])
    body.output("state_out", shape=[1, c, 5, 5])
    outer.node("Loop", [trip, cond, x], "y", name="loop0", body=body.graph())
    outer.output("y", shape=[1, c, 5, 5])
    return outer.model(infer_outputs=False)


def scan_body_bn():
    """Scan over axis 0 of a (T, N, C, L) sequence; the body applies a 1-D Conv -> BN per step."""
    c = 3
    outer = _Builder(86)
    x = outer.input("x", [4, 2, c, 6])
    body = _Builder(87, name="scan_body")
    body.input("x_t", [2, c, 6])
    y = body.node(
        "Conv",
        ["x_t", body.init("scan_conv_W", body.weight([c, c, 3]))],
        "scan_conv_out",
        name="scan_conv",
        pads=[1, 1],
    )
    body.bn(y, c, "y_t", "scan_bn")
    body.output("y_t", shape=[2, c, 6])
    outer.node("Scan", [x], "y", name="scan0", body=body.graph(), num_scan_inputs=1)
    outer.output("y", shape=[4, 2, c, 6])
    return outer.model(infer_outputs=False)


# ==== structural cases ==========================================================================


def conv_bn_external_data():
    """Big enough (Conv 64x64x3x3 = 147 KiB) that saving with external data moves it out."""
    return _conv_bn(91, spatial=[6, 6], cin=64, cout=64, pads=[1, 1, 1, 1])


def shared_weight_two_conv_bn():
    """One weight tensor read by two Convs, each followed by its own BN (different statistics)."""
    b = _Builder(92)
    x = b.input("x", [2, 3, 6, 6])
    w = b.init("shared_W", b.weight([4, 3, 3, 3]))
    ya = b.node("Conv", [x, w], "conv_a_out", name="conv_a")
    yb = b.node("Conv", [x, w], "conv_b_out", name="conv_b", pads=[1, 1, 1, 1])
    b.bn(ya, 4, "y_a", "bn_a")
    b.bn(yb, 4, "y_b", "bn_b")
    b.output("y_a")
    b.output("y_b")
    return b.model()


def shared_weight_conv_bn_and_plain_conv():
    """The weight is shared with a Conv that has no BN: that Conv must keep reading the original."""
    b = _Builder(93)
    x = b.input("x", [2, 3, 6, 6])
    w = b.init("shared_W", b.weight([4, 3, 3, 3]))
    ya = b.node("Conv", [x, w], "conv_a_out", name="conv_a")
    b.node("Conv", [x, w], "y_plain", name="conv_plain")
    b.bn(ya, 4, "y_a", "bn_a")
    b.output("y_a")
    b.output("y_plain")
    return b.model()


def unnamed_nodes_conv_bn():
    """Two Conv -> BN pairs and no node names at all."""
    b = _Builder(94)
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Conv", [x, b.init("W", b.weight([4, 3, 3, 3]))], "t0", pads=[1, 1, 1, 1])
    y = b.bn(y, 4, "t1", None)
    y = b.node("Conv", [y, b.init("W_bn", b.weight([4, 4, 3, 3]))], "t2")
    b.bn(y, 4, "y", None)
    b.output("y")
    return b.model()


def graph_output_conv_bn():
    b = _Builder(95)
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Conv", [x, b.init("conv_W", b.weight([4, 3, 3, 3]))], "conv_out", name="conv")
    b.bn(y, 4, "y", "bn")
    b.output("conv_out")
    b.output("y")
    return b.model()


def multiple_consumers_conv_bn():
    b = _Builder(96)
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Conv", [x, b.init("conv_W", b.weight([4, 3, 3, 3]))], "conv_out", name="conv")
    b.bn(y, 4, "y", "bn")
    b.node("Relu", [y], "side", name="side_relu")
    b.output("y")
    b.output("side")
    return b.model()


def subgraph_reads_conv_output_bn():
    """The Conv output is also read inside an If branch (outer-scope reference): other consumer."""
    c = 3
    outer = _Builder(97)
    x = outer.input("x", [1, c, 5, 5])
    cond = outer.input("cond", [], TensorProto.BOOL)
    y = outer.node(
        "Conv", [x, outer.init("conv_W", outer.weight([c, c, 3, 3]))], "conv_out", name="conv", pads=[1, 1, 1, 1]
    )
    outer.bn(y, c, "bn_out", "bn")
    then_b = _Builder(98, name="then_body")
    then_b.node("Relu", ["conv_out"], "then_y", name="then_relu")
    then_b.output("then_y", shape=[1, c, 5, 5])
    else_b = _Builder(99, name="else_body")
    else_b.node("Neg", ["conv_out"], "else_y", name="else_neg")
    else_b.output("else_y", shape=[1, c, 5, 5])
    outer.node("If", [cond], "branch_out", name="if0", then_branch=then_b.graph(), else_branch=else_b.graph())
    outer.node("Add", ["bn_out", "branch_out"], "y", name="sum")
    outer.output("y", shape=[1, c, 5, 5])
    return outer.model(infer_outputs=False)


def bn_params_graph_inputs():
    b = _Builder(100)
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Conv", [x, b.init("conv_W", b.weight([4, 3, 3, 3]))], "conv_out", name="conv")
    params = [b.input(f"bn_{n}", [4]) for n in ("scale", "bias", "mean", "var")]
    b.node("BatchNormalization", [y, *params], "y", name="bn")
    b.output("y")
    return b.model()


def conv_weight_graph_input_bn():
    b = _Builder(101)
    x = b.input("x", [2, 3, 6, 6])
    w = b.input("conv_W", [4, 3, 3, 3])
    y = b.node("Conv", [x, w], "conv_out", name="conv")
    b.bn(y, 4, "y", "bn")
    b.output("y")
    return b.model()


def _training_bn(seed, opset, outputs, attrs):
    b = _Builder(seed)
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Conv", [x, b.init("conv_W", b.weight([4, 3, 3, 3]))], "conv_out", name="conv")
    gamma, beta, mean, var = b.bn_stats(4)
    params = [b.init(f"bn_{n}", v) for n, v in zip(("scale", "bias", "mean", "var"), (gamma, beta, mean, var))]
    b.node("BatchNormalization", [y, *params], outputs, name="bn", momentum=0.9, **attrs)
    b.output("y", shape=[2, 4, 4, 4])
    return b


def training_mode_bn():
    """Opset-15 BN with training_mode=1 (batch statistics; running stats are extra outputs)."""
    b = _training_bn(102, OPSET, ["y", "running_mean", "running_var"], {"training_mode": 1})
    return b.model()


def opset9_bn_extra_outputs():
    """Opset-9 BN whose running mean/var outputs are used (graph outputs): a training BN."""
    b = _training_bn(103, 9, ["y", "run_mean", "run_var", "saved_mean", "saved_var"], {})
    b.output("run_mean", shape=[4])
    b.output("run_var", shape=[4])
    return b.model(opset=9)


def bn_after_relu():
    b = _Builder(104)
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Conv", [x, b.init("conv_W", b.weight([4, 3, 3, 3]))], "conv_out", name="conv")
    y = b.node("Relu", [y], "relu_out", name="relu")
    y = b.bn(y, 4, "bn_out", "bn")
    b.node("Relu", [y], "y", name="relu2")
    b.output("y")
    return b.model()


def mixed_small_cnn():
    """A small network mixing foldable and unfoldable BNs: fold them all except the BN after Relu."""
    b = _Builder(105)
    x = b.input("x", [2, 3, 8, 8])
    y = b.node("Conv", [x, b.init("c1_W", b.weight([8, 3, 3, 3]))], "c1", name="conv1", pads=[1, 1, 1, 1])
    y = b.bn(y, 8, "b1", "bn1")
    y = b.node("Relu", [y], "r1", name="relu1")
    y = b.bn(y, 8, "b2", "bn2_after_relu")
    y = b.node("Relu", [y], "r2", name="relu2")
    y = b.node("Conv", [y, b.init("c2_W", b.weight([8, 1, 3, 3]))], "c2", name="dw", group=8, pads=[1, 1, 1, 1])
    y = b.bn(y, 8, "b3", "bn3")
    y = b.node("GlobalAveragePool", [y], "gap", name="gap")
    y = b.node("Flatten", [y], "flat", name="flatten")
    y = b.bn(y, 8, "b4", "bn4_before_fc")
    b.node("Gemm", [y, b.init("fc_W", b.weight([10, 8])), b.init("fc_C", np.zeros(10))], "y", name="fc", transB=1)
    b.output("y")
    return b.model()


# ==== further edge cases =======================================================================


def gemm_scalar_c_bn():
    """Gemm whose C is a (1,) constant broadcast over the whole (N, M) product."""
    b = _Builder(111)
    x = b.input("x", [4, 6])
    y = b.node(
        "Gemm",
        [x, b.init("fc_W", b.weight([5, 6])), b.init("fc_C", np.array([0.4]))],
        "fc_out",
        name="fc",
        transB=1,
        beta=0.5,
    )
    b.bn(y, 5, "y", "bn")
    b.output("y")
    return b.model()


def gemm_full_c_bn():
    """Gemm whose C is a full (N, M) matrix."""
    b = _Builder(112)
    x = b.input("x", [4, 6])
    y = b.node(
        "Gemm",
        [x, b.init("fc_W", b.weight([6, 5])), b.init("fc_C", b.rng.normal(0, 0.3, (4, 5)))],
        "fc_out",
        name="fc",
        alpha=1.5,
    )
    b.bn(y, 5, "y", "bn")
    b.output("y")
    return b.model()


def conv_add_const_first_bn():
    """Add(const (1, C, 1, 1), conv_out): the constant is the first operand."""
    b = _Builder(113)
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Conv", [x, b.init("conv_W", b.weight([4, 3, 3, 3]))], "conv_out", name="conv")
    y = b.node("Add", [b.init("add_chan", b.rng.normal(0, 1, (1, 4, 1, 1))), y], "add_out", name="add_first")
    b.bn(y, 4, "y", "bn")
    b.output("y")
    return b.model()


def conv_bn_bn():
    """Two BNs in a row after a Conv: the pass folds to a fixed point, both into the Conv."""
    b = _Builder(114)
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Conv", [x, b.init("conv_W", b.weight([4, 3, 3, 3]))], "conv_out", name="conv")
    y = b.bn(y, 4, "bn1_out", "bn1")
    b.bn(y, 4, "y", "bn2")
    b.output("y")
    return b.model()


def convtranspose_depthwise_bn():
    b = _Builder(115)
    x = b.input("x", [2, 4, 5, 5])
    y = b.node(
        "ConvTranspose",
        [x, b.init("deconv_W", b.weight([4, 1, 3, 3]))],
        "deconv_out",
        name="deconv",
        group=4,
        strides=[2, 2],
    )
    b.bn(y, 4, "y", "bn")
    b.output("y")
    return b.model()


def bn_gemm_trans_a():
    """BN -> Gemm(transA=1): the BN channel axis of X becomes the product's row axis, which no
    weight scales: not foldable forward (and nothing before the BN) -> matmul_layout."""
    b = _Builder(116)
    x = b.input("x", [6, 3])  # A = x, Gemm uses x^T of shape (3, 6)
    y = b.bn(x, 3, "bn_out", "bn")
    b.node("Gemm", [y, b.init("fc_W", b.weight([6, 5]))], "y", name="fc", transA=1)
    b.output("y")
    return b.model()


def bn_matmul_rank3():
    """BN over axis 1 of a (N, C, L) tensor feeding MatMul with W (L, M): MatMul contracts L, not C."""
    b = _Builder(117)
    x = b.input("x", [2, 3, 6])
    y = b.bn(x, 3, "bn_out", "bn")
    b.node("MatMul", [y, b.init("mm_W", b.weight([6, 4], fan_in=6))], "y", name="matmul")
    b.output("y")
    return b.model()


def bn_gemm_second_consumer():
    """BN -> Gemm, but the BN output is also read by a Relu: forward fold would change the Relu's input."""
    b = _Builder(118)
    x = b.input("x", [3, 6])
    y = b.bn(x, 6, "bn_out", "bn")
    b.node("Gemm", [y, b.init("fc_W", b.weight([5, 6]))], "y", name="fc", transB=1)
    b.node("Relu", [y], "side", name="side_relu")
    b.output("y")
    b.output("side")
    return b.model()


def conv_bn_weight_shared_with_forward_conv():
    """bn_a folds backward into conv_a; bn_b folds forward into conv_b; both Convs share one weight."""
    b = _Builder(120)
    x = b.input("x", [2, 4, 6, 6])
    w = b.init("shared_W", b.weight([4, 4, 1, 1]))
    y = b.node("Conv", [x, w], "conv_a_out", name="conv_a")
    y = b.bn(y, 4, "bn_a_out", "bn_a")
    y = b.node("Relu", [y], "relu_out", name="relu")
    y = b.bn(y, 4, "bn_b_out", "bn_b")
    b.node("Conv", [y, w], "y", name="conv_b")
    b.output("y")
    return b.model()


def loop_body_outer_weight_shared():
    """A Loop body Conv -> BN reads its weight from the outer graph, where a plain Conv reads it too."""
    c = 3
    outer = _Builder(121)
    x = outer.input("x", [1, c, 5, 5])
    w = outer.init("shared_W", outer.weight([c, c, 3, 3]))
    trip = outer.init("trip_count", np.array(2), TensorProto.INT64)
    cond = outer.init("loop_cond", np.array(True), TensorProto.BOOL)
    body = _Builder(122, name="loop_body")
    body.input("iter", [], TensorProto.INT64)
    body.input("cond_in", [], TensorProto.BOOL)
    body.input("state_in", [1, c, 5, 5])
    body.node("Identity", ["cond_in"], "cond_out", name="keep_going")
    _conv_bn_body(body, "body", "state_in", c, "state_out", weight_name=w)
    body.output("cond_out", TensorProto.BOOL, [])
    body.output("state_out", shape=[1, c, 5, 5])
    looped = outer.node("Loop", [trip, cond, x], "looped", name="loop0", body=body.graph())
    outer.node("Conv", [looped, w], "y", name="main_conv", pads=[1, 1, 1, 1])
    outer.output("y", shape=[1, c, 5, 5])
    return outer.model(infer_outputs=False)


def bn_in_branch_conv_outside():
    """The Conv is in the main graph, its BN inside an If branch (reading the outer value)."""
    c = 3
    outer = _Builder(123)
    x = outer.input("x", [1, c, 5, 5])
    cond = outer.input("cond", [], TensorProto.BOOL)
    outer.node(
        "Conv", [x, outer.init("conv_W", outer.weight([c, c, 3, 3]))], "conv_out", name="conv", pads=[1, 1, 1, 1]
    )
    then_b = _Builder(124, name="then_body")
    then_b.bn("conv_out", c, "then_y", "then_bn")
    then_b.output("then_y", shape=[1, c, 5, 5])
    else_b = _Builder(125, name="else_body")
    else_b.node("Relu", ["conv_out"], "else_y", name="else_relu")
    else_b.output("else_y", shape=[1, c, 5, 5])
    outer.node("If", [cond], "y", name="if0", then_branch=then_b.graph(), else_branch=else_b.graph())
    outer.output("y", shape=[1, c, 5, 5])
    return outer.model(infer_outputs=False)


def names_taken_conv_bn():
    """Values already carry the names a fold is likely to generate (<value>_bnfold, <value>_bias_bnfold,
    <weight>_bnfold, with _1 suffixes), in the main graph and in an If branch: new names must avoid all."""
    c = 4
    b = _Builder(126)
    x = b.input("x", [2, 3, 6, 6])
    cond = b.input("cond", [], TensorProto.BOOL)
    w = b.init("conv_W", b.weight([c, 3, 3, 3]))
    shared = b.node("Conv", [x, w], "conv_out", name="conv")
    b.bn(shared, c, "bn_out", "bn")
    taken = [
        "conv_W_bnfold",
        "conv_out_bias_bnfold",
        "conv_out_bnfold",
        "conv_B_bnfold",
        "bn_bnfold",
        "conv_W_bnfold_1",
        "conv_out_bias_bnfold_1",
    ]
    v = "bn_out"
    for i, name in enumerate(taken[:4]):
        v = b.node("Identity", [v], name, name=f"ident{i}")
    then_b = _Builder(127, name="then_body")
    t = then_b.node("Identity", [v], taken[4], name="t_ident0")
    t = then_b.node("Identity", [t], taken[5], name="t_ident1")
    then_b.node("Identity", [t], taken[6], name="t_ident2")
    then_b.output(taken[6], shape=[2, c, 4, 4])
    else_b = _Builder(128, name="else_body")
    else_b.node("Neg", [v], "else_y", name="else_neg")
    else_b.output("else_y", shape=[2, c, 4, 4])
    b.node("If", [cond], "y", name="if0", then_branch=then_b.graph(), else_branch=else_b.graph())
    b.output("y", shape=[2, c, 4, 4])
    return b.model(infer_outputs=False)


# ==== registry ==================================================================================

_T = "if0/then_branch"
_E = "if0/else_branch"

CASES = {
    "conv1d_bn": (conv1d_bn, (Fold("bn", "conv_bn"),)),
    "conv2d_bn": (conv2d_bn, (Fold("bn", "conv_bn"),)),
    "conv2d_nobias_bn": (conv2d_nobias_bn, (Fold("bn", "conv_bn"),)),
    "conv3d_bn": (conv3d_bn, (Fold("bn", "conv_bn"),)),
    "conv2d_grouped_bn": (conv2d_grouped_bn, (Fold("bn", "conv_bn"),)),
    "conv2d_depthwise_bn": (conv2d_depthwise_bn, (Fold("bn", "conv_bn"),)),
    "conv2d_autopad_same_upper_bn": (conv2d_autopad_same_upper_bn, (Fold("bn", "conv_bn"),)),
    "conv2d_strided_dilated_bn": (conv2d_strided_dilated_bn, (Fold("bn", "conv_bn"),)),
    "convtranspose2d_bn": (convtranspose2d_bn, (Fold("bn", "convtranspose_bn"),)),
    "convtranspose2d_grouped_outpad_bias_bn": (
        convtranspose2d_grouped_outpad_bias_bn,
        (Fold("bn", "convtranspose_bn"),),
    ),
    "convtranspose1d_bn": (convtranspose1d_bn, (Fold("bn", "convtranspose_bn"),)),
    "convtranspose2d_add_bias_bn": (convtranspose2d_add_bias_bn, (Fold("bn", "convtranspose_bn"),)),
    "conv_add_vector_bn": (conv_add_vector_bn, (Remain("bn", "not_per_channel"),)),
    "conv_bn_float16_overflow": (conv_bn_float16_overflow, (Remain("bn", "would_overflow"),)),
    "conv_bn_float16_underflow": (
        conv_bn_float16_underflow,
        (Remain("bn1", "would_lose_precision"), Fold("bn2", "conv_bn")),
    ),
    "conv_mul_add_bn": (conv_mul_add_bn, (Fold("bn", "conv_bn"),)),
    "gemm_bn": (gemm_bn, (Fold("bn", "gemm_bn"),)),
    "gemm_transa_alpha_beta_row_c_bn": (gemm_transa_alpha_beta_row_c_bn, (Fold("bn", "gemm_bn"),)),
    "gemm_transab_beta_vector_c_bn": (gemm_transab_beta_vector_c_bn, (Fold("bn", "gemm_bn"),)),
    "gemm_no_c_alpha_bn": (gemm_no_c_alpha_bn, (Fold("bn", "gemm_bn"),)),
    "matmul_bn": (matmul_bn, (Fold("bn", "matmul_bn"),)),
    "matmul_rank3_bn": (matmul_rank3_bn, (Remain("bn", "matmul_layout"),)),
    "bn_gemm": (bn_gemm, (Fold("bn", "bn_gemm"),)),
    "bn_matmul": (bn_matmul, (Fold("bn", "bn_matmul"),)),
    "bn_conv_nopad": (bn_conv_nopad, (Fold("bn", "bn_conv"),)),
    "bn_conv_grouped_nopad": (bn_conv_grouped_nopad, (Fold("bn", "bn_conv"),)),
    "bn_conv_padded": (bn_conv_padded, (Remain("bn", "padded_conv"),)),
    "conv_bn_constant_nodes": (conv_bn_constant_nodes, (Fold("bn", "conv_bn"),)),
    "conv_bn_constant_subgraph": (conv_bn_constant_subgraph, (Fold("bn", "conv_bn"),)),
    "conv_bn_bias_from_shape": (conv_bn_bias_from_shape, (Fold("bn", "conv_bn"),)),
    "duplicate_bn_then_conv_bn": (
        duplicate_bn_then_conv_bn,
        (Fold("bn_norm", "bn_duplicate"), Fold("bn_mixer", "conv_bn")),
    ),
    "duplicate_bn_with_equal_copies": (
        duplicate_bn_with_equal_copies,
        (
            Remain("bn_a", "no_foldable_neighbour"),
            Fold("bn_b", "bn_duplicate"),
            Remain("bn_c", "no_foldable_neighbour"),
        ),
    ),
    "conv_bn_bias_from_overridable_size": (conv_bn_bias_from_overridable_size, (Remain("bn", "non_constant_weight"),)),
    "conv_bn_bias_from_declared_shape": (conv_bn_bias_from_declared_shape, (Remain("bn", "non_constant_weight"),)),
    "convtranspose2d_identity_add_identity_bn": (
        convtranspose2d_identity_add_identity_bn,
        (Fold("bn", "convtranspose_bn"),),
    ),
    "conv_bn_float16": (conv_bn_float16, (Fold("bn", "conv_bn"),)),
    "conv_bn_float64": (conv_bn_float64, (Fold("bn", "conv_bn"),)),
    "gemm_bn_float64": (gemm_bn_float64, (Fold("bn", "gemm_bn"),)),
    "gemm_bn_bfloat16": (gemm_bn_bfloat16, (Fold("bn", "gemm_bn"),)),
    "conv_bn_bfloat16_opset22": (conv_bn_bfloat16_opset22, (Fold("bn", "conv_bn"),)),
    "conv_bn_float16_mixed_param_dtypes": (conv_bn_float16_mixed_param_dtypes, (Fold("bn", "conv_bn"),)),
    "conv_bn_opset14": (conv_bn_opset14, (Fold("bn", "conv_bn"),)),
    "conv_bn_opset9_default_epsilon": (conv_bn_opset9_default_epsilon, (Fold("bn", "conv_bn"),)),
    "conv_bn_opset7_spatial1": (conv_bn_opset7_spatial1, (Fold("bn", "conv_bn"),)),
    "conv_bn_opset7_spatial0": (conv_bn_opset7_spatial0, (Remain("bn", "spatial_mode"),)),
    "conv_bn_opset6": (conv_bn_opset6, (Fold("bn", "conv_bn"),)),
    "conv_bn_opset1": (conv_bn_opset1, (Fold("bn", "conv_bn"),)),
    "conv_bn_opset6_is_test0": (conv_bn_opset6_is_test0, (Remain("bn", "training_mode"),)),
    "if_branches_bn": (if_branches_bn, (Fold("then_bn", "conv_bn", _T), Fold("else_bn", "conv_bn", _E))),
    "loop_body_bn": (loop_body_bn, (Fold("body_bn", "conv_bn", "loop0/body"),)),
    "scan_body_bn": (scan_body_bn, (Fold("scan_bn", "conv_bn", "scan0/body"),)),
    "conv_bn_external_data": (conv_bn_external_data, (Fold("bn", "conv_bn"),)),
    "shared_weight_two_conv_bn": (shared_weight_two_conv_bn, (Fold("bn_a", "conv_bn"), Fold("bn_b", "conv_bn"))),
    "shared_weight_conv_bn_and_plain_conv": (shared_weight_conv_bn_and_plain_conv, (Fold("bn_a", "conv_bn"),)),
    "unnamed_nodes_conv_bn": (unnamed_nodes_conv_bn, (Fold(None, "conv_bn"), Fold(None, "conv_bn"))),
    "graph_output_conv_bn": (graph_output_conv_bn, (Remain("bn", "graph_output"),)),
    "multiple_consumers_conv_bn": (multiple_consumers_conv_bn, (Remain("bn", "multiple_consumers"),)),
    "subgraph_reads_conv_output_bn": (subgraph_reads_conv_output_bn, (Remain("bn", "multiple_consumers"),)),
    "bn_params_graph_inputs": (bn_params_graph_inputs, (Remain("bn", "non_constant_params"),)),
    "conv_weight_graph_input_bn": (conv_weight_graph_input_bn, (Remain("bn", "non_constant_weight"),)),
    "training_mode_bn": (training_mode_bn, (Remain("bn", "training_mode"),)),
    "opset9_bn_extra_outputs": (opset9_bn_extra_outputs, (Remain("bn", "training_mode"),)),
    "bn_after_relu": (bn_after_relu, (Remain("bn", "no_foldable_neighbour"),)),
    "gemm_scalar_c_bn": (gemm_scalar_c_bn, (Fold("bn", "gemm_bn"),)),
    "gemm_full_c_bn": (gemm_full_c_bn, (Fold("bn", "gemm_bn"),)),
    "conv_add_const_first_bn": (conv_add_const_first_bn, (Fold("bn", "conv_bn"),)),
    "conv_bn_bn": (conv_bn_bn, (Fold("bn1", "conv_bn"), Fold("bn2", "conv_bn"))),
    "convtranspose_depthwise_bn": (convtranspose_depthwise_bn, (Fold("bn", "convtranspose_bn"),)),
    "bn_gemm_trans_a": (bn_gemm_trans_a, (Remain("bn", "matmul_layout"),)),
    "bn_matmul_rank3": (bn_matmul_rank3, (Remain("bn", "matmul_layout"),)),
    "bn_gemm_second_consumer": (bn_gemm_second_consumer, (Remain("bn", "multiple_consumers"),)),
    "conv_bn_weight_shared_with_forward_conv": (
        conv_bn_weight_shared_with_forward_conv,
        (Fold("bn_a", "conv_bn"), Fold("bn_b", "bn_conv")),
    ),
    "loop_body_outer_weight_shared": (loop_body_outer_weight_shared, (Fold("body_bn", "conv_bn", "loop0/body"),)),
    "bn_in_branch_conv_outside": (bn_in_branch_conv_outside, (Remain("then_bn", "no_foldable_neighbour", _T),)),
    "names_taken_conv_bn": (names_taken_conv_bn, (Fold("bn", "conv_bn"),)),
    "mixed_small_cnn": (
        mixed_small_cnn,
        (
            Fold("bn1", "conv_bn"),
            Remain("bn2_after_relu", "no_foldable_neighbour"),
            Fold("bn3", "conv_bn"),
            Fold("bn4_before_fc", "bn_gemm"),
        ),
    ),
}

# Cases whose file form keeps tensors in an external data file (main() and the tests save them so).
SAVE_WITH_EXTERNAL_DATA = {"conv_bn_external_data"}


# ==== inputs ====================================================================================


def random_feeds(model: onnx.ModelProto, seed: int = 0, shapes=None) -> list:
    """Feed dicts for the model's real inputs (initializers excluded), random normal values.

    1-D inputs (parameter vectors such as a BN variance fed as an input) are uniform in [0.5, 1.5).
    A boolean input (an If condition) yields one feed per value, so both branches run. ``shapes``
    (name -> tuple) fills dynamic dimensions; otherwise unknown dims are 1.
    """
    rng = np.random.default_rng(seed)
    init_names = {t.name for t in model.graph.initializer}
    base, bool_names = {}, []
    for value in model.graph.input:
        if value.name in init_names:
            continue
        tt = value.type.tensor_type
        shape = (shapes or {}).get(value.name) or tuple(
            d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim
        )
        if tt.elem_type == TensorProto.BOOL:
            bool_names.append(value.name)
            continue
        if tt.elem_type == TensorProto.INT64:
            base[value.name] = np.full(shape, 2, np.int64)
            continue
        if len(shape) == 1:  # a parameter vector fed as input (e.g. BN variance): keep it positive
            base[value.name] = rng.uniform(0.5, 1.5, shape).astype(numpy_dtype(tt.elem_type))
        else:
            base[value.name] = rng.normal(0.0, 1.0, shape).astype(numpy_dtype(tt.elem_type))
    feeds = [base]
    for name in bool_names:
        feeds = [{**f, name: np.array(v)} for f in feeds for v in (True, False)]
    return feeds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Write every BN fold test model to OUT_DIR/<case>.onnx.",
        epilog="example: python tools/make_models.py /tmp/bn_models",
    )
    parser.add_argument("out_dir")
    parser.add_argument("--case", action="append", help="only this case (repeatable)")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    names = args.case or list(CASES)
    for name in names:
        if name not in CASES:
            print(f"unknown case {name!r}; known: {', '.join(CASES)}", file=sys.stderr)
            return 2
        model = CASES[name][0]()
        path = os.path.join(args.out_dir, name + ".onnx")
        if name in SAVE_WITH_EXTERNAL_DATA:
            onnx.save_model(
                model,
                path,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=name + ".onnx.data",
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, path)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
