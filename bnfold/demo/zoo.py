"""Built-in models with BatchNormalization layers, for the demo, tests and benchmarks.

* ``build_demo_cnn``: a small CNN with the layer patterns real exporters produce -- Conv+BN+Relu,
  residual blocks, a depthwise-separable block, a projection shortcut, one pre-activation BN
  (Relu -> BN -> padded Conv, which no exact fold can remove) and a BN before the fully connected
  layer. Its BN statistics are computed from data with ``bnfold.calibrate(mode="sequential")``,
  so the BNs do real work and folding them is a meaningful test.
* ``build_resnet``: ResNet-18/34/50/101/152 with random weights (ResNet-50: 53 Conv+BN pairs,
  ~25.6M parameters), with fast random BN statistics or statistics calibrated from data.

Both produce ir_version 8 / opset 17 float32 models with input ``"input"`` of shape (N, 3, H, W)
(dynamic batch ``"N"``) and output ``"logits"``. Everything is seeded: the same arguments build
byte-identical models.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"

# depth -> (block kind, blocks per stage)
RESNET_LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


class _GraphBuilder:
    """Appends named nodes and their (He-initialized) weights in topological order."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.nodes = []
        self.initializers = []
        # Estimated second moment E[x^2] of each tensor, so random BN statistics can be given the
        # scale the BN's input really has (otherwise activations grow exponentially with depth).
        self.second_moment = {INPUT_NAME: 1.0}

    def _weight(self, name, array):
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def conv(self, x, name, cin, cout, kernel, stride=1, group=1, bias=False):
        fan_in = (cin // group) * kernel * kernel
        w = self.rng.standard_normal((cout, cin // group, kernel, kernel), dtype=np.float32)
        w *= np.float32(np.sqrt(2.0 / fan_in))
        inputs = [x, self._weight(f"{name}.weight", w)]
        if bias:
            inputs.append(self._weight(f"{name}.bias", self.rng.standard_normal(cout, dtype=np.float32) * 0.1))
        pad = kernel // 2
        # He initialization: Var(out) = fan_in * (2 / fan_in) * E[in^2].
        self.second_moment[name] = 2.0 * self.second_moment[x]
        self.nodes.append(
            helper.make_node(
                "Conv",
                inputs,
                [name],
                name=name,
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[pad] * 4,
                group=group,
            )
        )
        return name

    def bn(self, x, name, channels, stats="random"):
        """BN with random gamma/beta; statistics random (positive, log-normal variances) or
        placeholders (0/1) for calibration to overwrite."""
        rng = self.rng
        gamma = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        beta = (rng.standard_normal(channels) * 0.1).astype(np.float32)
        if stats == "random":
            # Around the estimated true statistics of the input (zero mean, its second moment),
            # with per-channel spread as trained networks have.
            scale = self.second_moment[x]
            mean = (rng.standard_normal(channels) * 0.2 * np.sqrt(scale)).astype(np.float32)
            var = (scale * rng.lognormal(0.0, 0.3, channels)).astype(np.float32)
        else:
            mean = np.zeros(channels, np.float32)
            var = np.ones(channels, np.float32)
        inputs = [x] + [
            self._weight(f"{name}.{k}", v)
            for k, v in (("weight", gamma), ("bias", beta), ("running_mean", mean), ("running_var", var))
        ]
        self.nodes.append(helper.make_node("BatchNormalization", inputs, [name], name=name, epsilon=1e-5))
        self.second_moment[name] = float(np.mean(gamma.astype(np.float64) ** 2) + np.mean(beta.astype(np.float64) ** 2))
        return name

    def op(self, op_type, inputs, name, **attrs):
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        moments = [self.second_moment[i] for i in inputs]
        if op_type == "Relu":
            self.second_moment[name] = moments[0] / 2.0  # half of a zero-mean symmetric input
        elif op_type == "Add":
            self.second_moment[name] = sum(moments)
        else:
            self.second_moment[name] = moments[0]
        return name

    def gemm(self, x, name, fan_in, fan_out):
        w = self.rng.standard_normal((fan_out, fan_in), dtype=np.float32) * np.float32(np.sqrt(1.0 / fan_in))
        b = np.zeros(fan_out, np.float32)
        inputs = [x, self._weight(f"{name}.weight", w), self._weight(f"{name}.bias", b)]
        self.nodes.append(helper.make_node("Gemm", inputs, [OUTPUT_NAME], name=name, transB=1))
        return OUTPUT_NAME

    def model(self, graph_name, image_size, num_classes, doc):
        x = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, image_size, image_size])
        y = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", num_classes])
        graph = helper.make_graph(self.nodes, graph_name, [x], [y], self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name="bnfold.demo.zoo",
            doc_string=doc,
        )
        return model


def _conv_bn(g, x, name, cin, cout, kernel, stride=1, group=1, relu=True, stats="random"):
    y = g.bn(g.conv(x, f"{name}.conv", cin, cout, kernel, stride, group), f"{name}.bn", cout, stats)
    return g.op("Relu", [y], f"{name}.relu") if relu else y


def _check_positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def build_demo_cnn(image_size=32, width=16, num_classes=10, seed=0, calibrate=True) -> onnx.ModelProto:
    """A small CNN whose BN statistics come from data (see the module docstring for its layers).

    ``calibrate=False`` leaves the placeholder statistics (mean 0, variance 1), e.g. to show
    calibration itself.
    """
    _check_positive_int("image_size", image_size, 8)
    _check_positive_int("width", width, 2)
    _check_positive_int("num_classes", num_classes)
    rng = np.random.default_rng(seed)
    g = _GraphBuilder(rng)
    stats = "placeholder"  # calibration (below) replaces the 0/1 statistics
    w, w2 = width, 2 * width
    x = _conv_bn(g, INPUT_NAME, "stem", 3, w, 3, stats=stats)
    # Residual block (identity shortcut).
    h = _conv_bn(g, x, "res1.a", w, w, 3, stats=stats)
    h = _conv_bn(g, h, "res1.b", w, w, 3, relu=False, stats=stats)
    x = g.op("Relu", [g.op("Add", [h, x], "res1.add")], "res1.relu")
    # Depthwise-separable block, downsampling.
    h = _conv_bn(g, x, "dw.depthwise", w, w, 3, stride=2, group=w, stats=stats)
    x = _conv_bn(g, h, "dw.pointwise", w, w2, 1, stats=stats)
    # Residual block with a projection shortcut (Conv1x1 + BN), downsampling.
    h = _conv_bn(g, x, "res2.a", w2, w2, 3, stride=2, stats=stats)
    h = _conv_bn(g, h, "res2.b", w2, w2, 3, relu=False, stats=stats)
    shortcut = _conv_bn(g, x, "res2.shortcut", w2, w2, 1, stride=2, relu=False, stats=stats)
    x = g.op("Relu", [g.op("Add", [h, shortcut], "res2.add")], "res2.relu")
    # Pre-activation BN (ResNet-v2 style): Relu -> BN -> Conv with zero padding. Folding it forward
    # would be inexact at the borders, so bnfold leaves it and says why.
    h = g.bn(x, "preact.bn", w2, stats)
    x = g.op("Relu", [g.conv(h, "preact.conv", w2, w2, 3, bias=True)], "preact.relu")
    # Head: pooled features -> BN -> fully connected (folds forward into the Gemm).
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x], "head.pool")], "head.flatten", axis=1)
    x = g.bn(x, "head.bn", w2, stats)
    g.gemm(x, "head.fc", w2, num_classes)
    model = g.model("bnfold_demo_cnn", image_size, num_classes, "bnfold demo CNN (random weights)")
    if calibrate:
        model = _calibrate_sequential(model, image_size, rng)
    return model


def build_resnet(depth=50, image_size=224, num_classes=1000, seed=0, width=64, stats="random") -> onnx.ModelProto:
    """ResNet with random He-initialized weights.

    ``stats="random"``: random BN statistics (means ~N(0, 0.5), log-normal positive variances),
    built in about a second for ResNet-50. ``stats="calibrated"``: statistics computed from random
    data with ``bnfold.calibrate(mode="sequential")`` (slow for large models: one pass per BN level).
    """
    if depth not in RESNET_LAYOUTS:
        raise ValueError(f"depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth!r}")
    if stats not in ("random", "calibrated"):
        raise ValueError(f"stats must be 'random' or 'calibrated', got {stats!r}")
    _check_positive_int("image_size", image_size, 32)
    _check_positive_int("width", width, 1)
    _check_positive_int("num_classes", num_classes)
    kind, blocks = RESNET_LAYOUTS[depth]
    expansion = 4 if kind == "bottleneck" else 1
    rng = np.random.default_rng(seed)
    g = _GraphBuilder(rng)
    bn_stats = "random" if stats == "random" else "placeholder"
    x = _conv_bn(g, INPUT_NAME, "stem", 3, width, 7, stride=2, stats=bn_stats)
    x = g.op("MaxPool", [x], "stem.pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = width
    for stage, n_blocks in enumerate(blocks):
        planes = width * 2**stage
        for b in range(n_blocks):
            name = f"layer{stage + 1}.{b}"
            stride = 2 if (b == 0 and stage > 0) else 1
            cout = planes * expansion
            if kind == "bottleneck":
                h = _conv_bn(g, x, f"{name}.1", cin, planes, 1, stats=bn_stats)
                h = _conv_bn(g, h, f"{name}.2", planes, planes, 3, stride=stride, stats=bn_stats)
                h = _conv_bn(g, h, f"{name}.3", planes, cout, 1, relu=False, stats=bn_stats)
            else:
                h = _conv_bn(g, x, f"{name}.1", cin, planes, 3, stride=stride, stats=bn_stats)
                h = _conv_bn(g, h, f"{name}.2", planes, cout, 3, relu=False, stats=bn_stats)
            if stride != 1 or cin != cout:
                x = _conv_bn(g, x, f"{name}.downsample", cin, cout, 1, stride=stride, relu=False, stats=bn_stats)
            x = g.op("Relu", [g.op("Add", [h, x], f"{name}.add")], f"{name}.relu")
            cin = cout
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x], "head.pool")], "head.flatten", axis=1)
    g.gemm(x, "head.fc", cin, num_classes)
    model = g.model(f"resnet{depth}", image_size, num_classes, f"ResNet-{depth} (random weights)")
    if stats == "calibrated":
        model = _calibrate_sequential(model, image_size, rng, n_images=8)
    return model


def _calibrate_sequential(model, image_size, rng, n_images=32):
    """Set every BN's running statistics to those its input has on random images when every
    earlier BN already uses its own computed statistics (bnfold.calibrate, mode="sequential")."""
    from bnfold.calibration import calibrate

    images = rng.standard_normal((n_images, 3, image_size, image_size), dtype=np.float32)
    calibrated, _ = calibrate(model, {INPUT_NAME: images}, mode="sequential", batch_size=n_images)
    return calibrated
