"""bnfold.io load / paths / save: one-line errors for unusable files, atomic writes that never touch the input, the
streaming writer's bytes decode to the same model, external data stays external."""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import InputError
from bnfold.io.load import file_uses_external_data, load_model
from bnfold.io.paths import check_output_path, source_files
from bnfold.io.save import save_model_atomic


def _matmul_model(k=300, with_small=True):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((k, k)).astype(np.float32), "W")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm")]
    if with_small:
        inits.append(numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), "b"))
        nodes.append(helper.make_node("Add", ["h", "b"], ["y"], name="add"))
    else:
        nodes.append(helper.make_node("Identity", ["h"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", k])],
        inits,
    )
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 15)], producer_name="test")
    model.metadata_props.add(key="k", value="v")
    return model


def test_streaming_save_round_trips_exactly(tmp_path):
    model = _matmul_model()
    before = model.SerializeToString()
    out = tmp_path / "m.onnx"
    save_model_atomic(model, out)
    assert model.SerializeToString() == before  # the caller's model is untouched
    loaded = onnx.load(str(out))
    assert loaded == model
    onnx.checker.check_model(str(out), full_check=True)
    assert not file_uses_external_data(out)


def test_streaming_save_writes_fields_in_field_number_order(tmp_path):
    # Other ONNX readers (OpenVINO) misread a model whose opset_import precedes its graph: the
    # streamed bytes must be exactly what onnx's own serializer writes, fields in number order.
    model = _matmul_model()
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    model.doc_string = "doc"
    model.graph.doc_string = "graph doc"
    model.graph.initializer[0].doc_string = "big tensor doc"
    out = tmp_path / "m.onnx"
    save_model_atomic(model, out)
    assert out.read_bytes() == model.SerializeToString()


def test_fold_file_output_is_in_field_number_order(tmp_path):
    # fold_file streams payloads kept apart in the memory-mapped input (a different code path).
    from bnfold.folding.fold_pass import fold_file

    model = _matmul_model()
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    fold_file(src, out)
    written = out.read_bytes()
    assert written == onnx.load(str(out)).SerializeToString()


def test_save_keeps_external_data_of_the_source(tmp_path):
    model = _matmul_model()
    src = tmp_path / "src.onnx"
    save_model_atomic(model, src, external_data=True)
    assert (tmp_path / "src.onnx.data").exists()
    assert file_uses_external_data(src)
    loaded = load_model(src)
    out = tmp_path / "out.onnx"
    save_model_atomic(loaded, out, source_path=src)
    assert (tmp_path / "out.onnx.data").exists()
    assert file_uses_external_data(out)
    again = load_model(out)
    w0 = numpy_helper.to_array(model.graph.initializer[0])
    assert np.array_equal(numpy_helper.to_array(again.graph.initializer[0]), w0)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".bnfold-")]  # no temp leftovers


def test_small_model_saved_with_external_data_folds_into_one_file(tmp_path):
    # Every tensor below onnx's 1 KiB threshold: onnx writes no data file for the output, which
    # once made bnfold fold exit 2 ("cannot write output") on a model onnxruntime runs.
    from bnfold.folding.fold_pass import fold_file

    model = _matmul_model(k=8)
    w0 = numpy_helper.to_array(model.graph.initializer[0])
    src = tmp_path / "small.onnx"
    onnx.save(
        model,
        str(src),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="small.bin",
        size_threshold=0,
    )
    assert file_uses_external_data(src)
    out = tmp_path / "out.onnx"
    fold_file(src, out)
    again = load_model(out)
    assert np.array_equal(numpy_helper.to_array(again.graph.initializer[0]), w0)
    assert not (tmp_path / "out.onnx.data").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".bnfold-")]


def test_refuses_to_overwrite_the_input(tmp_path):
    src = tmp_path / "m.onnx"
    save_model_atomic(_matmul_model(), src)
    before = src.read_bytes()
    with pytest.raises(InputError, match="refusing to overwrite"):
        save_model_atomic(_matmul_model(k=8), src, source_path=src)
    assert src.read_bytes() == before


@pytest.mark.parametrize(
    "content, message",
    [(None, "no such file"), (b"", "not"), (os.urandom(4096), "not"), (b"hello world\n", "not")],
)
def test_unusable_files_give_one_line_input_errors(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message) as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_invalid_model_is_reported(tmp_path):
    model = _matmul_model()
    model.graph.node[0].input[1] = "missing"
    path = tmp_path / "invalid.onnx"
    onnx.save(model, str(path))
    with pytest.raises(InputError, match="invalid ONNX model"):
        load_model(path)


def test_output_path_checks(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        check_output_path(tmp_path / "nope" / "m.onnx")
    with pytest.raises(InputError, match="is a directory"):
        check_output_path(tmp_path)
    assert check_output_path(tmp_path / "m.onnx") == str(tmp_path)


def _external_model(tmp_path, name, location):
    """(weight W, path) of a model saved with its tensors in ``location`` (relative to tmp_path)."""
    model = _matmul_model()
    weight = numpy_helper.to_array(model.graph.initializer[0])
    path = tmp_path / name
    # onnx.save_model moves the tensors of ``model`` itself to external data
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0
    )
    return weight, path


def test_output_whose_data_file_name_is_the_inputs_data_gets_another_name(tmp_path):
    # in.onnx keeps its weights in out.onnx.data: writing out.onnx with its data in
    # out.onnx.data would destroy the input, so the output's data goes to another name
    weight, src = _external_model(tmp_path, "in.onnx", "out.onnx.data")
    data_before = (tmp_path / "out.onnx.data").read_bytes()
    assert save_model_atomic(load_model(src), tmp_path / "out.onnx", source_path=src)
    assert (tmp_path / "out.onnx.data").read_bytes() == data_before
    assert source_files(tmp_path / "out.onnx") == {str(tmp_path / "out.onnx"), str(tmp_path / "out.onnx.1.data")}
    assert np.array_equal(numpy_helper.to_array(load_model(tmp_path / "out.onnx").graph.initializer[0]), weight)
    assert np.array_equal(numpy_helper.to_array(load_model(src).graph.initializer[0]), weight)


def test_output_on_the_inputs_data_file_is_refused(tmp_path):
    weight, src = _external_model(tmp_path, "m.onnx", "m.onnx.data")
    data_before = (tmp_path / "m.onnx.data").read_bytes()
    with pytest.raises(InputError, match="external data file"):
        check_output_path(tmp_path / "m.onnx.data", source_path=src)
    with pytest.raises(InputError, match="external data file"):
        save_model_atomic(load_model(src), tmp_path / "m.onnx.data", source_path=src)
    assert (tmp_path / "m.onnx.data").read_bytes() == data_before
    assert np.array_equal(numpy_helper.to_array(load_model(src).graph.initializer[0]), weight)


def test_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        out = tmp_path / "ext.onnx"
        save_model_atomic(_matmul_model(), out, external_data=True)
    finally:
        os.umask(umask)
    assert (os.stat(out).st_mode & 0o777) == 0o644
    assert (os.stat(tmp_path / "ext.onnx.data").st_mode & 0o777) == 0o644


@pytest.mark.skipif(
    not os.path.isdir("/proc/self"), reason="needs Linux /proc (a directory nobody can create files in)"
)
def test_unwritable_directory_is_reported_before_any_work():
    with pytest.raises(InputError) as info:
        check_output_path("/proc/bnfold-out.onnx")
    message = str(info.value)
    assert message.startswith("/proc/bnfold-out.onnx: cannot write")
    assert ".bnfold-" not in message  # no temporary file names leak into the message


def test_fold_of_an_invalid_file_reports_the_checker_error(tmp_path):
    # fold(path) runs the checker in the background while it folds; the error must still surface
    import bnfold

    model = _matmul_model()
    model.graph.node[0].input[1] = "missing"
    path = tmp_path / "invalid.onnx"
    onnx.save(model, str(path))
    with pytest.raises(InputError, match="invalid ONNX model"):
        bnfold.fold(path)


def _ir3_conv_bn(list_initializers: bool):
    """An IR 3 / opset 8 Conv -> BN model (what old exporters write); with ``list_initializers``
    False its initializers are not graph inputs, which IR 3 requires but onnxruntime ignores."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "g"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "m"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "v"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])]
    if list_initializers:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", 8)]
    )
    model.ir_version = 3
    return model


def test_ir3_model_with_unlisted_initializers_is_read_as_ir4(tmp_path):
    import onnxruntime as ort

    from bnfold.errors import BnfoldWarning
    from bnfold.folding.fold_pass import fold_file

    model = _ir3_conv_bn(list_initializers=False)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)  # what the spec says...
    src, out = tmp_path / "ir3.onnx", tmp_path / "folded.onnx"
    onnx.save(model, str(src))
    ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])  # ...and what onnxruntime runs
    with pytest.warns(BnfoldWarning, match="IR version 3 .* not listed as graph inputs"):
        loaded = load_model(src)
    assert loaded.ir_version == 4 and [i.name for i in loaded.graph.input] == [i.name for i in model.graph.input]
    with pytest.warns(BnfoldWarning):
        report = fold_file(src, out)
    assert report.n_folded == 1
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    assert folded.ir_version == 4


def test_ir3_model_that_lists_its_initializers_stays_ir3(tmp_path, recwarn):
    from bnfold.folding.fold_pass import fold_file

    src, out = tmp_path / "ir3.onnx", tmp_path / "folded.onnx"
    onnx.save(_ir3_conv_bn(list_initializers=True), str(src))
    assert fold_file(src, out).n_folded == 1
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    assert folded.ir_version == 3
    assert not [w for w in recwarn if "IR version" in str(w.message)]


def test_cli_folds_an_ir3_model_with_one_warning_line(tmp_path, capsys):
    from bnfold.cli.app import main

    src, out = tmp_path / "ir3.onnx", tmp_path / "folded.onnx"
    onnx.save(_ir3_conv_bn(list_initializers=False), str(src))
    assert main(["fold", str(src), "-o", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bnfold fold: warning: ") and "IR 4" in err[0]
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_permissions_of_a_replaced_file_that_vanishes_meanwhile_fall_back(tmp_path, monkeypatch):
    """A concurrent writer of the same output may remove the old data file between the check that
    it exists and the stat of its mode (CI saw exactly that: "cannot write output (No such file or
    directory)"); the new file then gets the usual permissions instead of the writer failing."""
    import os
    import stat

    from bnfold.io import temporaries

    target = tmp_path / "new"
    target.write_bytes(b"x")
    os.chmod(target, 0o600)
    monkeypatch.setattr(os.path, "isfile", lambda p: True)  # "it exists" -- and then it is gone
    temporaries.default_permissions(str(target), like=str(tmp_path / "removed.data"))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~umask
    kept = tmp_path / "kept"
    kept.write_bytes(b"y")
    os.chmod(kept, 0o640)
    temporaries.default_permissions(str(target), like=str(kept))
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
