"""Models as the parity check and the benchmark hold them: a model argument loaded once
(``LoadedModel``: its structure for bnfold, its path or bytes for onnxruntime, optionally with
intermediate values exposed as extra outputs) and its interface as onnxruntime sees it
(``TensorSpec``, ``session_specs``, ``compare_interfaces``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import onnx

from bnfold.errors import ArgumentTypeError, InputError
from bnfold.io import PROTOBUF_LIMIT, file_uses_external_data, fits_in_one_message, load_model, load_model_deferred
from bnfold.verify.session import create_session
from bnfold.verify.shapes import format_shape

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


def check_model_argument(model, argument: str) -> None:
    """A model argument is a path (str or os.PathLike) or an onnx.ModelProto; anything else is an
    ArgumentTypeError (a TypeError) naming ``argument``."""
    if not isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        raise ArgumentTypeError(f"{argument} must be a path or an onnx.ModelProto, got {type(model).__name__}")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A graph input or output as onnxruntime sees it. Dims: int, symbol name (str) or None."""

    name: str
    dtype: str
    shape: tuple | None


class LoadedModel:
    """A model loaded once for validation and spec extraction, with its label for messages.

    ``source`` is what onnxruntime gets: the path for files (so external data resolves), the
    serialized bytes for in-memory models, or a temporary file for in-memory models too large to
    serialize in one message.
    """

    def __init__(self, model_or_path, label: str):
        self.label = label
        self.path = None if isinstance(model_or_path, onnx.ModelProto) else os.fspath(model_or_path)
        if self.path is None:
            self.proto = load_model(model_or_path)
        else:
            # onnxruntime reads the file itself; here only the graph's structure is needed (value
            # specs, table shapes), so the weights stay on disk and ``proto`` has no tensor data
            # for the big initializers (see bnfold.io.payloads).
            if os.path.exists(self.path) and not (os.path.isfile(self.path) or os.path.isdir(self.path)):
                raise InputError(
                    f"{self.path}: not a regular file (onnxruntime reads the model again after "
                    "bnfold has); save it to a file first"
                )
            self.proto, payloads, wait_for_check = load_model_deferred(self.path)
            payloads.close()
            wait_for_check()
        self._bytes = None
        self._tmpdir = None
        self._exposed = None  # (source, session config entries) once ``expose`` was called

    def ort_source(self):
        if self.path is not None:
            return self.path
        if self._bytes is None and self._tmpdir is None:
            if not fits_in_one_message(self.proto):
                self._tmpdir = tempfile.TemporaryDirectory(prefix="bnfold-")
                big_path = os.path.join(self._tmpdir.name, "model.onnx")
                # Saving with external data rewrites the tensors in place: work on a copy.
                copy = onnx.ModelProto()
                copy.CopyFrom(self.proto)
                onnx.save_model(copy, big_path, save_as_external_data=True, location="model.onnx.data")
            else:
                self._bytes = self.proto.SerializeToString()
        return self._bytes if self._bytes is not None else os.path.join(self._tmpdir.name, "model.onnx")

    def expose(self, suffix: bytes) -> None:
        """Prepare the model with extra graph outputs for ``session(..., exposed=True)``:
        ``suffix`` (``bnfold.verify.intermediates.exposure_suffix``) is appended to the serialized model,
        which protobuf reads as the model with those outputs added. The file on disk is never
        touched. Raises ExposureUnavailable when the result would exceed protobuf's 2 GiB."""
        if self.path is not None:
            if file_uses_external_data(self.path):
                # The .onnx holds the graph only; onnxruntime finds the data through the folder
                # given in the session options (a model read from bytes has no directory).
                with open(self.path, "rb") as f:
                    raw = f.read()
                self._check_exposable(len(raw) + len(suffix))
                folder = os.path.dirname(os.path.abspath(self.path))
                self._exposed = (raw + suffix, {"session.model_external_initializers_file_folder_path": folder})
                return
            self._check_exposable(os.path.getsize(self.path) + len(suffix))
            # A copy in our own temporary directory (the kernel copies it; no Python bytes).
            self._exposed = (self._copy_with_suffix(self.path, suffix), {})
            return
        source = self.ort_source()
        if isinstance(source, bytes):
            self._check_exposable(len(source) + len(suffix))
            self._exposed = (source + suffix, {})
        else:
            # Written with external data beside it (too big for one message): the small .onnx
            # gets the suffix, in the same directory so that the data still resolves.
            self._check_exposable(os.path.getsize(source) + len(suffix))
            self._exposed = (self._copy_with_suffix(source, suffix), {})

    def _check_exposable(self, size: int) -> None:
        if size > PROTOBUF_LIMIT:
            raise ExposureUnavailable(
                f"{self.label} is too large ({size / 2**30:.1f} GiB) to be given to onnxruntime "
                "again with its intermediate values as outputs (protobuf's 2 GiB limit)"
            )

    def _copy_with_suffix(self, path: str, suffix: bytes) -> str:
        if self._tmpdir is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="bnfold-")
        directory = os.path.dirname(path) if path.startswith(self._tmpdir.name) else self._tmpdir.name
        exposed = os.path.join(directory, "exposed.onnx")
        shutil.copyfile(path, exposed)
        with open(exposed, "ab") as f:
            f.write(suffix)
        return exposed

    def session(self, opt_level: str, *, threads: int | None = None, exposed: bool = False):
        """An onnxruntime session at ``opt_level``; ``exposed``: of the model prepared by
        ``expose`` (its intermediate values are outputs too)."""
        if exposed:
            source, config = self._exposed
        else:
            source, config = self.ort_source(), None
        what = "the model with its intermediate values as outputs" if exposed else "the model"
        return create_session(
            source,
            opt_level=opt_level,
            threads=threads,
            config=config,
            failure=f"{self.label}: onnxruntime cannot load {what}",
        )

    def close(self):
        self._exposed = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


class ExposureUnavailable(Exception):
    """The intermediate values cannot be made outputs of this model (the message says why)."""


def session_specs(session, label: str):
    """(inputs, outputs) as lists of TensorSpec; non-tensor or unsupported types raise InputError."""

    def convert(args, kind):
        specs = []
        for arg in args:
            dtype = _ORT_TYPES.get(arg.type)
            if dtype is None:
                raise InputError(f"{label}: {kind} {arg.name!r} has type {arg.type}, which bnfold cannot compare")
            shape = None if arg.shape is None else tuple(d if isinstance(d, (int, str)) else None for d in arg.shape)
            specs.append(TensorSpec(arg.name, dtype, shape))
        return specs

    return convert(session.get_inputs(), "input"), convert(session.get_outputs(), "output")


def _static_dims_conflict(a, b) -> bool:
    if a is None or b is None:
        return False
    if len(a) != len(b):
        return True
    return any(isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a, b))


def name_differences(first, second, only_first: str, only_second: str, *, quote: bool = False) -> str:
    """How two collections of names differ, for a message: "" when they hold the same names, else
    ``only_first`` followed by the names only in ``first`` and ``only_second`` by those only in
    ``second`` (in their order, repr'd when ``quote``), "; " between the two."""
    show = repr if quote else str
    parts = []
    for prefix, names, others in ((only_first, first, second), (only_second, second, first)):
        only = [n for n in names if n not in others]
        if only:
            parts.append(prefix + ", ".join(map(show, only)))
    return "; ".join(parts)


def compare_interfaces(ref_specs, cand_specs, ref_label="reference", cand_label="candidate") -> None:
    """Raise InputError naming the first disagreement in input/output names, dtypes or shapes."""
    for kind, ref, cand in (("input", ref_specs[0], cand_specs[0]), ("output", ref_specs[1], cand_specs[1])):
        ref_by_name = {s.name: s for s in ref}
        cand_by_name = {s.name: s for s in cand}
        differences = name_differences(ref_by_name, cand_by_name, f"only in {ref_label}: ", f"only in {cand_label}: ")
        if differences:
            raise InputError(f"the models' {kind} names differ ({differences})")
        for name, r in ref_by_name.items():
            c = cand_by_name[name]
            if r.dtype != c.dtype:
                raise InputError(f"{kind} {name!r}: dtype {r.dtype} in {ref_label} but {c.dtype} in {cand_label}")
            if _static_dims_conflict(r.shape, c.shape):
                raise InputError(
                    f"{kind} {name!r}: shape {format_shape(r.shape)} in {ref_label} "
                    f"but {format_shape(c.shape)} in {cand_label}"
                )
