"""Tests of bnfold.calibrate (PreciseBN) against a float64 numpy reference of the same semantics.

The reference evaluates the ONNX graph itself in float64 (Conv, BatchNormalization, Relu, Add,
GlobalAveragePool, Flatten, Gemm) and implements both modes naively: "batch" concatenates every
BN input over all batches; "sequential" calibrates one BN at a time in node order, re-running the
whole data set each time. It shares no code with bnfold.calibration.
"""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.calibration.runner import calibrate
from bnfold.errors import InputError

OPSET = 15


# ------------------------------------------------------------------------------------------------
# Model builders
# ------------------------------------------------------------------------------------------------


class _Builder:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.count = 0

    def _init(self, name, array):
        self.inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def conv(self, x, cin, cout, k=3, stride=1, pad=1):
        i = self.count = self.count + 1
        w = self._init(f"conv{i}.w", self.rng.normal(0, 1 / np.sqrt(cin * k * k), (cout, cin, k, k)))
        b = self._init(f"conv{i}.b", self.rng.normal(0, 0.3, cout))
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, w, b],
                [f"conv{i}"],
                name=f"conv{i}",
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad] * 4,
            )
        )
        return f"conv{i}"

    def bn(self, x, c, name=None, shared=None):
        i = self.count = self.count + 1
        name = name or f"bn{i}"
        s = self._init(f"{name}.scale", self.rng.uniform(0.5, 1.5, c))
        b = self._init(f"{name}.bias", self.rng.normal(0, 0.5, c))
        if shared:
            m, v = shared
        else:
            m = self._init(f"{name}.mean", self.rng.normal(0, 1, c))
            v = self._init(f"{name}.var", self.rng.uniform(0.5, 2, c))
        self.nodes.append(helper.make_node("BatchNormalization", [x, s, b, m, v], [name], name=name, epsilon=1e-3))
        return name

    def op(self, op, inputs, **attrs):
        i = self.count = self.count + 1
        out = f"{op.lower()}{i}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def gemm(self, x, cin, cout):
        i = self.count = self.count + 1
        w = self._init(f"gemm{i}.w", self.rng.normal(0, 1 / np.sqrt(cin), (cout, cin)))
        b = self._init(f"gemm{i}.b", self.rng.normal(0, 0.3, cout))
        self.nodes.append(helper.make_node("Gemm", [x, w, b], [f"gemm{i}"], name=f"gemm{i}", transB=1))
        return f"gemm{i}"

    def model(self, input_shape, output, output_shape):
        graph = helper.make_graph(
            self.nodes,
            "calibration_test",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def conv_stack(seed=0):
    """Conv-BN-ReLU x3 (second conv strided), input (N, 3, 8, 8)."""
    b = _Builder(seed)
    y = b.op("Relu", [b.bn(b.conv("x", 3, 4), 4)])
    y = b.op("Relu", [b.bn(b.conv(y, 4, 5, stride=2), 5)])
    y = b.bn(b.conv(y, 5, 6, k=1, pad=0), 6)
    return b.model(["N", 3, 8, 8], y, ["N", 6, 4, 4])


def residual_net(seed=1):
    """Two branches from the input joined by Add, then pooling, a BN on (N, C) and a Gemm.
    BN levels: bn_a=1, bn_c=1, bn_b=2, bn_fc=3."""
    b = _Builder(seed)
    a = b.op("Relu", [b.bn(b.conv("x", 3, 4), 4, name="bn_a")])
    a = b.bn(b.conv(a, 4, 4), 4, name="bn_b")
    c = b.bn(b.conv("x", 3, 4, k=1, pad=0), 4, name="bn_c")
    y = b.op("Relu", [b.op("Add", [a, c])])
    y = b.op("Flatten", [b.op("GlobalAveragePool", [y])])
    y = b.gemm(b.bn(y, 4, name="bn_fc"), 4, 3)
    return b.model(["N", 3, 6, 6], y, ["N", 3])


def bn_gemm(seed=2):
    """BN directly on the (N, 6) input, Gemm, ReLU, BN."""
    b = _Builder(seed)
    y = b.op("Relu", [b.gemm(b.bn("x", 6, name="bn_in"), 6, 5)])
    y = b.bn(y, 5, name="bn_out")
    return b.model(["N", 6], y, ["N", 5])


MODELS = {"conv_stack": (conv_stack, (3, 8, 8)), "residual_net": (residual_net, (3, 6, 6)), "bn_gemm": (bn_gemm, (6,))}


def make_data(sample_shape, n=20, seed=0):
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0, 2, (1, sample_shape[0]) + (1,) * (len(sample_shape) - 1))
    return (rng.normal(0, 1.5, (n,) + sample_shape) + offsets).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# float64 numpy reference
# ------------------------------------------------------------------------------------------------


def _conv(x, w, b, strides, pads):
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    k_h, k_w = w.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(x, (k_h, k_w), axis=(2, 3))[:, :, :: strides[0], :: strides[1]]
    return np.einsum("nchwij,ocij->nohw", windows, w) + b[None, :, None, None]


def _reduce_axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _bshape(v, x):
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def reference_forward(model, x, bn_behaviour):
    """Evaluate ``model`` in float64. ``bn_behaviour(name, x, scale, bias, mean, var, eps)`` -> y."""
    consts = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    env = {"x": x.astype(np.float64), **consts}
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ins = [env[i] for i in node.input]
        if node.op_type == "Constant":
            y = numpy_helper.to_array(attrs["value"]).astype(np.float64)
        elif node.op_type in ("Identity", "Cast"):  # everything is float64 here
            y = ins[0]
        elif node.op_type == "Conv":
            y = _conv(ins[0], ins[1], ins[2], attrs.get("strides", [1, 1]), attrs.get("pads", [0] * 4))
        elif node.op_type == "BatchNormalization":
            y = bn_behaviour(node.name, ins[0], *ins[1:], attrs.get("epsilon", 1e-5))
        elif node.op_type == "Relu":
            y = np.maximum(ins[0], 0)
        elif node.op_type == "Add":
            y = ins[0] + ins[1]
        elif node.op_type == "Concat":  # a constant of batch 1 joins every sample (a dynamic twin's semantics)
            n = max(i.shape[0] for i in ins)
            y = np.concatenate([np.broadcast_to(i, (n,) + i.shape[1:]) for i in ins], axis=attrs["axis"])
        elif node.op_type == "GlobalAveragePool":
            y = ins[0].mean(axis=(2, 3), keepdims=True)
        elif node.op_type == "Flatten":
            y = ins[0].reshape(ins[0].shape[0], -1)
        elif node.op_type == "Gemm":
            y = ins[0] @ (ins[1].T if attrs.get("transB", 0) else ins[1]) + ins[2]
        else:
            raise NotImplementedError(node.op_type)
        env[node.output[0]] = y
    return env[model.graph.output[0].name]


def _batches(data, batch_size):
    return [data[i : i + batch_size] for i in range(0, len(data), batch_size)]


def reference_calibrate(model, data, mode, batch_size):
    """name -> (mean, var, values per channel) per BN, float64."""
    bn_names = [n.name for n in model.graph.node if n.op_type == "BatchNormalization"]
    if mode == "batch":
        collected = {n: [] for n in bn_names}

        def batch_bn(name, x, scale, bias, mean, var, eps):
            collected[name].append(np.moveaxis(x, 1, -1).reshape(-1, x.shape[1]))
            mu, sig2 = x.mean(axis=_reduce_axes(x)), x.var(axis=_reduce_axes(x))
            return (x - _bshape(mu, x)) / np.sqrt(_bshape(sig2, x) + eps) * _bshape(scale, x) + _bshape(bias, x)

        for batch in _batches(data, batch_size):
            reference_forward(model, batch, batch_bn)
        return {n: _moments(np.concatenate(v)) for n, v in collected.items()}

    stats = {}
    for target in bn_names:
        seen = []

        def infer_bn(name, x, scale, bias, mean, var, eps, target=target, seen=seen):
            if name == target:
                seen.append(np.moveaxis(x, 1, -1).reshape(-1, x.shape[1]))
            mean, var = stats.get(name, (mean, var))[:2]
            return (x - _bshape(mean, x)) / np.sqrt(_bshape(var, x) + eps) * _bshape(scale, x) + _bshape(bias, x)

        for batch in _batches(data, batch_size):
            reference_forward(model, batch, infer_bn)
        stats[target] = _moments(np.concatenate(seen))
    return stats


def _moments(values):
    """(mean, biased var, number of values) per channel of a (values, C) array."""
    return values.mean(axis=0), values.var(axis=0), len(values)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def bn_statistics(model):
    """name -> (running_mean, running_var) as stored in the model."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {
        n.name: (inits[n.input[3]], inits[n.input[4]]) for n in model.graph.node if n.op_type == "BatchNormalization"
    }


def assert_stats_close(got, want, rtol=1e-5):
    for name, (mean, var, *_) in want.items():
        g_mean, g_var = got[name]
        scale = np.abs(mean) + np.sqrt(var)
        assert np.all(np.abs(g_mean - mean) <= rtol * scale), (name, g_mean, mean)
        np.testing.assert_allclose(g_var, var, rtol=rtol, err_msg=name)


def run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


# ------------------------------------------------------------------------------------------------
# Correctness against the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["batch", "sequential"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_matches_float64_reference(model_name, mode):
    builder, sample_shape = MODELS[model_name]
    model = builder()
    data = make_data(sample_shape, n=22)
    calibrated, report = calibrate(model, data, mode=mode, batch_size=8)
    want = reference_calibrate(model, data.astype(np.float64), mode, 8)
    assert_stats_close(bn_statistics(calibrated), want)
    assert report.n_calibrated == len(want)
    for entry in report.entries:
        assert entry.samples == 22
        assert entry.values_per_channel == want[entry.bn][2]


def test_scale_bias_and_other_weights_untouched():
    model = residual_net()
    calibrated, _ = calibrate(model, make_data((3, 6, 6)), mode="batch", batch_size=5)
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in calibrated.graph.initializer}
    assert set(before) == set(after)
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed == {f"{bn}.{s}" for bn in ("bn_a", "bn_b", "bn_c", "bn_fc") for s in ("mean", "var")}
    assert [n.op_type for n in calibrated.graph.node] == [n.op_type for n in model.graph.node]
    onnx.checker.check_model(calibrated)


def test_input_model_not_mutated():
    model = conv_stack()
    snapshot = model.SerializeToString()
    calibrate(model, make_data((3, 8, 8)), mode="sequential", batch_size=7)
    assert model.SerializeToString() == snapshot


def test_levels_group_independent_bns():
    _, report = calibrate(residual_net(), make_data((3, 6, 6)), mode="sequential", batch_size=10)
    levels = {e.bn: e.level for e in report.entries}
    assert levels == {"bn_a": 1, "bn_c": 1, "bn_b": 2, "bn_fc": 3}
    assert report.passes == 3


# ------------------------------------------------------------------------------------------------
# Exactness: batch-size (in)dependence
# ------------------------------------------------------------------------------------------------


def test_batch_mode_first_bn_independent_of_batch_size_deeper_ones_not():
    model, data = residual_net(), make_data((3, 6, 6), n=24)
    stats = [bn_statistics(calibrate(model, data, mode="batch", batch_size=bs)[0]) for bs in (3, 8, 24)]
    for other in stats[1:]:
        for first in ("bn_a", "bn_c"):  # both read the input directly
            np.testing.assert_allclose(other[first][0], stats[0][first][0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(other[first][1], stats[0][first][1], rtol=1e-5)
        # PreciseBN semantics: deeper BNs see per-batch normalized activations.
        assert not np.allclose(other["bn_b"][1], stats[0]["bn_b"][1], rtol=1e-3)


def test_sequential_mode_independent_of_batch_size():
    model, data = residual_net(), make_data((3, 6, 6), n=24)
    stats = [bn_statistics(calibrate(model, data, mode="sequential", batch_size=bs)[0]) for bs in (1, 5, 24)]
    for other in stats[1:]:
        assert_stats_close(other, stats[0], rtol=1e-5)


def test_sequential_recovers_corrupted_statistics():
    model, data = conv_stack(seed=5), make_data((3, 8, 8), n=16, seed=3)
    truth = reference_calibrate(model, data.astype(np.float64), "sequential", 16)
    good = onnx.ModelProto()
    good.CopyFrom(model)
    rng = np.random.default_rng(9)
    corrupted = onnx.ModelProto()
    corrupted.CopyFrom(model)
    for m, source in (
        (good, lambda s: s),
        (corrupted, lambda s: (s[0] + rng.normal(0, 1, s[0].shape), s[1] * rng.uniform(0.2, 5, s[1].shape))),
    ):
        inits = {t.name: t for t in m.graph.initializer}
        for node in m.graph.node:
            if node.op_type == "BatchNormalization":
                mean, var = source(truth[node.name][:2])
                inits[node.input[3]].CopyFrom(numpy_helper.from_array(mean.astype(np.float32), node.input[3]))
                inits[node.input[4]].CopyFrom(numpy_helper.from_array(var.astype(np.float32), node.input[4]))
    expected = run(good, data)
    assert not np.allclose(run(corrupted, data), expected, rtol=1e-2, atol=1e-2)
    recovered, _ = calibrate(corrupted, data, mode="sequential", batch_size=6)
    np.testing.assert_allclose(run(recovered, data), expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Data sources and streaming
# ------------------------------------------------------------------------------------------------


def test_every_data_source_gives_the_same_result(tmp_path):
    model, data = conv_stack(), make_data((3, 8, 8), n=20)
    want = bn_statistics(calibrate(model, {"x": data}, mode="batch", batch_size=6)[0])
    np.save(tmp_path / "all.npy", data)
    np.savez(tmp_path / "all.npz", x=data)
    np.savez_compressed(tmp_path / "all_compressed.npz", x=data)
    np.savez(tmp_path / "unnamed.npz", data)  # arr_0 for a single-input model
    parts = tmp_path / "parts"
    parts.mkdir()
    np.save(parts / "a.npy", data[:7])
    np.savez_compressed(parts / "b.npz", x=data[7:12])
    np.savez(parts / "c.npz", x=np.asfortranarray(data[12:]))
    (parts / "README.txt").write_text("not data")
    sources = [
        data,
        data.astype(np.float64),
        [{"x": data[:4]}, {"x": data[4:13]}, {"x": data[13:]}],
        iter([{"x": data[:10]}, {"x": data[10:]}]),
        str(tmp_path / "all.npy"),
        tmp_path / "all.npz",
        tmp_path / "all_compressed.npz",
        tmp_path / "unnamed.npz",
        parts,
    ]
    for source in sources:
        got = bn_statistics(calibrate(model, source, mode="batch", batch_size=6)[0])
        assert_stats_close(
            got, {k: (v[0].astype(np.float64), v[1].astype(np.float64)) for k, v in want.items()}, rtol=1e-6
        )


@pytest.mark.parametrize("writer", ["npy", "savez", "savez_compressed"])
def test_files_are_streamed_not_loaded_whole(tmp_path, writer):
    """Peak Python-side memory stays far below the data set size (tracemalloc sees numpy buffers)."""
    import tracemalloc

    b = _Builder(7)
    model = b.model(["N", 3, 16, 16], b.bn("x", 3, name="bn"), ["N", 3, 16, 16])
    data = np.random.default_rng(0).standard_normal((2000, 3, 16, 16), dtype=np.float32)  # 6.1 MB
    path = tmp_path / ("d.npy" if writer == "npy" else "d.npz")
    np.save(path, data) if writer == "npy" else getattr(np, writer)(path, x=data)
    tracemalloc.start()
    try:
        calibrated, report = calibrate(model, path, batch_size=8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.n_samples == 2000
    assert peak < data.nbytes / 4, peak
    np.testing.assert_allclose(
        bn_statistics(calibrated)["bn"][1], data.astype(np.float64).var(axis=(0, 2, 3)), rtol=1e-5
    )


def test_compressed_npz_fortran_member(tmp_path):
    model, data = conv_stack(), make_data((3, 8, 8), n=9)
    np.savez_compressed(tmp_path / "f.npz", x=np.asfortranarray(data))
    got = bn_statistics(calibrate(model, tmp_path / "f.npz", batch_size=4)[0])
    want = bn_statistics(calibrate(model, data, batch_size=4)[0])
    for k in want:
        np.testing.assert_allclose(got[k][1], want[k][1], rtol=1e-6)


def test_max_batches_limits_samples():
    model, data = conv_stack(), make_data((3, 8, 8), n=20)
    calibrated, report = calibrate(model, data, batch_size=4, max_batches=2)
    assert report.n_batches == 2 and report.n_samples == 8
    assert all(e.samples == 8 for e in report.entries)
    want = bn_statistics(calibrate(model, data[:8], batch_size=4)[0])
    assert_stats_close(
        bn_statistics(calibrated),
        {k: (v[0].astype(np.float64), v[1].astype(np.float64)) for k, v in want.items()},
        rtol=1e-6,
    )


def test_npz_multi_input_model(tmp_path):
    """Two inputs, each through its own BN, summed: arrays found by input name."""
    rng = np.random.default_rng(0)
    inits = []
    nodes = []
    for name in ("a", "b"):
        for role, v in (("s", np.ones(3)), ("bias", np.zeros(3)), ("m", np.zeros(3)), ("v", np.ones(3))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{name}.{role}"))
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [name, f"{name}.s", f"{name}.bias", f"{name}.m", f"{name}.v"],
                [f"bn_{name}"],
                name=f"bn_{name}",
            )
        )
    nodes.append(helper.make_node("Add", ["bn_a", "bn_b"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3, 4]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    a = rng.normal(1, 2, (10, 3, 4)).astype(np.float32)
    b = rng.normal(-3, 0.5, (10, 3, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", b=b, a=a)
    got = bn_statistics(calibrate(model, tmp_path / "d.npz", batch_size=3)[0])
    for name, x in (("bn_a", a), ("bn_b", b)):
        np.testing.assert_allclose(got[name][0], x.astype(np.float64).mean(axis=(0, 2)), rtol=1e-5)
        np.testing.assert_allclose(got[name][1], x.astype(np.float64).var(axis=(0, 2)), rtol=1e-5)
    with pytest.raises(InputError, match="several inputs"):
        np.save(tmp_path / "a.npy", a)
        calibrate(model, tmp_path / "a.npy")
    with pytest.raises(InputError, match="single array"):
        calibrate(model, a)


# ------------------------------------------------------------------------------------------------
# Bad data
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda d: {"y": d}, r"missing input\(s\) 'x'; unexpected array\(s\) 'y'"),
        (lambda d: {"x": d, "extra": d}, r"unexpected array\(s\) 'extra'"),
        (lambda d: {"x": d[:, :, :4]}, r"axis 2: expected 8, got 4"),
        (lambda d: {"x": d[:, 0]}, r"rank 3.*expects rank 4"),
        (lambda d: {"x": d.astype(np.int32)}, r"expected float32, got int32"),
        (lambda d: {"x": d[:0]}, r"empty"),
        (lambda d: [], r"empty"),
        (lambda d: 42, r"expected a path"),
        (lambda d: np.float32(1.0), r"0-d array|expected a path"),
    ],
)
def test_bad_data_in_memory(make, pattern):
    with pytest.raises(InputError, match=pattern):
        calibrate(conv_stack(), make(make_data((3, 8, 8), n=4)))


def test_bad_data_files(tmp_path):
    model, data = conv_stack(), make_data((3, 8, 8), n=4)
    np.savez(tmp_path / "mismatch.npz", x=data)
    two = _two_input_model()
    np.savez(tmp_path / "lengths.npz", a=np.zeros((4, 3, 4), np.float32), b=np.zeros((5, 3, 4), np.float32))
    with pytest.raises(InputError, match=r"different numbers of samples \('a': 4, 'b': 5\)"):
        calibrate(two, tmp_path / "lengths.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no \.npy or \.npz files"):
        calibrate(model, tmp_path / "empty")
    with pytest.raises(InputError, match="no such file"):
        calibrate(model, tmp_path / "missing.npz")
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(InputError, match="unsupported data file"):
        calibrate(model, tmp_path / "data.csv")
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match=r"not a readable \.npy"):
        calibrate(model, tmp_path / "broken.npy")
    bad_dir = tmp_path / "bad_dir"
    bad_dir.mkdir()
    np.save(bad_dir / "a.npy", data)
    np.save(bad_dir / "b.npy", data[:, :, :, :5])
    with pytest.raises(InputError, match=r"b.npy.*axis 3: expected 8, got 5"):
        calibrate(model, bad_dir)


def _two_input_model():
    nodes = [helper.make_node("Add", ["a", "b"], ["s"])]
    inits = [
        numpy_helper.from_array(v.astype(np.float32), n)
        for n, v in (("sc", np.ones(3)), ("bi", np.zeros(3)), ("m", np.zeros(3)), ("v", np.ones(3)))
    ]
    nodes.append(helper.make_node("BatchNormalization", ["s", "sc", "bi", "m", "v"], ["y"], name="bn"))
    graph = helper.make_graph(
        nodes,
        "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3, 4]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def test_one_value_per_channel_is_an_error_in_batch_mode_only():
    model, data = bn_gemm(), make_data((6,), n=5)
    with pytest.raises(InputError, match=r"batch 3: BN 'bn_in' sees one value per channel"):
        calibrate(model, data, mode="batch", batch_size=2)  # batches of 2, 2, 1
    _, report = calibrate(model, data, mode="sequential", batch_size=2)
    assert report.n_calibrated == 2


def test_sequential_mode_rejects_one_shot_iterator_for_several_levels():
    data = make_data((3, 8, 8), n=6)
    with pytest.raises(InputError, match="one-shot iterator"):
        calibrate(conv_stack(), iter([{"x": data}]), mode="sequential")


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"mode": "train"}, "mode must be"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_batches": 0}, "max_batches"),
        ({"n_threads": 0}, "n_threads"),
    ],
)
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(InputError, match=pattern):
        calibrate(conv_stack(), make_data((3, 8, 8), n=4), **kwargs)


# ------------------------------------------------------------------------------------------------
# Graph cases: shared statistics, subgraphs, training mode; report
# ------------------------------------------------------------------------------------------------


def test_shared_statistics_tensors_get_their_own_copies():
    b = _Builder(3)
    y = b.bn(b.conv("x", 3, 4), 4, name="first")
    y = b.bn(b.op("Relu", [y]), 4, name="second", shared=("first.mean", "first.var"))
    model = b.model(["N", 3, 8, 8], y, ["N", 4, 8, 8])
    data = make_data((3, 8, 8), n=10)
    calibrated, _ = calibrate(model, data, mode="sequential", batch_size=4)
    got = bn_statistics(calibrated)
    want = reference_calibrate(model, data.astype(np.float64), "sequential", 4)
    assert_stats_close(got, want)
    assert not np.allclose(got["first"][1], got["second"][1])
    onnx.checker.check_model(calibrated)


def test_statistics_from_constant_nodes_are_replaced():
    b = _Builder(6)
    y = b.bn(b.conv("x", 3, 4), 4, name="bn")
    model = b.model(["N", 3, 8, 8], y, ["N", 4, 8, 8])
    inits = {t.name: t for t in model.graph.initializer}
    constants = []
    for role in ("mean", "var"):
        tensor = inits.pop(f"bn.{role}")
        constants.append(helper.make_node("Constant", [], [f"bn.{role}"], value=tensor))
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits.values())
    model.graph.node.insert(0, constants[1])
    model.graph.node.insert(0, constants[0])
    data = make_data((3, 8, 8), n=6)
    calibrated, report = calibrate(model, data, batch_size=3)
    np.testing.assert_array_equal(report.entries[0].old_var, numpy_helper.to_array(constants[1].attribute[0].t))
    assert [n.op_type for n in calibrated.graph.node] == ["Conv", "BatchNormalization"]  # orphaned Constants removed
    assert_stats_close(bn_statistics(calibrated), reference_calibrate(model, data.astype(np.float64), "batch", 3))


def _behind(model, bn, slot, op, **attrs):
    """Feed input ``slot`` of BN ``bn`` through a new ``op`` node (Identity, Cast) reading the tensor."""
    node = next(n for n in model.graph.node if n.name == bn)
    source = node.input[slot]
    out = f"{source}.{op.lower()}"
    index = list(model.graph.node).index(node)
    model.graph.node.insert(index, helper.make_node(op, [source], [out], name=out, **attrs))
    node.input[slot] = out
    return out


@pytest.mark.parametrize("mode", ["batch", "sequential"])
def test_parameters_behind_identity_and_cast(mode):
    """torch's TorchScript exporter writes BN statistics as Identity(initializer); converters put
    parameters behind Cast. Old statistics are read through them (report), new ones written as
    fresh initializers, and the nodes nobody reads any more are removed."""
    model = conv_stack(seed=4)
    old = bn_statistics(model)
    _behind(model, "bn2", 3, "Identity")
    _behind(model, "bn2", 4, "Identity")
    inits = {t.name: t for t in model.graph.initializer}
    for name in ("bn5.var", "bn5.scale"):  # stored as float64, cast to the float32 the BN reads
        inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]).astype(np.float64), name))
    _behind(model, "bn5", 4, "Cast", to=TensorProto.FLOAT)
    _behind(model, "bn5", 1, "Cast", to=TensorProto.FLOAT)
    onnx.checker.check_model(model, full_check=True)
    data = make_data((3, 8, 8), n=12)
    calibrated, report = calibrate(model, data, mode=mode, batch_size=5)
    for bn in ("bn2", "bn5"):
        np.testing.assert_allclose(report.entry(bn).old_mean, old[bn][0], rtol=1e-7)
        np.testing.assert_allclose(report.entry(bn).old_var, old[bn][1], rtol=1e-7)
        assert report.entry(bn).max_rel_change_var is not None
    assert_stats_close(bn_statistics(calibrated), reference_calibrate(model, data.astype(np.float64), mode, 5))
    got = bn_statistics(calibrated)
    assert got["bn5"][1].dtype == np.float32  # the type the BN read, not the float64 behind the Cast
    ops = [n.op_type for n in calibrated.graph.node]
    assert ops.count("Identity") == 0 and ops.count("Cast") == 1  # the scale's Cast is still read
    names = {t.name for t in calibrated.graph.initializer}
    assert "bn2.mean" not in names and "bn5.var" not in names and "bn5.scale" in names
    assert "bn2" in report.format_table()
    onnx.checker.check_model(calibrated, full_check=True)


def test_fresh_statistics_of_an_ir3_model_are_listed_as_graph_inputs():
    """IR 3 requires every initializer to be a graph input too; statistics written as a fresh
    initializer (here: behind an Identity) are declared so the result still passes the checker."""
    model = conv_stack(seed=6)
    _behind(model, "bn5", 4, "Identity")
    model.ir_version = 3
    model.opset_import[0].version = 8
    model.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer
    )
    onnx.checker.check_model(model)
    data = make_data((3, 8, 8), n=8)
    calibrated, _ = calibrate(model, data, mode="sequential", batch_size=4)
    onnx.checker.check_model(calibrated)
    var_name = next(n for n in calibrated.graph.node if n.name == "bn5").input[4]
    assert var_name != "bn5.var.identity" and var_name in {i.name for i in calibrated.graph.input}
    assert_stats_close(bn_statistics(calibrated), reference_calibrate(model, data.astype(np.float64), "sequential", 4))


@pytest.mark.parametrize("mode", ["batch", "sequential"])
def test_two_bns_sharing_one_identity_running_var(mode):
    """The exporter's dedup: two BNs read one Identity(initializer) as running_var, which here is
    also a graph output. Each BN gets its own statistics; the shared value never changes."""
    b = _Builder(8)
    y = b.bn(b.conv("x", 3, 4), 4, name="first")
    y = b.bn(b.op("Relu", [y]), 4, name="second")
    shared = b._init("shared.var", np.full(4, 0.75))
    b.nodes.insert(0, helper.make_node("Identity", [shared], ["shared.var.id"], name="dedup"))
    for node in b.nodes:
        if node.op_type == "BatchNormalization":
            node.input[4] = "shared.var.id"
    model = b.model(["N", 3, 8, 8], y, ["N", 4, 8, 8])
    model.graph.output.append(helper.make_tensor_value_info("shared.var.id", TensorProto.FLOAT, [4]))
    data = make_data((3, 8, 8), n=11)
    calibrated, report = calibrate(model, data, mode=mode, batch_size=4)
    np.testing.assert_array_equal(report.entry("second").old_var, np.full(4, 0.75))
    want = reference_calibrate(model, data.astype(np.float64), mode, 4)
    got = bn_statistics(calibrated)
    assert_stats_close(got, want)
    assert not np.allclose(got["first"][1], got["second"][1], rtol=1e-2)
    bns = [n for n in calibrated.graph.node if n.op_type == "BatchNormalization"]
    assert bns[0].input[4] != bns[1].input[4] and "shared.var.id" not in (bns[0].input[4], bns[1].input[4])
    session = ort.InferenceSession(calibrated.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(["shared.var.id"], {"x": data[:2]})[0], np.full(4, 0.75, np.float32))
    onnx.checker.check_model(calibrated, full_check=True)


def test_subgraph_and_training_mode_bns_are_reported_not_calibrated():
    rng = np.random.default_rng(0)
    c = 3

    def params(prefix):
        return [
            numpy_helper.from_array(v.astype(np.float32), f"{prefix}.{r}")
            for r, v in (("s", np.ones(c)), ("b", np.zeros(c)), ("m", rng.normal(0, 1, c)), ("v", np.ones(c)))
        ]

    then_graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["main", "t.s", "t.b", "t.m", "t.v"], ["then_out"], name="inner_bn")],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)],
        params("t"),
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["main"], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node(
            "BatchNormalization",
            ["x", "tr.s", "tr.b", "tr.m", "tr.v"],
            ["trained", "tr_rm", "tr_rv"],
            name="train_bn",
            training_mode=1,
        ),
        helper.make_node("BatchNormalization", ["trained", "m.s", "m.b", "m.m", "m.v"], ["main"], name="main_bn"),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph),
    ]
    inits = params("tr") + params("m") + [numpy_helper.from_array(np.array(True), "cond")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    data = rng.normal(2, 3, (8, c, 4)).astype(np.float32)
    calibrated, report = calibrate(model, data, mode="sequential", batch_size=4)
    by_name = {e.bn: e for e in report.entries}
    assert by_name["main_bn"].status == "calibrated"
    assert by_name["train_bn"].status == "skipped" and "training_mode" in by_name["train_bn"].reason
    assert by_name["inner_bn"].status == "skipped" and by_name["inner_bn"].graph == "branch/then_branch"
    # main_bn reads the train-mode BN's output: per-batch standardized values (mean 0, var ~1).
    np.testing.assert_allclose(bn_statistics(calibrated)["main_bn"][0], 0, atol=1e-5)
    table = report.format_table()
    assert "inner_bn [branch/then_branch]" in table and "skipped" in table


def test_report_contents_and_json(tmp_path):
    model, data = conv_stack(), make_data((3, 8, 8), n=12)
    calibrated, report = calibrate(model, data, mode="batch", batch_size=5)
    old, new = bn_statistics(model), bn_statistics(calibrated)
    entry = report.entries[0]
    assert entry.bn == "bn2" and entry.channels == 4 and entry.samples == 12 and entry.values_per_channel == 12 * 64
    np.testing.assert_array_equal(entry.old_mean, old["bn2"][0])
    np.testing.assert_allclose(entry.new_var, new["bn2"][1], rtol=1e-6)
    expected_change = np.max(np.abs(new["bn2"][1] - old["bn2"][1]) / (np.abs(old["bn2"][1]) + 1e-3))
    assert entry.max_rel_change_var == pytest.approx(expected_change, rel=1e-5)
    report.to_json(tmp_path / "r.json")
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["mode"] == "batch" and loaded["n_calibrated"] == 3 and loaded["n_batches"] == 3
    assert loaded["bn"][0]["new_var"]["max"] == pytest.approx(float(new["bn2"][1].max()), rel=1e-6)
    assert "bn2" in report.format_table()
    assert report.seconds_forward > 0 and report.seconds_statistics > 0


def test_opset_18_reduce_mean_axes_as_input():
    model = conv_stack()
    model.opset_import[0].version = 18
    data = make_data((3, 8, 8), n=10)
    calibrated, _ = calibrate(model, data, mode="batch", batch_size=4)
    assert_stats_close(bn_statistics(calibrated), reference_calibrate(model, data.astype(np.float64), "batch", 4))


# ------------------------------------------------------------------------------------------------
# Fixed batch dimension (torch.onnx.export's default: batch 1)
# ------------------------------------------------------------------------------------------------


def with_fixed_batch(model, batch):
    """Copy of ``model`` whose input and output declare batch dimension ``batch``."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for vi in list(fixed.graph.input) + list(fixed.graph.output):
        dim = vi.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = batch
    return fixed


def token_net(batch):
    """An exporter-style graph with batch 1 spelled out (``batch=1``) or its dynamic twin
    (``batch=None``): Conv -> Reshape (B, 4, 64) -> Relu -> Reshape (B, 4, 8, 8) -> Concat with a
    constant map Expand'ed to (B, 1, 8, 8) -> BN -> Reshape (B, 320) -> BN on (N, C), whose batch
    statistics need more than one sample per batch."""
    b = _Builder(11)

    def shape(name, values):
        b.inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    lead = batch if batch else -1
    y = b.op("Reshape", [b.conv("x", 3, 4), shape("s_flat", [lead, 4, 64])])
    y = b.op("Reshape", [b.op("Relu", [y]), shape("s_map", [lead, 4, 8, 8])])
    token = b._init("token", b.rng.normal(0, 1, (1, 1, 8, 8)))
    if batch:
        expand_to = shape("s_token", [batch, 1, 8, 8])
    else:
        n = b.op("Gather", [b.op("Shape", ["x"]), shape("first", [0])], axis=0)
        expand_to = b.op("Concat", [n, shape("s_rest", [1, 8, 8])], axis=0)
    y = b.op("Concat", [y, b.op("Expand", [token, expand_to])], axis=1)
    y = b.op("Reshape", [b.bn(y, 5, name="bn_map"), shape("s_vec", [lead, 320])])
    y = b.bn(y, 320, name="bn_vec")
    return b.model([batch or "N", 3, 8, 8], y, [batch or "N", 320])


def stats_of(model):
    return {k: (m.astype(np.float64), v.astype(np.float64)) for k, (m, v) in bn_statistics(model).items()}


@pytest.mark.parametrize("model_maker", [lambda: with_fixed_batch(conv_stack(), 1), lambda: token_net(1)])
def test_fixed_batch_sequential_runs_at_the_fixed_batch(model_maker):
    """Sequential statistics do not depend on the batch size: a batch-1 model runs one sample at a
    time and gives the dynamic twin's statistics."""
    fixed = model_maker()
    twin = token_net(None) if "bn_vec" in bn_statistics(fixed) else conv_stack()
    data = make_data((3, 8, 8), n=11)
    calibrated, report = calibrate(fixed, data, mode="sequential", batch_size=4)
    assert report.fixed_batch == 1 and report.run_batch_size == 1 and report.n_batches == 11 and report.n_samples == 11
    assert any("fixed at 1: sequential mode ran it 1 sample at a time" in n for n in report.notes)
    assert "11 samples in 11 batches of 1" in report.format_table()
    want = stats_of(calibrate(twin, data, mode="sequential", batch_size=4)[0])
    assert_stats_close(stats_of(calibrated), want, rtol=1e-5)
    assert_stats_close(
        stats_of(calibrated), stats_of(calibrate(twin, data, mode="sequential", batch_size=11)[0]), rtol=1e-5
    )
    assert [d.dim_value for d in calibrated.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 8, 8]  # still fixed


def test_fixed_batch_batch_mode_made_symbolic_equals_dynamic_twin():
    """Batch 1 spelled out in three Reshapes and an Expand: the calibration graph gets a symbolic
    batch, is checked by running it, and gives the dynamic twin's batch-mode statistics at the same
    batch size, final smaller batch included."""
    data = make_data((3, 8, 8), n=10)
    calibrated, report = calibrate(token_net(1), data, mode="batch", batch_size=4)
    assert report.run_batch_size == 4 and report.n_batches == 3 and report.n_samples == 10
    assert any("made symbolic (4 shapes rewritten" in n for n in report.notes), report.notes
    want = stats_of(calibrate(token_net(None), data, mode="batch", batch_size=4)[0])
    assert_stats_close(stats_of(calibrated), want, rtol=1e-5)
    # Batch statistics over 4 samples are not those over 1 (what running at the fixed batch gives).
    with pytest.raises(AssertionError):
        assert_stats_close(
            stats_of(calibrated), stats_of(calibrate(token_net(None), data, mode="batch", batch_size=2)[0]), rtol=1e-3
        )
    assert [d.dim_value for d in calibrated.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 8, 8]
    assert [n.op_type for n in calibrated.graph.node] == [n.op_type for n in token_net(1).graph.node]
    np.testing.assert_array_equal(  # the model's own shape constants are untouched
        numpy_helper.to_array(next(t for t in calibrated.graph.initializer if t.name == "s_vec")), [1, 320]
    )


def test_fixed_batch_3_batch_mode_symbolic_uses_every_sample():
    data = make_data((3, 8, 8), n=11)
    calibrated, report = calibrate(with_fixed_batch(conv_stack(), 3), data, mode="batch", batch_size=6)
    assert report.run_batch_size == 6 and report.n_samples == 11 and "made symbolic (0 shapes" in report.notes[0]
    assert_stats_close(
        stats_of(calibrated), stats_of(calibrate(conv_stack(), data, mode="batch", batch_size=6)[0]), rtol=1e-5
    )


@pytest.mark.parametrize("batch_size, n", [(3, 10), (2, 11), (6, 3)])
def test_fixed_batch_4_batch_mode_at_a_smaller_batch_size_is_the_dynamic_twin(batch_size, n):
    """Batch sizes below the fixed batch (and data smaller than it) also get the symbolic batch:
    the check compares a short batch against the fixed-batch model run on it padded with its own
    samples. Running at the fixed batch instead would give statistics over 4 samples at a time."""
    data = make_data((3, 8, 8), n=n)
    calibrated, report = calibrate(with_fixed_batch(conv_stack(), 4), data, mode="batch", batch_size=batch_size)
    assert report.run_batch_size == batch_size and report.n_samples == n, report.notes
    assert "made symbolic (0 shapes" in report.notes[0]
    want = stats_of(calibrate(conv_stack(), data, mode="batch", batch_size=batch_size)[0])
    assert_stats_close(stats_of(calibrated), want, rtol=1e-5)


def test_fixed_batch_symbolic_check_of_a_short_batch_still_catches_a_spelled_out_batch():
    """token_net(4) spells batch 4 out in Reshapes; the rewritten variant passes the check at
    batch 3 (padded chunk), and the statistics are the dynamic twin's."""
    data = make_data((3, 8, 8), n=9)
    calibrated, report = calibrate(token_net(4), data, mode="batch", batch_size=3)
    assert report.run_batch_size == 3 and report.n_samples == 9
    assert any("made symbolic (4 shapes rewritten" in n for n in report.notes), report.notes
    assert_stats_close(
        stats_of(calibrated), stats_of(calibrate(token_net(None), data, mode="batch", batch_size=3)[0]), rtol=1e-5
    )


def _rolled_batch_net(batch):
    """Conv -> (h + h with its batch rolled by F/2) -> BN, F/2 baked in as a Slice constant: at the
    fixed batch each sample is paired with the one F/2 rows away. ``batch=None``: the dynamic twin
    computes n/2 from Shape(x)."""
    b = _Builder(15)
    h = b.conv("x", 3, 4)
    ints = lambda name, v: b.inits.append(numpy_helper.from_array(np.array(v, np.int64), name)) or name  # noqa: E731
    zero, end = ints("zero", [0]), ints("end", [np.iinfo(np.int64).max])
    if batch:
        half = ints("half", [batch // 2])
    else:
        half = b.op("Div", [b.op("Gather", [b.op("Shape", ["x"]), zero], axis=0), ints("two", [2])])
    rolled = b.op("Concat", [b.op("Slice", [h, half, end, zero]), b.op("Slice", [h, zero, half, zero])], axis=0)
    y = b.bn(b.op("Add", [h, rolled]), 4, name="bn_rolled")
    return b.model([batch or "N", 3, 8, 8], y, [batch or "N", 4, 8, 8])


@pytest.mark.parametrize("batch_size, n", [(2, 8), (32, 2)])
def test_fixed_batch_model_that_mixes_samples_is_not_made_symbolic_at_a_batch_dividing_it(batch_size, n):
    """A short batch is padded with filler that differs from its samples (their negation): padded
    with copies of the same 2 samples, the roll by F/2 = 2 maps the chunk onto itself, exactly what
    the symbolic graph computes at batch 2, and the check once accepted a graph whose statistics
    were 62 % off the dynamic twin's."""
    data = make_data((3, 8, 8), n=n)
    if n < 4:
        with pytest.raises(InputError, match="no complete batch"):
            calibrate(_rolled_batch_net(4), data, mode="batch", batch_size=batch_size)
        return
    calibrated, report = calibrate(_rolled_batch_net(4), data, mode="batch", batch_size=batch_size)
    assert report.run_batch_size == 4 and "could not be made symbolic (BN 'bn_rolled' input differs" in report.notes[0]
    twin = stats_of(calibrate(_rolled_batch_net(None), data, mode="batch", batch_size=4)[0])
    assert_stats_close(stats_of(calibrated), twin, rtol=1e-5)


def concat_constant_net(batch=1):
    """Conv output concatenated along channels with a constant map of batch 1 (no Expand): nothing
    to rewrite, so at batch > 1 the Concat fails and batch mode runs at the fixed batch."""
    b = _Builder(12)
    token = b._init("token", b.rng.normal(0, 1, (1, 1, 8, 8)))
    y = b.bn(b.op("Concat", [b.conv("x", 3, 4), token], axis=1), 5, name="bn_a")
    y = b.bn(b.op("Relu", [y]), 5, name="bn_b")
    return b.model([batch, 3, 8, 8], y, [batch, 5, 8, 8])


def test_fixed_batch_that_cannot_be_made_symbolic_falls_back_with_a_note(capfd):
    data = make_data((3, 8, 8), n=6)
    calibrated, report = calibrate(concat_constant_net(), data, mode="batch", batch_size=4)
    assert capfd.readouterr().err == ""  # the failed trial run is the note's business, not a logged error
    assert report.run_batch_size == 1 and report.n_batches == 6 and report.n_samples == 6
    (note,) = report.notes
    assert note.startswith(
        "batch mode ran at the model's fixed batch 1, not 4: its batch dimension could not be made symbolic ("
    )
    assert "Concat" in note and "\n" not in note
    assert "note: batch mode ran at the model's fixed batch 1" in report.format_table()
    # What it computed is batch mode at batch 1 (each sample normalized by its own statistics).
    assert_stats_close(
        stats_of(calibrated), reference_calibrate(concat_constant_net(), data.astype(np.float64), "batch", 1)
    )
    with pytest.raises(AssertionError):
        assert_stats_close(
            stats_of(calibrated),
            reference_calibrate(concat_constant_net(), data.astype(np.float64), "batch", 2),
            rtol=1e-3,
        )


def test_fixed_batch_symbolic_graph_that_runs_but_mixes_samples_is_refused():
    """A mean over axis 0 is a per-sample mean at the fixed batch 1 but mixes samples at batch 4:
    onnxruntime runs the symbolic graph happily, the sample-for-sample comparison refuses it."""
    b = _Builder(14)
    x = b.conv("x", 3, 4)
    centered = b.op("Sub", [x, b.op("ReduceMean", [x], axes=[0], keepdims=1)])
    y = b.bn(b.op("Add", [centered, x]), 4, name="bn_mixed")
    model = b.model([1, 3, 8, 8], y, [1, 4, 8, 8])
    data = make_data((3, 8, 8), n=8)
    calibrated, report = calibrate(model, data, mode="batch", batch_size=4)
    assert report.run_batch_size == 1 and len(report.notes) == 1
    assert "BN 'bn_mixed' input differs from the fixed-batch model's" in report.notes[0]
    # At batch 1 the mean over axis 0 is the sample itself: bn_mixed reads the conv output.
    b.nodes = b.nodes[:1]
    conv_out = run(b.model(["N", 3, 8, 8], x, ["N", 4, 8, 8]), data).astype(np.float64)
    np.testing.assert_allclose(bn_statistics(calibrated)["bn_mixed"][0], conv_out.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(bn_statistics(calibrated)["bn_mixed"][1], conv_out.var(axis=(0, 2, 3)), rtol=1e-4)


def _padded_vector_net():
    """(1, 6) input padded with a batch-1 constant to (1, 8) -> BN -> Relu -> BN: nothing to make
    symbolic (Concat with a constant), and at batch 1 each BN sees one value per channel."""
    b = _Builder(13)
    pad = b._init("pad", np.zeros((1, 2)))
    y = b.bn(b.op("Concat", ["x", pad], axis=1), 8, name="bn_vec")
    y = b.bn(b.op("Relu", [y]), 8, name="bn_out")
    return b.model([1, 6], y, [1, 8])


def test_fixed_batch_1_batch_mode_with_one_value_per_channel_calibrates_sequentially_with_a_note():
    """Batch statistics of one value per channel are undefined: default options still work, in
    sequential mode, and the report says so."""
    data = make_data((6,), n=5)
    calibrated, report = calibrate(_padded_vector_net(), data, mode="batch", batch_size=4)
    assert report.mode == "sequential" and report.run_batch_size == 1 and report.passes == 2
    assert report.notes[0].startswith(
        "calibrated in sequential mode, not batch mode: the model's batch dimension is fixed "
        "at 1 and could not be made symbolic ("
    )
    assert "BN 'bn_vec' sees one value per channel" in report.notes[0]
    want = stats_of(calibrate(_padded_vector_net(), data, mode="sequential", batch_size=4)[0])
    assert_stats_close(stats_of(calibrated), want, rtol=1e-6)
    np.testing.assert_allclose(
        bn_statistics(calibrated)["bn_vec"][1][:6], data.astype(np.float64).var(axis=0), rtol=1e-5
    )
    with pytest.raises(InputError, match=r"^calibrated in sequential mode, not batch mode.*one-shot iterator"):
        calibrate(_padded_vector_net(), iter([{"x": data}]), mode="batch", batch_size=4)


def test_fixed_batch_1_fallback_with_unknown_shapes_and_one_value_per_channel_is_an_error(monkeypatch):
    """Without static shapes (shape inference blind, as on a model with unknown ops) the degenerate
    BN shows only while running: a one-line error that points to --mode sequential instead of a
    batch size the model cannot take."""
    import bnfold.calibration.runner as runner

    real = runner.value_types  # calibrate() looks value_types up in runner
    monkeypatch.setattr(runner, "value_types", lambda m: (real(m)[0], {}))
    with pytest.raises(
        InputError, match=r"BN 'bn_vec' sees one value per channel at the model's fixed batch 1.*--mode sequential"
    ):
        calibrate(_padded_vector_net(), make_data((6,), n=5), mode="batch", batch_size=4)


@pytest.mark.parametrize("mode, batch_size", [("batch", 3), ("sequential", 4), ("sequential", 3)])
def test_fixed_batch_remainder_is_dropped_with_a_note(mode, batch_size):
    """Running at a fixed batch of 3, 11 samples fill 3 batches: the last 2 are not used (padding
    would need to know which BN-input rows belong to which sample) and the report says so."""
    data = make_data((3, 8, 8), n=11)
    calibrated, report = calibrate(with_fixed_batch(conv_stack(), 3), data, mode=mode, batch_size=batch_size)
    assert report.n_samples == 9 and report.n_batches == 3 and all(e.samples == 9 for e in report.entries)
    assert any(
        n == "the last 2 samples of the data were not used: the model's batch dimension is fixed at 3 and they do "
        "not fill a batch"
        for n in report.notes
    ), report.notes
    want = stats_of(calibrate(conv_stack(), data[:9], mode=mode, batch_size=3)[0])
    assert_stats_close(stats_of(calibrated), want, rtol=1e-5)
    with pytest.raises(
        InputError, match=r"no complete batch: the model's batch dimension is fixed at 3 and the data holds 2 samples"
    ):
        calibrate(with_fixed_batch(conv_stack(), 3), data[:2], mode=mode, batch_size=batch_size)


def test_fixed_batch_max_batches_counts_data_batches():
    data = make_data((3, 8, 8), n=20)
    _, report = calibrate(with_fixed_batch(conv_stack(), 1), data, mode="sequential", batch_size=4, max_batches=2)
    assert report.n_samples == 8 and report.n_batches == 8


def test_inputs_with_different_fixed_batches_are_an_error():
    model = _two_input_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_value = 2
    with pytest.raises(InputError, match=r"different fixed batch dimensions \('a': 1, 'b': 2\)"):
        calibrate(model, {"a": np.zeros((4, 3, 4), np.float32), "b": np.zeros((4, 3, 4), np.float32)})


def test_public_api_exports():
    assert bnfold.calibrate is calibrate
    assert bnfold.CalibrationReport.__name__ == "CalibrationReport"


# ------------------------------------------------------------------------------------------------
# float16 models
# ------------------------------------------------------------------------------------------------


def to_float16(model, statistics_dtype=np.float16):
    """Copy of a float32 model with initializers and I/O in float16; BN running mean/var in
    ``statistics_dtype`` (opset 15 lets them differ from X's type)."""
    half = onnx.ModelProto()
    half.CopyFrom(model)
    stats_names = {n.input[i] for n in half.graph.node if n.op_type == "BatchNormalization" for i in (3, 4)}
    for t in half.graph.initializer:
        dtype = statistics_dtype if t.name in stats_names else np.float16
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))
    for vi in list(half.graph.input) + list(half.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(half)
    return half


@pytest.mark.parametrize("statistics_dtype", [np.float16, np.float32])
@pytest.mark.parametrize("mode", ["batch", "sequential"])
def test_float16_model_matches_float64_reference(mode, statistics_dtype):
    model = to_float16(conv_stack(), statistics_dtype)
    data = make_data((3, 8, 8), n=22)
    calibrated, report = calibrate(model, data, mode=mode, batch_size=8)
    assert report.n_calibrated == 3
    got = bn_statistics(calibrated)
    assert all(m.dtype == statistics_dtype and v.dtype == statistics_dtype for m, v in got.values())
    # The reference runs the same float16 weights and float16-rounded data in float64; onnxruntime's
    # float16 forward pass rounds every activation to 11 significant bits.
    want = reference_calibrate(model, data.astype(np.float16).astype(np.float64), mode, 8)
    assert_stats_close({n: (m.astype(np.float64), v.astype(np.float64)) for n, (m, v) in got.items()}, want, rtol=4e-3)
    # Not merely "close": stale statistics are far off this tolerance.
    with pytest.raises(AssertionError):
        assert_stats_close(
            {n: (m.astype(np.float64), v.astype(np.float64)) for n, (m, v) in bn_statistics(model).items()},
            want,
            rtol=4e-3,
        )
    y = run(calibrated, data[:4].astype(np.float16))
    assert y.dtype == np.float16 and np.isfinite(y).all()


# ------------------------------------------------------------------------------------------------
# Non-finite values
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_value, kind", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
@pytest.mark.parametrize("mode", ["batch", "sequential"])
def test_non_finite_data_is_an_error_naming_input_and_sample(mode, bad_value, kind):
    data = make_data((3, 8, 8), n=20)
    data[13, 1, 2, 3] = bad_value
    with pytest.raises(InputError, match=rf"data\['x'\]: non-finite values \({kind}\) in sample 13"):
        calibrate(conv_stack(), {"x": data}, mode=mode, batch_size=8)


def test_non_finite_data_in_files_names_the_file(tmp_path):
    data = make_data((3, 8, 8), n=20)
    parts = tmp_path / "parts"
    parts.mkdir()
    np.savez(parts / "a.npz", x=data[:10])
    bad = data[10:].copy()
    bad[4, 0, 0, 0] = np.nan
    np.savez_compressed(parts / "b.npz", x=bad)
    with pytest.raises(InputError, match=r"b\.npz:x: non-finite values \(NaN\) in sample 4"):
        calibrate(conv_stack(), parts, batch_size=6)
    np.save(tmp_path / "bad.npy", np.concatenate([data[:10], bad]))
    with pytest.raises(InputError, match=r"bad\.npy: non-finite values \(NaN\) in sample 14"):
        calibrate(conv_stack(), tmp_path / "bad.npy", batch_size=6)


def test_data_overflowing_the_model_dtype_is_an_error():
    data = make_data((3, 8, 8), n=6).astype(np.float64)
    data[2, 0, 0, 0] = 1e6  # finite in float64, Inf once converted to the model's float16
    with pytest.raises(InputError, match=r"sample 2.*out of the float16 range"):
        calibrate(to_float16(conv_stack()), {"x": data}, batch_size=4)


def _overflowing_model():
    """x -> x * x * 1e38 -> BN: finite data, Inf inside the network."""
    b = _Builder(7)
    square = b.op("Mul", ["x", "x"])
    big = b._init("big", np.float32(1e38))
    y = b.bn(b.op("Mul", [square, big]), 6, name="bn_overflow")
    return b.model(["N", 6], y, ["N", 6])


@pytest.mark.parametrize("mode", ["batch", "sequential"])
def test_non_finite_statistics_from_finite_data_is_an_error_naming_the_bn(mode):
    data = make_data((6,), n=10) * 3
    with pytest.raises(InputError, match=r"BN 'bn_overflow'.*non-finite"):
        calibrate(_overflowing_model(), data, mode=mode, batch_size=5)


def test_statistics_out_of_the_float16_range_are_an_error():
    model = to_float16(conv_stack())
    data = make_data((3, 8, 8), n=8) * 2000  # BN inputs finite in float16, variance above 65504
    with pytest.raises(InputError, match=r"BN 'bn2': the calibrated running_var exceeds the float16 range"):
        calibrate(model, data, mode="sequential", batch_size=4)


def test_empty_files_are_named(tmp_path):
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(InputError, match=r"empty\.npz: the archive holds no arrays \(no samples\)"):
        calibrate(conv_stack(), tmp_path / "empty.npz")
    np.savez(tmp_path / "zero.npz", x=np.zeros((0, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match=r"zero\.npz: calibration data is empty \(0 samples\)"):
        calibrate(conv_stack(), tmp_path / "zero.npz")
    parts = tmp_path / "parts"
    parts.mkdir()
    np.savez(parts / "a.npz", x=make_data((3, 8, 8), n=4))
    np.savez(parts / "b.npz")
    with pytest.raises(InputError, match=r"b\.npz: the archive holds no arrays"):
        calibrate(conv_stack(), parts)


@pytest.mark.parametrize(
    "n, batch_size, mode, summary",
    [
        (1, 4, "sequential", "1 sample in 1 batch of 4, 3 passes"),
        (10, 32, "batch", "10 samples in 1 batch of 32, 1 pass,"),
        (10, 4, "batch", "10 samples in 3 batches of 4, 1 pass,"),
    ],
)
def test_summary_line_singular_and_plural(n, batch_size, mode, summary):
    _, report = calibrate(conv_stack(), make_data((3, 8, 8), n=n), mode=mode, batch_size=batch_size)
    assert summary in report.format_table()


# ------------------------------------------------------------------------------------------------
# One value per channel in all the data; no RuntimeWarning on degenerate statistics (issue 11)
# ------------------------------------------------------------------------------------------------


def _calibrate_quietly(*args, **kwargs):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model, report = calibrate(*args, **kwargs)
        report.to_dict()
        report.format_table()
    return model, report


@pytest.mark.parametrize(
    "mode, message",
    [
        ("batch", r"batch 1: BN 'bn_in' sees one value per channel"),
        (
            "sequential",
            (
                r"BN 'bn_in' sees one value per channel in all the calibration data \(1 sample\); one value is "
                r"not a population"
            ),
        ),
    ],
)
def test_one_sample_without_spatial_positions_is_refused_in_both_modes(mode, message):
    """bn_gemm's BNs see (N, C): one sample is one value per channel, whose variance is 0 for every
    channel whatever the data; sequential mode wrote exactly that."""
    with pytest.raises(InputError, match=message) as raised:
        calibrate(bn_gemm(), make_data((6,), n=1), mode=mode)
    assert len(str(raised.value).splitlines()) == 1


@pytest.mark.parametrize("mode", ["batch", "sequential"])
def test_one_sample_at_a_fixed_batch_of_1_is_refused(mode):
    # torch.onnx.export's default batch 1: sequential mode runs sample by sample, which is fine
    # for many samples (see test_fixed_batch_sequential_runs_at_the_fixed_batch), not for one.
    with pytest.raises(InputError, match=r"BN 'bn_in' sees one value per channel"):
        calibrate(with_fixed_batch(bn_gemm(), 1), make_data((6,), n=1), mode=mode)
    _, report = _calibrate_quietly(with_fixed_batch(bn_gemm(), 1), make_data((6,), n=3), mode="sequential")
    assert report.entry("bn_in").values_per_channel == 3


@pytest.mark.parametrize("mode", ["batch", "sequential"])
def test_one_sample_with_spatial_positions_is_a_population(mode):
    _, report = _calibrate_quietly(conv_stack(), make_data((3, 8, 8), n=1), mode=mode)
    assert report.n_calibrated == 3
    assert all((e.new_var > 0).all() for e in report.calibrated)


@pytest.mark.parametrize("mode", ["batch", "sequential"])
def test_two_identical_samples_give_a_real_variance_of_0(mode):
    data = np.repeat(make_data((6,), n=1), 2, axis=0)
    model, report = _calibrate_quietly(bn_gemm(), data, mode=mode)
    entry = report.entry("bn_in")
    assert entry.values_per_channel == 2 and (entry.new_var == 0).all()
    assert np.isfinite(run(model, data)).all()


@pytest.mark.parametrize("mode", ["batch", "sequential"])
def test_cli_one_sample_exits_2_in_one_line_and_writes_nothing(tmp_path, mode):
    import subprocess
    import sys

    model_path, data_path, out = tmp_path / "m.onnx", tmp_path / "one.npy", tmp_path / "out.onnx"
    onnx.save(bn_gemm(), model_path)
    np.save(data_path, make_data((6,), n=1))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bnfold",
            "calibrate",
            str(model_path),
            "-o",
            str(out),
            "--data",
            str(data_path),
            "--mode",
            mode,
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    err = done.stderr.splitlines()
    assert done.returncode == 2, (done.stdout, err)
    assert len(err) == 1 and err[0].startswith("bnfold calibrate: error: ") and "one value per channel" in err[0], err
    assert not out.exists()


def _degenerate_statistics_model(mean, var, epsilon):
    """bn_gemm with bn_in's old statistics replaced (what a broken export may hold)."""
    model = bn_gemm()
    for tensor in model.graph.initializer:
        if tensor.name in ("bn_in.mean", "bn_in.var"):
            value = mean if tensor.name.endswith("mean") else var
            tensor.CopyFrom(numpy_helper.from_array(np.full(6, value, np.float32), tensor.name))
    for node in model.graph.node:
        if node.name == "bn_in":
            node.ClearField("attribute")
            node.attribute.append(helper.make_attribute("epsilon", epsilon))
    return model


@pytest.mark.parametrize(
    "mean, var, epsilon", [(0.0, 0.0, 0.0), (np.inf, 1.0, 1e-3), (np.nan, np.nan, 1e-3), (1.0, -np.inf, 1e-3)]
)
@pytest.mark.parametrize("mode", ["batch", "sequential"])
def test_degenerate_old_statistics_give_no_runtime_warning(mean, var, epsilon, mode):
    _, report = _calibrate_quietly(_degenerate_statistics_model(mean, var, epsilon), make_data((6,), n=8), mode=mode)
    assert report.n_calibrated == 2


def test_overflowing_network_at_a_fixed_batch_is_refused_without_runtime_warning():
    # Batch mode checks a symbolic batch against the fixed-batch model first: Inf in both runs.
    model = with_fixed_batch(conv_stack(), 1)
    for tensor in model.graph.initializer:
        if tensor.name == "conv1.w":
            tensor.CopyFrom(numpy_helper.from_array(np.full((4, 3, 3, 3), np.inf, np.float32), tensor.name))
    with pytest.raises(InputError, match="non-finite inputs"):
        _calibrate_quietly(model, make_data((3, 8, 8), n=4), mode="batch", batch_size=4)


def test_cli_data_onnxruntime_cannot_run_is_one_line(tmp_path):
    import subprocess
    import sys

    # Data of 4 channels for a model that takes 3 (the input's channels are dynamic, so the data
    # passes validation): onnxruntime's Conv fails, and logs nothing of its own on stderr.
    model = conv_stack()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "C"
    model_path, data_path = tmp_path / "m.onnx", tmp_path / "data.npy"
    onnx.save(model, model_path)
    np.save(data_path, make_data((4, 8, 8), n=4))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bnfold",
            "calibrate",
            str(model_path),
            "-o",
            str(tmp_path / "o.onnx"),
            "--data",
            str(data_path),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    err = done.stderr.splitlines()
    assert done.returncode == 2 and len(err) == 1, err
    assert "onnxruntime failed on the calibration data" in err[0], err
