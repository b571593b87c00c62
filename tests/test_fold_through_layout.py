"""Folds through layout ops (rules matmul_layout_bn, gemm_layout_bn, bn_layout_gemm,
bn_layout_matmul): a BN reaching its Gemm/MatMul through Flatten / Reshape / Transpose / Squeeze /
Unsqueeze, in both directions.

Positive tests: the BN is gone, the model passes the full checker, onnxruntime (optimizations off)
gives the same outputs, a second fold changes nothing, and every value left under its old name
still holds what it held (``bnfold.check(intermediates=True)``). Negative tests: the BN stays,
with the reason code that says why.
"""

from __future__ import annotations

import collections
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper

import bnfold
from test_rules import G, fold_and_check, remaining_reason

INT64 = TensorProto.INT64


def ints(g: G, name, values):
    return g.const(name, None, elem=INT64, array=np.array(values, dtype=np.int64))


def ops_of(model):
    return collections.Counter(n.op_type for n in model.graph.node)


def fold_through_layout(model, *, rule, n_folded=1):
    folded, report = fold_and_check(model, n_folded=n_folded, rule=rule)
    assert ops_of(folded)["BatchNormalization"] == 0
    assert bnfold.check(model, folded, intermediates=True).passed
    return folded, report


def linear_norm(flatten, *, k=8, c=6, tokens=(2, 5), dynamic=False):
    """timm LeViT's LinearNorm: MatMul on (B, N, K) -> flatten to (B*N, C) -> BN -> reshape back."""
    g = G(seed=3)
    x = g.input("x", ["batch" if dynamic else tokens[0], tokens[1], k])
    m = g.node("MatMul", [x, g.const("W", (k, c))], ["m"])
    if flatten == "Flatten":
        f = g.node("Flatten", [m], ["f"], axis=2)
    elif flatten == "Reshape":
        f = g.node("Reshape", [m, ints(g, "to2d", [-1, c])], ["f"])
    else:  # the shape computed from the product's own shape: [-1, last dim of m]
        last = g.node("Shape", [m], ["m_shape"], start=-1)
        shape = g.node("Concat", [ints(g, "minus1", [-1]), last], ["f_shape"], axis=0)
        f = g.node("Reshape", [m, shape], ["f"])
    b = g.bn(f, "b", c)
    g.node("Reshape", [b, g.node("Shape", [m], ["back_shape"])], ["y"])
    return g.model([("y", None)])


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape", "ReshapeComputed"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_levit_linear_norm_folds_into_matmul_and_an_add(flatten, dynamic):
    folded, _ = fold_through_layout(linear_norm(flatten, dynamic=dynamic), rule="matmul_layout_bn")
    ops = ops_of(folded)
    # Rank-3 product: no Gemm can take it; the shift is an Add in the BN's place, the rest stays.
    assert ops["Add"] == 1 and ops["MatMul"] == 1 and ops["Gemm"] == 0
    add = next(n for n in folded.graph.node if n.op_type == "Add")
    assert add.output[0] == "b"
    assert "m" not in {o for n in folded.graph.node for o in n.output}, "the scaled product has a new name"


def test_transpose_then_bn1d_gets_a_channel_shaped_add():
    g = G(seed=4)
    x = g.input("x", [2, 5, 8])
    m = g.node("MatMul", [x, g.const("W", (8, 6))], ["m"])
    t = g.node("Transpose", [m], ["t"], perm=[0, 2, 1])  # (2, 6, 5): the features on axis 1
    b = g.bn(t, "b", 6)
    g.node("Transpose", [b], ["y"], perm=[0, 2, 1])
    folded, _ = fold_through_layout(g.model([("y", None)]), rule="matmul_layout_bn")
    shift = next(n for n in folded.graph.node if n.op_type == "Add").input[1]
    assert [list(t.dims) for t in folded.graph.initializer if t.name == shift] == [[6, 1]]


@pytest.mark.parametrize("opset", [11, 17])  # axes as an attribute, then as an input
def test_unsqueeze_then_bn_turns_a_2d_matmul_into_gemm(opset):
    g = G(seed=5)
    x = g.input("x", [4, 8])
    m = g.node("MatMul", [x, g.const("W", (8, 6))], ["m"])
    axes = {"axes": [2, 3]} if opset < 13 else {}
    inputs = [m] if opset < 13 else [m, ints(g, "axes", [2, 3])]
    u = g.node("Unsqueeze", inputs, ["u"], **axes)  # (4, 6, 1, 1): BatchNorm2d on a vector
    g.bn(u, "y", 6)
    folded, _ = fold_through_layout(g.model([("y", None)], opset=opset), rule="matmul_layout_bn")
    ops = ops_of(folded)
    assert ops["Gemm"] == 1 and ops["MatMul"] == 0 and ops["Add"] == 0 and ops["Unsqueeze"] == 1


def test_squeeze_then_bn():
    g = G(seed=6)
    x = g.input("x", [1, 4, 8])
    m = g.node("MatMul", [x, g.const("W", (8, 6))], ["m"])
    s = g.node("Squeeze", [m, ints(g, "axes", [0])], ["s"])  # (4, 6)
    g.bn(s, "y", 6)
    folded, _ = fold_through_layout(g.model([("y", None)]), rule="matmul_layout_bn")
    assert ops_of(folded)["Add"] == 1


def test_gemm_then_unsqueeze_then_bn():
    g = G(seed=7)
    x = g.input("x", [4, 8])
    m = g.node("Gemm", [x, g.const("W", (6, 8)), g.const("C", (6,))], ["m"], transB=1, alpha=0.7, beta=1.3)
    u = g.node("Unsqueeze", [m, ints(g, "axes", [-1])], ["u"])
    g.bn(u, "y", 6)
    folded, _ = fold_through_layout(g.model([("y", None)]), rule="gemm_layout_bn")
    assert sum(ops_of(folded).values()) == 2  # Gemm, Unsqueeze


def test_shape_readers_of_the_path_read_unchanged_shapes():
    g = G(seed=8)
    x = g.input("x", [2, 5, 8])
    m = g.node("MatMul", [x, g.const("W", (8, 6))], ["m"])
    f = g.node("Flatten", [m], ["f"], axis=2)
    zeros = g.node("ConstantOfShape", [g.node("Shape", [f], ["f_shape"])], ["zeros"])  # reads the BN input's shape
    b = g.bn(f, "b", 6)
    g.node("Reshape", [b, g.node("Shape", [m], ["m_shape"])], ["y"])
    fold_through_layout(g.model([("y", None), (zeros, None)]), rule="matmul_layout_bn")


# ----- forward ---------------------------------------------------------------------------------
def test_bn2d_flatten_gemm_face_recognition_head():
    g = G(seed=9)
    x = g.input("x", [2, 3, 4, 4])
    b = g.bn(x, "b", 3)
    f = g.node("Flatten", [b], ["f"], axis=1)  # (2, 48): feature k is channel k // 16
    g.node("Gemm", [f, g.const("W", (5, 48)), g.const("C", (5,))], ["y"], transB=1, alpha=0.5)
    folded, _ = fold_through_layout(g.model([("y", None)]), rule="bn_layout_gemm")
    assert ops_of(folded) == {"Flatten": 1, "Gemm": 1}


@pytest.mark.parametrize("dynamic", [False, True])
def test_bn2d_reshape_0_minus1_matmul(dynamic):
    g = G(seed=10)
    x = g.input("x", ["n" if dynamic else 2, 3, 4, 4])
    b = g.bn(x, "b", 3)
    f = g.node("Reshape", [b, ints(g, "flat", [0, -1])], ["f"])
    # A shape reader of the BN output: it reads the BN input after the fold.
    zeros = g.node("ConstantOfShape", [g.node("Shape", [b], ["b_shape"])], ["zeros"])
    g.node("MatMul", [f, g.const("W", (48, 5))], ["y"])
    folded, _ = fold_through_layout(g.model([("y", None), (zeros, None)]), rule="bn_layout_matmul")
    assert ops_of(folded)["Gemm"] == 1 and ops_of(folded)["MatMul"] == 0


def test_bn1d_transpose_reshape_gemm_is_cyclic():
    """(N, C, T) -> BN -> (N, T, C) -> (N*T/2, 2C): feature k is channel k % C."""
    g = G(seed=11)
    x = g.input("x", [2, 3, 4])
    b = g.bn(x, "b", 3)
    t = g.node("Transpose", [b], ["t"], perm=[0, 2, 1])
    f = g.node("Reshape", [t, ints(g, "pairs", [-1, 6])], ["f"])
    g.node("Gemm", [f, g.const("W", (6, 5))], ["y"])
    fold_through_layout(g.model([("y", None)]), rule="bn_layout_gemm")


def test_bn_transpose_gemm_transposed_a():
    g = G(seed=12)
    x = g.input("x", [4, 3])
    b = g.bn(x, "b", 3)
    t = g.node("Transpose", [b], ["t"], perm=[1, 0])  # (3, 4): channels on axis 0, which transA contracts
    g.node("Gemm", [t, g.const("W", (3, 5))], ["y"], transA=1)
    fold_through_layout(g.model([("y", None)]), rule="bn_layout_gemm")


def test_bn_squeeze_gemm():
    g = G(seed=13)
    x = g.input("x", [4, 3, 1])
    b = g.bn(x, "b", 3)
    s = g.node("Squeeze", [b, ints(g, "axes", [2])], ["s"])
    g.node("Gemm", [s, g.const("W", (3, 5))], ["y"])
    fold_through_layout(g.model([("y", None)]), rule="bn_layout_gemm")


# ----- refusals --------------------------------------------------------------------------------
def test_reshape_that_splits_the_features_is_refused():
    g = G(seed=14)
    x = g.input("x", [4, 8])
    m = g.node("MatMul", [x, g.const("W", (8, 6))], ["m"])
    r = g.node("Reshape", [m, ints(g, "split", [4, 2, 3])], ["r"])  # BN channels: 2 groups of 3 features
    g.bn(r, "y", 2)
    assert remaining_reason(g.model([("y", None)])) == "matmul_layout"


def test_flatten_that_merges_tokens_into_the_channels_is_refused():
    g = G(seed=15)
    x = g.input("x", [2, 5, 8])
    m = g.node("MatMul", [x, g.const("W", (8, 6))], ["m"])
    f = g.node("Flatten", [m], ["f"], axis=1)  # (2, 30): a channel is a (token, feature) pair
    g.bn(f, "y", 30)
    assert remaining_reason(g.model([("y", None)])) == "not_per_channel"


def test_transpose_that_moves_the_features_off_the_channel_axis_is_refused():
    g = G(seed=16)
    x = g.input("x", [2, 5, 8])
    m = g.node("MatMul", [x, g.const("W", (8, 6))], ["m"])
    t = g.node("Transpose", [m], ["t"], perm=[2, 0, 1])  # (6, 2, 5): the tokens on axis 1
    g.bn(t, "y", 2)
    assert remaining_reason(g.model([("y", None)])) == "matmul_layout"


def test_two_reshapes_are_refused():
    g = G(seed=17)
    x = g.input("x", [4, 8])
    m = g.node("MatMul", [x, g.const("W", (8, 6))], ["m"])
    r = g.node("Reshape", [m, ints(g, "a", [4, 2, 3])], ["r"])
    t = g.node("Transpose", [r], ["t"], perm=[1, 0, 2])
    f = g.node("Reshape", [t, ints(g, "b", [-1, 6])], ["f"])  # rows now mix features of two tokens
    g.bn(f, "y", 6)
    assert remaining_reason(g.model([("y", None)])) == "matmul_layout"


def test_unknown_rank_is_refused():
    g = G(seed=18)
    x = g.input("x", [4, 8])
    shape = g.input("target", [None], elem=INT64)  # a shape of unknown length
    m = g.node("MatMul", [x, g.const("W", (8, 6))], ["m"])
    r = g.node("Reshape", [m, shape], ["r"])
    g.bn(r, "y", 6)
    model = g.model([("y", None)])
    assert remaining_reason(model) == "unknown_rank"


@pytest.mark.parametrize("extra", ["reader", "graph_output"])
def test_extra_readers_of_the_path_are_refused(extra):
    g = G(seed=19)
    x = g.input("x", [2, 5, 8])
    m = g.node("MatMul", [x, g.const("W", (8, 6))], ["m"])
    f = g.node("Flatten", [m], ["f"], axis=2)
    g.bn(f, "y", 6)
    outputs = [("y", None)]
    if extra == "reader":
        outputs.append((g.node("Relu", [m], ["relu"]), None))
    else:
        outputs.append(("f", None))
    expected = "multiple_consumers" if extra == "reader" else "graph_output"
    assert remaining_reason(g.model(outputs)) == expected


def test_forward_flatten_after_the_channel_axis_is_refused():
    g = G(seed=20)
    x = g.input("x", [2, 3, 4, 4])
    b = g.bn(x, "b", 3)
    f = g.node("Flatten", [b], ["f"], axis=2)  # (6, 16): the channels are in the rows
    g.node("Gemm", [f, g.const("W", (16, 5))], ["y"])
    assert remaining_reason(g.model([("y", None)])) == "matmul_layout"


def test_forward_into_a_rank_3_matmul_is_refused():
    g = G(seed=21)
    x = g.input("x", [2, 3, 4])
    b = g.bn(x, "b", 3)
    t = g.node("Transpose", [b], ["t"], perm=[0, 2, 1])
    g.node("MatMul", [t, g.const("W", (3, 5))], ["y"])
    assert remaining_reason(g.model([("y", None)])) == "matmul_layout"


def test_forward_with_rows_not_a_multiple_of_the_channels_is_refused():
    g = G(seed=22)
    x = g.input("x", [2, 3, 4])
    b = g.bn(x, "b", 3)
    t = g.node("Transpose", [b], ["t"], perm=[0, 2, 1])  # (2, 4, 3)
    f = g.node("Reshape", [t, ints(g, "to", [-1, 4])], ["f"])  # (6, 4): a row holds parts of two tokens
    g.node("Gemm", [f, g.const("W", (4, 5))], ["y"])
    assert remaining_reason(g.model([("y", None)])) == "not_per_channel"


# ----- torch / timm exports --------------------------------------------------------------------
_KEEP_ALIVE = []


def _levit_block(torch):
    """Two timm LeViT LinearNorm layers with a Hardswish between, BN statistics away from 0/1."""
    import importlib.util
    import pathlib

    tools = pathlib.Path(__file__).resolve().parent.parent / "tools" / "build_corpus.py"
    spec = importlib.util.spec_from_file_location("bnfold_build_corpus", tools)
    build_corpus = sys.modules.get(spec.name) or importlib.util.module_from_spec(spec)
    if spec.name not in sys.modules:
        sys.modules[spec.name] = build_corpus  # its dataclasses look their module up there
        spec.loader.exec_module(build_corpus)
    try:
        # Without these schemas importing torchvision (which timm does) fails.
        build_corpus._define_torchvision_schemas(torch)
    except RuntimeError:  # already defined in this process
        pass
    _KEEP_ALIVE.append(build_corpus)  # the schemas live as long as its library object
    levit = pytest.importorskip("timm.models.levit")
    block = torch.nn.Sequential(levit.LinearNorm(16, 32), torch.nn.Hardswish(), levit.LinearNorm(32, 16))
    build_corpus.make_statistics_realistic(block, (7, 16), torch.Generator().manual_seed(0))
    return block


@pytest.mark.parametrize("dynamo", [False, True])
def test_timm_levit_linear_norm_export_folds(tmp_path, dynamo):
    torch = pytest.importorskip("torch")
    import onnx

    block = _levit_block(torch)
    example = torch.randn(2, 7, 16)
    path = tmp_path / "levit_block.onnx"
    if dynamo:
        pytest.importorskip("onnxscript")
        torch.onnx.export(
            block, (example,), str(path), dynamo=True, input_names=["x"], dynamic_shapes=({0: torch.export.Dim("b")},)
        )
    else:
        torch.onnx.export(
            block,
            (example,),
            str(path),
            dynamo=False,
            input_names=["x"],
            dynamic_axes={"x": {0: "b"}},
            opset_version=17,
        )
    model = onnx.load(str(path))
    assert ops_of(model)["BatchNormalization"] == 2
    folded, report = bnfold.fold(model)
    assert report.n_folded == 2 and {f.rule for f in report.folded} == {"matmul_layout_bn"}
    assert ops_of(folded)["BatchNormalization"] == 0
    onnx.checker.check_model(folded, full_check=True)
    with torch.no_grad():
        for batch in (1, 3):
            x = torch.randn(batch, 7, 16)
            expected = block(x).numpy()
            import onnxruntime as ort

            session = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
            got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
            assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))
    assert bnfold.fold(folded)[1].n_folded == 0


def test_generated_layout_model_has_the_expected_structure():
    """The builder above makes what its docstring says (a guard for the tests that use it)."""
    model = linear_norm("ReshapeComputed", dynamic=True)
    assert [n.op_type for n in model.graph.node] == [
        "MatMul",
        "Shape",
        "Concat",
        "Reshape",
        "BatchNormalization",
        "Shape",
        "Reshape",
    ]
    assert helper.get_attribute_value(model.graph.node[1].attribute[0]) == -1


def test_ranks_that_onnx_inference_cannot_give_are_worked_out():
    """Opset 12, a Reshape to a shape computed from Shape/Slice/Concat (timm's stem in a
    dynamic-batch TorchScript export): onnx infers no rank after it; the rules derive it."""
    import onnx

    from bnfold.folding.view import GraphView, ModelContext

    g = G(seed=23)
    x = g.input("x", ["batch", 5, 8])
    leading = g.node("Slice", [g.node("Shape", [x], ["x_shape"]), ints(g, "s0", [0]), ints(g, "s1", [2])], ["lead"])
    tokens = g.node("Reshape", [x, g.node("Concat", [leading, ints(g, "k", [8])], ["to"], axis=0)], ["tokens"])
    m = g.node("MatMul", [g.node("Relu", [tokens], ["act"]), g.const("W", (8, 6))], ["m"])
    f = g.node("Flatten", [m], ["f"], axis=2)
    b = g.bn(f, "b", 6)
    g.node("Reshape", [b, g.node("Shape", [m], ["back"])], ["y"])
    model = g.model([("y", ["batch", 5, 6])], opset=12)
    view = GraphView(onnx.ModelProto.FromString(model.SerializeToString()).graph, ModelContext(model))
    assert view.rank("m") is None  # what onnx inference (and GraphView.rank) leave unknown
    fold_through_layout(model, rule="matmul_layout_bn")


def test_forward_flatten_at_the_rank_puts_the_channels_in_the_rows():
    g = G(seed=24)
    x = g.input("x", [2, 3])
    b = g.bn(x, "b", 3)
    f = g.node("Flatten", [b], ["f"], axis=2)  # (6, 1): every value a row of its own
    g.node("Gemm", [f, g.const("W", (1, 5))], ["y"])
    assert remaining_reason(g.model([("y", None)])) == "matmul_layout"


@pytest.mark.parametrize("dim_0", ["gather_unsqueeze", "slice", "shape_end", "dynamo"])
def test_bn2d_view_batch_minus1_gemm(dim_0):
    """TorchScript's ``x.view(x.size(0), -1)``: Reshape(x, Concat([x.shape[0]], [-1]))."""
    g = G(seed=25)
    x = g.input("x", ["n", 3, 2, 2])
    b = g.bn(x, "b", 3)
    if dim_0 == "gather_unsqueeze":
        batch = g.node("Gather", [g.node("Shape", [b], ["s"]), ints(g, "zero", 0)], ["n0"], axis=0)
        batch = g.node("Unsqueeze", [batch, ints(g, "axes", [0])], ["n1"])
    elif dim_0 == "slice":
        batch = g.node("Slice", [g.node("Shape", [b], ["s"]), ints(g, "start", [0]), ints(g, "end", [1])], ["n1"])
    elif dim_0 == "shape_end":
        batch = g.node("Shape", [x], ["n1"], start=0, end=1)
    else:  # the scalar made a vector again, and the merged length written out
        scalar = g.node("Squeeze", [g.node("Shape", [x], ["n0"], start=0, end=1)], ["n_scalar"])
        batch = g.node("Reshape", [scalar, ints(g, "vector", [-1])], ["n1"])
    rest = [12] if dim_0 == "dynamo" else [-1]
    shape = g.node("Concat", [batch, ints(g, "rest", rest)], ["to"], axis=0)
    f = g.node("Reshape", [b, shape], ["f"])
    g.node("Gemm", [f, g.const("W", (12, 5)), g.const("C", (5,))], ["y"])
    fold_through_layout(g.model([("y", None)]), rule="bn_layout_gemm")


def test_view_with_another_values_batch_is_refused():
    g = G(seed=26)
    x = g.input("x", ["n", 3, 2, 2])
    other = g.input("other", ["m", 4])
    b = g.bn(x, "b", 3)
    batch = g.node("Shape", [other], ["n1"], start=0, end=1)  # another tensor's dimension 0
    f = g.node("Reshape", [b, g.node("Concat", [batch, ints(g, "rest", [-1])], ["to"], axis=0)], ["f"])
    g.node("Gemm", [f, g.const("W", (12, 5))], ["y"])
    assert remaining_reason(g.model([("y", None)])) == "matmul_layout"


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("flatten", ["view", "flatten"])
def test_torch_bn2d_flatten_linear_head_folds_forward(tmp_path, dynamo, flatten):
    """A face-recognition style head, BatchNorm2d -> x.view(x.size(0), -1) / flatten(1) -> Linear,
    exported with a dynamic batch: the BN folds into the Linear's Gemm."""
    torch = pytest.importorskip("torch")
    import onnx
    import onnxruntime as ort

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(4)
            self.fc = torch.nn.Linear(4 * 3 * 3, 5)

        def forward(self, x):
            x = self.bn(x)
            return self.fc(x.view(x.size(0), -1) if flatten == "view" else torch.flatten(x, 1))

    head = Head()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head.bn.running_mean.normal_(generator=generator)
        head.bn.running_var.uniform_(0.5, 2.0, generator=generator)
        head.bn.weight.uniform_(0.5, 1.5, generator=generator)
        head.bn.bias.normal_(generator=generator)
    head.eval()
    example = torch.randn(2, 4, 3, 3)
    if dynamo:
        pytest.importorskip("onnxscript")
        program = torch.onnx.export(
            head,
            (example,),
            dynamo=True,
            input_names=["x"],
            dynamic_shapes=({0: torch.export.Dim("b")},),
            optimize=False,
        )
        model = program.model_proto
    else:
        path = str(tmp_path / "head.onnx")
        torch.onnx.export(
            head, (example,), path, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "b"}}, opset_version=17
        )
        model = onnx.load(path)
    folded, report = bnfold.fold(model)
    assert report.n_folded == 1 and report.folded[0].rule == "bn_layout_gemm", report.to_dict()
    assert ops_of(folded)["BatchNormalization"] == 0
    onnx.checker.check_model(folded, full_check=True)
    session = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 4, 3, 3)
    with torch.no_grad():
        expected = head(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))
