"""Every case of issue 3 (tools/make_models.py CASES): what folds, what stays and why, and that the
folded model is valid, keeps its interface, computes the same outputs and is a fixed point."""

from __future__ import annotations

import collections
import os

import numpy as np
import onnx
import pytest

from bnfold.folding.fold_pass import fold
from fold_testing import (
    MM,
    NotRunnable,
    assert_parity,
    constant_value,
    count_bn,
    iter_graphs,
    op_counts,
    report_entries,
    run_model,
    signature,
)

CASE_NAMES = list(MM.CASES)
POSITIVE = [n for n in CASE_NAMES if any(isinstance(e, MM.Fold) for e in MM.CASES[n][1])]


@pytest.fixture(scope="module")
def folded_cases():
    """name -> (original, folded, report, original bytes before folding, original bytes after)."""
    cache = {}

    def get(name):
        if name not in cache:
            original = MM.CASES[name][0]()
            before = original.SerializeToString()
            folded, report = fold(original)
            cache[name] = (original, folded, report, before, original.SerializeToString())
        return cache[name]

    return get


def _graph_matches(expected: str, reported: str) -> bool:
    if not expected:
        return reported == ""
    holder, attr = expected.rsplit("/", 1)
    return reported.endswith(attr) and holder.split("/")[-1] in reported


@pytest.mark.parametrize("name", CASE_NAMES)
def test_report_matches_expected(name, folded_cases):
    original, folded, report, _, _ = folded_cases(name)
    expected = MM.CASES[name][1]
    rows = report_entries(report)
    assert len(rows) == count_bn(original) == len(expected), f"every BN accounted for once: {rows}"
    assert report.n_folded == sum(isinstance(e, MM.Fold) for e in expected)
    assert report.n_remaining == sum(isinstance(e, MM.Remain) for e in expected)
    named = [e for e in expected if e.bn is not None]
    for e in named:
        matches = [r for r in rows if r[0] == e.bn]
        assert len(matches) == 1, f"{e.bn}: {rows}"
        bn, graph, kind, code, message = matches[0]
        if isinstance(e, MM.Fold):
            assert (kind, code) == ("fold", e.rule), f"{name}/{bn}: expected fold {e.rule}, got {kind} {code} {message}"
        else:
            assert (kind, code) == ("remain", e.reason), f"{name}/{bn}: expected remain {e.reason}, got {kind} {code}"
            assert message.strip(), f"{name}/{bn}: remaining BN needs a sentence saying why"
        assert _graph_matches(e.graph, graph), f"{name}/{bn}: graph {graph!r}, expected like {e.graph!r}"
    # unnamed BNs: the pass labels them itself, so compare the multiset of outcomes
    named_bns = {e.bn for e in named}
    rest = collections.Counter((r[2], r[3]) for r in rows if r[0] not in named_bns)
    want = collections.Counter(
        ("fold", e.rule) if isinstance(e, MM.Fold) else ("remain", e.reason) for e in expected if e.bn is None
    )
    assert rest == want
    assert len({(r[1], r[0]) for r in rows}) == len(rows), f"BN labels must be unique: {rows}"
    assert report.to_dict()  # JSON-serialisable form exists for every case


@pytest.mark.parametrize("name", CASE_NAMES)
def test_fold_does_not_mutate_caller_model(name, folded_cases):
    _, _, _, before, after = folded_cases(name)
    assert before == after


@pytest.mark.parametrize("name", CASE_NAMES)
def test_folded_model_valid_and_interface_kept(name, folded_cases):
    original, folded, report, _, _ = folded_cases(name)
    onnx.checker.check_model(folded, full_check=True)
    assert signature(folded) == signature(original)
    assert count_bn(folded) == count_bn(original) - report.n_folded


@pytest.mark.parametrize("name", CASE_NAMES)
def test_folded_model_parity(name, folded_cases):
    original, folded, report, _, _ = folded_cases(name)
    feeds = MM.random_feeds(original, seed=1)
    try:
        run_model(original, feeds[0])
    except NotRunnable:
        # Only a model no engine here executes (opset-6 training BN) lands here: then nothing may change.
        assert report.n_folded == 0
        assert folded.graph.SerializeToString() == original.graph.SerializeToString()
        return
    assert_parity(original, folded, feeds, name)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_fold_is_idempotent(name, folded_cases):
    _, folded, report, _, _ = folded_cases(name)
    again, report2 = fold(folded)
    assert report2.n_folded == 0, report_entries(report2)
    assert sorted((r.bn, r.reason) for r in report2.remaining) == sorted((r.bn, r.reason) for r in report.remaining)
    assert op_counts(again) == op_counts(folded)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_initializer_names_unique(name, folded_cases):
    original, folded, _, _, _ = folded_cases(name)
    # Names visible in a subgraph include the outer scopes': a new name must not shadow any of them.
    for path, graph in iter_graphs(folded.graph):
        names = [t.name for t in graph.initializer]
        assert len(names) == len(set(names)), f"{name} {path or 'main'}: duplicate initializers"
    produced = collections.Counter()
    for _, graph in iter_graphs(folded.graph):
        produced.update(t.name for t in graph.initializer)
        produced.update(o for n in graph.node for o in n.output if o)
        init_names = {t.name for t in graph.initializer}
        produced.update(v.name for v in graph.input if v.name not in init_names)  # IR < 4 lists weights as inputs
    dupes = [k for k, v in produced.items() if v > 1]
    assert not dupes, f"{name}: names defined more than once in the folded model: {dupes}"


@pytest.mark.parametrize(
    "name", ["conv_mul_add_bn", "convtranspose2d_add_bias_bn", "convtranspose2d_identity_add_identity_bn"]
)
def test_add_mul_chain_absorbed(name, folded_cases):
    original, folded, _, _, _ = folded_cases(name)
    counts = op_counts(folded)
    assert counts["Add"] == 0 and counts["Mul"] == 0 and counts["BatchNormalization"] == 0, counts
    assert counts["Identity"] == 0, counts


def test_not_per_channel_add_kept(folded_cases):
    _, folded, _, _, _ = folded_cases("conv_add_vector_bn")
    add = [n for n in folded.graph.node if n.op_type == "Add"]
    assert len(add) == 1
    np.testing.assert_array_equal(
        constant_value(folded.graph, add[0].input[1]), constant_value(MM.conv_add_vector_bn().graph, "add_vec")
    )


def test_shared_weight_other_layer_keeps_original(folded_cases):
    original, folded, _, _, _ = folded_cases("shared_weight_conv_bn_and_plain_conv")
    plain = next(n for n in folded.graph.node if n.name == "conv_plain")
    folded_conv = next(n for n in folded.graph.node if n.name == "conv_a")
    w_original = constant_value(original.graph, "shared_W")
    np.testing.assert_array_equal(constant_value(folded.graph, plain.input[1]), w_original)
    assert folded_conv.input[1] != plain.input[1], "the folded Conv must get its own copy of the weight"
    assert not np.array_equal(constant_value(folded.graph, folded_conv.input[1]), w_original)


def test_shared_weight_two_folds_get_separate_copies(folded_cases):
    _, folded, _, _, _ = folded_cases("shared_weight_two_conv_bn")
    convs = {n.name: n for n in folded.graph.node if n.op_type == "Conv"}
    wa, wb = (constant_value(folded.graph, convs[k].input[1]) for k in ("conv_a", "conv_b"))
    assert convs["conv_a"].input[1] != convs["conv_b"].input[1]
    assert not np.array_equal(wa, wb), "each Conv carries its own BN's scale"


@pytest.mark.parametrize("name", ["conv_bn_float16", "conv_bn_float64", "gemm_bn_bfloat16", "conv_bn_bfloat16_opset22"])
def test_weights_keep_their_dtype(name, folded_cases):
    original, folded, _, _, _ = folded_cases(name)
    dtypes = {t.data_type for _, g in iter_graphs(folded.graph) for t in g.initializer}
    orig_dtypes = {t.data_type for _, g in iter_graphs(original.graph) for t in g.initializer}
    assert dtypes <= orig_dtypes, f"{name}: folded weights changed dtype {orig_dtypes} -> {dtypes}"


def test_external_data_kept_external(tmp_path):
    from bnfold.io import load_model, save_model_atomic

    name = "conv_bn_external_data"
    original = MM.CASES[name][0]()
    src = tmp_path / "in.onnx"
    onnx.save_model(
        original,
        str(src),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="in.onnx.data",
        size_threshold=1024,
    )
    assert os.path.getsize(src) < 20_000  # the weights really are outside the .onnx file
    folded, report = fold(str(src))
    assert report.n_folded == 1
    out = tmp_path / "out.onnx"
    save_model_atomic(folded, str(out), source_path=str(src))
    assert (tmp_path / "out.onnx.data").exists()
    assert os.path.getsize(out) < 20_000
    reloaded = load_model(str(out))
    fresh = MM.CASES[name][0]()  # onnx.save_model(save_as_external_data=True) rewrote `original` in place
    assert_parity(fresh, reloaded, MM.random_feeds(fresh, seed=2), name)


def test_fold_accepts_a_path(tmp_path):
    original = MM.conv2d_bn()
    path = tmp_path / "m.onnx"
    onnx.save_model(original, str(path))
    folded, report = fold(str(path))
    assert report.n_folded == 1
    assert_parity(original, folded, MM.random_feeds(original), "path")
    assert path.read_bytes() == original.SerializeToString()


def _unused_initializers(model):
    used = set()
    for _, graph in iter_graphs(model.graph):
        used.update(i for n in graph.node for i in n.input)
        used.update(v.name for v in graph.output)
    return {t.name for _, g in iter_graphs(model.graph) for t in g.initializer if t.name not in used}


@pytest.mark.parametrize("name", POSITIVE)
def test_no_dead_weights_left_behind(name, folded_cases):
    """Folded BN parameters and replaced weights are dropped, so the model really gets smaller."""
    original, folded, _, _, _ = folded_cases(name)
    assert _unused_initializers(folded) <= _unused_initializers(original)
