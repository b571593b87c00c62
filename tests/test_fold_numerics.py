"""Numerics of every fold: subnormal results flushed to zero and counted (``fold``, ``fold_file``'s
deferred products, ``inspect``, ``bnfold fold``), tensors the fold did not write left alone,
float16 left unflushed and bfloat16 judged as stored, float16 biases, and the channels whose
near-zero variance ``inspect`` and the fold report flag."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.cli.app import main
from bnfold.folding.rules.base import LOST_PRECISION_LIMIT
from bnfold.folding.screening import OUTLIER_SCALE_RATIO
from bnfold.folding.tensors import ScaledWeight, count_subnormals, flush_subnormals
from fold_testing import MM

F32_TINY = float(np.finfo(np.float32).tiny)  # 1.1754944e-38, the smallest normal float32

NUMPY_TYPES = {
    TensorProto.FLOAT: np.dtype(np.float32),
    TensorProto.DOUBLE: np.dtype(np.float64),
    TensorProto.FLOAT16: np.dtype(np.float16),
    TensorProto.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
}


def conv_bn_model(
    gamma,
    beta=None,
    mean=None,
    var=None,
    *,
    cin=4,
    kernel=3,
    elem=TensorProto.FLOAT,
    params_elem=None,
    epsilon=1e-5,
    weight=None,
    seed=0,
):
    """x -> Conv(w, no bias) -> BN(gamma, beta, mean, var) -> y, every array given in float64."""
    rng = np.random.default_rng(seed)
    gamma = np.asarray(gamma, dtype=np.float64)
    cout = gamma.size
    beta = np.zeros(cout) if beta is None else np.asarray(beta, dtype=np.float64)
    mean = np.zeros(cout) if mean is None else np.asarray(mean, dtype=np.float64)
    var = np.ones(cout) if var is None else np.asarray(var, dtype=np.float64)
    w = rng.standard_normal((cout, cin, kernel, kernel)) if weight is None else weight
    types = NUMPY_TYPES[elem], NUMPY_TYPES[params_elem or elem]
    inits = [numpy_helper.from_array(np.asarray(w).astype(types[0]), "w")] + [
        numpy_helper.from_array(value.astype(types[1]), name)
        for name, value in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var))
    ]
    pad = kernel // 2
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[pad] * 4),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], epsilon=epsilon),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", elem, [1, cin, 6, 6])],
        [helper.make_tensor_value_info("y", elem, [1, cout, 6, 6])],
        inits,
    )
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 15)])


def folded_conv_tensors(model):
    """(weight, bias) of the single Conv of a folded model, as numpy arrays."""
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    inits = {t.name: t for t in model.graph.initializer}
    return numpy_helper.to_array(inits[conv.input[1]]), numpy_helper.to_array(inits[conv.input[2]])


def expected_fold(model):
    """The folded weight and bias computed here in float64 and rounded once, unflushed."""
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    eps = next(a.f for a in bn.attribute if a.name == "epsilon")
    dtype = numpy_helper.to_array(model.graph.initializer[0]).dtype
    s = inits["gamma"] / np.sqrt(inits["var"] + np.float64(np.float32(eps)))
    t = inits["beta"] - inits["mean"] * s
    return (inits["w"] * s[:, None, None, None]).astype(dtype), t.astype(dtype)


def tiny_gamma_model(cout=8, cin=4, kernel=3):
    """Channels 0 and 1 scaled by 1e-38: a good part of their folded float32 weights is subnormal,
    and channel 2's bias t = beta is 3e-39 (subnormal as well)."""
    gamma = np.ones(cout)
    gamma[:2] = 1e-38
    beta = np.zeros(cout)
    beta[2] = 3e-39
    return conv_bn_model(gamma, beta, params_elem=TensorProto.DOUBLE, cin=cin, kernel=kernel)


def assert_flushed(got, expected):
    """``got`` is ``expected`` with every subnormal replaced by a zero of its sign, bit for bit."""
    assert count_subnormals(got) == 0
    sub = (np.abs(expected.astype(np.float64)) < float(np.finfo(expected.dtype).tiny)) & (expected != 0)
    np.testing.assert_array_equal(got[~sub], expected[~sub])
    assert np.all(got[sub] == 0)
    np.testing.assert_array_equal(np.signbit(got[sub]), np.signbit(expected[sub]))


# ----- the helpers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64, ml_dtypes.bfloat16])
def test_flush_subnormals_zeroes_exactly_the_subnormals_keeping_their_sign(dtype):
    info = np.finfo(dtype)
    values = np.array(
        [0.0, -0.0, 1.0, float(info.tiny), -float(info.tiny) / 2, float(info.tiny) / 64, np.inf, np.nan, -3.5],
        dtype=np.float64,
    ).astype(dtype)
    flushed, n = flush_subnormals(values)
    assert n == count_subnormals(values) == 2
    assert flushed[4] == 0 and np.signbit(flushed[4]) and flushed[5] == 0 and not np.signbit(flushed[5])
    keep = [0, 1, 2, 3, 6, 8]
    np.testing.assert_array_equal(flushed[keep], values[keep])
    assert np.isnan(flushed[7])
    assert values[4] != 0  # a copy: the input is unchanged


def test_float16_is_never_flushed():
    values = np.array([6e-8, -1e-6, 1.0], dtype=np.float16)  # the first two are float16 subnormals
    flushed, n = flush_subnormals(values)
    assert n == count_subnormals(values) == 0 and flushed is values


def test_count_spans_scan_chunks(monkeypatch):
    import bnfold.folding.tensors as tensors

    monkeypatch.setattr(tensors, "_SCAN_ELEMENTS", 7)
    values = np.ones(100, dtype=np.float32)
    values[[0, 6, 7, 50, 99]] = 1e-40
    flushed, n = flush_subnormals(values)
    assert n == 5 and count_subnormals(flushed) == 0 and np.count_nonzero(flushed) == 95


# ----- flush in fold, fold_file, inspect -------------------------------------------------------------
def test_fold_flushes_the_subnormals_it_computes_and_counts_them():
    model = tiny_gamma_model()
    weight, bias = expected_fold(model)
    n_expected = count_subnormals(weight) + count_subnormals(bias)
    assert count_subnormals(bias) == 1 and count_subnormals(weight) > 20  # the case is what it claims
    folded, report = bnfold.fold(model)
    got_w, got_b = folded_conv_tensors(folded)
    assert_flushed(got_w, weight)
    assert_flushed(got_b, bias)
    assert report.flushed_subnormals == n_expected
    assert report.to_dict()["flushed_subnormals"] == n_expected
    assert bnfold.inspect(model).flushed_subnormals == n_expected


def test_nothing_to_flush_counts_zero():
    _, report = bnfold.fold(conv_bn_model(np.ones(4)))
    assert report.flushed_subnormals == 0 and report.to_dict()["flushed_subnormals"] == 0


def big_tiny_gamma_model():
    """64 x 64 x 3 x 3 float32 weight (144 KiB): above the payload threshold, so fold_file
    computes its product only while writing it."""
    return tiny_gamma_model(cout=64, cin=64)


def test_fold_file_flushes_the_deferred_products_as_it_writes_them(tmp_path, monkeypatch):
    model = big_tiny_gamma_model()
    weight, bias = expected_fold(model)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    written = []
    original_write_to = ScaledWeight.write_to

    def recording_write_to(self, file):
        written.append(self)
        original_write_to(self, file)

    monkeypatch.setattr(ScaledWeight, "write_to", recording_write_to)
    monkeypatch.setattr(ScaledWeight, "CHUNK_BYTES", 4096)  # many chunks, subnormals in several
    report = bnfold.fold_file(str(src), str(out))
    assert len(written) == 1 and written[0].flush  # the weight went the deferred way, flushed
    assert written[0].flushed == count_subnormals(weight)
    got_w, got_b = folded_conv_tensors(onnx.load(out))
    assert_flushed(got_w, weight)
    assert_flushed(got_b, bias)
    assert report.flushed_subnormals == count_subnormals(weight) + count_subnormals(bias)
    # fold / inspect of the path agree, and give the same model
    folded, fold_report = bnfold.fold(str(src))
    assert fold_report.flushed_subnormals == report.flushed_subnormals
    assert bnfold.inspect(str(src)).flushed_subnormals == report.flushed_subnormals
    assert folded == onnx.load(out)


def test_fold_file_report_holds_the_count_when_verify_sees_it(tmp_path):
    model = big_tiny_gamma_model()
    weight, bias = expected_fold(model)
    src = tmp_path / "in.onnx"
    onnx.save(model, src)
    seen = []

    def verify(tmp_path_written, report=None):
        seen.append(count_subnormals(folded_conv_tensors(onnx.load(tmp_path_written))[0]))
        return True

    report = bnfold.fold_file(str(src), str(tmp_path / "out.onnx"), verify=verify)
    assert seen == [0]
    assert report.flushed_subnormals == count_subnormals(weight) + count_subnormals(bias) > 0


def test_a_weight_folded_twice_is_flushed_only_as_it_ends_up():
    # BN 1 makes the product subnormal (2e-39 * w), BN 2 scales it back by 1e30: flushing the
    # intermediate would have zeroed values the final weight holds as normal numbers.
    model = conv_bn_model(np.full(2, 2e-39), params_elem=TensorProto.DOUBLE, cin=2)
    g = model.graph
    g.node[1].output[0] = "z"
    for name in ("gamma2", "beta2", "mean2", "var2"):
        value = np.full(2, 1e30) if name == "gamma2" else np.ones(2) if name == "var2" else np.zeros(2)
        g.initializer.append(numpy_helper.from_array(value, name))
    g.node.append(helper.make_node("BatchNormalization", ["z", "gamma2", "beta2", "mean2", "var2"], ["y"]))
    folded, report = bnfold.fold(model)
    assert report.n_folded == 2
    got_w, _ = folded_conv_tensors(folded)
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    first = (w * (2e-39 / np.sqrt(1 + np.float64(np.float32(1e-5))))).astype(np.float32)
    assert count_subnormals(first) == first.size  # the intermediate weight was all subnormal
    second = (first.astype(np.float64) * (1e30 / np.sqrt(1 + 1e-5))).astype(np.float32)  # default epsilon
    np.testing.assert_array_equal(got_w, second)
    assert np.all(got_w != 0) and report.flushed_subnormals == 0


def test_float64_subnormals_are_flushed():
    gamma = np.ones(4)
    gamma[0] = 1e-308
    model = conv_bn_model(gamma, elem=TensorProto.DOUBLE)
    weight, _ = expected_fold(model)
    assert count_subnormals(weight) > 0
    folded, report = bnfold.fold(model)
    got_w, _ = folded_conv_tensors(folded)
    assert_flushed(got_w, weight)
    assert report.flushed_subnormals == count_subnormals(weight)


# ----- what the fold did not write stays ----------------------------------------------------------
def subnormal_bystanders_model(big=False):
    """A folded Conv -> BN next to tensors holding subnormals that no fold writes: a weight shared
    with a second Conv (the fold writes a fresh copy), the parameters of a BN that stays (it
    reads a graph input), and a constant added to the second Conv's output."""
    cin = 64 if big else 4
    rng = np.random.default_rng(3)
    shared = rng.standard_normal((cin, cin, 3, 3)).astype(np.float32)
    shared[0, 0, 0, 0] = 1e-40
    gamma = np.full(cin, 1e-38)
    inits = [
        numpy_helper.from_array(shared, "w"),
        numpy_helper.from_array(gamma.astype(np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(cin, np.float32), "beta"),
        numpy_helper.from_array(np.zeros(cin, np.float32), "mean"),
        numpy_helper.from_array(np.ones(cin, np.float32), "var"),
        numpy_helper.from_array(np.full(cin, 1e-39, np.float32), "kept_gamma"),
        # Varies over the spatial axes: not a per-channel chain that conv_affine would fold.
        numpy_helper.from_array(np.full((1, 1, 5, 5), -2e-41, np.float32), "offset"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y1"]),
        helper.make_node("Conv", ["x", "w"], ["c2"], pads=[1] * 4),
        helper.make_node("Add", ["c2", "offset"], ["y2"]),
        helper.make_node("BatchNormalization", ["x", "kept_gamma", "beta", "mean", "var"], ["y3"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 5, 5])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, cin, 5, 5]) for n in ("y1", "y2", "y3")]
    graph = helper.make_graph(nodes, "g", [x], outs, inits)
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 15)])


UNTOUCHED = ("w", "kept_gamma", "offset", "beta", "mean", "var")


@pytest.mark.parametrize("big", [False, True])
def test_tensors_no_fold_wrote_keep_their_subnormals(tmp_path, big):
    model = subnormal_bystanders_model(big)
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    fold_file_report = bnfold.fold_file(str(src), str(out))
    for folded, report in ((bnfold.fold(model)), (onnx.load(out), fold_file_report)):
        assert report.n_folded == 1 and report.remaining[0].reason == "no_foldable_neighbour"
        after = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
        for name in UNTOUCHED:
            np.testing.assert_array_equal(after[name], before[name])
            assert after[name].tobytes() == before[name].tobytes()
        assert count_subnormals(after["w"]) == 1  # the second Conv's weight, shared before
        new_weight = next(n for n in folded.graph.node if n.op_type == "Conv" and n.output[0] == "y1").input[1]
        assert new_weight != "w" and count_subnormals(after[new_weight]) == 0
        assert report.flushed_subnormals > 0


# ----- float16 / bfloat16 ------------------------------------------------------------------------------
def test_float16_folds_keep_their_subnormals_and_count_none():
    # One channel of eight scaled by 1e-5: its folded float16 weights are subnormal, the layer's
    # norm is the other seven's, so the precision check lets the fold through.
    gamma = np.ones(8)
    gamma[0] = 1e-5
    model = conv_bn_model(gamma, elem=TensorProto.FLOAT16, params_elem=TensorProto.FLOAT)
    weight, bias = expected_fold(model)
    assert np.count_nonzero((np.abs(weight.astype(np.float64)) < 6.1e-5) & (weight != 0)) > 20
    folded, report = bnfold.fold(model)
    assert report.n_folded == 1 and report.flushed_subnormals == 0
    got_w, got_b = folded_conv_tensors(folded)
    np.testing.assert_array_equal(got_w, weight)  # bit for bit: rounded once, nothing flushed
    np.testing.assert_array_equal(got_b, bias)


def test_float16_fold_that_underflows_its_weights_still_stays_unfolded():
    model = conv_bn_model(np.full(4, 1e-6), elem=TensorProto.FLOAT16, params_elem=TensorProto.FLOAT)
    folded, report = bnfold.fold(model)
    assert [r.reason for r in report.remaining] == ["would_lose_precision"]
    assert report.n_folded == 0 and folded.graph.initializer[0] == model.graph.initializer[0]


def test_float16_bias_that_would_overflow_stays_unfolded():
    beta = np.zeros(4)
    beta[1] = 7e4  # beyond 65504: only the float32 parameters can hold it
    model = conv_bn_model(np.ones(4), beta, elem=TensorProto.FLOAT16, params_elem=TensorProto.FLOAT)
    _, report = bnfold.fold(model)
    assert [r.reason for r in report.remaining] == ["would_overflow"]
    assert "bias" in report.remaining[0].message


def run_ort(model, x):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_float16_bias_underflow_costs_no_more_than_the_models_own_output_rounding():
    # The BN's shift is 1e-9 (float32 parameters): the folded float16 bias rounds it to zero, an
    # absolute error below the float16 rounding of the output that the original BN does too.
    rng = np.random.default_rng(5)
    beta = np.full(4, 1e-9)
    mean = rng.standard_normal(4) * 1e-9
    model = conv_bn_model(np.ones(4), beta, mean, elem=TensorProto.FLOAT16, params_elem=TensorProto.FLOAT)
    folded, report = bnfold.fold(model)
    assert report.n_folded == 1
    _, got_b = folded_conv_tensors(folded)
    assert np.all(got_b == 0)  # underflowed: the case is what it claims
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float16)
    # the exact function, in float64
    from onnx.reference import ReferenceEvaluator

    exact_model = conv_bn_model(np.ones(4), beta, mean, elem=TensorProto.DOUBLE)
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    exact_model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    exact = ReferenceEvaluator(exact_model).run(None, {"x": x.astype(np.float64)})[0]
    original_error = np.abs(run_ort(model, x).astype(np.float64) - exact)
    folded_error = np.abs(run_ort(folded, x).astype(np.float64) - exact)
    # each element: no worse than the original's rounding of that element plus half a float16 ulp
    ulp = np.spacing(np.abs(exact).astype(np.float16)).astype(np.float64)
    assert np.all(folded_error <= original_error + ulp)


def bfloat16_model(gamma, weight):
    return conv_bn_model(gamma, elem=TensorProto.BFLOAT16, params_elem=TensorProto.DOUBLE, weight=weight, cin=2)


def test_bfloat16_subnormals_are_flushed_and_counted():
    weight = np.random.default_rng(2).standard_normal((8, 2, 3, 3))
    gamma = np.ones(8)
    gamma[0] = 1e-38
    model = bfloat16_model(gamma, weight)
    expected, _ = expected_fold(model)
    assert count_subnormals(expected) > 3
    folded, report = bnfold.fold(model)
    assert report.n_folded == 1
    got_w, _ = folded_conv_tensors(folded)
    assert_flushed(got_w, expected)
    assert report.flushed_subnormals == count_subnormals(expected)


def test_bfloat16_precision_is_judged_on_the_flushed_weights():
    # Folded weights at the bottom of the normal range, one in five of them below it: rounded into
    # bfloat16's subnormals they would keep their precision, flushed to zero they lose it.
    rng = np.random.default_rng(4)
    weight = rng.uniform(1.2, 2.0, (4, 2, 3, 3)) * rng.choice([-1, 1], (4, 2, 3, 3))
    weight[:, :, 0, :2] = 0.4  # 8 of 36 elements per channel
    gamma = np.full(4, F32_TINY * np.sqrt(1 + np.float64(np.float32(1e-5))))
    model = bfloat16_model(gamma, weight)
    product = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64) * F32_TINY
    unit = 2.0**-8
    rounded = product.astype(ml_dtypes.bfloat16).astype(np.float64)
    assert np.linalg.norm(rounded - product) / np.linalg.norm(product) / unit < LOST_PRECISION_LIMIT
    _, report = bnfold.fold(model)
    assert [r.reason for r in report.remaining] == ["would_lose_precision"]


# ----- the command line ------------------------------------------------------------------------------
def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out


def test_bnfold_fold_prints_and_reports_the_flush(tmp_path, capsys):
    model = big_tiny_gamma_model()
    weight, bias = expected_fold(model)
    src, out, report_path = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model, src)
    code, text = _cli(capsys, "fold", src, "-o", out, "--json", report_path, "--no-check")
    n = count_subnormals(weight) + count_subnormals(bias)
    assert code == 0
    assert f"subnormals flushed to zero: {n} value(s)" in text
    assert json.loads(report_path.read_text())["flushed_subnormals"] == n
    assert count_subnormals(folded_conv_tensors(onnx.load(out))[0]) == 0


def test_bnfold_fold_says_nothing_of_a_flush_that_did_not_happen(tmp_path, capsys):
    src = tmp_path / "in.onnx"
    onnx.save(conv_bn_model(np.ones(4)), src)
    code, text = _cli(capsys, "fold", src, "-o", tmp_path / "out.onnx", "--no-check")
    assert code == 0 and "subnormal" not in text and "outlier" not in text


# ----- variance outliers ------------------------------------------------------------------------------
def dead_channel_model(channels=(3,), cout=16, epsilon=1e-12):
    """Channels with running variance 0 next to unit-variance ones: with eps 1e-12 their scale is
    1e6 times the others'."""
    var = np.random.default_rng(7).uniform(0.5, 2.0, cout)
    var[list(channels)] = 0.0
    return conv_bn_model(np.ones(cout), var=var, epsilon=epsilon)


def test_inspect_and_fold_flag_near_zero_variance_channels(tmp_path):
    model = dead_channel_model(channels=(3, 11))
    report = bnfold.inspect(model)
    assert report.bn_nodes[0].outlier_channels == (3, 11)
    _, fold_report = bnfold.fold(model)
    assert fold_report.n_folded == 1  # flagged, not refused
    assert fold_report.folded[0].outlier_channels == (3, 11)
    assert fold_report.bn_nodes[0].outlier_channels == (3, 11)
    fold_report.to_json(tmp_path / "r.json")
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["bn_nodes"][0]["outlier_channels"] == [3, 11]
    assert written["folded"][0]["outlier_channels"] == [3, 11]


def test_a_remaining_bn_is_flagged_too():
    model = dead_channel_model()
    model.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 16, 6, 6]))
    report = bnfold.inspect(model)
    assert report.remaining[0].reason == "graph_output"
    assert report.bn_nodes[0].outlier_channels == (3,)


@pytest.mark.parametrize(
    "what",
    ["large gamma", "small variance, gamma compensates", "dead channel at eps 1e-5", "just under the ratio"],
)
def test_what_is_not_a_variance_outlier(what):
    cout = 16
    gamma, var, epsilon = np.ones(cout), np.ones(cout), 1e-5
    if what == "large gamma":
        gamma[2] = 1e6  # a trained network's choice, not a degenerate variance
    elif what == "small variance, gamma compensates":
        var[2], epsilon, gamma[2] = 0.0, 1e-12, 1e-4  # scale 100x the others
    elif what == "dead channel at eps 1e-5":
        var[2] = 0.0  # scale ~316x the median: far, not orders of magnitude
    else:
        var[2], epsilon = (1 / OUTLIER_SCALE_RATIO) ** 2 * 1.01, 0.0
    model = conv_bn_model(gamma, var=var, epsilon=epsilon)
    assert bnfold.inspect(model).bn_nodes[0].outlier_channels == ()


def test_bnfold_inspect_and_fold_list_the_outliers(tmp_path, capsys):
    src, report_path = tmp_path / "in.onnx", tmp_path / "i.json"
    onnx.save(dead_channel_model(channels=(3, 11)), src)
    code, text = _cli(capsys, "inspect", src, "--json", report_path)
    assert code == 0
    assert "1 BatchNormalization node(s) with variance-outlier channels:" in text
    assert "outlier channels of BatchNormalization#1: 3, 11 (variance ~0" in text
    assert json.loads(report_path.read_text())["bn_nodes"][0]["outlier_channels"] == [3, 11]
    code, text = _cli(capsys, "fold", src, "-o", tmp_path / "out.onnx", "--no-check")
    assert code == 0 and "outlier channels of BatchNormalization#1: 3, 11" in text


def test_many_outliers_are_listed_in_short():
    model = dead_channel_model(channels=tuple(range(12)), cout=40)
    from bnfold.cli.fold import outlier_lines

    (line,) = outlier_lines(bnfold.inspect(model).bn_nodes)
    assert "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ... (12 in all)" in line


@pytest.mark.parametrize("name", sorted(MM.CASES))
def test_the_fold_cases_flag_and_flush_nothing(name):
    builder, _ = MM.CASES[name]
    _, report = bnfold.fold(builder())
    assert all(info.outlier_channels == () for info in report.bn_nodes)
    assert report.flushed_subnormals == 0


def test_the_demo_models_flag_and_flush_nothing():
    from bnfold.demo.zoo import build_resnet

    _, report = bnfold.fold(build_resnet())
    assert report.n_folded > 10
    assert all(info.outlier_channels == () for info in report.bn_nodes)
    assert report.flushed_subnormals == 0
