"""fold_file: tensor payloads kept outside the proto (bnfold.io.payloads) give exactly the model the
in-memory route gives, for every case; the input checker still rejects invalid files; the lazy
scaled weights write the same bytes as the eager ones; the wire-format helpers round-trip."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold.io.payloads
from bnfold.errors import InputError
from bnfold.folding.fold_pass import fold, fold_file
from bnfold.folding.tensors import ScaledWeight
from bnfold.io import load_model_deferred, save_model_atomic, wire
from bnfold.io.payloads import TensorPayloads, split_serialized_model
from fold_testing import MM


def assert_parity(original, folded):
    from bnfold.verify.parity import check

    report = check(original, folded)
    assert report.passed, report.summary()


@pytest.fixture
def defer_everything(monkeypatch):
    """Keep every initializer payload (>= 1 byte) apart, so the small test models exercise it."""
    monkeypatch.setattr(bnfold.io.payloads, "DEFER_THRESHOLD", 1)


def _save(model, path):
    onnx.save_model(model, str(path))
    return str(path)


@pytest.mark.parametrize("name", list(MM.CASES))
def test_fold_file_gives_the_model_fold_gives(name, tmp_path, defer_everything):
    src = _save(MM.CASES[name][0](), tmp_path / "in.onnx")
    expected, expected_report = fold(onnx.load(src))  # the in-memory route, nothing kept apart
    report = fold_file(src, str(tmp_path / "out.onnx"))
    written = onnx.load(str(tmp_path / "out.onnx"))
    assert written == expected
    assert report.to_dict() == expected_report.to_dict()


def _model_with_big_weight(seed=0, cout=64, cin=64):
    """Conv (64x64x3x3 float32 weight = 144 KiB, above the default threshold) -> BN."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(rng.uniform(0.5, 2, cout).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, cout).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, 8, 8])],
        inits,
    )
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 15)])


def test_big_weights_stay_apart_and_the_result_runs(tmp_path):
    src = _save(_model_with_big_weight(), tmp_path / "in.onnx")
    model, payloads, wait = load_model_deferred(src)
    try:
        wait()
        held = [t.name for t in model.graph.initializer if payloads.holds(t)]
        assert held == ["w"]  # only the payload above the threshold
        assert model.ByteSize() < 4096
        w = payloads.array(model.graph.initializer[0])
        assert not w.flags.writeable
        np.testing.assert_array_equal(w, numpy_helper.to_array(onnx.load(src).graph.initializer[0]))
    finally:
        payloads.close()
    out = str(tmp_path / "out.onnx")
    report = fold_file(src, out)
    assert report.n_folded == 1 and report.ops_after.get("BatchNormalization", 0) == 0
    onnx.checker.check_model(out, full_check=True)
    assert_parity(onnx.load(src), onnx.load(out))


def test_conv_bn_bn_reads_the_weight_the_first_fold_wrote(tmp_path):
    model = _model_with_big_weight()
    g = model.graph
    g.node[1].output[0] = "z"
    rng = np.random.default_rng(1)
    for name in ("gamma2", "beta2", "mean2", "var2"):
        g.initializer.append(numpy_helper.from_array(rng.uniform(0.5, 2, 64).astype(np.float32), name))
    g.node.append(helper.make_node("BatchNormalization", ["z", "gamma2", "beta2", "mean2", "var2"], ["y"]))
    src = _save(model, tmp_path / "in.onnx")
    out = str(tmp_path / "out.onnx")
    assert fold_file(src, out).n_folded == 2
    expected, _ = fold(onnx.load(src))
    assert onnx.load(out) == expected
    assert_parity(onnx.load(src), onnx.load(out))


def test_invalid_model_with_payloads_apart_is_rejected(tmp_path):
    model = _model_with_big_weight()
    model.graph.node[0].input[0] = "undefined_input"
    src = _save(model, tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    with pytest.raises(InputError, match="invalid ONNX model"):
        fold_file(src, str(out))
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if p != "in.onnx"] == []


def test_initializer_named_like_a_node_output_is_rejected(tmp_path):
    """The SSA check still sees initializers whose payloads are kept apart."""
    model = _model_with_big_weight()
    model.graph.initializer[0].name = "c"  # also the Conv's output
    model.graph.node[0].input[1] = "c"
    src = _save(model, tmp_path / "in.onnx")
    with pytest.raises(InputError, match="invalid ONNX model"):
        fold_file(src, str(tmp_path / "out.onnx"))


def test_short_payload_is_left_in_the_proto_and_reported_invalid(tmp_path, defer_everything):
    model = _model_with_big_weight()
    w = model.graph.initializer[0]
    w.raw_data = w.raw_data[:-4]
    src = _save(model, tmp_path / "in.onnx")
    model2, payloads, wait = load_model_deferred(src, check=False)
    assert not payloads.holds(model2.graph.initializer[0])
    payloads.close()
    with pytest.raises(InputError, match="too small"):
        fold_file(src, str(tmp_path / "out.onnx"))


def test_verify_false_writes_nothing_and_sees_a_complete_model(tmp_path):
    src = _save(_model_with_big_weight(), tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    seen = []

    def verify(tmp):
        seen.append(tmp)
        onnx.checker.check_model(tmp, full_check=True)
        assert_parity(onnx.load(src), onnx.load(tmp))
        return False

    fold_file(src, str(out), verify=verify)
    assert len(seen) == 1 and not out.exists() and not os.path.exists(seen[0])
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]


@pytest.mark.parametrize("name", ["conv2d_bn", "gemm_bn_bfloat16", "if_branches_bn", "shared_weight_two_conv_bn"])
def test_fold_of_a_path_gives_a_complete_model(name, tmp_path, defer_everything):
    src = _save(MM.CASES[name][0](), tmp_path / "in.onnx")
    from_path, _ = fold(src)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in from_path.graph.initializer)
    assert from_path == fold(onnx.load(src))[0]


def test_materialize_gives_a_complete_model(tmp_path, defer_everything):
    src = _save(_model_with_big_weight(), tmp_path / "in.onnx")
    model, payloads, wait = load_model_deferred(src)
    wait()
    payloads.materialize(model.graph.initializer)
    payloads.close()
    assert model == onnx.load(src)


def test_external_data_source_is_loaded_whole(tmp_path):
    src = str(tmp_path / "in.onnx")
    onnx.save_model(_model_with_big_weight(), src, save_as_external_data=True, location="in.data", size_threshold=1024)
    model, payloads, wait = load_model_deferred(src)
    wait()
    assert not any(payloads.holds(t) for t in model.graph.initializer)
    assert model.graph.initializer[0].HasField("raw_data")  # external data was loaded
    payloads.close()
    out = str(tmp_path / "out.onnx")
    fold_file(src, out)
    assert os.path.exists(out + ".data")  # kept external
    assert_parity(onnx.load(src), onnx.load(out))


def test_save_model_atomic_counts_payloads_kept_apart_toward_the_size_limit(tmp_path, monkeypatch):
    import bnfold.io.load as io_load

    src = _save(_model_with_big_weight(), tmp_path / "in.onnx")
    model, payloads, wait = load_model_deferred(src)
    wait()
    assert io_load.tensor_payload_bytes(model, payloads) >= 64 * 64 * 9 * 4
    monkeypatch.setattr(io_load, "PROTOBUF_LIMIT", (64 << 20) + 64 * 64 * 9 * 4)  # the weight no longer fits
    out = str(tmp_path / "out.onnx")
    assert save_model_atomic(model, out, payloads=payloads)
    payloads.close()
    assert os.path.exists(out + ".data")
    written, original = onnx.load(out), onnx.load(src)
    assert written.graph.node == original.graph.node
    for a, b in zip(written.graph.initializer, original.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape,factor_shape,chunk",
    [
        ((6, 5, 3, 3), (6, 1, 1, 1), 64),  # conv weight, per output channel, rows split across chunks
        ((7, 11), (1, 11), 24),  # matmul weight, per column (rows of one value)
        ((2, 3, 4, 5), (1, 1, 4, 1), 1000),  # middle axis
        ((4, 4), (1, 1), 8),  # scalar factor
    ],
)
def test_scaled_weight_written_in_chunks_equals_the_whole(dtype, shape, factor_shape, chunk, monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(dtype)
    factor = rng.uniform(-2, 2, factor_shape)
    data_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    scaled = ScaledWeight.of(w, factor, data_type)
    expected = (w.astype(np.float64) * factor).astype(dtype)
    assert np.frombuffer(scaled.to_bytes(), dtype=dtype).reshape(shape).tobytes() == expected.tobytes()
    monkeypatch.setattr(ScaledWeight, "CHUNK_BYTES", chunk)
    with open(tmp_path / "w.bin", "wb") as f:
        scaled.write_to(f)
    assert (tmp_path / "w.bin").read_bytes() == expected.tobytes()


def test_scaled_weight_declines_what_the_compiled_loop_cannot_do():
    w = np.ones((4, 6), np.float32)
    assert ScaledWeight.of(w, np.ones((4, 6)), TensorProto.FLOAT) is None  # varies along two axes
    assert ScaledWeight.of(w.astype(np.float16), np.ones((4, 1)), TensorProto.FLOAT16) is None
    assert ScaledWeight.of(w[:, ::2], np.ones((4, 1)), TensorProto.FLOAT) is None  # not contiguous
    with pytest.raises(ValueError, match="reshape"):
        ScaledWeight.of(w, np.ones((4, 1)), TensorProto.FLOAT).reshape((5, 5))


def test_scale_rows_into_rejects_partial_rows():
    from bnfold._fold_math import scale_rows_into

    src = np.zeros(12, np.uint8)
    with pytest.raises(ValueError, match="whole rows"):
        scale_rows_into(src, np.zeros(8, np.uint8), 0, 1, 1, np.ones(1), False, 1)
    with pytest.raises(ValueError, match="whole rows"):
        scale_rows_into(src[:10], np.zeros(10, np.uint8), 0, 1, 2, np.ones(1), False, 1)


def test_wire_fields_and_varints_round_trip():
    for n in (0, 1, 127, 128, 300, 2**31, 2**63 - 1):
        assert wire.read_varint(wire.encode_varint(n), 0, len(wire.encode_varint(n))) == (n, len(wire.encode_varint(n)))
    tensor = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "t")
    buf = tensor.SerializeToString()
    found = {f[0]: f for f in wire.fields(buf, 0, len(buf))}
    raw = found[wire.TENSOR_RAW_DATA]
    assert buf[raw[3] : raw[4]] == tensor.raw_data
    with pytest.raises(wire.WireError):
        list(wire.fields(b"\x0a\x05ab", 0, 4))  # length runs past the end
    with pytest.raises(wire.WireError):
        wire.read_varint(b"\xff\xff", 0, 2)  # truncated


def test_split_declines_repeated_graph_fields():
    model = _model_with_big_weight()
    buf = model.SerializeToString()
    graph = model.graph.SerializeToString()
    doubled = buf + wire.length_delimited(wire.MODEL_GRAPH, len(graph)) + graph
    assert split_serialized_model(doubled, TensorPayloads()) is None
    assert split_serialized_model(buf, TensorPayloads()) is not None


def test_background_writer_writes_in_order_and_reports_errors():
    import io

    from bnfold.io.stream import _BackgroundWriter

    target = io.BytesIO()
    with _BackgroundWriter(target, depth=2) as w:
        for k in range(100):
            w.write(bytes([k]) * 3)
    assert target.getvalue() == b"".join(bytes([k]) * 3 for k in range(100))

    class Full(io.RawIOBase):
        def write(self, data):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"), _BackgroundWriter(Full()) as w:
        for _ in range(10):
            w.write(b"data")


def test_write_error_becomes_one_input_error_and_leaves_nothing(tmp_path, monkeypatch):
    import bnfold.io.stream as stream

    src = _save(_model_with_big_weight(), tmp_path / "in.onnx")

    class FullDisk(stream._BackgroundWriter):
        def write(self, data):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(stream, "_BackgroundWriter", FullDisk)
    with pytest.raises(InputError, match="cannot write output"):
        fold_file(src, str(tmp_path / "out.onnx"))
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]


def test_external_data_only_inside_a_body_is_noticed(tmp_path):
    """Only main-graph initializers are kept apart; a file whose external data sits in an If
    body is loaded whole (its data read) and saved with external data again."""
    rng = np.random.default_rng(0)
    body_w = numpy_helper.from_array(rng.standard_normal((64, 8)).astype(np.float32), "body_w")  # 2 KiB
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "body_w"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 8])],
        [body_w],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["z"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 8])],
    )
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
    )
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 15)])
    src = str(tmp_path / "in.onnx")
    onnx.save_model(model, src, save_as_external_data=True, location="in.data", size_threshold=1024)
    from bnfold.io import file_uses_external_data

    assert file_uses_external_data(src)
    loaded, payloads, wait = load_model_deferred(src)
    wait()
    then_branch = next(a.g for a in loaded.graph.node[0].attribute if a.name == "then_branch")
    body_tensor = then_branch.initializer[0]
    assert body_tensor.HasField("raw_data") and len(body_tensor.raw_data) == 64 * 8 * 4
    payloads.close()
    out = str(tmp_path / "out.onnx")
    fold_file(src, out)
    assert os.path.exists(out + ".data")


def test_ir3_model_with_a_big_unlisted_initializer_is_read_as_ir4(tmp_path):
    """The payload path reads an IR 3 model whose (big, kept apart) initializer is not a graph
    input as onnxruntime does, like the whole-file loader (see test_model_io)."""
    from bnfold.errors import BnfoldWarning

    model = _model_with_big_weight()
    model.ir_version = 3
    model.opset_import[0].version = 8
    src = _save(model, tmp_path / "ir3.onnx")
    out = str(tmp_path / "out.onnx")
    with pytest.warns(BnfoldWarning, match="IR version 3"):
        fold_file(src, out)
    written = onnx.load(out)
    assert written.ir_version == 4
    onnx.checker.check_model(written, full_check=True)


def test_checker_still_rejects_what_it_rejects_for_small_tensors(tmp_path):
    """raw_data next to float_data is refused for a big tensor kept apart too."""
    model = _model_with_big_weight()
    model.graph.initializer[0].float_data.append(1.0)
    src = _save(model, tmp_path / "two.onnx")
    with pytest.raises(InputError, match="one and only one value field"):
        fold_file(src, str(tmp_path / "out.onnx"))


def test_fold_file_arguments_are_named_in_type_errors(tmp_path):
    src = _save(_model_with_big_weight(), tmp_path / "in.onnx")
    with pytest.raises(TypeError, match="input_path"):
        fold_file(onnx.load(src), str(tmp_path / "out.onnx"))
    with pytest.raises(TypeError, match="output_path"):
        fold_file(src, None)
    with pytest.raises(TypeError, match="input_path"):
        fold_file(src.encode(), str(tmp_path / "out.onnx"))


def test_missing_external_data_file_is_named(tmp_path):
    src = str(tmp_path / "in.onnx")
    onnx.save_model(_model_with_big_weight(), src, save_as_external_data=True, location="in.data", size_threshold=1024)
    os.unlink(tmp_path / "in.data")
    with pytest.raises(InputError, match="external data"):
        fold_file(src, str(tmp_path / "out.onnx"))


def test_a_pipe_cannot_be_checked_and_says_why(tmp_path):
    from bnfold.verify.parity import check

    fifo = str(tmp_path / "pipe.onnx")
    os.mkfifo(fifo)
    src = _save(_model_with_big_weight(), tmp_path / "in.onnx")
    with pytest.raises(InputError, match="not a regular file"):
        check(src, fifo)


def test_fields_unknown_to_this_onnx_survive_fold_file(tmp_path):
    """A newer onnx may write fields this one does not know: the streaming writer keeps them."""
    model = _model_with_big_weight()
    model.graph.node[1].output[0] = "z"  # BN output feeds a Relu, so the model stays foldable
    model.graph.node.append(helper.make_node("Relu", ["z"], ["y"]))
    data = model.SerializeToString()
    unknown_model = wire.key(900, wire.VARINT) + wire.encode_varint(7)
    unknown_graph = wire.length_delimited(901, 5) + b"hello"
    parsed = onnx.load_model_from_string(data)
    parsed.graph.MergeFromString(unknown_graph)
    parsed.MergeFromString(unknown_model)
    src = str(tmp_path / "in.onnx")
    with open(src, "wb") as f:
        f.write(parsed.SerializeToString())
    out = str(tmp_path / "out.onnx")
    assert fold_file(src, out).n_folded == 1
    written = pathlib.Path(out).read_bytes()
    assert unknown_model in written and unknown_graph in written


def _big_weight_edited(edit):
    """``_model_with_big_weight`` serialized with its weight initializer's encoding changed by
    ``edit(tensor bytes) -> tensor bytes`` (the graph's framing fixed)."""
    buf = _model_with_big_weight().SerializeToString()
    graph = next(f for f in wire.fields(buf, 0, len(buf)) if f[0] == wire.MODEL_GRAPH)
    _, _, graph_field_start, graph_start, graph_end, _ = graph
    weight = next(f for f in wire.fields(buf, graph_start, graph_end) if f[0] == wire.GRAPH_INITIALIZER)
    _, _, field_start, start, stop, _ = weight
    tensor = edit(buf[start:stop])
    graph_bytes = (
        buf[graph_start:field_start]
        + wire.length_delimited(wire.GRAPH_INITIALIZER, len(tensor))
        + tensor
        + buf[stop:graph_end]
    )
    return (
        buf[:graph_field_start]
        + wire.length_delimited(wire.MODEL_GRAPH, len(graph_bytes))
        + graph_bytes
        + buf[graph_end:]
    )


def _negated_dims(tensor):
    # [-64, -64, 3, 3]: the product still matches the payload
    header = TensorProto()
    header.ParseFromString(tensor)
    dims = list(header.dims)
    del header.dims[:]
    header.dims.extend([-dims[0], -dims[1]] + dims[2:])
    return header.SerializeToString()


@pytest.mark.parametrize(
    "edit,checker_refuses",
    [
        (_negated_dims, True),
        (lambda t: t + wire.key(wire.TENSOR_DATA_LOCATION, wire.VARINT) + wire.encode_varint(0), False),
        (lambda t: t + wire.length_delimited(wire.TENSOR_SEGMENT, 4) + bytes([8, 0, 16, 1]), False),
        (lambda t: t + wire.key(wire.TENSOR_RAW_DATA, wire.FIXED32) + bytes(4), False),  # wrong wire type: unknown
        (lambda t: t + wire.length_delimited(wire.TENSOR_NAME, 0), True),  # an empty name
        (lambda t: t + wire.key(wire.TENSOR_DATA_TYPE, wire.VARINT) + wire.encode_varint(0), True),  # UNDEFINED
    ],
    ids=[
        "negative_dims",
        "explicit_default_data_location",
        "segment",
        "raw_data_as_fixed32",
        "empty_name",
        "undefined_type",
    ],
)
def test_split_leaves_in_the_proto_what_the_checker_must_see(edit, checker_refuses, tmp_path):
    """A big initializer the checker would refuse, or whose fields would not survive being
    kept apart exactly, stays in the proto: the deferred loader reads the model onnx.load
    reads and refuses what the checker refuses, as the whole-file loader does."""
    from bnfold.io import load_model

    data = _big_weight_edited(edit)
    src = tmp_path / "in.onnx"
    src.write_bytes(data)
    payloads = TensorPayloads()
    rest = split_serialized_model(data, payloads)
    assert rest is not None and not any(payloads.holds(t) for t in onnx.load_model_from_string(rest).graph.initializer)
    model, payloads, wait = load_model_deferred(str(src))
    try:
        if checker_refuses:
            with pytest.raises(InputError, match="invalid ONNX model"):
                wait()
            with pytest.raises(InputError, match="invalid ONNX model"):
                load_model(str(src))
        else:
            wait()
            assert model == onnx.load_model_from_string(data) == load_model(str(src))
    finally:
        payloads.close()


@pytest.mark.parametrize("clash", ["small_initializer", "big_initializer", "sparse_initializer"])
def test_initializer_names_shared_with_a_kept_apart_one_are_refused(clash, tmp_path):
    """The checker refuses two initializers (or an initializer and a sparse one) of one name;
    it must see them both, although it would see a kept-apart one as a graph input, which may
    share a name with an initializer."""
    model = _model_with_big_weight()
    graph = model.graph
    if clash == "small_initializer":
        graph.initializer[1].name = "w"
    elif clash == "big_initializer":
        graph.initializer.append(numpy_helper.from_array(np.zeros((64, 64, 3, 3), np.float32), "w"))
    else:
        graph.sparse_initializer.append(
            helper.make_sparse_tensor(
                numpy_helper.from_array(np.ones(2, np.float32), "w"),
                numpy_helper.from_array(np.array([0, 3]), "i"),
                [5],
            )
        )
    src = _save(model, tmp_path / "in.onnx")
    assert split_serialized_model(pathlib.Path(src).read_bytes(), TensorPayloads()) is None  # read whole
    with pytest.raises(InputError, match="not unique"):
        fold_file(src, str(tmp_path / "out.onnx"))
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]
