"""Multi-branch re-parameterization in the fold pass: an identity-branch BN folds into a Conv of the
same input (``bn_branch``), and the Convs of one input that Adds sum merge into one Conv
(``conv_branches``), as timm's RepVGG / MobileOne blocks need. Positive cases check the folded model
(checker, onnxruntime parity, one Conv per block, report entries); negative cases check that each
refusal leaves the graph as it was with the expected reason code."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.folding.fold_pass import fold, inspect
from fold_testing import assert_close, op_counts, run_model


class _Block:
    """A block ``Add(...Add(branch_0, branch_1)..., branch_n)`` of one input, built with onnx.helper."""

    def __init__(self, channels, spatial=(6, 7), dtype=np.float32, seed=0, out_channels=None):
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        self.channels = channels
        self.out_channels = out_channels or channels
        self.spatial = tuple(spatial)
        self.nodes, self.inits, self.extra_outputs, self.inputs = [], [], [], []
        self.summands = []
        self.count = 0

    def name(self, prefix):
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, prefix, value):
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value).astype(self.dtype), name))
        return name

    def batch_norm(self, value, channels):
        gamma = self.rng.uniform(0.5, 1.5, channels)
        beta = self.rng.normal(0, 0.2, channels)
        mean = self.rng.normal(0, 0.3, channels)
        var = self.rng.uniform(0.5, 2.0, channels)
        ins = [value] + [self.const(p, v) for p, v in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var))]
        out = self.name("bn_out")
        self.nodes.append(helper.make_node("BatchNormalization", ins, [out], name=self.name("bn")))
        return out

    def conv(self, kernel, *, pads=None, group=1, bn=True, bias=False, weight_value=None, **attrs):
        kernel = tuple(kernel)
        shape = (self.out_channels, self.channels // group) + kernel
        weight = self.rng.normal(0, 0.5, shape) if weight_value is None else np.broadcast_to(weight_value, shape)
        ins = ["x", self.const("W", weight)]
        if bias:
            ins.append(self.const("B", self.rng.normal(0, 0.3, self.out_channels)))
        if pads is None and "auto_pad" not in attrs:
            pads = [k // 2 for k in kernel] * 2
        if pads is not None:
            attrs["pads"] = list(pads)
        out = self.name("conv_out")
        self.nodes.append(helper.make_node("Conv", ins, [out], name=self.name("conv"), group=group, **attrs))
        self.summands.append(self.batch_norm(out, self.out_channels) if bn else out)
        return out

    def identity(self):
        out = self.batch_norm("x", self.channels)
        self.summands.append(out)
        return out

    def output_info(self, name):
        return helper.make_tensor_value_info(name, self.elem, [None] * (2 + len(self.spatial)))

    def model(self, relu=True):
        total = self.summands[0]
        for value in self.summands[1:]:
            out = self.name("sum")
            self.nodes.append(helper.make_node("Add", [total, value], [out], name=self.name("add")))
            total = out
        if relu:
            self.nodes.append(helper.make_node("Relu", [total], ["y"], name="relu"))
        else:
            self.nodes[-1].output[0] = "y"
        x_shape = [1, self.channels, *self.spatial]
        graph = helper.make_graph(
            self.nodes,
            "block",
            [helper.make_tensor_value_info("x", self.elem, x_shape)] + self.inputs,
            [self.output_info("y")] + self.extra_outputs,
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model


def _feeds(model, seed=1):
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(dims).astype(
            helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        )
    return feeds


def _fold_and_check(model):
    folded, report = fold(model)
    onnx.checker.check_model(folded, full_check=True)
    for seed in (1, 2):
        feeds = _feeds(model, seed)
        assert_close(run_model(model, feeds)[0], run_model(folded, feeds)[0], "reparam")
    again, second = fold(folded)
    assert op_counts(again) == op_counts(folded) and not second.folded and not second.merged
    return folded, report


def _rules(report):
    return collections.Counter(f.rule for f in report.folded)


# ----- positive cases ---------------------------------------------------------------------------
def _repvgg(group=1, dilation=1, channels=4):
    b = _Block(channels)
    b.conv((3, 3), group=group, pads=[dilation] * 4, dilations=[dilation, dilation])
    b.conv((1, 1), group=group)
    b.identity()
    return b


def _mobileone(group=1):
    b = _Block(4)
    for _ in range(3):
        b.conv((3, 3), group=group)
    b.conv((1, 1), group=group)
    b.identity()
    return b


POSITIVE = {
    "repvgg": lambda: _repvgg(),
    "repvgg_grouped": lambda: _repvgg(group=2),
    "repvgg_depthwise": lambda: _repvgg(group=4),
    "repvgg_dilated": lambda: _repvgg(dilation=2),
    "mobileone_depthwise": lambda: _mobileone(group=4),
    "mobileone_pointwise": lambda: _mobileone(group=1),
}


@pytest.mark.parametrize("case", sorted(POSITIVE))
def test_block_becomes_one_conv(case):
    model = POSITIVE[case]().model()
    folded, report = _fold_and_check(model)
    counts = op_counts(folded)
    assert counts["Conv"] == 1 and counts["BatchNormalization"] == 0 and counts["Add"] == 0
    convs_before = op_counts(model)["Conv"]
    assert _rules(report) == {"conv_bn": convs_before, "bn_branch": 1}
    assert report.n_remaining == 0 and not report.unmerged
    assert len(report.merged) == 1 and len(report.merged[0].convs) == convs_before
    merged = report.merged[0]
    assert merged.rule == "conv_branches" and merged.target == merged.convs[0]
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    kernel = next(helper.get_attribute_value(a) for a in conv.attribute if a.name == "kernel_shape")
    assert list(kernel) == [3, 3]
    as_dict = report.to_dict()
    assert as_dict["merged"][0]["convs"] == list(merged.convs) and as_dict["unmerged"] == []


def test_identity_weight_is_the_centre_tap():
    """1x1 branch alone with its identity BN: the folded weight is W*s_conv + diag(s_id)."""
    b = _Block(3)
    b.conv((1, 1), bn=False, bias=True)
    conv = b.nodes[-1]
    weight = numpy_helper.to_array(b.inits[0]).astype(np.float64)
    bias = numpy_helper.to_array(b.inits[1]).astype(np.float64)
    b.identity()
    gamma, beta, mean, var = (numpy_helper.to_array(t).astype(np.float64) for t in b.inits[2:6])
    scale = gamma / np.sqrt(var + 1e-5)
    model = b.model()
    folded, report = _fold_and_check(model)
    assert _rules(report) == {"bn_branch": 1} and op_counts(folded)["Add"] == 0
    assert report.folded[0].target == conv.name
    (new_conv,) = [n for n in folded.graph.node if n.op_type == "Conv"]
    new_weight, new_bias = (
        numpy_helper.to_array(next(t for t in folded.graph.initializer if t.name == name))
        for name in new_conv.input[1:3]
    )
    expected = weight + np.diag(scale).reshape(3, 3, 1, 1)
    np.testing.assert_allclose(new_weight, expected.astype(np.float32), rtol=1e-7)
    np.testing.assert_allclose(new_bias, (bias + beta - mean * scale).astype(np.float32), rtol=1e-6)


def test_three_by_one_and_one_by_three_merge_into_three_by_three():
    """ACNet: 3x3 + 1x3 + 3x1 branches, centres aligned per axis."""
    b = _Block(4)
    b.conv((3, 3))
    b.conv((1, 3), pads=[0, 1, 0, 1])
    b.conv((3, 1), pads=[1, 0, 1, 0])
    folded, report = _fold_and_check(b.model())
    assert op_counts(folded)["Conv"] == 1 and len(report.merged) == 1 and len(report.merged[0].convs) == 3


def test_strided_branches_without_identity_merge():
    """The first block of a stage: stride 2, no identity branch."""
    b = _Block(4, out_channels=6)
    b.conv((3, 3), strides=[2, 2])
    b.conv((1, 1), strides=[2, 2])
    folded, report = _fold_and_check(b.model())
    assert op_counts(folded)["Conv"] == 1 and op_counts(folded)["Add"] == 0 and _rules(report) == {"conv_bn": 2}


def test_same_padding_and_explicit_pads_merge():
    b = _Block(4)
    b.conv((3, 3), auto_pad="SAME_UPPER")
    b.conv((1, 1))
    b.identity()
    folded, _ = _fold_and_check(b.model())
    assert op_counts(folded)["Conv"] == 1


def test_one_dimensional_branches():
    b = _Block(4, spatial=(9,))
    b.conv((5,))
    b.conv((3,))
    b.conv((1,))
    b.identity()
    folded, report = _fold_and_check(b.model())
    assert op_counts(folded)["Conv"] == 1 and _rules(report)["bn_branch"] == 1


def test_scalar_zero_summand_folds_and_does_not_stop_the_merge():
    """timm MobileOne writes ``out = 0; out += branch``: an Add of a constant 0 in the tree, which
    folds into the Conv beside it (``conv_affine``)."""
    b = _Block(4)
    b.conv((3, 3))
    b.summands.append(b.const("zero", np.zeros(())))
    b.conv((1, 1))
    b.identity()
    folded, report = _fold_and_check(b.model())
    counts = op_counts(folded)
    assert counts["Conv"] == 1 and "Add" not in counts and counts["BatchNormalization"] == 0
    assert len(report.merged) == 1
    assert [f.rule for f in report.folded if f.kind == "affine_chain"] == ["conv_affine"]


def test_float16_block_folds_within_float16_noise():
    b = _Block(4, dtype=np.float16)
    b.conv((3, 3))
    b.conv((1, 1))
    b.identity()
    folded, report = _fold_and_check(b.model())
    assert op_counts(folded)["Conv"] == 1
    assert {f.weight_type for f in report.folded} == {"float16"}


def test_sum_output_that_is_a_graph_output_keeps_its_name():
    model = _repvgg().model(relu=False)
    folded, _ = _fold_and_check(model)
    assert [o.name for o in folded.graph.output] == ["y"]
    assert [n.op_type for n in folded.graph.node] == ["Conv"] and folded.graph.node[0].output[0] == "y"


def test_inspect_reports_what_fold_does():
    model = _mobileone().model()
    assert inspect(model).to_dict() == fold(model)[1].to_dict()


# ----- refusals ---------------------------------------------------------------------------------
def _remaining_reasons(report):
    return {r.bn: r.reason for r in report.remaining}


def test_identity_into_an_uncentred_conv_is_refused():
    b = _Block(4)
    b.conv((3, 3), pads=[2, 2, 0, 0])  # shifted: same output shape, other input positions
    bn_out = b.identity()
    folded, report = _fold_and_check(b.model())
    assert list(_remaining_reasons(report).values()) == ["misaligned_branches"]
    assert bn_out in {o for n in folded.graph.node for o in n.output}


def test_identity_into_an_even_kernel_is_refused():
    b = _Block(4)
    b.conv((2, 2), pads=[1, 1, 0, 0])
    b.identity()
    _, report = _fold_and_check(b.model())
    assert list(_remaining_reasons(report).values()) == ["misaligned_branches"]


def test_identity_into_a_strided_conv_is_refused():
    b = _Block(4, spatial=(1, 1))  # a 1x1 map keeps its shape under stride 2, so the Add is valid
    b.conv((3, 3), strides=[2, 2])
    b.identity()
    _, report = _fold_and_check(b.model())
    assert list(_remaining_reasons(report).values()) == ["misaligned_branches"]


def test_identity_with_other_channel_counts_is_refused():
    b = _Block(1, out_channels=4)  # BN(x) has 1 channel, broadcast against the Conv's 4
    b.conv((3, 3))
    b.identity()
    _, report = _fold_and_check(b.model())
    assert list(_remaining_reasons(report).values()) == ["incompatible_branches"]


@pytest.mark.parametrize("also", ["graph_output", "multiple_consumers"])
def test_identity_read_elsewhere_is_refused(also):
    b = _Block(4)
    b.conv((3, 3))
    bn_out = b.identity()
    if also == "graph_output":
        b.extra_outputs.append(b.output_info(bn_out))
    else:
        b.nodes.append(helper.make_node("Relu", [bn_out], ["other"], name="other_reader"))
        b.extra_outputs.append(b.output_info("other"))
    _, report = _fold_and_check(b.model())
    assert list(_remaining_reasons(report).values()) == [also]


def test_float16_identity_that_would_overflow_is_refused():
    b = _Block(4, dtype=np.float16)
    b.conv((3, 3), bn=False, weight_value=65504.0)
    b.identity()
    _, report = _fold_and_check(b.model())
    assert list(_remaining_reasons(report).values()) == ["would_overflow"]


def _unmerged(report):
    return [(u.reason, len(u.convs)) for u in report.unmerged]


def test_misaligned_centres_do_not_merge():
    b = _Block(4)
    b.conv((3, 3), pads=[2, 2, 0, 0])
    b.conv((1, 1))
    folded, report = _fold_and_check(b.model())
    assert _unmerged(report) == [("misaligned_branches", 2)] and not report.merged
    assert op_counts(folded)["Conv"] == 2 and op_counts(folded)["Add"] == 1


@pytest.mark.parametrize(
    "second",
    [dict(kernel=(3, 3), pads=[2, 2, 2, 2], dilations=[2, 2]), dict(kernel=(3, 3), group=2)],
    ids=["dilations", "group"],
)
def test_incompatible_branches_do_not_merge(second):
    b = _Block(4)
    b.conv((3, 3))
    b.conv(second.pop("kernel"), **second)
    _, report = _fold_and_check(b.model())
    assert _unmerged(report) == [("incompatible_branches", 2)]


def test_same_padding_with_a_stride_does_not_merge():
    b = _Block(4, spatial=(7, 7))
    b.conv((3, 3), auto_pad="SAME_UPPER", strides=[2, 2])
    b.conv((1, 1), auto_pad="SAME_UPPER", strides=[2, 2])
    _, report = _fold_and_check(b.model())
    assert _unmerged(report) == [("misaligned_branches", 2)]


def test_branch_output_read_elsewhere_does_not_merge():
    b = _Block(4)
    b.conv((3, 3), bn=False)
    side = b.conv((1, 1), bn=False)
    b.extra_outputs.append(b.output_info(side))
    _, report = _fold_and_check(b.model())
    assert _unmerged(report) == [("graph_output", 2)]


def test_non_constant_branch_weight_does_not_merge():
    b = _Block(4)
    b.conv((3, 3), bn=False)
    b.conv((1, 1), bn=False)
    weight = b.nodes[-1].input[1]
    b.inits = [t for t in b.inits if t.name != weight]
    b.inputs.append(helper.make_tensor_value_info(weight, b.elem, [4, 4, 1, 1]))
    _, report = _fold_and_check(b.model())
    assert _unmerged(report) == [("non_constant_weight", 2)]


def test_float16_merge_that_would_overflow_is_refused():
    b = _Block(4, dtype=np.float16)
    b.conv((3, 3), bn=False, weight_value=60000.0)
    b.conv((1, 1), bn=False, weight_value=60000.0)
    _, report = _fold_and_check(b.model())
    assert _unmerged(report) == [("would_overflow", 2)]


def test_cli_lists_merges(tmp_path, capsys):
    from bnfold.cli.app import main

    path = tmp_path / "block.onnx"
    b = _Block(4)
    b.conv((3, 3), pads=[2, 2, 0, 0])
    b.conv((1, 1))
    onnx.save(b.model(), path)
    assert main(["inspect", str(path)]) == 0
    assert "misaligned_branches" in capsys.readouterr().out
    onnx.save(_repvgg().model(), path)
    assert main(["fold", str(path), "-o", str(tmp_path / "out.onnx")]) == 0
    assert "Conv branches: 2 merged into 1 Conv(s), 0 Add(s) left apart" in capsys.readouterr().out


# ----- real blocks from timm --------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["repvgg", "mobileone"])
def test_timm_block_export_becomes_one_conv_per_block(arch, tmp_path):
    torch = pytest.importorskip("torch")
    import importlib.util
    import os
    import sys

    spec = importlib.util.spec_from_file_location(
        "bnfold_build_corpus", os.path.join(os.path.dirname(__file__), "..", "tools", "build_corpus.py")
    )
    build_corpus = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, build_corpus)  # its dataclasses look their module up there
    spec.loader.exec_module(build_corpus)
    try:
        build_corpus._define_torchvision_schemas(torch)
    except RuntimeError:  # already defined in this process
        pass
    byobnet = pytest.importorskip("timm.models.byobnet")
    layers = byobnet.LayerFn()
    if arch == "repvgg":
        blocks = [
            byobnet.RepVggBlock(8, 8, stride=2, layers=layers),
            byobnet.RepVggBlock(8, 8, layers=layers),
            byobnet.RepVggBlock(8, 8, group_size=4, layers=layers),
        ]
    else:
        blocks = [
            byobnet.MobileOneBlock(8, 8, stride=2, group_size=1, num_conv_branches=3, layers=layers),
            byobnet.MobileOneBlock(8, 8, group_size=1, num_conv_branches=3, layers=layers),
            byobnet.MobileOneBlock(8, 16, num_conv_branches=2, layers=layers),
        ]
    net = torch.nn.Sequential(*blocks)
    build_corpus.make_statistics_realistic(net, (8, 12, 12), torch.Generator().manual_seed(0))
    path = tmp_path / f"{arch}.onnx"
    torch.onnx.export(net, torch.randn(1, 8, 12, 12), str(path), opset_version=17, dynamo=False)
    model = onnx.load(path)
    folded, report = _fold_and_check(model)
    counts = op_counts(folded)
    assert counts["Conv"] == len(blocks) and counts["BatchNormalization"] == 0
    assert len(report.merged) == len(blocks) and report.n_remaining == 0


@pytest.mark.parametrize("identity_folds", [True, False])
def test_values_keeping_their_names_keep_their_meaning(identity_folds):
    """Every value left under its name holds what it held: bnfold.check compares them all."""
    import bnfold

    b = _Block(4)
    b.conv((3, 3))
    b.identity()
    b.conv((1, 1))
    if not identity_folds:  # a second reader keeps the identity BN, the Convs still merge around it
        b.nodes.append(helper.make_node("Relu", [b.summands[1]], ["other"], name="other_reader"))
        b.extra_outputs.append(b.output_info("other"))
    b.conv((1, 1))
    model = b.model()
    folded, report = _fold_and_check(model)
    assert op_counts(folded)["Conv"] == 1 and len(report.merged) == 1
    assert op_counts(folded)["Add"] == (0 if identity_folds else 1)
    check = bnfold.check(model, folded, intermediates=True)
    assert check.passed, check.summary()


def test_declared_initializer_shapes_stay_true_when_a_kernel_grows():
    """The dynamo exporter declares every initializer in value_info; the 1x1 weight that becomes
    the merged 3x3 kernel must not keep a (C, C, 1, 1) declaration (the full checker refuses it)."""
    b = _Block(4)
    b.conv((1, 1), bn=False)
    b.conv((3, 3), bn=False)
    model = b.model()
    for tensor in model.graph.initializer:
        model.graph.value_info.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    onnx.checker.check_model(model, full_check=True)
    folded, report = _fold_and_check(model)
    assert len(report.merged) == 1 and op_counts(folded)["Conv"] == 1
    onnx.checker.check_model(folded, full_check=True)
