"""PreciseBN: re-estimate every BatchNormalization's population statistics from data.

``calibrate(model, data)`` streams calibration data through onnxruntime in batches, collects the
input of every BatchNormalization (BN) of the main graph, reduces it per channel with bnfold's
kernels (``Moments``, merged across batches with Chan's formula in float64) and writes the exact
population mean and biased variance into the BN's running_mean / running_var. Scale, bias and all
other weights are untouched.

Two modes:

* ``"batch"`` (PreciseBN, Wu & Johnson 2021): a copy of the graph in which every inference BN
  normalizes by the statistics of the *current batch* (training-mode behaviour, written as explicit
  ReduceMean/Sub/Mul/Div ops so any onnxruntime build runs it) and exposes its input as an extra
  output. One onnxruntime run per batch yields all BN inputs. The first BN's statistics are exact
  population statistics; deeper BNs see activations normalized per batch, so their statistics
  depend on the batch size, as in PreciseBN.
* ``"sequential"``: every BN's statistics are computed with all earlier BNs already normalizing by
  their *new* population statistics (inference mode) -- what each BN sees at inference time,
  independent of the batch size. BNs are grouped into levels (level = number of calibrated BNs on
  the longest path from the inputs to the BN, itself included); the BNs of one level do not depend
  on each other and share one pass over the data, on a graph pruned to the nodes they need.

A model whose inputs fix the batch dimension (``torch.onnx.export``'s default) runs at that batch
in sequential mode (the data fed in chunks of it); batch mode runs a calibration graph with the
batch made symbolic when running it checks out, else the fixed batch too (see "Fixed batch
dimension" below). The report's notes say what was done.

Data flows: data source -> ``_Dataset`` (validated parts, streamed and re-batched along axis 0) ->
onnxruntime run of the calibration graph -> ``Moments.from_array`` per BN input -> merge -> model.
Memory stays bounded by one batch plus its activations (see ``_Dataset`` for how .npy/.npz files
are read without loading them whole).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.common import count, first_line, format_table
from bnfold.errors import InputError
from bnfold.folding import (
    FLOAT_TYPES,
    GraphView,
    ModelContext,
    get_attr,
    is_batch_norm,
    node_label,
    node_subgraphs,
    numpy_type,
    outer_scope_reads,
    read_tensor,
    remove_unused,
)
from bnfold.io import load_model
from bnfold.verify import create_session
from bnfold.folding import inference_mode_failure

MODES = ("batch", "sequential")

# Prefix of every tensor/node name the calibration graphs add (never written to the result).
_PREFIX = "bnfold_calib"


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------




def _summary(values) -> dict | None:
    if values is None:
        return None
    v = np.asarray(values, dtype=np.float64)
    return {"min": float(v.min()), "mean": float(v.mean()), "max": float(v.max())}


@dataclass
class BNCalibration:
    """What calibration did to one BatchNormalization node.

    ``status`` is "calibrated" or "skipped" (then ``reason`` says why). ``graph`` is "" for the
    main graph, else the path of the subgraph ("If_3/then_branch"). ``values_per_channel`` counts
    the values each channel's statistics were computed from (samples x spatial positions).
    Relative changes: the mean's change is measured against max(|old mean|, old std) so a mean
    near zero does not make it explode; the variance's against old var + eps.
    """

    bn: str
    graph: str = ""
    status: str = "calibrated"
    reason: str = ""
    level: int | None = None
    channels: int = 0
    samples: int = 0
    values_per_channel: int = 0
    old_mean: np.ndarray | None = None
    old_var: np.ndarray | None = None
    new_mean: np.ndarray | None = None
    new_var: np.ndarray | None = None
    epsilon: float = 1e-5

    @property
    def max_rel_change_mean(self) -> float | None:
        if self.old_mean is None or self.new_mean is None:
            return None
        # A model's old statistics may be anything (Inf, NaN, a variance of 0 with epsilon 0):
        # the change is then Inf or NaN, which the report shows as such; numpy's warnings about
        # computing it would only be noise.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            old_std = np.sqrt(np.maximum(self.old_var, 0) + self.epsilon) if self.old_var is not None else 0.0
            denom = np.maximum(np.abs(self.old_mean), old_std)
            return float(np.max(np.abs(self.new_mean - self.old_mean) / denom))

    @property
    def max_rel_change_var(self) -> float | None:
        if self.old_var is None or self.new_var is None:
            return None
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # as max_rel_change_mean
            denom = np.abs(self.old_var) + self.epsilon
            return float(np.max(np.abs(self.new_var - self.old_var) / denom))

    def to_dict(self) -> dict:
        return {
            "bn": self.bn,
            "graph": self.graph,
            "status": self.status,
            "reason": self.reason,
            "level": self.level,
            "channels": self.channels,
            "samples": self.samples,
            "values_per_channel": self.values_per_channel,
            "old_mean": _summary(self.old_mean),
            "old_var": _summary(self.old_var),
            "new_mean": _summary(self.new_mean),
            "new_var": _summary(self.new_var),
            "max_rel_change_mean": self.max_rel_change_mean,
            "max_rel_change_var": self.max_rel_change_var,
        }


@dataclass
class CalibrationReport:
    """Per-BN results of ``calibrate`` plus run totals and where the time went."""

    mode: str
    batch_size: int  # samples per batch read from the data (the batch_size argument)
    entries: list[BNCalibration] = field(default_factory=list)
    fixed_batch: int | None = None  # the model inputs' fixed batch dimension, None when dynamic
    run_batch_size: int = 0  # samples per onnxruntime run: batch_size, or fixed_batch when run at it
    n_batches: int = 0  # onnxruntime runs per pass over the data
    n_samples: int = 0  # samples per pass over the data
    passes: int = 0
    seconds_total: float = 0.0
    seconds_forward: float = 0.0  # onnxruntime runs
    seconds_statistics: float = 0.0  # Moments.from_array + merge
    notes: list[str] = field(default_factory=list)

    @property
    def calibrated(self) -> list[BNCalibration]:
        return [e for e in self.entries if e.status == "calibrated"]

    @property
    def skipped(self) -> list[BNCalibration]:
        return [e for e in self.entries if e.status != "calibrated"]

    @property
    def n_calibrated(self) -> int:
        return len(self.calibrated)

    def entry(self, bn: str) -> BNCalibration:
        for e in self.entries:
            if e.bn == bn:
                return e
        raise KeyError(bn)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "batch_size": self.batch_size,
            "fixed_batch": self.fixed_batch,
            "run_batch_size": self.run_batch_size,
            "n_batches": self.n_batches,
            "n_samples": self.n_samples,
            "passes": self.passes,
            "n_calibrated": self.n_calibrated,
            "n_skipped": len(self.skipped),
            "seconds_total": self.seconds_total,
            "seconds_forward": self.seconds_forward,
            "seconds_statistics": self.seconds_statistics,
            "notes": list(self.notes),
            "bn": [e.to_dict() for e in self.entries],
        }

    def to_json(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def format_table(self) -> str:
        def average(values) -> str:
            # Old statistics are unknown when they are not constant (e.g. fed as a graph input).
            return "?" if values is None else f"{np.mean(values):.4g}"

        def change(value) -> str:
            return "-" if value is None else f"{value:.3g}"

        header = ("BN", "level", "samples", "values/ch", "mean old->new (avg)", "var old->new (avg)", "max rel chg mean", "max rel chg var")
        rows = []
        for e in self.entries:
            if e.status != "calibrated":
                where = f" [{e.graph}]" if e.graph else ""
                rows.append((e.bn + where, "-", "-", "-", f"skipped: {e.reason}", "", "", ""))
                continue
            rows.append(
                (
                    e.bn,
                    "-" if e.level is None else str(e.level),
                    str(e.samples),
                    str(e.values_per_channel),
                    f"{average(e.old_mean)} -> {average(e.new_mean)}",
                    f"{average(e.old_var)} -> {average(e.new_var)}",
                    change(e.max_rel_change_mean),
                    change(e.max_rel_change_var),
                )
            )
        lines = format_table(header, rows)
        stat_share = self.seconds_statistics / self.seconds_total if self.seconds_total > 0 else 0.0
        lines.append(
            f"{self.n_calibrated} BN calibrated, {len(self.skipped)} skipped; mode={self.mode}, "
            f"{count(self.n_samples, 'sample')} in {count(self.n_batches, 'batch')} of {self.run_batch_size or self.batch_size}, "
            f"{count(self.passes, 'pass')}, "
            f"{self.seconds_total:.2f} s ({100 * stat_share:.1f}% statistics)"
        )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Data: sources, validation, streaming re-batcher
# --------------------------------------------------------------------------------------------


@dataclass
class _InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple | None  # None: unknown rank; entries None for dynamic dims


def _model_input_specs(model: onnx.ModelProto) -> tuple[dict, set]:
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
        required[vi.name] = _InputSpec(vi.name, dtype, dims)
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
    except Exception as e:
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
    except Exception as e:
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
            except Exception as e:
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
        raise InputError(f"{path}: a .npy file holds one array, but the model has several inputs; use .npz with arrays named by input")
    return {single_input: _npy_source(path)}


class _Dataset:
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
                raise InputError(f"data: a single array was given but the model has {len(names)} inputs ({', '.join(names)}); pass a dict name -> array")
            self.parts = [{self._single: _memory_source("data", data)}]
        elif isinstance(data, Iterable) and not isinstance(data, (bytes, bytearray)):
            self.parts = None
            self._lazy = data
            self.one_shot = iter(data) is data
        else:
            raise InputError(f"data: expected a path, a dict name -> array, an array or an iterable of dicts, got {type(data).__name__}")
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
            except Exception as e:
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
                    raise InputError(f"{src.origin}: shape {src.shape} has rank {len(src.shape)}, model input '{name}' expects rank {len(spec.dims)} {_fmt_dims(spec.dims)}")
                for axis in range(1, len(spec.dims)):
                    if spec.dims[axis] is not None and src.shape[axis] != spec.dims[axis]:
                        raise InputError(f"{src.origin}: shape {src.shape} does not match model input '{name}' {_fmt_dims(spec.dims)} (axis {axis}: expected {spec.dims[axis]}, got {src.shape[axis]})")
            if not _castable(src.dtype, spec.dtype):
                raise InputError(f"{src.origin}: dtype {src.dtype} does not match model input '{name}' (expected {spec.dtype}, got {src.dtype}; only floating-point data is converted between float types)")
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
                    raise InputError(f"{origin}: sample {sample} holds values out of the {dtype} range of model input '{name}' (Inf after conversion from {rows.dtype})")
                bad = rows[bad_row]
                kinds = " and ".join(k for k, present in (("NaN", np.isnan(bad).any()), ("Inf", np.isinf(bad).any())) if present)
                raise InputError(f"{origin}: non-finite values ({kinds}) in sample {sample}; calibration data must be finite")
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


# --------------------------------------------------------------------------------------------
# Graph analysis and rewriting
# --------------------------------------------------------------------------------------------


@dataclass
class _BN:
    """A BatchNormalization node of the main graph that will be calibrated."""

    index: int  # position in model.graph.node
    label: str
    x: str
    level: int = 0


def _subgraph_bns(graph, path):
    """(label, graph path) of every BN inside the subgraphs of ``graph``'s nodes, recursively."""
    found = []
    for i, node in enumerate(graph.node):
        owner = node_label(node, i)
        for attr_label, sub in node_subgraphs(node):
            sub_path = f"{path}/{owner}/{attr_label}" if path else f"{owner}/{attr_label}"
            for j, inner in enumerate(sub.node):
                if is_batch_norm(inner):
                    found.append((node_label(inner, j), sub_path))
            found += _subgraph_bns(sub, sub_path)
    return found


def _outer_references(node) -> set:
    """Names a node's subgraphs read from the enclosing scope (implicit inputs)."""
    refs = set()
    for _, sub in node_subgraphs(node):
        refs |= outer_scope_reads(sub)
    return refs


def _node_inputs(node) -> set:
    return {n for n in node.input if n} | _outer_references(node)


def _assign_levels(model, bns: list[_BN]) -> None:
    """level(BN) = number of calibrated BNs on the longest path from the graph inputs, itself
    included. The main graph is topologically sorted (the ONNX checker requires it)."""
    by_index = {b.index: b for b in bns}
    depth = {}
    for i, node in enumerate(model.graph.node):
        d = max((depth.get(n, 0) for n in _node_inputs(node)), default=0)
        if i in by_index:
            d += 1
            by_index[i].level = d
        for o in node.output:
            if o:
                depth[o] = d


def _prune(model, outputs: list[str], elem_types: dict) -> None:
    """Keep only the nodes and initializers needed to compute ``outputs``; make them the outputs.
    Graph inputs are kept so every batch can be fed as is."""
    graph = model.graph
    needed = set(outputs)
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed |= _node_inputs(node)
    keep.reverse()
    kept_inits = [t for t in graph.initializer if t.name in needed]
    # IR 3 lists every initializer as a graph input too: one pruned away must not stay behind as
    # an input onnxruntime then requires a feed for.
    pruned = {t.name for t in graph.initializer} - needed
    kept_inputs = [vi for vi in graph.input if vi.name not in pruned]
    del graph.node[:]
    graph.node.extend(keep)
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    del graph.input[:]
    graph.input.extend(kept_inputs)
    known = {vi.name: vi for vi in list(graph.value_info) + list(graph.output) + list(graph.input)}
    del graph.output[:]
    for name in outputs:
        vi = onnx.ValueInfoProto()
        if name in known:
            vi.CopyFrom(known[name])
        elif name in elem_types:
            vi = helper.make_tensor_value_info(name, elem_types[name], None)
        else:
            vi.name = name
        graph.output.append(vi)


def _expose_inputs(model, bns: list[_BN], elem_types: dict) -> dict:
    """Make every BN input fetchable as a graph output; returns BN label -> output name.

    A BN reading a graph input (or an initializer) directly gets an Identity in between, because a
    name cannot be both a graph input and a graph output in every runtime.
    """
    graph = model.graph
    direct = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    fetch = {}
    identities = {}
    for b in bns:
        if b.x in direct:
            if b.x not in identities:
                out = f"{_PREFIX}/input_copy/{len(identities)}"
                graph.node.insert(0, helper.make_node("Identity", [b.x], [out], name=out))
                identities[b.x] = out
                if b.x in elem_types:
                    elem_types[out] = elem_types[b.x]
                for bb in bns:
                    bb.index += 1
            fetch[b.label] = identities[b.x]
        else:
            fetch[b.label] = b.x
    return fetch


def _value_types(model) -> tuple[dict, dict]:
    """(name -> ONNX element type, name -> static shape) for every tensor shape inference can
    type (best effort). A shape is a tuple of ints, None for a dimension that is not a number."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:
            inferred = model
    types, shapes = {}, {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.elem_type:
            types[vi.name] = tt.elem_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    for t in g.initializer:
        types[t.name] = t.data_type
        shapes[t.name] = tuple(t.dims)
    return types, shapes


def _rewrite_batch_mode(model, bns: list[_BN], elem_types: dict, opset: int) -> None:
    """Replace every BN in ``bns`` with explicit batch-statistics normalization, in place.

    x (N, C, ...) -> reshape (N, C, S) -> mean/biased var over axes (0, 2) -> (x - mean) /
    sqrt(var + eps) * scale + bias (the per-channel factor scale / sqrt(var + eps) computed first)
    -> reshape back. Reshape keeps it rank-agnostic.
    """
    graph = model.graph
    p = _PREFIX
    consts = [
        numpy_helper.from_array(np.array([0, 0, -1], np.int64), f"{p}/shape_ncs"),
        numpy_helper.from_array(np.array([1, -1, 1], np.int64), f"{p}/shape_1c1"),
    ]
    if opset >= 18:
        consts.append(numpy_helper.from_array(np.array([0, 2], np.int64), f"{p}/axes_0_2"))
    graph.initializer.extend(consts)

    def reduce_mean(inp, out, name):
        if opset >= 18:
            return helper.make_node("ReduceMean", [inp, f"{p}/axes_0_2"], [out], name=name, keepdims=1)
        return helper.make_node("ReduceMean", [inp], [out], name=name, axes=[0, 2], keepdims=1)

    by_index = {b.index: b for b in bns}
    new_nodes = []
    for i, node in enumerate(graph.node):
        if i not in by_index:
            new_nodes.append(node)
            continue
        b = by_index[i]
        q = f"{p}/{i}"
        x, scale, bias = node.input[0], node.input[1], node.input[2]
        x_type = elem_types.get(x) or elem_types.get(scale) or onnx.TensorProto.FLOAT
        eps = float(get_attr(node, "epsilon", 1e-5))
        graph.initializer.append(
            numpy_helper.from_array(np.array(eps, dtype=helper.tensor_dtype_to_np_dtype(x_type)), f"{q}/eps")
        )
        ops = [
            helper.make_node("Reshape", [x, f"{p}/shape_ncs"], [f"{q}/x3"], name=f"{q}/x3"),
            reduce_mean(f"{q}/x3", f"{q}/mean", f"{q}/mean"),
            helper.make_node("Sub", [f"{q}/x3", f"{q}/mean"], [f"{q}/centered"], name=f"{q}/centered"),
            helper.make_node("Mul", [f"{q}/centered", f"{q}/centered"], [f"{q}/sq"], name=f"{q}/sq"),
            reduce_mean(f"{q}/sq", f"{q}/var", f"{q}/var"),
            helper.make_node("Add", [f"{q}/var", f"{q}/eps"], [f"{q}/var_eps"], name=f"{q}/var_eps"),
            helper.make_node("Sqrt", [f"{q}/var_eps"], [f"{q}/std"], name=f"{q}/std"),
        ]
        for role, name in (("scale", scale), ("bias", bias)):
            src = name
            if elem_types.get(name, x_type) != x_type:
                src = f"{q}/{role}_cast"
                ops.append(helper.make_node("Cast", [name], [src], name=src, to=x_type))
            ops.append(helper.make_node("Reshape", [src, f"{p}/shape_1c1"], [f"{q}/{role}_1c1"], name=f"{q}/{role}_1c1"))
        # scale / std is per channel: one full-size Mul instead of a Div and a Mul.
        ops += [
            helper.make_node("Div", [f"{q}/scale_1c1", f"{q}/std"], [f"{q}/gain"], name=f"{q}/gain"),
            helper.make_node("Mul", [f"{q}/centered", f"{q}/gain"], [f"{q}/scaled"], name=f"{q}/scaled"),
            helper.make_node("Add", [f"{q}/scaled", f"{q}/bias_1c1"], [f"{q}/y3"], name=f"{q}/y3"),
            helper.make_node("Shape", [x], [f"{q}/x_shape"], name=f"{q}/x_shape"),
            helper.make_node("Reshape", [f"{q}/y3", f"{q}/x_shape"], [node.output[0]], name=f"{q}/y"),
        ]
        new_nodes += ops
        b.index = -1  # node no longer exists in this graph copy
    del graph.node[:]
    graph.node.extend(new_nodes)


def _write_statistics(view: GraphView, bn_index: int, label: str, mean: np.ndarray, var: np.ndarray, elem_types: dict) -> None:
    """Set the BN's running mean/var with ``GraphView.set_constant_input``: an initializer only
    this BN reads is overwritten in place (name and dtype kept); otherwise -- a tensor another node
    also reads, the output of an Identity / Cast / Constant node or of a constant subgraph, a graph
    input -- that value is left as it is and the BN gets a fresh initializer, so nothing else in the
    model changes. The tensors it no longer reads are in ``view.released`` for ``remove_unused``."""
    node = view.nodes[bn_index]
    for slot, values, role in ((3, mean, "running_mean"), (4, var, "running_var")):
        name = node.input[slot]
        # The type the BN reads: the initializer's, a Cast's target type, the declared input type.
        data_type = view.constant_type(name) or elem_types.get(name, onnx.TensorProto.FLOAT)
        if data_type not in FLOAT_TYPES:
            raise InputError(f"BN '{label}': {role} '{name}' is not a float tensor; nothing written")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, by BN
            stored = np.asarray(values, dtype=np.float64).astype(numpy_type(data_type))
        if not np.isfinite(stored.astype(np.float64)).all():
            problem = "is non-finite (NaN/Inf)" if not np.isfinite(values).all() else f"exceeds the {FLOAT_TYPES[data_type]} range of the tensor it replaces"
            raise InputError(f"BN '{label}': the calibrated {role} {problem}; nothing written")
        view.set_constant_input(bn_index, slot, stored, data_type, f"{label}.{role}")


def _initial_statistics(view: GraphView, node):
    """Current running mean/var of a BN (float64, flat) for the report; None where not constant.

    Read as the fold pass reads BN parameters (``GraphView.constant``: initializers, Constant
    nodes, Identity / Cast / small constant subgraphs). An initializer that is also a graph input
    (IR >= 4) is only a default the caller may override, so GraphView does not call it constant;
    its stored value is still what the model computes with, so the report shows it."""
    out = []
    for name in node.input[3:5]:
        value = view.constant(name)
        if value is None and name in view.initializers:
            value = read_tensor(view.initializers[name])
        out.append(None if value is None else np.asarray(value, dtype=np.float64).reshape(-1))
    return out


# --------------------------------------------------------------------------------------------
# Fixed batch dimension
# --------------------------------------------------------------------------------------------
#
# torch.onnx.export fixes the batch at the example's (usually 1) unless told otherwise; the tf2onnx
# exports measured in issue 10 are fixed-batch too. Sequential statistics do not depend on the batch size, so sequential mode runs such a model
# at its fixed batch, feeding the data in chunks of that size. Batch mode needs batches of
# batch_size: the calibration graph gets a symbolic batch dimension (inputs, and the Reshape /
# Expand shape constants that spell the batch out) and is used only after onnxruntime, run on the
# first data batch, reproduces the fixed-batch model's BN inputs sample for sample; otherwise batch
# mode runs at the fixed batch too, with a note.

_BATCH_DIM = "bnfold_batch"
# Relative tolerance of the symbolic-batch check: far above float rounding (the two runs differ
# only in how onnxruntime blocks its loops), far below what a wrong shape does (samples mixed up).
_SYMBOLIC_RTOL = {onnx.TensorProto.FLOAT16: 1e-2, onnx.TensorProto.BFLOAT16: 5e-2}
_SYMBOLIC_RTOL_DEFAULT = 1e-3


def _fixed_batch(specs: dict) -> int | None:
    """The fixed batch dimension shared by the model's inputs, None when every one is dynamic."""
    fixed = {spec.name: spec.dims[0] for spec in specs.values() if spec.dims and spec.dims[0] is not None}
    if len(set(fixed.values())) > 1:
        listed = ", ".join(f"'{name}': {dim}" for name, dim in fixed.items())
        raise InputError(f"model inputs have different fixed batch dimensions ({listed}); calibration needs one batch axis")
    return next(iter(fixed.values()), None)


class _FixedSizeFeeds:
    """Re-cuts a stream of data batches into feeds of exactly ``size`` samples, for a model run at
    its fixed batch: samples carry over from one data batch into the next, and the samples left at
    the end that do not fill a feed are counted in ``dropped`` (padding them would need the BN
    inputs' rows to be attributable to samples, which a reshape can hide)."""

    def __init__(self, size: int):
        self.size = size
        self.dropped = 0
        self._pending: list[dict] = []
        self._rows = 0

    def cut(self, batch: dict) -> list[dict]:
        self._pending.append(batch)
        self._rows += len(next(iter(batch.values())))
        if self._rows < self.size:
            return []
        merged = {n: np.concatenate([p[n] for p in self._pending]) if len(self._pending) > 1 else self._pending[0][n]
                  for n in batch}
        used = self._rows - self._rows % self.size
        feeds = [{n: np.ascontiguousarray(v[i:i + self.size]) for n, v in merged.items()} for i in range(0, used, self.size)]
        self._rows -= used
        self._pending = [{n: v[used:] for n, v in merged.items()}] if self._rows else []
        return feeds

    def finish(self) -> None:
        self.dropped, self._rows, self._pending = self._rows, 0, []


def _reshape_result(target, in_shape, allowzero: bool):
    """Output shape of Reshape(x of ``in_shape``, ``target``), or None when it cannot be known."""
    out = []
    for k, d in enumerate(int(v) for v in target):
        if d == 0 and not allowzero:
            if in_shape is None or k >= len(in_shape) or in_shape[k] is None:
                return None
            d = in_shape[k]
        out.append(d)
    if out.count(-1) == 1:
        if in_shape is None or any(d is None for d in in_shape):
            return None
        known = int(np.prod([d for d in out if d != -1], dtype=np.int64))
        total = int(np.prod(in_shape, dtype=np.int64))
        if known <= 0 or total % known:
            return None
        out[out.index(-1)] = total // known
    return tuple(out) if all(d >= 0 for d in out) else None


def _static(shapes: dict, name: str):
    shape = shapes.get(name)
    return shape if shape is not None and all(d is not None for d in shape) else None


# What _symbolic_batch_model may rewrite, tried in this order (the first variant that passes the
# check is used): a rewrite the model does not need can break it (an Expand building a Conv's zero
# bias of 512 channels is no batch even when the batch is 1), so the fewer the better.
_SYMBOLIC_VARIANTS = ((), ("Reshape",), ("Reshape", "Expand"))


def _symbolic_batch_model(model, view: GraphView, fixed: int, shapes: dict, ops=("Reshape", "Expand")):
    """A copy of ``model`` whose inputs' fixed batch dimension ``fixed`` is symbolic.

    Returns ``(model, shift, rewritten)``: ``shift`` nodes computing the runtime batch were put
    before the original nodes (which keep their order), ``rewritten`` shape constants were
    replaced. What is rewritten (op types in ``ops``), from the shapes of the fixed-batch model,
    for results of rank >= 2 whose leading dimension is ``fixed * k`` (k rows per sample, the
    batch on axis 0):

    * Reshape to a constant shape -> ``[-1, *rest]``, the leading dimension following the data;
    * Expand to a constant shape that spells out the leading dimension -> the same shape with
      ``batch * k`` computed from the first input's runtime shape;
    * every value_info and output shape is dropped (onnxruntime infers them again).

    Anything else that bakes the batch in (a Concat with a constant of batch 1, a Squeeze of axis
    0, ...) is not recognized; ``_SymbolicBatchCheck`` finds those by running the result.
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)
    graph = work.graph
    initializers = {t.name for t in graph.initializer}
    batch_inputs = []
    for vi in graph.input:
        dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []
        if vi.name not in initializers and len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == fixed:
            dims[0].Clear()
            dims[0].dim_param = _BATCH_DIM
            batch_inputs.append(vi.name)
    del graph.value_info[:]
    for vi in graph.output:
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")

    p = f"{_PREFIX}/batch"
    prologue = []  # nodes computing runtime shapes; they read only the input's shape and constants
    runtime_batch = None

    def constant(name, values):
        graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def batch_times(k: int) -> str:
        """Name of a (1,) int64 tensor holding runtime batch * k / fixed."""
        nonlocal runtime_batch
        if runtime_batch is None:
            runtime_batch = f"{p}/n"
            prologue.append(helper.make_node("Shape", [batch_inputs[0]], [f"{p}/input_shape"], name=f"{p}/input_shape"))
            prologue.append(helper.make_node("Gather", [f"{p}/input_shape", constant(f"{p}/axis0", [0])], [runtime_batch],
                                             name=runtime_batch, axis=0))
        if k == fixed:
            return runtime_batch
        scaled = f"{p}/n_times_{k}"
        if scaled not in {o for n in prologue for o in n.output}:
            prologue.append(helper.make_node("Mul", [runtime_batch, constant(f"{scaled}/k", [k])], [f"{scaled}/mul"], name=f"{scaled}/mul"))
            prologue.append(helper.make_node("Div", [f"{scaled}/mul", constant(f"{scaled}/fixed", [fixed])], [scaled], name=scaled))
        return scaled

    rewritten = 0
    for i, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ops or len(node.input) < 2:
            continue
        data, target_name, out = node.input[0], node.input[1], node.output[0]
        target = view.constant(target_name)
        if target is None:
            continue  # computed at run time: follows the runtime batch by itself
        target = np.asarray(target).astype(np.int64).reshape(-1)
        if node.op_type == "Reshape":
            if view.constant(data) is not None:
                continue  # a constant reshaped: no batch in it
            result = _static(shapes, out) or _reshape_result(target, _static(shapes, data), bool(get_attr(node, "allowzero", 0)))
            if not result or len(result) < 2 or result[0] % fixed or any(d <= 0 for d in result[1:]):
                continue
            new = [-1, *result[1:]]
            if list(target) == new:
                continue
            node.input[1] = constant(f"{p}/reshape_{i}", new)
        else:
            result = _static(shapes, out)
            if not batch_inputs or not result or len(result) < 2 or len(target) != len(result) or target[0] != result[0] \
                    or result[0] % fixed:
                continue
            prologue.append(helper.make_node("Concat", [batch_times(int(result[0])), constant(f"{p}/expand_{i}/rest", result[1:])],
                                             [f"{p}/expand_{i}"], name=f"{p}/expand_{i}", axis=0))
            node.input[1] = f"{p}/expand_{i}"
        rewritten += 1
    nodes = prologue + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return work, len(prologue), rewritten


def _bn_input_session(model, bns: list[_BN], shift: int, elem_types: dict, n_threads):
    """An onnxruntime session computing only the inputs of ``bns`` (inference-mode BNs before
    them), and the output names in the order it returns them, with BN labels."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    copies = [_BN(b.index + shift, b.label, b.x, b.level) for b in bns]
    types = dict(elem_types)
    fetch = _expose_inputs(work, copies, types)
    names = list(dict.fromkeys(fetch.values()))
    _prune(work, names, types)
    label_of = {}
    for label, name in fetch.items():
        label_of.setdefault(name, label)
    return _session(work, n_threads), names, label_of


class _SymbolicBatchCheck:
    """Whether a calibration graph with a symbolic batch is the fixed-batch model on ``batch``.

    Every BN input of the symbolic graph, run on the whole batch, must equal sample for sample the
    fixed-batch model's, run on chunks of ``fixed`` samples (in inference mode samples are
    independent, so any difference is a shape that still spells out the batch). The fixed-batch
    chunks are compared as they come, so memory holds one batch of BN inputs plus one chunk's, as
    a calibration run does."""

    def __init__(self, model, bns: list[_BN], elem_types: dict, batch: dict, fixed: int, n_threads):
        self.model, self.bns, self.elem_types, self.batch, self.fixed, self.n_threads = model, bns, elem_types, batch, fixed, n_threads
        self.n = len(next(iter(batch.values())))
        self._fixed_session = None

    def problem(self, symbolic, shift: int) -> str:
        """"" when ``symbolic`` passes, else why not (one line)."""
        n, fixed = self.n, self.fixed
        try:
            session, names, label_of = _bn_input_session(symbolic, self.bns, shift, self.elem_types, self.n_threads)
            got = session.run(None, self.batch)
        except Exception as e:  # noqa: BLE001 - any failure means: not usable at this batch size
            return f"onnxruntime cannot run it at batch {n}: {first_line(e, 160)}"
        del session
        if self._fixed_session is None:
            self._fixed_session = _bn_input_session(self.model, self.bns, 0, self.elem_types, self.n_threads)
        fixed_session, fixed_names, _ = self._fixed_session
        if fixed_names != names:
            return "its BN inputs are not the fixed-batch model's"
        errors = [0.0] * len(names)
        scales = [0.0] * len(names)
        for start in range(0, n, fixed):
            # A last chunk shorter than the fixed batch (or a whole batch smaller than it) is
            # padded, and only its real samples' rows are compared. The filler must differ from
            # the real samples (float inputs: their negation): a fixed-batch model that mixes
            # samples (say, each with the one F/2 rows away) then gives rows that depend on the
            # filler, which a symbolic graph run without it cannot match -- padding with copies
            # of the same samples would make such mixing invisible whenever n divides F.
            real = min(fixed, n - start)
            want = _run(fixed_session, {k: _padded(v[start:start + real], fixed) for k, v in self.batch.items()},
                        start // fixed + 1)
            for j, name in enumerate(names):
                label, chunk, value = label_of[name], want[j], got[j]
                rows = chunk.shape[0] if chunk.ndim else 0
                if chunk.ndim == 0 or (rows * n) % fixed or (rows * real) % fixed \
                        or value.shape != ((rows * n) // fixed,) + chunk.shape[1:]:
                    return f"BN '{label}' input has shape {value.shape} at batch {n}, the fixed-batch model's {chunk.shape} at {fixed}"
                first, real_rows = start // fixed * rows, (rows * real) // fixed
                have = value[first:first + real_rows].astype(np.float64)
                chunk = chunk[:real_rows]
                # A network that overflows gives Inf in both runs, and Inf - Inf warns; the
                # calibration run refuses a non-finite BN input anyway (_Accumulator.add).
                with np.errstate(invalid="ignore", over="ignore"):
                    errors[j] = max(errors[j], float(np.max(np.abs(have - chunk))) if chunk.size else 0.0)
                scales[j] = max(scales[j], float(np.max(np.abs(chunk))) if chunk.size else 0.0)
        for j, name in enumerate(names):
            rtol = _SYMBOLIC_RTOL.get(self.elem_types.get(name), _SYMBOLIC_RTOL_DEFAULT)
            if not errors[j] <= rtol * scales[j] + 1e-30:  # NaN fails too
                return (f"BN '{label_of[name]}' input differs from the fixed-batch model's (max abs error {errors[j]:.3g} "
                        f"of {scales[j]:.3g})")
        return ""


def _padded(rows: np.ndarray, size: int) -> np.ndarray:
    """``rows`` followed by filler rows up to ``size``: the rows again, negated where they are
    floats (any values the model takes, and different from the real ones)."""
    if len(rows) >= size:
        return rows
    filler = rows[np.arange(size - len(rows)) % len(rows)]
    if np.issubdtype(filler.dtype, np.floating):
        filler = -filler
    return np.concatenate([rows, filler])


def _symbolic_batch(model, view: GraphView, bns: list[_BN], elem_types: dict, shapes: dict, batch: dict, fixed: int,
                    n_threads):
    """``(symbolic model, shift, shapes rewritten, "")`` for the first variant of
    ``_SYMBOLIC_VARIANTS`` that passes ``_SymbolicBatchCheck`` on ``batch``, else
    ``(None, 0, 0, why the last one failed)``."""
    check = _SymbolicBatchCheck(model, bns, elem_types, batch, fixed, n_threads)
    problem, previous = "", None
    for ops in _SYMBOLIC_VARIANTS:
        symbolic, shift, rewritten = _symbolic_batch_model(model, view, fixed, shapes, ops)
        if rewritten == previous:
            continue  # each variant rewrites a superset of the one before: nothing new, same graph
        previous = rewritten
        problem = check.problem(symbolic, shift)
        if not problem:
            return symbolic, shift, rewritten, ""
    return None, 0, 0, problem


@dataclass
class _RunPlan:
    """Where the calibration graphs come from and at which batch onnxruntime runs them."""

    mode: str
    base: onnx.ModelProto  # the model the calibration graphs are built from
    shift: int = 0  # nodes ``base`` has before the model's own (BN indices move by this much)
    run_at: int | None = None  # exact samples per run (a fixed batch), None = any
    first_pass: Iterator | None = None  # the first pass's data stream when its first batch was read
    batch_mode_at_fixed: bool = False  # batch mode wanted batch_size but runs at the fixed batch
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # onnxruntime time of the symbolic-batch check


def _plan_runs(model, view, bns, dataset, mode, batch_size, max_batches, fixed, elem_types, shapes, n_threads) -> _RunPlan:
    """How to run a model whose batch dimension is ``fixed`` (None: dynamic, nothing to plan).

    Sequential mode runs at the fixed batch. Batch mode tries a symbolic batch on the first data
    batch (``_symbolic_batch``) and otherwise runs at the fixed batch -- unless some BN would then
    see one value per channel, where batch statistics are undefined: then sequential mode."""
    plan = _RunPlan(mode=mode, base=model)
    if fixed is None:
        return plan
    plan.run_at = fixed
    if mode == "batch" and batch_size != fixed:
        stream = dataset.batches(batch_size, max_batches)
        first = next(stream)
        plan.first_pass = itertools.chain([first], stream)
        # A first batch of exactly `fixed` samples is what running at the fixed batch gives anyway
        # (all the data, or batch_size == fixed); any other size needs the symbolic batch.
        if len(next(iter(first.values()))) != fixed:
            t0 = time.perf_counter()
            symbolic, shift, rewritten, problem = _symbolic_batch(model, view, bns, elem_types, shapes, first, fixed, n_threads)
            plan.seconds = time.perf_counter() - t0
            if symbolic is not None:
                plan.base, plan.shift, plan.run_at = symbolic, shift, None
                plan.notes.append(
                    f"the model's batch dimension is fixed at {fixed}: batch mode ran a calibration graph with it made "
                    f"symbolic ({count(rewritten, 'shape')} rewritten; checked against the fixed-batch model on the first batch)")
                return plan
            degenerate = _one_value_per_channel(bns, shapes)
            if degenerate is not None:
                # Batch statistics of one value per channel are undefined; sequential statistics are
                # not, and they are what this BN's input becomes at inference time.
                plan.mode = "sequential"
                plan.notes.append(
                    f"calibrated in sequential mode, not batch mode: the model's batch dimension is fixed at {fixed} and "
                    f"could not be made symbolic ({problem}), and at that batch BN '{degenerate}' sees one value per "
                    "channel (undefined batch statistics)")
            else:
                plan.batch_mode_at_fixed = True
                plan.notes.append(
                    f"batch mode ran at the model's fixed batch {fixed}, not {batch_size}: its batch dimension could not be "
                    f"made symbolic ({problem}); batch statistics are over {count(fixed, 'sample')} at a time")
    if plan.mode == "sequential" and batch_size != fixed:
        plan.notes.append(f"the model's batch dimension is fixed at {fixed}: sequential mode ran it "
                          f"{count(fixed, 'sample')} at a time (its statistics do not depend on the batch size)")
    return plan


# Per-channel statistics need this many values per channel: the variance of one value is 0
# whatever the data (a BN calibrated on it divides by sqrt(eps) at inference), and a batch-mode BN
# normalizing by it outputs 0 or NaN. Batch mode needs it per batch (the batch is what each BN
# normalizes by), both modes over all the data (the population written to the model).
_MIN_VALUES_PER_CHANNEL = 2


def _values_per_channel(shape) -> int:
    """Values each channel of a BN input of ``shape`` (N, C, ...) holds: N times the spatial size."""
    return math.prod(int(d) for d in shape) // int(shape[1]) if int(shape[1]) else 0


def _too_few_values(values_per_channel: int) -> bool:
    """Whether statistics of ``values_per_channel`` values per channel are undefined (a single
    value; an empty input, no channels or no samples, is refused elsewhere)."""
    return 0 < values_per_channel < _MIN_VALUES_PER_CHANNEL


def _one_value_per_channel(bns: list[_BN], shapes: dict):
    """Label of the first BN whose input has one value per channel at the fixed batch (from the
    fixed-batch model's static shapes), else None."""
    for b in bns:
        shape = _static(shapes, b.x)
        if shape is not None and len(shape) >= 2 and shape[1] > 0 and _too_few_values(_values_per_channel(shape)):
            return b.label
    return None


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _session(model, n_threads):
    # Extended fusions (Conv+activation, ...) speed the forward pass up; the layout-changing and
    # pattern-matching transformers of level "all" are not needed and could rewrite the explicit
    # normalization ops. Idle onnxruntime threads would otherwise spin after every run and steal
    # the cores bnfold's OpenMP statistics kernels run on (measured: statistics 4x slower). A
    # trial run (the symbolic-batch check) fails as an expected answer, logged nowhere.
    return create_session(model.SerializeToString(), opt_level="extended", threads=n_threads, spinning=False,
                          failure="onnxruntime cannot run the calibration graph")


def _run(session, batch, batch_number):
    try:
        return session.run(None, batch)
    except Exception as e:
        raise InputError(f"batch {batch_number}: onnxruntime failed on the calibration data ({first_line(e)})") from None


class _NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass


def _progress(enabled, total, label):
    if not enabled:
        return _NullProgress()
    try:
        from bnfold.progress import Progress
    except ImportError:
        return _NullProgress()
    return Progress(total, label)


class _Accumulator:
    """Per-BN Moments merged across batches, and the time spent on them."""

    def __init__(self, labels, one_value_is_error: bool, n_threads=None, fixed_batch=None):
        from bnfold.kernels import Moments

        self._moments_cls = Moments
        self.moments = {label: None for label in labels}
        self.samples = {label: 0 for label in labels}
        self.seconds = 0.0
        self._one_value_is_error = one_value_is_error
        self._n_threads = n_threads
        self._fixed_batch = fixed_batch  # the model runs at this fixed batch; batch_size cannot help

    def add(self, label, x, batch_number):
        if x.ndim < 2:
            raise InputError(f"BN '{label}': input of rank {x.ndim}; BatchNormalization needs (N, C, ...)")
        one_value = _too_few_values(_values_per_channel(x.shape))
        if self._one_value_is_error and one_value and self._fixed_batch is not None:
            raise InputError(
                f"batch {batch_number}: BN '{label}' sees one value per channel at the model's fixed batch "
                f"{self._fixed_batch}, whose batch dimension could not be made symbolic (see the note); batch statistics "
                "are undefined there -- use --mode sequential"
            )
        if self._one_value_is_error and one_value:
            raise InputError(
                f"batch {batch_number}: BN '{label}' sees one value per channel (batch of 1 sample without spatial "
                "positions); batch statistics are undefined -- use a batch size >= 2 that leaves no final batch of 1, "
                "or --mode sequential (which needs 2 samples in all)"
            )
        t0 = time.perf_counter()
        activation_dtype = x.dtype
        if x.dtype not in (np.float32, np.float64):
            # float16 (and other narrow float) activations: the kernels take float32/float64 and
            # accumulate in float64, so upcasting first is exact.
            x = x.astype(np.float32)
        m = self._moments_cls.from_array(x, axis=1, n_threads=self._n_threads)
        if not (np.isfinite(m.mean).all() and np.isfinite(m.m2).all()):
            # The data was checked finite as it was read: the network itself overflowed.
            raise InputError(
                f"batch {batch_number}: BN '{label}' gets non-finite inputs (NaN/Inf) from finite calibration data; "
                f"the network overflows {activation_dtype} or produces NaN on this data"
            )
        prev = self.moments[label]
        self.moments[label] = m if prev is None else prev.merge(m)
        self.seconds += time.perf_counter() - t0
        self.samples[label] += x.shape[0]

    def population(self, label):
        """The merged Moments of ``label`` over all the data, the population written to the
        model; InputError when they hold a single value per channel (``_too_few_values``): one
        sample in all, for a BN without spatial positions. (Batch mode refuses such a batch in
        ``add`` already; sequential mode, which merges single values, gets here.)"""
        m = self.moments[label]
        if _too_few_values(m.count):
            samples = self.samples[label]
            raise InputError(
                f"BN '{label}' sees one value per channel in all the calibration data ({count(samples, 'sample')}); "
                "one value is not a population (its variance is 0 for every channel) -- give at least 2 samples"
            )
        return m


def calibrate(model_or_path, data, *, mode="batch", batch_size=32, max_batches=None, progress=False, n_threads=None):
    """Re-estimate the running mean/variance of every main-graph BatchNormalization from data.

    Returns ``(calibrated ModelProto, CalibrationReport)``; the input model is never modified.
    ``data``: a .npy / .npz path or a directory of them, a dict input name -> array, a single
    array (single-input model), or an iterable of such dicts. Samples are streamed in batches of
    ``batch_size`` along axis 0; ``max_batches`` limits the number of batches per pass.
    ``mode``: "batch" (PreciseBN, statistics of deeper BNs depend on the batch size) or
    "sequential" (inference-consistent, batch-size independent, one pass per BN level).
    A model with a fixed batch dimension F works with any ``batch_size``: sequential mode runs it
    F samples at a time; batch mode at ``batch_size`` with the batch made symbolic when that is
    verified on the first batch, else at F (``report.notes`` says which; samples that do not fill a
    last batch of F are not used, and a note says how many).
    ``n_threads``: threads of onnxruntime and of the statistics kernels (None: all cores).
    Raises InputError for unusable data; nothing is returned half-calibrated. Data that gives a
    BN one value per channel in all (one sample, for a BN on (N, C)) is unusable in both modes,
    and in batch mode so is any batch that does (see ``_MIN_VALUES_PER_CHANNEL``).
    """
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, (int, np.integer)) or max_batches < 1):
        raise InputError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    batch_size = int(batch_size)
    if n_threads is not None and (isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)) or n_threads < 1):
        raise InputError(f"n_threads must be a positive integer or None, got {n_threads!r}")
    t_start = time.perf_counter()

    source = load_model(model_or_path)
    model = onnx.ModelProto()
    model.CopyFrom(source)
    specs, optional = _model_input_specs(model)
    if not specs:
        raise InputError("model has no inputs to feed calibration data into")
    dataset = _Dataset(data, specs, optional)
    fixed = _fixed_batch(specs)

    report = CalibrationReport(mode=mode, batch_size=batch_size, fixed_batch=fixed, run_batch_size=batch_size)
    # The main graph seen as the fold pass sees it: BN parameters are read and written through it.
    view = GraphView(model.graph, ModelContext(model))
    elem_types, shapes = _value_types(model)
    bns = []
    for i, node in enumerate(view.nodes):
        if not is_batch_norm(node):
            continue
        label = view.labels[i]
        entry = BNCalibration(bn=label, epsilon=float(get_attr(node, "epsilon", 1e-5)))
        failure = inference_mode_failure(node, label, view.ctx.opset)
        if failure is not None:
            entry.status, entry.reason = "skipped", f"{failure.reason}: {failure.message}; left alone"
        else:
            entry.old_mean, entry.old_var = _initial_statistics(view, node)
            bns.append(_BN(index=i, label=label, x=node.input[0]))
        report.entries.append(entry)
    for label, path in _subgraph_bns(model.graph, ""):
        report.entries.append(
            BNCalibration(bn=label, graph=path, status="skipped", reason="subgraph: BNs inside If/Loop/Scan bodies are not calibrated")
        )
    if not bns:
        report.notes.append("no BatchNormalization in the main graph can be calibrated; model unchanged")
        report.seconds_total = time.perf_counter() - t_start
        return model, report

    _assign_levels(model, bns)
    plan = _plan_runs(model, view, bns, dataset, mode, batch_size, max_batches, fixed, elem_types, shapes, n_threads)
    switched = plan.mode != mode  # batch mode impossible at the fixed batch: sequential instead
    mode = report.mode = plan.mode
    report.notes += plan.notes
    report.run_batch_size = plan.run_at or batch_size
    report.seconds_forward += plan.seconds
    base, shift, run_at, first_pass = plan.base, plan.shift, plan.run_at, plan.first_pass
    if mode == "batch":
        groups = [bns]
    else:
        levels = sorted({b.level for b in bns})
        groups = [[b for b in bns if b.level == lv] for lv in levels]
        if dataset.one_shot and len(groups) > 1:
            why = f"{plan.notes[0]}; " if switched else ""
            raise InputError(
                f"{why}sequential mode reads the data once per BN level ({len(groups)} levels); pass a list, dict, array "
                "or path instead of a one-shot iterator"
            )
    n_batches = dataset.n_batches(batch_size, max_batches)
    total = None if n_batches is None else n_batches * len(groups)

    results = {}
    with _progress(progress, total, f"calibrate ({mode})") as bar:
        for group_number, group in enumerate(groups):
            work = onnx.ModelProto()
            work.CopyFrom(base)
            group_copy = [_BN(b.index + shift, b.label, b.x, b.level) for b in group]
            fetch = _expose_inputs(work, group_copy, elem_types)
            if mode == "batch":
                _rewrite_batch_mode(work, group_copy, elem_types, view.ctx.opset)
            names = list(dict.fromkeys(fetch.values()))
            _prune(work, names, elem_types)
            session = _session(work, n_threads)
            acc = _Accumulator([b.label for b in group], one_value_is_error=(mode == "batch"), n_threads=n_threads,
                               fixed_batch=fixed if plan.batch_mode_at_fixed else None)
            runs = seen_samples = 0
            feeds = _FixedSizeFeeds(run_at) if run_at is not None else None
            batches = first_pass if group_number == 0 and first_pass is not None else dataset.batches(batch_size, max_batches)
            for batch in batches:
                for feed in feeds.cut(batch) if feeds is not None else [batch]:
                    runs += 1
                    t0 = time.perf_counter()
                    outputs = _run(session, feed, runs)
                    report.seconds_forward += time.perf_counter() - t0
                    by_name = dict(zip(names, outputs))
                    for b in group:
                        acc.add(b.label, by_name[fetch[b.label]], runs)
                    seen_samples += len(next(iter(feed.values())))
                bar.update(1)
            if feeds is not None:
                feeds.finish()
                if runs == 0:
                    raise InputError(f"no complete batch: the model's batch dimension is fixed at {fixed} and the data holds "
                                     f"{count(feeds.dropped, 'sample')}")
                if feeds.dropped:
                    note = (f"the last {count(feeds.dropped, 'sample')} of the data were not used: the model's batch "
                            f"dimension is fixed at {fixed} and they do not fill a batch")
                    if note not in report.notes:
                        report.notes.append(note)
            report.seconds_statistics += acc.seconds
            report.n_batches, report.n_samples = runs, seen_samples
            report.passes += 1
            for b in group:
                m = acc.population(b.label)
                results[b.label] = (m, acc.samples[b.label])
                if mode == "sequential":
                    _write_statistics(view, b.index, b.label, m.mean, m.var(), elem_types)
    if mode == "batch":
        for b in bns:
            m, _ = results[b.label]
            _write_statistics(view, b.index, b.label, m.mean, m.var(), elem_types)
    remove_unused(model, view.released)

    level_of = {b.label: b.level for b in bns}
    for entry in report.entries:
        if entry.status != "calibrated" or entry.graph:
            continue
        m, samples = results[entry.bn]
        entry.new_mean = np.asarray(m.mean, dtype=np.float64)
        entry.new_var = np.asarray(m.var(), dtype=np.float64)
        entry.channels = int(entry.new_mean.shape[0])
        entry.samples = int(samples)
        entry.values_per_channel = int(m.count)
        entry.level = level_of[entry.bn]
    report.seconds_total = time.perf_counter() - t_start
    return model, report


def iter_batches(model_or_path, data, *, batch_size=32, max_batches=None):
    """Validate ``data`` against the model's inputs and yield it as feed dicts (input name ->
    array of ``batch_size`` samples in the model's dtype), exactly as ``calibrate`` reads it."""
    model = load_model(model_or_path)
    specs, optional = _model_input_specs(model)
    return _Dataset(data, specs, optional).batches(int(batch_size), max_batches)


