"""Calibration data: the model's input specs, data sources (.npy / .npz files, directories, dicts,
arrays, iterables of dicts), their validation against the model, and the streaming re-batcher.

Data flows: data source -> ``Dataset`` (validated parts, streamed and re-batched along axis 0) ->
feed dicts of ``batch_size`` samples in the model's dtypes. Memory stays bounded by one batch:
.npy files and uncompressed .npz members are memory-mapped, compressed .npz members decompressed
as a stream, one batch of rows at a time.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from bnfold.common import first_line
from bnfold.errors import InputError
from bnfold.io import load_model


@dataclass
class InputSpec:
    """Name, dtype and dimensions of one model input that calibration data must feed."""

    name: str
    dtype: np.dtype
    dims: tuple | None  # None: unknown rank; entries None for dynamic dims


def model_input_specs(model: onnx.ModelProto) -> tuple[dict, set]:
    """(required inputs name -> spec, optional input names) of the main graph."""
    initializers = {t.name for t in model.graph.initializer}
    required, optional = {}, set()
    for vi in model.graph.input:
        if vi.name in initializers:
            optional.add(vi.name)
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise InputError(f"model input '{vi.name}' is not a tensor; calibration supports tensor inputs only")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        dims = None
        if tt.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
        required[vi.name] = InputSpec(vi.name, dtype, dims)
    return required, optional


class _SliceReader:
    """Sequential row reader over an array-like (ndarray or read-only memmap)."""

    def __init__(self, array):
        self._array = array
        self._pos = 0

    def read(self, n):
        out = self._array[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def close(self):
        self._array = None


class _StreamReader:
    """Sequential row reader over a file object positioned at the start of C-ordered array data."""

    def __init__(self, fileobj, shape, dtype, closers=()):
        self._f = fileobj
        self._row_shape = tuple(shape[1:])
        self._dtype = dtype
        self._row_bytes = dtype.itemsize * int(np.prod(self._row_shape, dtype=np.int64))
        self._left = shape[0]
        self._closers = closers

    def read(self, n):
        n = min(n, self._left)
        nbytes = n * self._row_bytes
        buf = self._f.read(nbytes) if nbytes else b""
        if len(buf) != nbytes:
            raise InputError("calibration data: file ended early (truncated array data)")
        self._left -= n
        return np.frombuffer(buf, dtype=self._dtype).reshape((n,) + self._row_shape)

    def close(self):
        for c in (self._f, *self._closers):
            c.close()


class _ArraySource:
    """One array of a data part: known shape and dtype, opened for sequential reading on demand."""

    def __init__(self, origin, shape, dtype, opener):
        self.origin = origin
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self._opener = opener

    def open(self):
        return self._opener()


def _memory_source(origin, array) -> _ArraySource:
    array = np.asarray(array)
    return _ArraySource(origin, array.shape, array.dtype, lambda: _SliceReader(array))


def _read_npy_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return np.lib.format._read_array_header(f, version)  # (3, 0): utf-8 field names


def _npy_source(path) -> _ArraySource:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - whatever the library raises, it is the input's fault
        raise InputError(f"{path}: not a readable .npy array ({first_line(e)})") from None
    shape, dtype = array.shape, array.dtype
    del array
    # Memory-mapped: slicing a batch reads only that batch from disk.
    return _ArraySource(path, shape, dtype, lambda: _SliceReader(np.load(path, mmap_mode="r", allow_pickle=False)))


def _npz_sources(path) -> dict:
    """name -> source for every member of an .npz archive.

    Uncompressed members (np.savez) are memory-mapped in place; compressed members
    (np.savez_compressed) are decompressed as a stream, one batch of rows at a time; a compressed
    Fortran-ordered member cannot be streamed by rows and is loaded whole.
    """
    try:
        zf = zipfile.ZipFile(path)
    except Exception as e:  # noqa: BLE001 - whatever the library raises, it is the input's fault
        raise InputError(f"{path}: not a readable .npz archive ({first_line(e)})") from None
    sources = {}
    with zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[: -len(".npy")]
            try:
                with zf.open(info) as f:
                    shape, fortran, dtype = _read_npy_header(f)
            except Exception as e:  # noqa: BLE001 - whatever the library raises, it is the input's fault
                raise InputError(f"{path}: member '{name}' is not a readable array ({first_line(e)})") from None
            if dtype.hasobject:
                raise InputError(f"{path}: member '{name}' has dtype object; calibration needs numeric arrays")
            origin = f"{path}:{name}"
            sources[name] = _ArraySource(origin, shape, dtype, _npz_opener(path, info, shape, fortran, dtype))
    return sources


def _npz_opener(path, info, shape, fortran, dtype):
    if info.compress_type == zipfile.ZIP_STORED and not fortran:
        offset = _stored_member_data_offset(path, info)

        def open_mapped():
            if int(np.prod(shape, dtype=np.int64)) == 0:
                return _SliceReader(np.empty(shape, dtype))
            return _SliceReader(np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape))

        return open_mapped
    if not fortran:

        def open_stream():
            zf = zipfile.ZipFile(path)
            f = zf.open(info)
            _read_npy_header(f)
            return _StreamReader(f, shape, dtype, closers=(zf,))

        return open_stream

    def open_whole():
        with np.load(path, allow_pickle=False) as npz:
            return _SliceReader(npz[info.filename[: -len(".npy")]])

    return open_whole


def _stored_member_data_offset(path, info) -> int:
    """File offset of the array data of an uncompressed .npy member of a zip archive."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise InputError(f"{path}: corrupt zip local header for '{info.filename}'")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        _read_npy_header(f)
        return f.tell()


def _file_part(path, single_input) -> dict:
    if path.endswith(".npz"):
        part = _npz_sources(path)
        if not part:
            raise InputError(f"{path}: the archive holds no arrays (no samples)")
        if single_input is not None and single_input not in part and list(part) == ["arr_0"]:
            part = {single_input: part["arr_0"]}  # np.savez(f, array) for a single-input model
        return part
    if single_input is None:
        raise InputError(
            f"{path}: a .npy file holds one array, but the model has several inputs; use .npz with arrays named by "
            "input"
        )
    return {single_input: _npy_source(path)}


class Dataset:
    """Calibration data as a sequence of parts (name -> array source), streamed in batches.

    Parts are files, one in-memory dict, or the items of a user iterable. Batches are cut from the
    concatenation of all parts, so how the data is split into files does not change the result.
    """

    def __init__(self, data, specs: dict, optional: set):
        self.specs = specs
        self.optional = optional
        names = list(specs)
        self._single = names[0] if len(names) == 1 else None
        self._lazy = None  # a user iterable of dicts, read part by part
        self.one_shot = False
        where = "calibration data"
        if isinstance(data, (str, os.PathLike)):
            where = f"{os.fspath(data)}: calibration data"
            self.parts = self._path_parts(os.fspath(data))
        elif isinstance(data, Mapping):
            self.parts = [self._mapping_part(data, "data")]
        elif isinstance(data, np.ndarray):
            if self._single is None:
                raise InputError(
                    f"data: a single array was given but the model has {len(names)} inputs ({', '.join(names)}); pass "
                    "a dict name -> array"
                )
            self.parts = [{self._single: _memory_source("data", data)}]
        elif isinstance(data, Iterable) and not isinstance(data, (bytes, bytearray)):
            self.parts = None
            self._lazy = data
            self.one_shot = iter(data) is data
        else:
            raise InputError(
                "data: expected a path, a dict name -> array, an array or an iterable of dicts, got "
                f"{type(data).__name__}"
            )
        if self.parts is not None:
            for part in self.parts:
                self._validate(part)
            if self.total_samples == 0:
                raise InputError(f"{where} is empty (0 samples)")

    # -- construction ----------------------------------------------------------------------
    def _path_parts(self, path):
        if not os.path.exists(path):
            raise InputError(f"{path}: no such file or directory")
        if os.path.isdir(path):
            files = sorted(f for f in os.listdir(path) if f.endswith((".npy", ".npz")))
            if not files:
                raise InputError(f"{path}: calibration data is empty (no .npy or .npz files in the directory)")
            return [_file_part(os.path.join(path, f), self._single) for f in files]
        if not path.endswith((".npy", ".npz")):
            raise InputError(f"{path}: unsupported data file (expected .npy, .npz or a directory of them)")
        return [_file_part(path, self._single)]

    def _mapping_part(self, mapping, origin):
        part = {}
        for name, value in mapping.items():
            if not isinstance(name, str):
                raise InputError(f"{origin}: keys must be input names (str), got {type(name).__name__}")
            try:
                array = np.asarray(value)
            except Exception as e:  # noqa: BLE001 - whatever the library raises, it is the input's fault
                raise InputError(f"{origin}['{name}']: not convertible to an array ({first_line(e)})") from None
            part[name] = _memory_source(f"{origin}['{name}']", array)
        return part

    # -- validation ------------------------------------------------------------------------
    def _validate(self, part):
        origin = _part_origin(part)
        missing = [n for n in self.specs if n not in part]
        unexpected = [n for n in part if n not in self.specs and n not in self.optional]
        if missing or unexpected:
            problems = []
            if missing:
                problems.append("missing input(s) " + ", ".join(f"'{n}'" for n in missing))
            if unexpected:
                problems.append("unexpected array(s) " + ", ".join(f"'{n}'" for n in unexpected))
            raise InputError(f"{origin}: {'; '.join(problems)} (model inputs: {', '.join(self.specs)})")
        lengths = set()
        for name, src in part.items():
            if name not in self.specs:
                continue
            spec = self.specs[name]
            if len(src.shape) == 0:
                raise InputError(f"{src.origin}: a 0-d array has no batch axis; expected shape {_fmt_dims(spec.dims)}")
            if spec.dims is not None:
                if len(src.shape) != len(spec.dims):
                    raise InputError(
                        f"{src.origin}: shape {src.shape} has rank {len(src.shape)}, model input '{name}' expects "
                        f"rank {len(spec.dims)} {_fmt_dims(spec.dims)}"
                    )
                for axis in range(1, len(spec.dims)):
                    if spec.dims[axis] is not None and src.shape[axis] != spec.dims[axis]:
                        raise InputError(
                            f"{src.origin}: shape {src.shape} does not match model input '{name}' "
                            f"{_fmt_dims(spec.dims)} (axis {axis}: expected {spec.dims[axis]}, got {src.shape[axis]})"
                        )
            if not _castable(src.dtype, spec.dtype):
                raise InputError(
                    f"{src.origin}: dtype {src.dtype} does not match model input '{name}' (expected {spec.dtype}, "
                    f"got {src.dtype}; only floating-point data is converted between float types)"
                )
            lengths.add(src.shape[0])
        if len(lengths) > 1:
            sizes = ", ".join(f"'{n}': {s.shape[0]}" for n, s in part.items() if n in self.specs)
            raise InputError(f"{origin}: inputs have different numbers of samples ({sizes})")

    @property
    def total_samples(self):
        if self.parts is None:
            return None
        return sum(next(s for n, s in p.items() if n in self.specs).shape[0] for p in self.parts)

    def _iter_parts(self):
        if self.parts is not None:
            yield from self.parts
            return
        for i, item in enumerate(self._lazy):
            if isinstance(item, np.ndarray) and self._single is not None:
                item = {self._single: item}
            if not isinstance(item, Mapping):
                raise InputError(f"data item {i}: expected a dict name -> array, got {type(item).__name__}")
            part = self._mapping_part(item, f"data item {i}")
            self._validate(part)
            yield part

    # -- streaming -------------------------------------------------------------------------
    def batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[dict]:
        """Yield dicts input name -> C-contiguous array of ``batch_size`` samples (the last may be
        smaller), in the model's dtypes. Holds at most one batch (plus one part's open readers)."""
        pending = {n: [] for n in self.specs}
        pending_rows = 0
        emitted = 0
        seen_any = False
        for part in self._iter_parts():
            readers = {n: part[n].open() for n in self.specs}
            try:
                rows = left = part[next(iter(self.specs))].shape[0]
                while left > 0:
                    take = min(batch_size - pending_rows, left)
                    for n, r in readers.items():
                        pending[n].append(self._converted(r.read(take), n, part[n].origin, rows - left))
                    pending_rows += take
                    left -= take
                    seen_any = True
                    if pending_rows == batch_size:
                        yield self._assemble(pending)
                        pending = {n: [] for n in self.specs}
                        pending_rows = 0
                        emitted += 1
                        if max_batches is not None and emitted >= max_batches:
                            return
            finally:
                for r in readers.values():
                    r.close()
        if pending_rows:
            yield self._assemble(pending)
        elif not seen_any:
            raise InputError("calibration data is empty (0 samples)")

    def _converted(self, rows, name, origin, first_row):
        """``rows`` in the model input's dtype, checked for NaN/Inf: they would silently turn
        every downstream statistic into NaN."""
        dtype = self.specs[name].dtype
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, by sample
            converted = rows.astype(dtype, copy=False)
        if converted.dtype.kind in "fc":
            finite = np.isfinite(converted)
            if not finite.all():
                bad_row = int(np.argmin(finite.reshape(len(rows), -1).all(axis=1)))
                sample = first_row + bad_row
                if np.isfinite(rows[bad_row]).all():
                    raise InputError(
                        f"{origin}: sample {sample} holds values out of the {dtype} range of model input '{name}' "
                        f"(Inf after conversion from {rows.dtype})"
                    )
                bad = rows[bad_row]
                kinds = " and ".join(
                    k for k, present in (("NaN", np.isnan(bad).any()), ("Inf", np.isinf(bad).any())) if present
                )
                raise InputError(
                    f"{origin}: non-finite values ({kinds}) in sample {sample}; calibration data must be finite"
                )
        return converted

    def _assemble(self, pending):
        batch = {}
        for n, pieces in pending.items():
            array = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)
            batch[n] = np.ascontiguousarray(array, dtype=self.specs[n].dtype)
        return batch

    def n_batches(self, batch_size, max_batches):
        total = self.total_samples
        if total is None:
            return max_batches
        n = -(-total // batch_size)
        return n if max_batches is None else min(n, max_batches)


def _castable(src: np.dtype, dst: np.dtype) -> bool:
    if src == dst:
        return True
    # float64 data for a float32 model is the common case (numpy's default dtype); converting
    # between float types is what the user means. Everything else must match exactly.
    return np.issubdtype(src, np.floating) and np.issubdtype(dst, np.floating)


def _part_origin(part) -> str:
    origins = {s.origin.rsplit(":", 1)[0] if ":" in s.origin else s.origin for s in part.values()}
    return origins.pop() if len(origins) == 1 else "data"


def _fmt_dims(dims) -> str:
    if dims is None:
        return "(unknown)"
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def iter_batches(model_or_path, data, *, batch_size=32, max_batches=None):
    """Validate ``data`` against the model's inputs and yield it as feed dicts (input name ->
    array of ``batch_size`` samples in the model's dtype), exactly as ``calibrate`` reads it."""
    model = load_model(model_or_path)
    specs, optional = model_input_specs(model)
    return Dataset(data, specs, optional).batches(int(batch_size), max_batches)
