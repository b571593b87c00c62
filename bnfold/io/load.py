"""Loading and validating ONNX models, and what a model's payload says about how it must be saved.

Every way a file can be unusable (missing, unreadable, not a regular file, not protobuf, not a
valid model, external data missing, truncated or not a regular file) becomes a one-line
InputError. ``load_model_deferred`` leaves the big payloads in the memory-mapped file (see
``bnfold.io.payloads``); the checker can run in a thread while the caller starts working. IR-3
files with unlisted initializers are read as the IR-4 models onnxruntime runs. Also here: whether
a file or model uses external data and whether a model fits in one protobuf message.
"""

from __future__ import annotations

import os
import threading
import warnings

import onnx
from onnx.external_data_helper import load_external_data_for_model, uses_external_data

from bnfold.common import first_line
from bnfold.errors import BnfoldWarning, InputError

# protobuf refuses to serialize a single message above 2 GiB; large models must go external.
PROTOBUF_LIMIT = 2**31 - 1


def load_model(model_or_path, *, check: bool = True) -> onnx.ModelProto:
    """Return a ModelProto from a path or a ModelProto (the latter is returned as is, not copied).

    External data next to the file is loaded. With ``check`` the model goes through
    ``onnx.checker.check_model`` so that later passes can rely on a well-formed graph.
    """
    model, wait_for_check = load_model_checked_in_background(model_or_path, check=check)
    wait_for_check()
    return model


def load_model_checked_in_background(model_or_path, *, check: bool = True):
    """``(model, wait_for_check)``: like ``load_model``, but the checker runs in a thread (it
    releases the GIL) while the caller starts working on the model; ``wait_for_check()`` raises
    the InputError of an invalid model. Call it before trusting or writing any result."""
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, lambda: None
    path = _existing_model_path(model_or_path)
    try:
        # Read the bytes once: they are parsed here and handed to the checker as they are, which
        # saves re-reading the file or re-serializing the proto (half the load time on 100 MB).
        # Parsing without external data first tells whether the file keeps tensors outside,
        # which savers need later to keep them outside.
        with open(path, "rb") as f:
            raw = f.read()
        model = onnx.load_model_from_string(raw)
        external = model_uses_external_data(model)
        if external:
            directory = os.path.dirname(os.path.abspath(path))
            external_tensors = _refuse_unreadable_external_data(model, directory, path)
            try:
                load_external_data_for_model(model, directory)
            except (FileNotFoundError, PermissionError):
                raise
            except Exception as e:  # noqa: BLE001 - onnx words a missing/short data file as a ValidationError
                raise InputError(f"{path}: external data missing or unreadable ({first_line(e)})") from None
            _refuse_wrong_payload_sizes(external_tensors, path)
    except InputError:
        raise
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except FileNotFoundError as e:  # a missing external-data file
        raise InputError(f"{path}: external data file missing ({e.filename or e})") from None
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError and friends: the file is not an ONNX model
        raise InputError(f"{path}: not a readable ONNX model ({type(e).__name__}: {first_line(e)})") from None
    _require_graph(model, path)
    _remember_external_data(path, external)
    if read_as_ir4_if_initializers_unlisted(model, path):
        # The checker must judge the model as it will be used, not the file's IR-3 reading of it.
        raw = model if external else model.SerializeToString()
    return model, (
        _check_in_background(path, path if external and not isinstance(raw, onnx.ModelProto) else raw)
        if check
        else (lambda: None)
    )


def load_model_deferred(path, *, check: bool = True):
    """``(model, payloads, wait_for_check)``: load the ONNX file at ``path`` for editing and
    saving, with the big initializer payloads left in the memory-mapped file (see
    ``bnfold.io.payloads``): ``model`` holds everything else, ``payloads`` (a TensorPayloads) the
    tensor data; no copy of the weights is made. Files this does not suit (external data, not
    mappable) are loaded whole, with an empty ``payloads``. Errors and the background checker
    are as in ``load_model_checked_in_background``; close ``payloads`` when done."""
    from bnfold.io.payloads import TensorPayloads

    path = _existing_model_path(path)
    try:
        split = _load_split(path)
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    if split is not None:
        model, payloads, rest = split
        try:
            _require_graph(model, path)
        except InputError:
            payloads.close()
            raise
        _remember_external_data(path, False)
        read_as_ir4_if_initializers_unlisted(model, path)
        marker = payloads.marker
        wait = (
            _check_in_background(path, lambda: _without_kept_apart_initializers(rest, marker))
            if check
            else (lambda: None)
        )
        return model, payloads, wait
    model, wait_for_check = load_model_checked_in_background(path, check=check)
    return model, TensorPayloads(), wait_for_check


def _load_split(path):
    """``(model, payloads, rest bytes)`` of the file at ``path`` with its big main-graph payloads
    kept apart, or None when the file does not suit that (not mappable, not protobuf, external
    data anywhere, a repeated graph field)."""
    from bnfold.io.payloads import TensorPayloads, map_file, split_serialized_model

    mapped = map_file(path)
    if mapped is None:
        return None
    payloads = TensorPayloads(source=mapped)
    try:
        rest = split_serialized_model(mapped[1], payloads)
        model = None if rest is None else onnx.load_model_from_string(rest)
    except Exception:  # noqa: BLE001 - not protobuf: callers fall back to the whole-file loader, which words the error
        model = None
    if model is None or model_uses_external_data(model, payloads):
        payloads.close()
        return None
    return model, payloads, rest


def _existing_model_path(model_or_path, argument: str = "model") -> str:
    path = os.fspath(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else None
    if not isinstance(path, str):
        raise TypeError(
            f"{argument} must be a path (str or os.PathLike of str) or an onnx.ModelProto, got "
            f"{type(model_or_path).__name__}"
        )
    if not os.path.exists(path):
        if os.path.islink(path):
            raise InputError(f"{path}: a symbolic link to nothing (broken, or a loop of links)")
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, expected an .onnx file")
    if not os.path.isfile(path):
        # open() of a FIFO blocks until a writer comes; a device may never end.
        raise InputError(f"{path}: not a regular file (a FIFO, device or socket), expected an .onnx file")
    return path


def _refuse_unreadable_external_data(model: onnx.ModelProto, directory: str, path) -> list:
    """The tensors of ``model`` whose data is external, after making sure each names a regular
    file (onnx's reader would block forever in ``open()`` on a FIFO). Locations that escape
    ``directory`` are refused by onnx's reader itself."""
    external = [t for t in all_tensors(model) if uses_external_data(t)]
    for tensor in external:
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if not location:
            raise InputError(f"{path}: tensor '{tensor.name}' is external data without a location")
        data_path = os.path.join(directory, location)
        if os.path.exists(data_path) and not os.path.isfile(data_path):
            raise InputError(f"{path}: external data of tensor '{tensor.name}' ({location}) is not a regular file")
    return external


def _refuse_wrong_payload_sizes(tensors, path) -> None:
    """One-line InputError for a tensor whose loaded external payload does not fit its dims: a
    truncated data file read without a ``length`` key yields fewer bytes, and the checker, which
    sees only the path of an external-data model, never compares them."""
    from bnfold.io.payloads import expected_payload_nbytes

    for tensor in tensors:
        if any(d < 0 for d in tensor.dims):
            raise InputError(f"{path}: tensor '{tensor.name}' has negative dims {list(tensor.dims)}")
        expected = expected_payload_nbytes(tensor)
        if expected is not None and len(tensor.raw_data) != expected:
            raise InputError(
                f"{path}: external data of tensor '{tensor.name}' holds {len(tensor.raw_data)} bytes, "
                f"its dims {list(tensor.dims)} call for {expected} (truncated or wrong data file)"
            )


def _require_graph(model: onnx.ModelProto, path) -> None:
    if not model.HasField("graph") or (len(model.graph.node) == 0 and len(model.graph.output) == 0):
        raise InputError(f"{path}: not an ONNX model (no graph)")


def _without_kept_apart_initializers(rest: bytes, marker: str) -> bytes:
    """The model ``rest`` (a model whose big initializers' payloads are kept apart, marked with
    ``marker``) as the checker should see it: those initializers become graph inputs of the same
    type and shape. Their own checks (known element type, non-negative dims, payload size
    matching the shape, a non-empty name no other initializer has, no second data field) were
    done when they were set apart (``payloads.split_serialized_model``); everything else the checker looks at
    is unchanged. Below IR 4 every initializer must already be a graph input: none is added, so
    a missing one still fails (as an undefined value)."""
    model = onnx.load_model_from_string(rest)
    read_as_ir4_if_initializers_unlisted(model, None)
    graph = model.graph
    input_names = {i.name for i in graph.input}
    if model.ir_version < 4:
        input_names = None
    kept, moved = [], []
    for tensor in graph.initializer:
        apart = any(e.key == "location" and e.value == marker for e in tensor.external_data)
        (moved if apart else kept).append(tensor)
    if moved:
        new_inputs = (
            []
            if input_names is None
            else [
                onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                for t in moved
                if t.name not in input_names
            ]
        )
        del graph.initializer[:]
        graph.initializer.extend(kept)
        graph.input.extend(new_inputs)
    return model.SerializeToString()


def read_as_ir4_if_initializers_unlisted(model: onnx.ModelProto, path) -> bool:
    """Make an IR < 4 model whose initializers are not all listed as graph inputs an IR 4 model
    that means what onnxruntime runs; return whether it was changed.

    IR 3 requires every initializer to be a graph input too, and the checker refuses a model that
    breaks that rule, but exporters write such files and onnxruntime (like OpenVINO and the other
    ONNX optimizers) runs them, treating every initializer as a constant. IR 4 is the first
    version that allows unlisted initializers; it also makes a *listed* initializer an input the
    caller may override, so the listed ones are unlisted: every initializer stays the constant it
    was in onnxruntime, and the interface onnxruntime shows (inputs without initializers) does
    not change. (onnxruntime refuses unlisted initializers in If/Loop/Scan bodies, so only the
    main graph is looked at.) ``path``: named in the one-line ``BnfoldWarning`` (None: no warning)."""
    if model.ir_version >= 4 or not model.HasField("graph"):
        return False
    listed = {i.name for i in model.graph.input}
    unlisted = sum(1 for t in model.graph.initializer if t.name not in listed)
    if not unlisted:
        return False
    initializer_names = {t.name for t in model.graph.initializer}
    kept_inputs = [i for i in model.graph.input if i.name not in initializer_names]
    del model.graph.input[:]
    model.graph.input.extend(kept_inputs)
    old_version = model.ir_version
    model.ir_version = 4
    if path is not None:
        warnings.warn(
            f"{os.fspath(path)}: IR version {old_version} model with {unlisted} initializer(s) not listed as graph "
            "inputs, which IR 3 requires; read as IR 4 with every initializer a constant, as onnxruntime "
            "runs it (models written from it are IR 4)",
            BnfoldWarning,
            stacklevel=3,
        )
    return True


def _check_in_background(path, what):
    """Run onnx.checker.check_model on ``what`` (a path, serialized bytes, or a function that
    returns either, called in the thread) in a thread; return the function that waits for it and
    raises the one-line InputError of an invalid model."""
    failure = []

    def run_checker():
        try:
            onnx.checker.check_model(what() if callable(what) else what)
        except Exception as e:  # noqa: BLE001 - the caller reports it as an invalid model
            failure.append(e)

    thread = threading.Thread(target=run_checker, name="bnfold-onnx-checker", daemon=True)
    thread.start()

    def wait_for_check():
        thread.join()
        if failure:
            raise InputError(f"{path}: invalid ONNX model ({first_line(failure[0])})") from None

    return wait_for_check


def model_uses_external_data(model: onnx.ModelProto, payloads=None) -> bool:
    """Whether some tensor of ``model`` refers to an external data file (tensors whose payload
    ``payloads`` holds are not external data)."""
    return any(uses_external_data(t) and not (payloads is not None and payloads.holds(t)) for t in all_tensors(model))


# (realpath, mtime_ns, size) of files load_model read -> whether they used external data.
_external_data_seen: dict = {}


def _file_key(path):
    st = os.stat(path)
    return (os.path.realpath(path), st.st_mtime_ns, st.st_size)


def _remember_external_data(path, external: bool) -> None:
    try:
        _external_data_seen[_file_key(path)] = external
    except OSError:
        pass


def file_uses_external_data(path) -> bool:
    """True when the ONNX file at ``path`` keeps some tensors in external data files.

    ``load_model`` pulls external data into memory, so the loaded model no longer says so; savers
    ask here. Files load_model has read are answered from memory; others are parsed without their
    big payloads (a file that keeps data external is small and parsed whole)."""
    try:
        key = _file_key(path)
    except OSError:
        return False
    if not os.path.isfile(key[0]):  # opening a FIFO would block
        return False
    if key not in _external_data_seen:
        try:
            split = _load_split(key[0])
            if split is not None:
                split[1].close()
                _external_data_seen[key] = False
            else:
                _external_data_seen[key] = model_uses_external_data(onnx.load(key[0], load_external_data=False))
        except Exception:  # noqa: BLE001 - unreadable means: not known to use external data
            return False
    return _external_data_seen[key]


def tensor_payload_bytes(model: onnx.ModelProto, payloads=None) -> int:
    """Bytes of tensor payload in the model: a cheap estimate (lower bound) of its serialized
    size; ``ByteSize()`` of the whole model walks the whole proto and costs as much as
    serializing it. (Per tensor ByteSize() is used because reading ``raw_data`` copies it.)"""
    tensors = list(all_tensors(model))
    kept_apart = payloads.total_bytes(tensors) if payloads is not None else 0
    return sum(t.ByteSize() for t in tensors) + kept_apart


def fits_in_one_message(model: onnx.ModelProto, payloads=None) -> bool:
    """Whether the model can be serialized as one protobuf message (< 2 GiB), judged by its
    tensor payload plus a margin for the graph."""
    return tensor_payload_bytes(model, payloads) < PROTOBUF_LIMIT - (64 << 20)


def all_tensors(model):
    """Every tensor of ``model``, as onnx's external-data code walks them: the initializers of the
    main graph and its subgraphs, and the tensors in node attributes (functions' included)."""
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)
