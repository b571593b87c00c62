"""Property test of the fold pass on random small graphs: chains of Conv / ConvTranspose / Gemm /
MatMul / Add / Sub / Mul / Div / Relu / BatchNormalization (2-D ones also Unsqueeze -> BN ->
Squeeze) with random shapes and parameters (so
decomposed BNs, BN merges and channel-widening broadcasts too), some values
also graph outputs or read by a second consumer. Whatever the graph, fold must not crash, must keep
the model valid and its outputs equal, must be idempotent, and must account for every BN."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bnfold.folding.fold_pass import fold
from fold_testing import assert_parity, count_bn, report_entries, run_model, signature


class _Chain:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.outputs = [], [], []
        self.count = 0

    def name(self, prefix):
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, prefix, value):
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def node(self, op, inputs, **attrs):
        out = self.name(op.lower() + "_out")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op.lower()), **attrs))
        return out


def _batch_norm(c, value, ch):
    rng = c.rng
    gamma = rng.uniform(0.5, 1.8, ch) * rng.choice([-1, 1], ch)
    params = [
        c.const("g", gamma),
        c.const("b", rng.normal(0, 0.5, ch)),
        c.const("m", rng.normal(0, 0.5, ch)),
        c.const("v", rng.uniform(0.4, 2.5, ch)),
    ]
    return c.node("BatchNormalization", [value, *params], epsilon=float(rng.choice([1e-5, 1e-3])))


def _build(mode, ops, marks, seed):
    """Model for one drawn chain; ``marks[i]`` says what else reads op i's output (0 nothing,
    1 it is also a graph output, 2 a second consumer (Relu -> graph output))."""
    c = _Chain(seed)
    rng = c.rng
    c.axes = c.const("axes", [2])
    c.inits[-1] = numpy_helper.from_array(np.array([2], np.int64), c.axes)
    if mode == "4d":
        shape = [2, int(rng.integers(1, 5)), int(rng.integers(3, 7)), int(rng.integers(3, 7))]
    else:
        shape = [3, int(rng.integers(2, 7))]
    x = "x"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))]
    value = x
    for op, mark in zip(ops, marks):
        ch = shape[1]
        if op == "Conv":
            cout = int(rng.integers(1, 6))
            depthwise = cout == ch and rng.random() < 0.4
            group = ch if depthwise else 1
            k = int(rng.choice([1, 3]))
            pad = int(rng.integers(0, 2)) if k == 3 else 0
            w = c.const("W", rng.normal(0, 0.5, (cout, ch // group, k, k)))
            ins = [value, w] + ([c.const("B", rng.normal(0, 0.3, cout))] if rng.random() < 0.5 else [])
            value = c.node("Conv", ins, pads=[pad] * 4, group=group)
            shape = [shape[0], cout, shape[2] - k + 1 + 2 * pad, shape[3] - k + 1 + 2 * pad]
            if min(shape[2:]) < 1:
                return None
        elif op == "Branches":
            # A RepVGG / MobileOne block: Convs of one input (3x3 and 1x1, some with a BN), maybe an
            # identity BN, summed by Adds; sometimes a branch is also a graph output.
            cout = ch if rng.random() < 0.6 else int(rng.integers(1, 6))
            group = ch if cout == ch and rng.random() < 0.4 else 1
            summands = []
            for k in [3] + [int(rng.choice([1, 3])) for _ in range(int(rng.integers(1, 3)))]:
                w = c.const("W", rng.normal(0, 0.5, (cout, ch // group, k, k)))
                ins = [value, w] + ([c.const("B", rng.normal(0, 0.3, cout))] if rng.random() < 0.5 else [])
                branch = c.node("Conv", ins, pads=[k // 2] * 4, group=group)
                if rng.random() < 0.7:
                    branch = _batch_norm(c, branch, cout)
                if rng.random() < 0.1:
                    c.outputs.append(branch)
                summands.append(branch)
            if cout == ch and rng.random() < 0.7:
                summands.insert(int(rng.integers(0, len(summands) + 1)), _batch_norm(c, value, ch))
            value = summands[0]
            for other in summands[1:]:
                value = c.node("Add", [value, other])
            shape = [shape[0], cout, shape[2], shape[3]]
        elif op == "ConvTranspose":
            cout = int(rng.integers(1, 5))
            stride = int(rng.choice([1, 2])) if max(shape[2:]) < 8 else 1
            w = c.const("W", rng.normal(0, 0.5, (ch, cout, 2, 2)))
            ins = [value, w] + ([c.const("B", rng.normal(0, 0.3, cout))] if rng.random() < 0.5 else [])
            value = c.node("ConvTranspose", ins, strides=[stride, stride])
            shape = [shape[0], cout, (shape[2] - 1) * stride + 2, (shape[3] - 1) * stride + 2]
        elif op == "Gemm":
            m = int(rng.integers(1, 7))
            trans_b = int(rng.integers(0, 2))
            w = c.const("W", rng.normal(0, 0.5, (m, ch) if trans_b else (ch, m)))
            ins = [value, w]
            if rng.random() < 0.6:
                ins.append(c.const("C", rng.normal(0, 0.3, (m,) if rng.random() < 0.5 else (1, m))))
            value = c.node(
                "Gemm", ins, transB=trans_b, alpha=float(rng.uniform(0.5, 1.5)), beta=float(rng.uniform(0.5, 1.5))
            )
            shape = [shape[0], m]
        elif op == "MatMul":
            m = int(rng.integers(1, 7))
            value = c.node("MatMul", [value, c.const("W", rng.normal(0, 0.5, (ch, m)))])
            shape = [shape[0], m]
        elif op == "AddChannel":
            bshape = (ch, 1, 1) if mode == "4d" else (ch,)
            value = c.node("Add", [value, c.const("A", rng.normal(0, 0.5, bshape))])
        elif op == "AddScalar":
            value = c.node("Add", [value, c.const("A", rng.normal(0, 0.5, (1,)))])
        elif op == "MulChannel":
            value = c.node("Mul", [value, c.const("M", rng.uniform(0.5, 1.5, (1, ch, 1, 1)))])
        elif op == "SubChannel":  # constant - x: a negative scale
            bshape = (1, ch, 1, 1) if mode == "4d" else (ch,)
            value = c.node("Sub", [c.const("S", rng.normal(0, 0.5, bshape)), value])
        elif op == "DivChannel":
            value = c.node("Div", [value, c.const("D", rng.uniform(0.5, 2.0, (ch, 1, 1)))])
        elif op == "MulWiden":  # a one-channel value broadcast up to several: not a per-channel map of x
            wide = int(rng.integers(2, 4)) if ch == 1 else ch
            value = c.node("Mul", [value, c.const("M", rng.uniform(0.5, 1.5, (1, wide, 1, 1)))])
            shape = [shape[0], wide, *shape[2:]]
        elif op == "MulScalar":
            value = c.node("Mul", [value, c.const("M", np.array(rng.uniform(0.5, 1.5) * rng.choice([-1, 1])))])
        elif op == "Relu":
            value = c.node("Relu", [value])
        elif op in ("BN", "LayoutBN"):
            layout = op == "LayoutBN"  # 2d only: the BN normalizes (M, ch, 1)
            if layout:
                value = c.node("Unsqueeze", [value, c.axes])
            value = _batch_norm(c, value, ch)
            if layout:  # back to (M, ch): Unsqueeze -> BN -> Squeeze folds through layout ops
                value = c.node("Squeeze", [value, c.axes])
        if mark == 1:
            c.outputs.append(value)
        elif mark == 2:
            c.outputs.append(c.node("Relu", [value]))
    if value not in c.outputs:
        c.outputs.append(value)
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in c.outputs]
    graph = helper.make_graph(c.nodes, "random_chain", inputs, outputs, c.inits)
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 15)])
    inferred = onnx.shape_inference.infer_shapes(model)
    for out, inf in zip(model.graph.output, inferred.graph.output):
        out.type.CopyFrom(inf.type)
    return model


LAYERS = {"4d": ["Conv", "Conv", "ConvTranspose", "Branches"], "2d": ["Gemm", "MatMul"]}
CHAIN = {
    "4d": ["AddChannel", "AddScalar", "MulChannel", "MulScalar", "SubChannel", "DivChannel", "MulWiden"],
    "2d": ["AddChannel", "MulScalar", "SubChannel"],
}


@st.composite
def chains(draw):
    """A few blocks of [layer] [Add/Mul ...] [BN] [Relu]: BN mostly next to a layer (so rules fire),
    sometimes alone, after Relu, after another BN, or before a layer (forward folds)."""
    mode = draw(st.sampled_from(["4d", "2d"]))
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.integers(0, 9)) < 8:
            ops.append(draw(st.sampled_from(LAYERS[mode])))
        ops += draw(st.lists(st.sampled_from(CHAIN[mode]), max_size=2))
        bn = draw(st.sampled_from(["BN", "BN", "LayoutBN"])) if mode == "2d" else "BN"
        ops += [bn] * draw(st.sampled_from([0, 1, 1, 1, 2]))
        if draw(st.booleans()):
            ops.append("Relu")
    ops = ops or ["BN"]  # every block can come out empty; a model needs at least one node
    marks = draw(st.lists(st.sampled_from([0, 0, 0, 0, 1, 2]), min_size=len(ops), max_size=len(ops)))
    seed = draw(st.integers(0, 2**31 - 1))
    return mode, ops, marks, seed


def _float64_copy(model):
    """The same model computing in float64 (float32 initializers and values widened)."""
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    for t in wide.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for v in list(wide.graph.input) + list(wide.graph.output) + list(wide.graph.value_info):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.DOUBLE
    return wide


def _assert_fold_accurate(model, folded, feeds, label):
    """Folded and original agree to 1e-5 of the output's scale — or, where the original's own
    float32 rounding is larger than that (large intermediates cancelling into a small output),
    the folded model is at most twice as far from the float64 result as the original is."""
    try:
        assert_parity(model, folded, feeds, label)
        return
    except AssertionError as parity_failure:
        from onnx.reference import ReferenceEvaluator

        for feed in feeds:
            exact = ReferenceEvaluator(_float64_copy(model)).run(
                None, {k: v.astype(np.float64) for k, v in feed.items()}
            )
            original, _ = run_model(model, feed)
            candidate, _ = run_model(folded, feed)
            for e, r, c in zip(exact, original, candidate):
                scale = float(np.max(np.abs(e))) if e.size else 0.0
                err_original = float(np.max(np.abs(r - e))) if e.size else 0.0
                err_folded = float(np.max(np.abs(c - e))) if e.size else 0.0
                assert err_folded <= 1e-5 * scale + 2 * err_original, (
                    f"{parity_failure}; against float64: folded error {err_folded:.3g}, original's own float32 "
                    f"error {err_original:.3g}"
                )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains())
def test_fold_random_chains(chain):
    mode, ops, marks, seed = chain
    model = _build(mode, ops, marks, seed)
    if model is None:  # spatial size shrank to nothing: not a valid model
        return
    onnx.checker.check_model(model, full_check=True)
    before = model.SerializeToString()
    folded, report = fold(model)
    assert model.SerializeToString() == before, "fold mutated its input"
    rows = report_entries(report)
    assert len(rows) == count_bn(model), f"every BN accounted for: {rows}"
    assert count_bn(folded) == report.n_remaining
    for _bn, _graph, kind, code, message in rows:
        assert code, rows
        if kind == "remain":
            assert message.strip(), rows
    onnx.checker.check_model(folded, full_check=True)
    assert signature(folded) == signature(model)
    feeds = [
        {
            "x": np.random.default_rng(seed)
            .normal(0, 1, [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim])
            .astype(np.float32)
        }
    ]
    _assert_fold_accurate(model, folded, feeds, f"{mode} {ops} {marks} seed={seed}")
    again, report2 = fold(folded)
    assert report2.n_folded == 0 and report2.n_chains_folded == 0 and not report2.merged, report2.to_dict()
    assert again.graph.SerializeToString() == folded.graph.SerializeToString() or [
        n.op_type for n in again.graph.node
    ] == [n.op_type for n in folded.graph.node]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains())
def test_random_chains_pass_the_intermediate_check(chain):
    """Every value a fold leaves under its name means what it meant: on random chains (values
    also graph outputs, read twice, BNs folded backward and forward) the fold passes
    ``check(intermediates=True)``, which compares every value both models produce."""
    import bnfold

    mode, ops, marks, seed = chain
    model = _build(mode, ops, marks, seed)
    if model is None:
        return
    folded, _ = fold(model)
    report = bnfold.check(model, folded, intermediates=True)
    assert report.passed, f"{mode} {ops} {marks} seed={seed}: {report.summary()}"
    assert report.intermediates_requested and report.intermediates_note in (
        "",
        "the models share no value names besides their inputs and outputs",
    )


def test_builder_makes_valid_models():
    """The generator itself: a fixed chain builds a valid model with the BNs it asked for."""
    model = _build("4d", ["Conv", "BN", "Relu", "BN", "ConvTranspose", "AddChannel", "BN"], [0, 1, 0, 2, 0, 0, 0], 7)
    onnx.checker.check_model(model, full_check=True)
    assert count_bn(model) == 3
    assert len(model.graph.output) == 3
