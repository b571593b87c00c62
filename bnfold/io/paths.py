"""Output-path safety: which files a model on disk consists of, where a model's external data
may go, and the checks every command makes of its output paths before any work (never over an
input, never two outputs on one file, never onto a directory, device or FIFO, only where a file
can really be written).
"""

from __future__ import annotations

import os
import tempfile

import onnx

from bnfold.errors import InputError
from bnfold.io.load import all_tensors, file_uses_external_data
from bnfold.io.temporaries import PROBE_PREFIX


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
        for tensor in all_tensors(model):
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
        raise InputError(
            f"{shown}: exists and is not a regular file (a device, FIFO or socket); choose another output path"
        )
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
            protected.setdefault(
                real,
                f"the input model {os.fspath(model)}"
                if real == os.path.realpath(model)
                else f"external data of the input model {os.fspath(model)}",
            )
    data_directories = []
    for item in inputs:
        if item is None or not isinstance(item, (str, os.PathLike)):
            continue
        item = os.fspath(item)
        if os.path.isdir(item):
            data_directories.append((os.path.realpath(item), item))
            for name in os.listdir(item):  # a data file may be a link to one elsewhere
                if name.endswith((".npy", ".npz")):
                    protected.setdefault(
                        os.path.realpath(os.path.join(item, name)), f"the input {os.path.join(item, name)}"
                    )
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
                raise InputError(
                    f"{path}: {option} is inside the data directory {shown}, whose .npy/.npz files "
                    "are the input data; choose another path"
                )
    options = list(given)
    for i, first in enumerate(options):
        for second in options[i + 1 :]:
            a, b = given[first], given[second]
            if os.path.realpath(a) == os.path.realpath(b) or (os.path.exists(a) and _same_file(a, b)):
                raise InputError(f"{b}: {first} and {second} name the same file")
            for model_opt, other_opt in ((first, second), (second, first)):
                # (the data goes beside the file the model path resolves to)
                if model_opt == model_option and os.path.realpath(given[other_opt]) in {
                    os.path.realpath(name) for name in external_data_candidates(os.path.realpath(given[model_opt]))
                }:
                    raise InputError(
                        f"{given[other_opt]}: {other_opt} is where the external data of "
                        f"{given[model_opt]} may go; choose another path"
                    )
    for path in given.values():
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
            raise InputError(
                f"{path}: refusing to overwrite the input model's external data file; choose another output path"
            )
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise InputError(f"{path}: output directory {directory} does not exist")
    directory = os.path.dirname(resolve_output_path(path))
    # os.access says yes to root everywhere (even /sys, read-only mounts): try for real.
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"{path}: cannot write in {directory} ({e.strerror or e})") from None
    return directory


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)
