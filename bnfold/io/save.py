"""Atomic saving: a model (external data included) or a JSON report is written to a temporary file
beside its destination and renamed into place, never over an input.

A model with external data is replaced as a pair, so that a crash at any instant leaves a
loadable model: the new data file is placed under a free name (``external_data_candidates``), the
.onnx is renamed last under the folder's lock, and only then is the replaced model's data file
removed (only one that bnfold named and marked as that model's).
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading

import onnx

from bnfold.errors import InputError
from bnfold.io.load import all_tensors, file_uses_external_data, fits_in_one_message, model_uses_external_data
from bnfold.io.paths import check_output_path, external_data_candidates, resolve_output_path, source_files
from bnfold.io.stream import write_model_streaming
from bnfold.io.temporaries import (
    DATA_TMP_SUFFIX,
    JSON_TMP_SUFFIX,
    MODEL_TMP_SUFFIX,
    TMP_PREFIX,
    default_permissions,
    lock_temporary,
    remove_stale_temporaries,
)


def save_model_atomic(
    model: onnx.ModelProto, path, *, source_path=None, external_data=None, payloads=None, verify=None
) -> bool:
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
        fd, tmp_path = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=MODEL_TMP_SUFFIX, dir=directory)
        lock = lock_temporary(fd)
        default_permissions(tmp_path, like=path)
        protected = source_files(source_path) if source_path is not None else set()
        if external_data and os.path.realpath(os.path.dirname(os.path.abspath(shown))) != directory:
            # Readers look for external data beside the path they open: through the link, the
            # data beside its target would not be found.
            raise InputError(
                f"{shown}: a symbolic link into another folder ({path}); a model with external data "
                "must be written where it will be opened: give the target path"
            )
        if external_data:
            tmp_data_name = os.path.basename(tmp_path)[: -len(MODEL_TMP_SUFFIX)] + DATA_TMP_SUFFIX
            tmp_data = os.path.join(directory, tmp_data_name)
            to_save = onnx.ModelProto()
            to_save.CopyFrom(model)
            if payloads is not None:
                payloads.materialize(all_tensors(to_save))
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
                default_permissions(tmp_data, like=next(iter(_replaced_data_files(path)), None))
            if verify is not None and not verify(tmp_path):
                return False
        else:
            has_data = False
            write_model_streaming(model, tmp_path, payloads)
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
        marked = {p.value for p in onnx.load(path, load_external_data=False).metadata_props if p.key == _DATA_FILE_MARK}
    except Exception:  # noqa: BLE001 - an unreadable old output: nothing is known to belong to it
        return set()
    return {
        name
        for name in external_data_candidates(path)
        if os.path.basename(name) in marked
        and os.path.realpath(name) in refs
        and not os.path.islink(name)
        and os.path.isfile(name)
    }


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
    raise InputError(
        f"{shown}: every external data file name for it ({os.path.basename(candidates[0])}, "
        f"... {os.path.basename(candidates[-1])}) is taken; remove those no model uses or choose "
        "another output path"
    )


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
    _DEFERRED = frozenset({signal.SIGINT, signal.SIGTERM})

    def __enter__(self):
        self._mask, self._handlers, self._arrived = None, {}, []
        if threading.current_thread() is threading.main_thread():
            # The mask holds a signal back from this thread only: the kernel hands one sent to the
            # process to another thread (numpy's BLAS pool, onnxruntime's), whose C handler still
            # makes Python run the handler here at once. So the Python handlers are swapped too.
            try:
                for signum in self._DEFERRED:
                    if signal.getsignal(signum) is not None:  # (None: set outside Python, cannot be put back)
                        self._handlers[signum] = signal.signal(signum, self._hold)
            except BaseException:  # the other signal's handler raised between the two swaps
                self._restore_handlers()
                raise
            if hasattr(signal, "pthread_sigmask"):
                self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, self._DEFERRED)
        try:
            import fcntl

            self._fd = os.open(self._directory, os.O_RDONLY)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        return self

    def _hold(self, signum, frame):
        self._arrived.append(signum)

    def __exit__(self, *exc):
        if self._fd is not None:
            os.close(self._fd)
        if self._mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)  # (a signal held back reaches _hold here)
        self._restore_handlers()
        for signum in dict.fromkeys(self._arrived):
            signal.raise_signal(signum)  # now its own handler runs, the pair complete
        return False

    def _restore_handlers(self):
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)


def _relocate_external_data(model, old_location, new_location):
    for tensor in all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old_location:
                entry.value = new_location


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
        fd, tmp_path = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=JSON_TMP_SUFFIX, dir=directory)
        lock_temporary(fd)
        default_permissions(tmp_path, like=path)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp_path, path)
        tmp_path = None
    except OSError as e:
        raise InputError(f"{shown}: cannot write ({e.strerror or e})") from None
    finally:
        if tmp_path and os.path.exists(tmp_path):
            os.unlink(tmp_path)
