"""Loading and saving ONNX models safely.

Loading turns every way a file can be unusable (missing, unreadable, not protobuf, not a valid
model) into a one-line InputError. Saving is atomic (temporary file in the destination directory,
then rename) and never writes over the input file; models whose tensors live in external data
files keep them external.
"""

from __future__ import annotations

import os
import signal
import stat
import tempfile
import threading
import time
import warnings

import onnx
from onnx.external_data_helper import load_external_data_for_model, uses_external_data

from bnfold.common import first_line
from bnfold.io import wire
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
            except Exception as e:  # onnx words a missing/short data file as a ValidationError
                raise InputError(f"{path}: external data missing or unreadable ({first_line(e)})") from None
            _refuse_wrong_payload_sizes(external_tensors, path)
    except InputError:
        raise
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except FileNotFoundError as e:  # a missing external-data file
        raise InputError(f"{path}: external data file missing ({e.filename or e})") from None
    except Exception as e:  # protobuf DecodeError and friends: the file is not an ONNX model
        raise InputError(f"{path}: not a readable ONNX model ({type(e).__name__}: {first_line(e)})") from None
    _require_graph(model, path)
    _remember_external_data(path, external)
    if read_as_ir4_if_initializers_unlisted(model, path):
        # The checker must judge the model as it will be used, not the file's IR-3 reading of it.
        raw = model if external else model.SerializeToString()
    return model, (_check_in_background(path, path if external and not isinstance(raw, onnx.ModelProto) else raw)
                   if check else (lambda: None))


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
        wait = _check_in_background(path, lambda: _without_kept_apart_initializers(rest, marker)) if check \
            else (lambda: None)
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
    except Exception:  # not protobuf: callers fall back to the whole-file loader, which words the error
        model = None
    if model is None or model_uses_external_data(model, payloads):
        payloads.close()
        return None
    return model, payloads, rest


def _existing_model_path(model_or_path, argument: str = "model") -> str:
    path = os.fspath(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else None
    if not isinstance(path, str):
        raise TypeError(f"{argument} must be a path (str or os.PathLike of str) or an onnx.ModelProto, got "
                        f"{type(model_or_path).__name__}")
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
    external = [t for t in _all_initializers(model) if uses_external_data(t)]
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
            raise InputError(f"{path}: external data of tensor '{tensor.name}' holds {len(tensor.raw_data)} bytes, "
                             f"its dims {list(tensor.dims)} call for {expected} (truncated or wrong data file)")


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
        new_inputs = [] if input_names is None else [
            onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in moved
            if t.name not in input_names]
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
            "runs it (models written from it are IR 4)", BnfoldWarning, stacklevel=3)
    return True


def _check_in_background(path, what):
    """Run onnx.checker.check_model on ``what`` (a path, serialized bytes, or a function that
    returns either, called in the thread) in a thread; return the function that waits for it and
    raises the one-line InputError of an invalid model."""
    failure = []

    def run_checker():
        try:
            onnx.checker.check_model(what() if callable(what) else what)
        except Exception as e:
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
    return any(uses_external_data(t) and not (payloads is not None and payloads.holds(t))
               for t in _all_initializers(model))


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
        except Exception:
            return False
    return _external_data_seen[key]


def tensor_payload_bytes(model: onnx.ModelProto, payloads=None) -> int:
    """Bytes of tensor payload in the model: a cheap estimate (lower bound) of its serialized
    size; ``ByteSize()`` of the whole model walks the whole proto and costs as much as
    serializing it. (Per tensor ByteSize() is used because reading ``raw_data`` copies it.)"""
    tensors = list(_all_initializers(model))
    kept_apart = payloads.total_bytes(tensors) if payloads is not None else 0
    return sum(t.ByteSize() for t in tensors) + kept_apart


def fits_in_one_message(model: onnx.ModelProto, payloads=None) -> bool:
    """Whether the model can be serialized as one protobuf message (< 2 GiB), judged by its
    tensor payload plus a margin for the graph."""
    return tensor_payload_bytes(model, payloads) < PROTOBUF_LIMIT - (64 << 20)


def files_size(path) -> int:
    """Bytes on disk of an ONNX file plus the external data files it refers to."""
    return sum(os.path.getsize(f) for f in source_files(path) if os.path.exists(f))


def external_data_path(path) -> str:
    """Where ``save_model_atomic`` puts the external data of a model first written to ``path``
    (see ``external_data_candidates`` for a model written over one)."""
    return os.fspath(path) + ".data"


def external_data_candidates(path) -> list:
    """The names ``save_model_atomic`` may give the external data file of a model written to
    ``path``, in order of preference: ``<path>.data``, then ``<path>.1.data`` ... A new data file
    always gets a name that no file has yet, so that no existing .onnx (the one it replaces, one
    that a concurrent writer is about to put in place) ever points at the new weights."""
    path = os.fspath(path)
    return [path + ".data"] + [f"{path}.{i}.data" for i in range(1, _DATA_NAME_TRIES)]


_DATA_NAME_TRIES = 10


def source_files(source_path) -> set:
    """Real paths of the files a model on disk consists of: the .onnx file and every external
    data file it refers to. Outputs must never land on any of them."""
    source_path = os.fspath(source_path)
    files = {os.path.realpath(source_path)}
    if file_uses_external_data(source_path):
        directory = os.path.dirname(os.path.abspath(source_path))
        model = onnx.load(source_path, load_external_data=False)
        for tensor in _all_initializers(model):
            for entry in tensor.external_data:
                if entry.key == "location":
                    files.add(os.path.realpath(os.path.join(directory, entry.value)))
    return files


def resolve_output_path(path) -> str:
    """The file an output named ``path`` really replaces: symbolic links are followed (the file a
    link points to is rewritten, the link stays, as ``cp`` does). An existing directory or
    non-regular file (device, FIFO, socket) is refused with a one-line InputError — renaming a
    model over ``/dev/null`` would replace the device."""
    shown = os.fspath(path)
    real = os.path.realpath(shown)
    if os.path.isdir(real):
        raise InputError(f"{shown}: is a directory, expected a file path")
    if os.path.exists(real) and not os.path.isfile(real):
        raise InputError(f"{shown}: exists and is not a regular file (a device, FIFO or socket); "
                         "choose another output path")
    return real


def check_outputs(outputs: dict, *, model_option=None, models=(), inputs=()) -> None:
    """Refuse, with a one-line InputError and before any work, outputs that would overwrite an
    input or each other. Every command calls it with everything it reads and writes.

    ``outputs``: option name -> path (None: not given), e.g. ``{"-o": ..., "--report": ...}``;
    ``model_option``: the option whose path is a model (its external data file is reserved too);
    ``models``: input models (their .onnx file and every external data file they refer to are
    protected); ``inputs``: other input files or directories (a data directory protects the
    ``.npy`` / ``.npz`` files it holds and may gain, since they would be read as data)."""
    given = {option: os.fspath(path) for option, path in outputs.items() if path is not None}
    protected = {}
    for model in models:
        if model is None or not isinstance(model, (str, os.PathLike)):
            continue
        for real in source_files(model):
            protected.setdefault(real, f"the input model {os.fspath(model)}" if real == os.path.realpath(model)
                                 else f"external data of the input model {os.fspath(model)}")
    data_directories = []
    for item in inputs:
        if item is None or not isinstance(item, (str, os.PathLike)):
            continue
        item = os.fspath(item)
        if os.path.isdir(item):
            data_directories.append((os.path.realpath(item), item))
            for name in os.listdir(item):  # a data file may be a link to one elsewhere
                if name.endswith((".npy", ".npz")):
                    protected.setdefault(os.path.realpath(os.path.join(item, name)),
                                         f"the input {os.path.join(item, name)}")
        else:
            protected.setdefault(os.path.realpath(item), f"the input {item}")
    for option, path in given.items():
        # (A model output's external data never lands on a protected file: save_model_atomic
        # picks a data file name that is free.)
        real = os.path.realpath(path)
        what = protected.get(real) or next((what for p, what in protected.items() if _same_file(path, p)), None)
        if what is not None:
            raise InputError(f"{path}: refusing to overwrite {what} ({option}); choose another path")
        for directory, shown in data_directories:
            if os.path.dirname(real) == directory and real.endswith((".npy", ".npz")):
                raise InputError(f"{path}: {option} is inside the data directory {shown}, whose .npy/.npz files "
                                 "are the input data; choose another path")
    options = list(given)
    for i, first in enumerate(options):
        for second in options[i + 1:]:
            a, b = given[first], given[second]
            if os.path.realpath(a) == os.path.realpath(b) or (os.path.exists(a) and _same_file(a, b)):
                raise InputError(f"{b}: {first} and {second} name the same file")
            for model_opt, other_opt in ((first, second), (second, first)):
                # (the data goes beside the file the model path resolves to)
                if model_opt == model_option and os.path.realpath(given[other_opt]) in {
                        os.path.realpath(name) for name in
                        external_data_candidates(os.path.realpath(given[model_opt]))}:
                    raise InputError(f"{given[other_opt]}: {other_opt} is where the external data of "
                                     f"{given[model_opt]} may go; choose another path")
    for option, path in given.items():
        check_output_path(path)


def check_output_path(path, *, source_path=None) -> str:
    """Raise a one-line InputError unless a file can be written at ``path`` without touching the
    model at ``source_path`` (its .onnx file or its external data); return the destination
    directory. (A model's external data goes to a file name ``save_model_atomic`` picks free of
    the source's files.) Commands call ``check_outputs``, which calls this, before any work."""
    path = os.fspath(path)
    if source_path is not None:
        protected = source_files(source_path)
        if os.path.realpath(path) == os.path.realpath(os.fspath(source_path)) or _same_file(path, source_path):
            raise InputError(f"{path}: refusing to overwrite the input model; choose another output path")
        if os.path.realpath(path) in protected:
            raise InputError(f"{path}: refusing to overwrite the input model's external data file; "
                             "choose another output path")
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise InputError(f"{path}: output directory {directory} does not exist")
    directory = os.path.dirname(resolve_output_path(path))
    # os.access says yes to root everywhere (even /sys, read-only mounts): try for real.
    try:
        fd, probe = tempfile.mkstemp(prefix=".bnfold-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"{path}: cannot write in {directory} ({e.strerror or e})") from None
    return directory


def save_model_atomic(model: onnx.ModelProto, path, *, source_path=None, external_data=None, payloads=None,
                      verify=None) -> bool:
    """Write ``model`` to ``path`` atomically; return whether it was written.

    ``external_data``: True stores tensors in a data file beside the file (``<name>.data``, or
    another of ``external_data_candidates`` when a model already at ``path`` uses that one);
    None means "as the source was": external when the model (or the file at ``source_path`` it
    was loaded from) uses external data, or when the model is too big for one protobuf message.
    Refuses to write over ``source_path`` or any external data file it refers to. ``payloads``:
    the TensorPayloads holding the data of some of the model's tensors (see
    ``load_model_deferred``). ``verify(tmp_path) -> bool``: called with the complete model
    written to a temporary file beside ``path`` (its external data, if any, beside it too)
    before anything is moved into place; when it returns False nothing is written.

    A pair is replaced so that a crash at any instant leaves a loadable model, the old or the
    new one: the new data file goes under a name the old .onnx does not refer to, the .onnx is
    renamed over the old one last, and only then is the old model's data file removed.
    Temporary files are hidden (``.bnfold-*.tmp``) and locked while in use; a later write to the
    same folder removes those that a killed process left behind (``remove_stale_temporaries``).
    """
    shown = os.fspath(path)
    if external_data is None:
        external_data = (
            model_uses_external_data(model, payloads)
            or (source_path is not None and file_uses_external_data(source_path))
            or not fits_in_one_message(model, payloads)
        )
    directory = check_output_path(shown, source_path=source_path)
    path = resolve_output_path(shown)
    remove_stale_temporaries(directory)
    tmp_path = tmp_data = lock = placed_data = None
    try:
        fd, tmp_path = tempfile.mkstemp(prefix=".bnfold-", suffix=_MODEL_TMP_SUFFIX, dir=directory)
        lock = _lock_temporary(fd)
        _default_permissions(tmp_path, like=path)
        protected = source_files(source_path) if source_path is not None else set()
        if external_data and os.path.realpath(os.path.dirname(os.path.abspath(shown))) != directory:
            # Readers look for external data beside the path they open: through the link, the
            # data beside its target would not be found.
            raise InputError(f"{shown}: a symbolic link into another folder ({path}); a model with external data "
                             "must be written where it will be opened: give the target path")
        if external_data:
            tmp_data_name = os.path.basename(tmp_path)[:-len(_MODEL_TMP_SUFFIX)] + _DATA_TMP_SUFFIX
            tmp_data = os.path.join(directory, tmp_data_name)
            to_save = onnx.ModelProto()
            to_save.CopyFrom(model)
            if payloads is not None:
                payloads.materialize(_all_initializers(to_save))
            onnx.save_model(
                to_save,
                tmp_path,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=tmp_data_name,
                size_threshold=1024,
            )
            # onnx writes no data file when no tensor reaches the threshold (a small model that
            # was saved with external data): the result is then a single file.
            has_data = os.path.exists(tmp_data)
            if has_data:
                _default_permissions(tmp_data, like=next(iter(_replaced_data_files(path)), None))
            if verify is not None and not verify(tmp_path):
                return False
        else:
            has_data = False
            _write_model_streaming(model, tmp_path, payloads)
            if verify is not None and not verify(tmp_path):
                return False
        # Everything from reading what the old model uses to removing it happens under the
        # folder's lock: two bnfold writers of one output take turns here (and only here).
        with _directory_lock(directory):
            old_data = _replaced_data_files(path)
            if has_data:
                # The data goes in place first, under a name no file has; then the model's
                # reference is rewritten to that name; the model is renamed last.
                data_path = placed_data = _place_data_file(tmp_data, path, protected, shown)
                tmp_data = None
                _relocate_external_data(to_save, tmp_data_name, os.path.basename(data_path))
                _mark_data_file(to_save, os.path.basename(data_path))
                onnx.save_model(to_save, tmp_path, save_as_external_data=False)
            os.replace(tmp_path, path)
            tmp_path = placed_data = None
            _remove_replaced_data_files(old_data, path, protected)
        return True
    except OSError as e:
        raise InputError(f"{shown}: cannot write output ({e.strerror or type(e).__name__})") from None
    finally:
        # (placed_data: a data file put in place for a model that was not, after all: an error
        # or a signal between the two renames)
        for leftover in (tmp_path, tmp_data, placed_data):
            if leftover and os.path.exists(leftover):
                os.unlink(leftover)
        if lock is not None:
            os.close(lock)


def _replaced_data_files(path) -> set:
    """The data files of the model now at ``path`` that ``save_model_atomic`` may remove once it
    has replaced that model: the ones it refers to under the names bnfold gives data files
    (``external_data_candidates``), and only regular files — a symbolic link is left alone, and
    so is every file a user named otherwise. Empty when there is no such model or it cannot be
    read."""
    if not os.path.isfile(path) or not file_uses_external_data(path):
        return set()
    try:
        refs = source_files(path) - {os.path.realpath(path)}
        marked = {p.value for p in onnx.load(path, load_external_data=False).metadata_props
                  if p.key == _DATA_FILE_MARK}
    except Exception:  # an unreadable old output: nothing is known to belong to it
        return set()
    return {name for name in external_data_candidates(path)
            if os.path.basename(name) in marked and os.path.realpath(name) in refs and not os.path.islink(name)
            and os.path.isfile(name)}


# metadata_props key with which save_model_atomic marks a model whose data file it named: only
# such a data file is removed when the model is replaced (never one of a model bnfold did not write).
_DATA_FILE_MARK = "bnfold.external_data_file"


def _mark_data_file(model, data_name) -> None:
    for i in reversed(range(len(model.metadata_props))):
        if model.metadata_props[i].key == _DATA_FILE_MARK:
            del model.metadata_props[i]
    model.metadata_props.add(key=_DATA_FILE_MARK, value=data_name)


def _place_data_file(tmp_data, path, protected: set, shown) -> str:
    """Give the finished data file ``tmp_data`` the first name of ``external_data_candidates``
    that no file has yet — so no existing model (the one being replaced, a user's model that
    happens to use such a name) ever reads the new weights. A hard link does it (it fails on an
    existing name); where the file system has none, a rename to a name that does not exist
    (under the folder's lock). Returns the name."""
    candidates = [name for name in external_data_candidates(path) if os.path.realpath(name) not in protected]
    for name in candidates:
        if os.path.lexists(name):
            continue
        try:
            os.link(tmp_data, name)
        except FileExistsError:
            continue
        except OSError:  # no hard links here (some FUSE, FAT, SMB mounts)
            os.rename(tmp_data, name)
            return name
        os.unlink(tmp_data)
        return name
    raise InputError(f"{shown}: every external data file name for it ({os.path.basename(candidates[0])}, "
                     f"... {os.path.basename(candidates[-1])}) is taken; remove those no model uses or choose "
                     "another output path")


def _remove_replaced_data_files(old_data: set, path, protected: set) -> None:
    """Remove the data files of the model that was at ``path`` before it was replaced, unless the
    new model or the input uses them too."""
    keep = set(source_files(path)) | protected
    for name in old_data:
        if os.path.realpath(name) in keep:
            continue
        try:
            os.unlink(name)
        except OSError:
            pass


class _directory_lock:
    """An exclusive ``flock`` on a folder, held for the few milliseconds in which a writer puts
    its files in place (no lock where the system has none)."""

    def __init__(self, directory):
        self._directory, self._fd = directory, None

    # SIGINT / SIGTERM wait until the section is over: an interruption between placing the
    # data and renaming the model (or just after the rename) would leave a pair half done.
    _DEFERRED = {signal.SIGINT, signal.SIGTERM}

    def __enter__(self):
        self._mask = None
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask"):
            self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, self._DEFERRED)
        try:
            import fcntl

            self._fd = os.open(self._directory, os.O_RDONLY)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.close(self._fd)
        if self._mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        return False


_MODEL_TMP_SUFFIX = ".onnx.tmp"
_DATA_TMP_SUFFIX = ".data.tmp"
_TMP_PREFIX = ".bnfold-"
# Files older than this process cannot be one of its own temporaries.
_PROCESS_START = time.time()


def _lock_temporary(fd):
    """Hold an exclusive lock on the temporary file open at ``fd`` until it is closed: the lock
    tells ``remove_stale_temporaries`` of any process that the file is in use. Returns ``fd``."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (ImportError, OSError):  # no flock (Windows, some network file systems): no cleanup either
        pass
    return fd


def _held_by_live_process(path) -> bool:
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def remove_stale_temporaries(directory) -> list:
    """Remove from ``directory`` the temporary files of bnfold writers that were killed
    (SIGKILL, power loss, OOM) before they could clean up; return their paths.

    A temporary is stale when it is older than this process and no live process holds its lock:
    ``.bnfold-*.onnx.tmp`` and ``.bnfold-*.json.tmp`` hold the lock themselves, a
    ``.bnfold-*.data.tmp`` belongs to the ``.onnx.tmp`` of the same name, a
    ``.bnfold-scratch-*`` folder to the lock file inside it, and a ``.bnfold-probe-*`` file (the
    writability probe, removed at once) to nobody. Nothing else is touched."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(_TMP_PREFIX):
            continue
        full = os.path.join(directory, name)
        try:
            info = os.lstat(full)
        except OSError:
            continue
        if info.st_mtime >= _PROCESS_START:
            continue
        if stat.S_ISREG(info.st_mode) and name.endswith((_MODEL_TMP_SUFFIX, ".json.tmp")):
            owner = full
        elif stat.S_ISREG(info.st_mode) and name.startswith(".bnfold-probe-"):
            owner = None
        elif stat.S_ISREG(info.st_mode) and name.endswith(_DATA_TMP_SUFFIX):
            owner = full[:-len(_DATA_TMP_SUFFIX)] + _MODEL_TMP_SUFFIX
            if not os.path.exists(owner):
                owner = None
        elif stat.S_ISDIR(info.st_mode) and name.startswith(SCRATCH_PREFIX):
            owner = os.path.join(full, SCRATCH_LOCK_NAME)
            if not os.path.exists(owner):
                owner = None
        else:
            continue
        if owner is not None and _held_by_live_process(owner):
            continue
        try:
            if stat.S_ISDIR(info.st_mode):
                import shutil

                shutil.rmtree(full)
            else:
                os.unlink(full)
            removed.append(full)
        except OSError:
            pass
    if removed:
        warnings.warn(f"removed {len(removed)} stale temporary file(s) of an interrupted bnfold run from "
                      f"{directory}", BnfoldWarning, stacklevel=3)
    return removed


# Scratch folders (``scratch_directory``) and the lock file that marks one in use.
SCRATCH_PREFIX = ".bnfold-scratch-"
SCRATCH_LOCK_NAME = ".lock"


class scratch_directory:
    """A hidden, locked temporary folder in ``directory`` (a context manager giving its path),
    removed on exit; one a killed process left is removed by ``remove_stale_temporaries``."""

    def __init__(self, directory):
        self._directory = directory

    def __enter__(self) -> str:
        self.path = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=self._directory)
        self._lock = _lock_temporary(os.open(os.path.join(self.path, SCRATCH_LOCK_NAME),
                                             os.O_CREAT | os.O_RDWR, 0o600))
        return self.path

    def __exit__(self, *exc):
        import shutil

        os.close(self._lock)
        shutil.rmtree(self.path, ignore_errors=True)
        return False


_STREAM_THRESHOLD = 1 << 16


def _write_model_streaming(model: onnx.ModelProto, path, payloads=None) -> None:
    """Write ``model`` to ``path`` as ONNX protobuf without serializing it in one piece.

    SerializeToString on a 100 MB model costs more than writing it; here the big raw_data
    payloads go to the file as they are and protobuf encodes only the small rest. Payloads kept
    in ``payloads`` (a ``TensorPayloads``) are written straight from there. Every message's fields
    are written in field-number order, as ``SerializeToString`` writes them: protobuf readers accept
    any order, but other ONNX readers do not (OpenVINO misreads a model whose ``opset_import``
    precedes its ``graph``). The caller's model is not modified or copied.
    """
    model_head, model_tail = _encode_around(model, "graph")
    graph_head, graph_tail = _encode_around(model.graph, "initializer")
    # Each initializer as (fields before raw_data, fields after it, raw payload length or None);
    # ByteSize() and the payload length give the encoded sizes without reading raw_data, which
    # copies it: each payload is read once, just before it is written.
    pieces = []
    for tensor in model.graph.initializer:
        if payloads is not None and payloads.holds(tensor):
            head, tail = _encode_around(payloads.tensor_without_payload(tensor), "raw_data")
            pieces.append((tensor, head, tail, payloads.nbytes(tensor)))
        elif tensor.ByteSize() >= _STREAM_THRESHOLD and tensor.HasField("raw_data"):
            head, tail = _encode_around(tensor, "raw_data")
            rest = len(head) + len(tail)
            pieces.append((tensor, head, tail, tensor.ByteSize() - rest - _raw_data_prefix_length(tensor, rest)))
        else:
            pieces.append((tensor, tensor.SerializeToString(), b"", None))
    sizes = [len(head) + len(tail) + (0 if n is None else len(wire.length_delimited(wire.TENSOR_RAW_DATA, n)) + n)
             for _, head, tail, n in pieces]
    graph_len = len(graph_head) + len(graph_tail) + sum(
        len(wire.length_delimited(wire.GRAPH_INITIALIZER, n)) + n for n in sizes)
    with open(path, "wb") as raw_file, _BackgroundWriter(raw_file) as f:
        f.write(model_head)
        f.write(wire.length_delimited(wire.MODEL_GRAPH, graph_len))
        f.write(graph_head)
        for (tensor, head, tail, n), size in zip(pieces, sizes):
            f.write(wire.length_delimited(wire.GRAPH_INITIALIZER, size))
            f.write(head)
            if n is not None:
                f.write(wire.length_delimited(wire.TENSOR_RAW_DATA, n))
                if payloads is not None and payloads.holds(tensor):
                    payloads.write(tensor, f)
                else:
                    f.write(tensor.raw_data)
            f.write(tail)
        f.write(graph_tail)
        f.write(model_tail)


class _BackgroundWriter:
    """A file-like ``write`` that hands the data to a thread, so that computing the next piece
    (e.g. a ScaledWeight chunk) overlaps writing the last. Data given to ``write`` must not change
    afterwards. An error of the thread is raised by the next ``write`` or on exit."""

    def __init__(self, file, depth: int = 4):
        import queue

        self._file = file
        self._queue = queue.Queue(maxsize=depth)
        self._error = None
        self._thread = threading.Thread(target=self._drain, name="bnfold-writer", daemon=True)
        self._thread.start()

    def _drain(self):
        while True:
            data = self._queue.get()
            if data is None:
                return
            if self._error is None:
                try:
                    self._file.write(data)
                except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                    self._error = e

    def write(self, data) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and exc[0] is None:
            raise self._error
        return False


def _raw_data_prefix_length(tensor, rest_length: int) -> int:
    """Bytes of the raw_data field's key and length prefix, from the tensor's encoded size and the
    encoded length of its other fields."""
    total = tensor.ByteSize() - rest_length  # key + length prefix + payload
    for prefix in range(2, 12):
        if len(wire.length_delimited(wire.TENSOR_RAW_DATA, total - prefix)) == prefix:
            return prefix
    raise AssertionError("inconsistent tensor size")


def _has_unknown_fields(message) -> bool:
    try:
        from google.protobuf.unknown_fields import UnknownFieldSet
    except ImportError:  # protobuf < 4.22: cannot tell; the fields are dropped
        return False
    return len(UnknownFieldSet(message)) > 0


def _is_repeated(field) -> bool:
    # protobuf 6 has FieldDescriptor.is_repeated; older releases only have .label
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == field.LABEL_REPEATED


def _encode_around(message, split_field: str):
    """``(head, tail)``: the encoding of every set field of ``message`` numbered below
    ``split_field`` and of every field numbered above it (plus fields this onnx version does not
    know, written by a newer one), so that ``head + <split_field> + tail`` is the encoding
    ``SerializeToString`` would produce, in field-number order.

    Walks the descriptor rather than ListFields() or CopyFrom(), which would materialize the
    split field (a copy of a large raw_data) just to leave it out."""
    number = message.DESCRIPTOR.fields_by_name[split_field].number
    head, tail = type(message)(), type(message)()
    unknown = _has_unknown_fields(message)
    if unknown:
        # Unknown fields can only be carried by copying the message whole; they go last, as
        # protobuf itself writes them.
        tail.CopyFrom(message)
        for field in message.DESCRIPTOR.fields:
            if field.number <= number:
                tail.ClearField(field.name)
    for field in message.DESCRIPTOR.fields:
        if field.number == number or (unknown and field.number > number):
            continue
        target = head if field.number < number else tail
        name = field.name
        if _is_repeated(field):
            values = getattr(message, name)
            if len(values):
                getattr(target, name).extend(values)
        elif message.HasField(name):
            if field.message_type is not None:
                getattr(target, name).CopyFrom(getattr(message, name))
            else:
                setattr(target, name, getattr(message, name))
    return head.SerializeToString(), tail.SerializeToString()


def write_json_atomic(data, path) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (temporary file, then rename).

    Shared by every command's ``--json`` / ``--report`` option; bad paths become a one-line InputError.
    """
    import json

    shown = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(shown)) or "."
    if not os.path.isdir(directory):
        raise InputError(f"{shown}: output directory {directory} does not exist")
    path = resolve_output_path(shown)
    directory = os.path.dirname(path)
    text = json.dumps(data, indent=2, allow_nan=True) + "\n"
    tmp_path = None
    try:
        fd, tmp_path = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".json.tmp", dir=directory)
        _lock_temporary(fd)
        _default_permissions(tmp_path, like=path)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp_path, path)
        tmp_path = None
    except OSError as e:
        raise InputError(f"{shown}: cannot write ({e.strerror or e})") from None
    finally:
        if tmp_path and os.path.exists(tmp_path):
            os.unlink(tmp_path)


def _default_permissions(path, like=None) -> None:
    """mkstemp creates files readable by the owner only; outputs get the permissions of the file
    they replace (``like``), else the usual 0666 & ~umask."""
    if like is not None and os.path.isfile(like):
        os.chmod(path, stat.S_IMODE(os.stat(like).st_mode))
        return
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _relocate_external_data(model, old_location, new_location):
    for tensor in _all_initializers(model):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old_location:
                entry.value = new_location


def _all_initializers(model):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


