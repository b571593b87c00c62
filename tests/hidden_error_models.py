"""Models whose head hides a wrong fold from a check of the outputs alone.

Found on real models (docs/check-bench-demo.md): PaddleOCR detection models end in a sigmoid map
that random inputs saturate to 0/1, and a Keras EfficientNetB0 ends in a softmax over 1000
classes whose probabilities are ~1e-3, below the default atol's scale of 1. In both, one folded
layer's weights x 1.01 moves the outputs by less than the output tolerance. The builders here
reproduce the two heads with onnx.helper; ``wrong_fold`` makes the 1 % error.

* ``saturating_model``: Conv -> BN -> Relu -> Conv -> BN (beta +-40) -> Sigmoid: every output is
  0 or 1 to float32 precision whatever the first layers compute.
* ``softmax_head_model``: Conv -> BN -> Relu -> GlobalAveragePool -> Flatten -> BN -> Gemm(1000)
  -> Softmax with logits of small spread: probabilities of about 1e-3.

Both fold completely (conv_bn for every Conv + BN, bn_gemm for the BN before the Gemm).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

INPUT = "x"
OUTPUT = "y"


def _conv_bn(rng, nodes, inits, x, cin, cout, tag, beta=None):
    w = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (9 * cin))
    params = {
        f"{tag}.conv.w": w,
        f"{tag}.conv.b": rng.normal(0.0, 0.1, cout),
        f"{tag}.bn.gamma": rng.uniform(0.5, 1.5, cout),
        f"{tag}.bn.beta": rng.normal(0.0, 0.3, cout) if beta is None else beta,
        f"{tag}.bn.mean": rng.normal(0.0, 0.2, cout),
        f"{tag}.bn.var": rng.uniform(0.5, 2.0, cout),
    }
    inits += [nh.from_array(v.astype(np.float32), k) for k, v in params.items()]
    nodes += [
        helper.make_node(
            "Conv", [x, f"{tag}.conv.w", f"{tag}.conv.b"], [f"{tag}.conv"], pads=[1, 1, 1, 1], name=f"{tag}.conv"
        ),
        helper.make_node(
            "BatchNormalization",
            [f"{tag}.conv", f"{tag}.bn.gamma", f"{tag}.bn.beta", f"{tag}.bn.mean", f"{tag}.bn.var"],
            [f"{tag}.bn"],
            name=f"{tag}.bn",
        ),
    ]
    return f"{tag}.bn"


def _model(nodes, inits, name, channels, size, out_shape):
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, out_shape)],
        inits,
    )
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def saturating_model(size=16, width=8, seed=0) -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Conv -> BN -> Sigmoid, the second BN's beta +-40: the sigmoid's
    input is 40 +- a few, so the output is 0 or 1 (within 4e-18) at every element."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    a = _conv_bn(rng, nodes, inits, INPUT, 3, width, "l1")
    nodes.append(helper.make_node("Relu", [a], ["l1.relu"], name="l1.relu"))
    saturate = 40.0 * np.where(np.arange(4) % 2 == 0, 1.0, -1.0)
    b = _conv_bn(rng, nodes, inits, "l1.relu", width, 4, "l2", beta=saturate)
    nodes.append(helper.make_node("Sigmoid", [b], [OUTPUT], name="head.sigmoid"))
    return _model(nodes, inits, "saturating", 3, size, [1, 4, size, size])


def softmax_head_model(size=8, width=16, classes=1000, seed=0) -> onnx.ModelProto:
    """Conv -> BN -> Relu -> GlobalAveragePool -> Flatten -> BN -> Gemm(classes) -> Softmax,
    the Gemm's weights small enough that the logits spread by ~0.1: every probability is
    within a few percent of 1/classes."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    a = _conv_bn(rng, nodes, inits, INPUT, 3, width, "stem")
    nodes += [
        helper.make_node("Relu", [a], ["stem.relu"], name="stem.relu"),
        helper.make_node("GlobalAveragePool", ["stem.relu"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flat"),
        helper.make_node(
            "BatchNormalization",
            ["flat", "head.bn.gamma", "head.bn.beta", "head.bn.mean", "head.bn.var"],
            ["head.bn"],
            name="head.bn",
        ),
        helper.make_node("Gemm", ["head.bn", "head.fc.w", "head.fc.b"], ["logits"], transB=1, name="head.fc"),
        helper.make_node("Softmax", ["logits"], [OUTPUT], axis=1, name="head.softmax"),
    ]
    head = {
        "head.bn.gamma": rng.uniform(0.5, 1.5, width),
        "head.bn.beta": rng.normal(0.0, 0.3, width),
        "head.bn.mean": rng.uniform(0.2, 0.6, width),
        "head.bn.var": rng.uniform(0.05, 0.2, width),
        "head.fc.w": rng.standard_normal((classes, width)) * 0.03,
        "head.fc.b": rng.normal(0.0, 0.02, classes),
    }
    inits += [nh.from_array(v.astype(np.float32), k) for k, v in head.items()]
    return _model(nodes, inits, "softmax_head", 3, size, [1, classes])


def wrong_fold(folded: onnx.ModelProto, layer_output: str, factor: float = 1.01) -> onnx.ModelProto:
    """A copy of ``folded`` in which the layer that produces ``layer_output`` has its weights x
    ``factor``: a fold that is wrong in that one layer."""
    wrong = onnx.ModelProto()
    wrong.CopyFrom(folded)
    node = next(n for n in wrong.graph.node if layer_output in n.output)
    tensor = next(t for t in wrong.graph.initializer if t.name == node.input[1])
    array = nh.to_array(tensor)
    tensor.CopyFrom(nh.from_array((array * factor).astype(array.dtype), tensor.name))
    return wrong
