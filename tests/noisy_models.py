"""A deep float32 model whose own rounding noise exceeds bnfold's fixed default tolerance.

Real deep exports (ResNet-50, ResNeXt-50, CSPDarkNet-53, GoogLeNet from torch) differ from
themselves by 2-4e-5 of their output scale between onnxruntime's optimization levels, and a
correct fold moves them as much; the suite cannot depend on torch exports being present, so
``deep_offset_chain`` reproduces the mechanism with onnx.helper: a chain of Conv 3x3 (with a
bias) -> BatchNormalization -> Relu in which every Conv output sits about ``offset`` standard
deviations away from zero. The BN subtracts that offset again, so the float32 rounding of the
Conv sum (one ulp of ``offset``) becomes an error of about ``offset`` ulps of the normalized
value, layer after layer: the same catastrophic cancellation as in real networks whose BN inputs
have means far larger than their spread. Folding the BN into the Conv removes the cancellation
(the fold computes ``(b - mean) * s + beta`` in float64), so a correct fold differs from the
reference by the reference's own rounding error.

The BN statistics are computed from data with ``bnfold.calibrate(mode="sequential")``, as real
statistics would be, so every BN output is normalized.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

import bnfold

INPUT = "x"


def deep_offset_chain(depth=12, channels=8, size=16, offset=30.0, seed=0) -> onnx.ModelProto:
    """Conv(3x3, bias ~ offset) -> BN -> Relu, ``depth`` times; input (1, 3, size, size); output
    ``"y"``. Deterministic for given arguments. Conv ``conv{i}``, BN ``bn{i}`` (parameters
    ``bn{i}.var`` etc.)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x, cin = INPUT, 3
    for i in range(depth):
        w = rng.standard_normal((channels, cin, 3, 3)) * np.sqrt(2.0 / (9 * cin))  # He init
        b = offset * rng.uniform(0.5, 1.5, channels)
        gamma = rng.uniform(0.5, 1.5, channels)
        beta = rng.normal(0.0, 0.3, channels)
        out = "y" if i == depth - 1 else f"relu{i}"
        params = {
            f"conv{i}.w": w,
            f"conv{i}.b": b,
            f"bn{i}.gamma": gamma,
            f"bn{i}.beta": beta,
            f"bn{i}.mean": np.zeros(channels),
            f"bn{i}.var": np.ones(channels),
        }  # placeholders
        inits += [nh.from_array(v.astype(np.float32), k) for k, v in params.items()]
        nodes += [
            helper.make_node("Conv", [x, f"conv{i}.w", f"conv{i}.b"], [f"conv{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
            helper.make_node(
                "BatchNormalization",
                [f"conv{i}", f"bn{i}.gamma", f"bn{i}.beta", f"bn{i}.mean", f"bn{i}.var"],
                [f"bn{i}"],
                name=f"bn{i}",
            ),
            helper.make_node("Relu", [f"bn{i}"], [out], name=f"relu{i}"),
        ]
        x, cin = out, channels
    graph = helper.make_graph(
        nodes,
        "deep_offset_chain",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, size, size])],
        inits,
    )
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    data = rng.standard_normal((8, 3, size, size)).astype(np.float32)
    calibrated, _ = bnfold.calibrate(model, {INPUT: data}, mode="sequential", batch_size=1)
    return calibrated


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return nh.to_array(t)
    raise KeyError(name)


def with_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> onnx.ModelProto:
    """A copy of ``model`` with initializer ``name`` replaced by ``value`` (same dtype)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for t in copy.graph.initializer:
        if t.name == name:
            t.CopyFrom(nh.from_array(np.asarray(value, dtype=nh.to_array(t).dtype), name))
            return copy
    raise KeyError(name)


def conv_inputs(model: onnx.ModelProto, conv: str) -> tuple:
    """(weight name, bias name) of the Conv node named ``conv`` (after folding the names change)."""
    node = next(n for n in model.graph.node if n.name == conv)
    return node.input[1], node.input[2]
