"""Unit tests of bnfold.folding.view and .tensors: producers/consumers (with reads from nested bodies), constants,
ranks, fresh names, dtype round trips, constant replacement and cleanup."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.folding.cleanup import remove_unused
from bnfold.folding.tensors import tensor_from_float64
from bnfold.folding.view import GraphView, ModelContext, node_label, outer_scope_reads


def make_model(nodes, inputs, outputs, inits=(), opset=17, ir_version=8):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def view_of(model):
    return GraphView(model.graph, ModelContext(model))


def if_model():
    """x -> Relu -> r; If(cond) whose then-branch reads r and w from the outer scope."""
    then_branch = helper.make_graph(
        [helper.make_node("Mul", ["r", "w"], ["t_out"], name="inner_mul")], "then", [], [vi("t_out", [2])]
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e_out"], name="inner_id")], "else", [], [vi("e_out", [2])]
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Neg", ["r"], ["n"], name="neg"),
        helper.make_node("If", ["cond"], ["y"], name="if0", then_branch=then_branch, else_branch=else_branch),
    ]
    return make_model(
        nodes,
        [vi("x", [2]), vi("cond", [], TensorProto.BOOL)],
        [vi("y", [2]), vi("n", [2])],
        [init("w", np.ones(2, np.float32))],
    )


def test_consumers_include_reads_from_nested_bodies():
    model = if_model()
    view = view_of(model)
    relu, neg, if0 = 0, 1, 2
    assert view.producer_of("r") == relu
    assert sorted(view.readers("r")) == [neg, if0]
    assert view.implicit_consumers["r"] == [if0]
    assert view.readers("w") == [if0]  # an initializer read only inside the body
    assert sorted(view.readers("x")) == [relu, if0]
    assert view.is_graph_output("n") and not view.is_graph_output("r")


def test_outer_scope_reads_excludes_names_the_body_defines():
    loop_body = helper.make_graph(
        [helper.make_node("Add", ["v", "outer"], ["v_next"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("v", [2])],
        [vi("cond_out", [], TensorProto.BOOL), vi("v_next", [2])],
    )
    assert outer_scope_reads(loop_body) == {"outer"}


def test_constants_from_initializers_constant_nodes_and_small_subgraphs():
    nodes = [
        helper.make_node("Constant", [], ["c_tensor"], value=numpy_helper.from_array(np.arange(3, dtype=np.float32))),
        helper.make_node("Constant", [], ["c_float"], value_float=2.5),
        helper.make_node("Constant", [], ["c_floats"], value_floats=[1.0, 2.0]),
        helper.make_node("Constant", [], ["c_int"], value_int=7),
        helper.make_node("Constant", [], ["c_ints"], value_ints=[1, 2]),
        helper.make_node("Cast", ["half"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["as_float", "c_float"], ["scaled"]),
        helper.make_node("Add", ["x", "c_float"], ["runtime"]),
        helper.make_node("RandomNormalLike", ["half"], ["random"]),
    ]
    model = make_model(
        nodes,
        [vi("x", [3])],
        [vi("runtime", [3])],
        [init("half", np.array([1.0, 2.0, 4.0], np.float16)), init("w", np.ones(3, np.float32))],
    )
    view = view_of(model)
    np.testing.assert_array_equal(view.constant("c_tensor"), [0, 1, 2])
    assert float(view.constant("c_float")) == 2.5
    np.testing.assert_array_equal(view.constant("c_floats"), [1.0, 2.0])
    assert int(view.constant("c_int")) == 7
    np.testing.assert_array_equal(view.constant("c_ints"), [1, 2])
    np.testing.assert_array_equal(view.constant("scaled"), np.array([2.5, 5.0, 10.0], np.float32))
    assert view.constant_type("scaled") == TensorProto.FLOAT
    assert view.constant_type("half") == TensorProto.FLOAT16
    assert view.constant("runtime") is None  # depends on a graph input
    assert view.constant("x") is None
    assert view.constant("random") is None  # never evaluate non-deterministic ops
    assert view.constant("w").shape == (3,)


def test_initializer_listed_as_input_is_overridable_from_ir4_only():
    nodes = [helper.make_node("Identity", ["w"], ["y"])]
    for ir_version, expect_constant in ((8, False), (3, True)):
        model = make_model(
            nodes,
            [vi("w", [2])],
            [vi("y", [2])],
            [init("w", np.ones(2, np.float32))],
            opset=7 if ir_version == 3 else 17,
            ir_version=ir_version,
        )
        assert (view_of(model).constant("w") is not None) == expect_constant


def test_shape_subgraphs_are_constant_when_the_shape_is_static():
    # torch's dynamo exporter (optimize=False) builds a bias-less Conv's zero bias as
    # Expand(CastLike(0, x), Expand(Shape(weight, end=1), [1])): constant, although x is an input.
    big = np.zeros((512, 256, 3, 3), np.float32)  # far above the evaluator's element budget
    nodes = [
        helper.make_node("Shape", ["w"], ["w_shape"], end=1),
        helper.make_node("Expand", ["w_shape", "one"], ["bias_shape"]),
        helper.make_node("CastLike", ["zero", "x"], ["zero_like_x"]),
        helper.make_node("Expand", ["zero_like_x", "bias_shape"], ["bias"]),
        helper.make_node("Size", ["w"], ["w_size"]),
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.zeros((2, 5), np.float32))),
        helper.make_node("Shape", ["k"], ["k_shape"], start=-1),
    ]
    model = make_model(
        nodes,
        [vi("x", [1, 256, 8, 8])],
        [vi(o, None) for o in ("bias", "w_size", "k_shape")],
        [init("w", big), init("one", np.array([1], np.int64)), init("zero", np.array(0.0, np.float64))],
    )
    view = view_of(model)
    bias = view.constant("bias")
    assert bias.dtype == np.float32 and bias.shape == (512,) and not bias.any()
    assert int(view.constant("w_size")) == big.size
    assert view.constant("k_shape").tolist() == [5]
    assert view.elem_type("x") == TensorProto.FLOAT


def test_shapes_that_are_only_declared_or_inferred_are_not_constants():
    """Only constants have a shape to build on: a graph input (other runtimes reshape inputs), an
    overridable initializer (fed with any shape), a value declared in value_info or inferred (not
    enforced; onnx's inference is wrong for a few operators) and a body input are not."""
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"], start=-2),
        helper.make_node("Size", ["p"], ["p_size"]),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Shape", ["r"], ["r_shape"]),
        helper.make_node("Identity", ["p"], ["p_copy"]),
    ]
    model = make_model(
        nodes,
        [vi("x", [1, 3, 8, 8]), vi("p", ["n"])],
        [vi(o, None) for o in ("x_shape", "p_size", "r_shape", "p_copy")],
        [init("p", np.zeros(3, np.float32))],
    )
    model.graph.value_info.append(vi("r", [1, 3, 8, 8]))
    view = view_of(model)
    for name in ("x", "p", "r"):
        assert view.static_shape(name) is None, name
    for name in ("x_shape", "p_size", "r_shape"):
        assert view.constant(name) is None, name


def test_body_view_finds_outer_scope_constants():
    model = if_model()
    parent = view_of(model)
    then_branch = model.graph.node[2].attribute[0].g
    body = GraphView(then_branch, parent.ctx, "if0/then_branch", parent)
    np.testing.assert_array_equal(body.constant("w"), [1.0, 1.0])
    assert body.constant("r") is None
    assert body.producer_of("r") is None


def test_rank_from_declarations_initializers_and_shape_inference():
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]), helper.make_node("Identity", ["t"], ["y"])]
    model = make_model(
        nodes, [vi("x", [2, 3, 4]), vi("u", None)], [vi("y", None)], [init("w", np.ones((2, 2), np.float32))]
    )
    view = view_of(model)
    assert view.rank("x") == 3
    assert view.rank("w") == 2
    assert view.rank("t") == 3  # only known through shape inference
    assert view.rank("u") is None


def test_fresh_names_are_unique_over_the_whole_model_and_unnamed_nodes_get_labels():
    model = if_model()
    model.graph.node[2].attribute[0].g.node[0].output[0] = "w_bnfold"  # used inside a body only
    model.graph.node[2].attribute[0].g.output[0].name = "w_bnfold"
    ctx = ModelContext(model)
    first = ctx.fresh_name("w")
    second = ctx.fresh_name("w")
    assert first == "w_bnfold_1" and second == "w_bnfold_2"
    unnamed = helper.make_node("Relu", ["a"], ["b"])
    assert node_label(unnamed, 5) == "Relu#5"
    assert node_label(model.graph.node[0], 0) == "relu"


@pytest.mark.parametrize("elem", [TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16])
def test_tensor_from_float64_casts_once_to_the_original_type(elem):
    values = np.array([1.0 / 3.0, -2.75, 1e-3, 65504.0 / 3])
    tensor = tensor_from_float64(values, elem, "t")
    assert tensor.data_type == elem and tensor.name == "t"
    back = numpy_helper.to_array(tensor)
    np_type = {
        TensorProto.FLOAT: np.float32,
        TensorProto.DOUBLE: np.float64,
        TensorProto.FLOAT16: np.float16,
        TensorProto.BFLOAT16: ml_dtypes.bfloat16,
    }[elem]
    np.testing.assert_array_equal(back.astype(np.float64), values.astype(np_type).astype(np.float64))


def conv_pair_model(shared_with_body=False):
    """Two Convs reading W; with ``shared_with_body`` the second reader is an If body instead."""
    w = init("W", np.ones((2, 2, 1, 1), np.float32))
    nodes = [helper.make_node("Conv", ["x", "W"], ["a"], name="conv_a")]
    if shared_with_body:
        body = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["b_in"])], "then", [], [vi("b_in", None)])
        nodes.append(helper.make_node("If", ["cond"], ["b"], name="if0", then_branch=body, else_branch=body))
    else:
        nodes.append(helper.make_node("Conv", ["x", "W"], ["b"], name="conv_b"))
    return make_model(
        nodes, [vi("x", [1, 2, 2, 2]), vi("cond", [], TensorProto.BOOL)], [vi("a", None), vi("b", None)], [w]
    )


@pytest.mark.parametrize("shared_with_body", [False, True])
def test_set_constant_input_clones_a_tensor_someone_else_reads(shared_with_body):
    model = conv_pair_model(shared_with_body)
    view = view_of(model)
    name = view.set_constant_input(0, 1, np.full((2, 2, 1, 1), 3.0), TensorProto.FLOAT, "W")
    assert name != "W" and name == "W_bnfold"
    assert view.nodes[0].input[1] == name
    np.testing.assert_array_equal(view.constant("W"), np.ones((2, 2, 1, 1)))  # the other reader's tensor
    np.testing.assert_array_equal(view.constant(name), np.full((2, 2, 1, 1), 3.0))


def test_set_constant_input_edits_in_place_for_a_sole_reader_and_appends_missing_inputs():
    model = conv_pair_model()
    del model.graph.node[1]
    view = view_of(model)
    assert view.set_constant_input(0, 1, np.full((2, 2, 1, 1), 2.0), TensorProto.FLOAT, "W") == "W"
    np.testing.assert_array_equal(view.constant("W"), np.full((2, 2, 1, 1), 2.0))
    bias = view.set_constant_input(0, 2, np.zeros(2), TensorProto.FLOAT, "a_bias")
    assert list(view.nodes[0].input) == ["x", "W", bias]
    assert len(model.graph.initializer) == 2


def test_ir3_new_initializers_are_declared_as_graph_inputs():
    model = make_model(
        [helper.make_node("Conv", ["x", "W"], ["y"])],
        [vi("x", [1, 2, 2, 2]), vi("W", [2, 2, 1, 1])],
        [vi("y", [1, 2, 2, 2])],
        [init("W", np.ones((2, 2, 1, 1), np.float32))],
        opset=7,
        ir_version=3,
    )
    view = view_of(model)
    bias = view.set_constant_input(0, 2, np.zeros(2), TensorProto.FLOAT, "y_bias")
    assert bias in {i.name for i in model.graph.input}
    onnx.checker.check_model(model)


def test_ir3_conv_bn_in_an_if_body_folds_into_a_valid_model():
    """IR 3 bodies cannot list initializers as inputs (If has none, Loop's are fixed): the folded
    weights of a Conv -> BN inside a body live in the main graph, declared as its inputs, and the
    body reads them from the outer scope. (They once landed in the body: checker and onnxruntime
    refused the output.)"""
    import onnxruntime as ort

    import bnfold

    rng = np.random.default_rng(0)
    then = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W"], ["c"], pads=[1] * 4),
            helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["yt"], name="bn"),
        ],
        "then",
        [],
        [vi("yt", [1, 4, 6, 6])],
    )
    other = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["ye"], pads=[1] * 4)], "else", [], [vi("ye", [1, 4, 6, 6])]
    )
    inits = [init("flag", np.array(True)), init("W", rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32))]
    inits += [
        init(n, a.astype(np.float32))
        for n, a in zip(
            "sbmv", [rng.uniform(0.5, 1.5, 4), rng.normal(0, 0.5, 4), rng.normal(0, 0.5, 4), rng.uniform(0.5, 2, 4)]
        )
    ]
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other)],
        "g",
        [vi("x", [1, 3, 6, 6])] + [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits],
        [vi("y", [1, 4, 6, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    onnx.checker.check_model(model)
    folded, report = bnfold.fold(model)
    assert report.n_folded == 1
    onnx.checker.check_model(folded)
    assert not folded.graph.node[0].attribute[0].g.initializer  # nothing added to the body
    x = rng.normal(size=(1, 3, 6, 6)).astype(np.float32)
    want, got = (
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        for m in (model, folded)
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_remove_unused_deletes_only_released_tensors_nothing_reads():
    nodes = [
        helper.make_node("Cast", ["half"], ["scale"], to=TensorProto.FLOAT),
        helper.make_node("Constant", [], ["shift"], value_float=1.0),
        helper.make_node("Identity", ["x"], ["y"]),
    ]
    inits = [init("half", np.ones(2, np.float16)), init("kept_unused", np.ones(2, np.float32))]
    model = make_model(nodes, [vi("x", [2])], [vi("y", [2])], inits)
    model.graph.value_info.append(vi("gone", [2]))
    remove_unused(model, {"scale", "shift", "x"}, {"gone"})
    assert [n.op_type for n in model.graph.node] == ["Identity"]
    assert [t.name for t in model.graph.initializer] == ["kept_unused"]  # never released: stays
    assert len(model.graph.value_info) == 0


def test_incremental_edits_keep_producer_and_reader_maps_exact():
    from bnfold.folding.rules import bn_gemm, conv_bn
    from bnfold.folding.screening import inference_batch_norm

    rng = np.random.default_rng(0)

    def params(p, c):
        return [init(f"{p}_{k}", np.abs(rng.standard_normal(c)).astype(np.float32) + 0.5) for k in ("s", "b", "m", "v")]

    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("Add", ["c", "k"], ["c2"], name="add"),
        helper.make_node("BatchNormalization", ["c2", "p_s", "p_b", "p_m", "p_v"], ["y"], name="bn"),
        helper.make_node("Flatten", ["y"], ["f"], name="flat"),
        helper.make_node("BatchNormalization", ["f", "q_s", "q_b", "q_m", "q_v"], ["n"], name="bn2"),
        helper.make_node("Gemm", ["n", "B"], ["out"], name="fc"),
    ]
    inits = [
        init("W", rng.standard_normal((3, 3, 1, 1)).astype(np.float32)),
        init("k", np.ones((3, 1, 1), np.float32)),
        init("B", rng.standard_normal((12, 2)).astype(np.float32)),
        *params("p", 3),
        *params("q", 12),
    ]
    model = make_model(nodes, [vi("x", [1, 3, 2, 2])], [vi("out", [1, 2])], inits)
    view = view_of(model)
    for rule, bn_index in ((conv_bn, 2), (bn_gemm, 4)):
        match = rule.RULE.check(view, inference_batch_norm(view, bn_index))
        match.rewrite()
        snapshot = (dict(view.producer), {k: sorted(v) for k, v in view.consumers.items() if v})
        view.refresh()
        assert snapshot == (dict(view.producer), {k: sorted(v) for k, v in view.consumers.items() if v})
    assert view.producer_of("y") == 0 and view.readers("f") == [5]


@pytest.mark.parametrize(
    "dtype, data_type",
    [(np.float32, TensorProto.FLOAT), (np.float64, TensorProto.DOUBLE), (np.float16, TensorProto.FLOAT16)],
)
@pytest.mark.parametrize(
    "shape, factor_shape",
    [
        ((8, 3, 3, 3), (8, 1, 1, 1)),  # Conv: output channel axis 0
        ((4, 2, 5, 3, 3), (1, 1, 5, 1, 1)),  # grouped ConvTranspose: channel axis 2
        ((7, 6), (6,)),  # Gemm/MatMul weight: last axis
        ((7, 6), (7, 1)),  # transB Gemm: first axis
        ((5, 4), (1,)),  # one factor for all
        ((5, 4), (3, 5, 4)),  # factor enlarges the result: general path
    ],
)
def test_scale_in_float64_rounds_the_float64_product_once(dtype, data_type, shape, factor_shape):
    from bnfold.folding.tensors import scale_in_float64, write_tensor

    rng = np.random.default_rng(1)
    array = rng.standard_normal(shape).astype(dtype)
    factor = rng.uniform(0.1, 3.0, factor_shape)
    expected = (array.astype(np.float64) * factor).astype(dtype)
    got = scale_in_float64(array, factor, data_type)
    assert got.dtype == dtype and got.shape == expected.shape
    assert np.array_equal(got, expected)
    tensor = TensorProto()
    write_tensor(tensor, got, data_type, "w")
    assert np.array_equal(numpy_helper.to_array(tensor), expected)


@pytest.mark.parametrize(
    "dtype, data_type",
    [(np.float32, TensorProto.FLOAT), (np.float16, TensorProto.FLOAT16), (np.float64, TensorProto.DOUBLE)],
)
@pytest.mark.parametrize("shape, factor_shape", [((4, 3), (4, 1)), ((4, 3), (4, 3))])  # compiled loop, numpy path
def test_scale_in_float64_is_quiet_on_nan_inf_and_overflow(dtype, data_type, shape, factor_shape):
    """NaN and Inf weights stay NaN and Inf, 0 * Inf is NaN and a product beyond the type is Inf,
    as the compiled loop computes them: without a numpy RuntimeWarning (the rules refuse the
    folds whose results would leave the range, see bnfold.folding.rules.base.representation_failure)."""
    import warnings

    from bnfold.folding.tensors import scale_in_float64

    largest = np.finfo(dtype).max
    array = np.array([[np.nan, 1, 2], [np.inf, -np.inf, 3], [largest, -largest, 1], [np.inf, 1, 1]], dtype)
    factor = np.broadcast_to(np.array([[2.0], [3.0], [4.0], [0.0]]), factor_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = scale_in_float64(array, factor, data_type).astype(np.float64)
    assert np.isnan(got[0, 0]) and got[1, 0] == np.inf and got[1, 1] == -np.inf
    assert got[2, 0] == np.inf and got[2, 1] == -np.inf  # x4 beyond the largest finite value
    assert np.isnan(got[3, 0]) and got[3, 1] == 0.0  # 0 * Inf


def test_constant_subgraph_that_overflows_is_evaluated_without_a_warning():
    """Cast(1e300 as float64 -> float32) is +Inf: a constant like any other (its readers judge
    it), not a warning — and under ``-W error`` not an exception that would make it 'not
    constant'."""
    import warnings

    nodes = [
        helper.make_node("Cast", ["big"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["as_float", "big_float"], ["product"]),
    ]
    model = make_model(
        nodes,
        [vi("x", [2])],
        [vi("x", [2])],
        [init("big", np.array([1e300, 1.0])), init("big_float", np.array([3e38, 3e38], np.float32))],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        view = view_of(model)
        np.testing.assert_array_equal(view.constant("as_float"), np.array([np.inf, 1.0], np.float32))
        np.testing.assert_array_equal(view.constant("product"), np.array([np.inf, 3e38], np.float32))
