"""Tensor storage for the fold pass: the float element types the fold math reads and writes,
reading a TensorProto (or a Constant node) as numpy, writing float64 results back rounded once to
the tensor's type, and ``ScaledWeight``, the lazily computed ``weight * factor`` that folding a big
model writes chunk by chunk instead of holding a second copy of its weights.

Subnormals: the fold pass flushes the subnormal values of the tensors it wrote to zero, once, when
it is done (``GraphView``'s ``ModelContext.flush_written_subnormals``): ``count_subnormals`` /
``flush_subnormals`` for values at hand, ``ScaledWeight.flush`` for products computed only when
written, and ``FlushedSubnormals`` adding them up. float32, float64 and bfloat16 are flushed (a
bfloat16 widens to float32 bit for bit, its subnormals stay float32 subnormals); float16 is not
(``SUBNORMAL_BITS``).
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

# Tensor element types the fold math can read and write back.
FLOAT_TYPES = {
    TensorProto.FLOAT: "float32",
    TensorProto.DOUBLE: "float64",
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
}


# Per flushed type (by numpy dtype name): the unsigned integer of its width, the mask of every bit
# but the sign, and the largest magnitude bit pattern with a zero exponent (the largest subnormal).
# float16 is left out on purpose: every CPU kernel widens float16 to float32, where its subnormals
# (down to 6e-8) are normal numbers, so they cost no time; and zeroing them would change a float16
# layer by up to 6e-8 — a relative error visible at float16 precision for small activations, which
# the precision check (rules/base.py, ``would_lose_precision``) already judges as a whole.
SUBNORMAL_BITS = {
    "float32": (np.uint32, 0x7FFFFFFF, 0x007FFFFF),
    "float64": (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x000FFFFFFFFFFFFF),
    "bfloat16": (np.uint16, 0x7FFF, 0x007F),
}
# Scanned this many elements at a time, so the temporaries stay in cache.
_SCAN_ELEMENTS = 1 << 18


def _subnormal_mask_chunks(array: np.ndarray):
    """Yield ``(flat chunk as unsigned ints, bool mask of its subnormals)`` of a contiguous array of
    a flushed type; nothing for other types."""
    bits = SUBNORMAL_BITS.get(array.dtype.name)
    if bits is None or not array.size:
        return
    uint, magnitude_mask, largest_subnormal = bits
    flat = np.ascontiguousarray(array).reshape(-1).view(uint)
    scratch = np.empty(min(flat.size, _SCAN_ELEMENTS), dtype=uint)
    mask = np.empty(scratch.size, dtype=bool)
    for start in range(0, flat.size, _SCAN_ELEMENTS):
        chunk = flat[start : start + _SCAN_ELEMENTS]
        n = chunk.size
        # subnormal <=> 1 <= magnitude bits <= largest subnormal <=> magnitude - 1 (unsigned, so a
        # zero wraps around to the top) < largest subnormal
        np.bitwise_and(chunk, uint(magnitude_mask), out=scratch[:n])
        np.subtract(scratch[:n], uint(1), out=scratch[:n])
        np.less(scratch[:n], uint(largest_subnormal), out=mask[:n])
        yield chunk, mask[:n]


def count_subnormals(array: np.ndarray) -> int:
    """Number of subnormal values of a float32 / float64 / bfloat16 array (0 for other types)."""
    return sum(int(np.count_nonzero(mask)) for _, mask in _subnormal_mask_chunks(np.asarray(array)))


def flush_subnormals(array: np.ndarray, in_place: bool = False) -> tuple[np.ndarray, int]:
    """``(array with its subnormals replaced by zeros of the same sign, their number)``; the array
    itself when there are none, else a copy (or ``array``, changed, when ``in_place``: it must then
    be C-contiguous and writable). Other types than float32 / float64 / bfloat16 come back
    unchanged with 0."""
    array = np.asarray(array)
    n = count_subnormals(array)
    if n == 0:
        return array, 0
    out = array if in_place else np.array(array, order="C")
    bits = SUBNORMAL_BITS[out.dtype.name]
    sign = bits[0](bits[1] + 1)
    for chunk, mask in _subnormal_mask_chunks(out):
        # Zero of the sign the value had, as a flush-to-zero CPU gives.
        chunk[mask] &= sign
    return out, n


class FlushedSubnormals:
    """How many subnormals one fold flushed: ``counted`` in the tensors written at once, plus those
    of the ``deferred`` products (``ScaledWeight``), known once each is computed; ``total()``
    computes (only counting) any not computed yet."""

    def __init__(self) -> None:
        self.counted = 0
        self.deferred: list[ScaledWeight] = []

    def total(self) -> int:
        return self.counted + sum(w.flushed if w.flushed is not None else w.count_subnormals() for w in self.deferred)


def to_float64(array: np.ndarray) -> np.ndarray:
    return np.asarray(array).astype(np.float64)


def tensor_from_float64(array: np.ndarray, data_type: int, name: str) -> TensorProto:
    """Cast float64 ``array`` once to ``data_type`` (float32/64, float16, bfloat16) as a TensorProto."""
    tensor = TensorProto()
    write_tensor(tensor, array, data_type, name)
    return tensor


def numpy_type(data_type: int):
    """numpy dtype of a float TensorProto type (bfloat16 through ml_dtypes)."""
    if data_type == TensorProto.BFLOAT16:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(FLOAT_TYPES[data_type])


def scale_in_float64(array: np.ndarray, factor: np.ndarray, data_type: int) -> np.ndarray:
    """``array * factor`` computed in float64 and rounded once to ``data_type``'s numpy type.

    A float32/float64 weight scaled along one axis (the common case) goes through the compiled
    loop of bnfold._fold_math (``ScaledWeight``), whose result is a read-only array over a bytes
    object that ``write_tensor`` stores without another copy. Otherwise the numpy ufunc works in
    float64 on buffered chunks, so a large weight is never materialized in float64 as a whole."""
    scaled = ScaledWeight.of(array, factor, data_type)
    if scaled is not None:
        return np.frombuffer(scaled.to_bytes(), dtype=scaled.dtype).reshape(scaled.shape)
    target = numpy_type(data_type)
    out = np.empty(np.broadcast_shapes(np.shape(array), np.shape(factor)), dtype=target)
    # Quietly, as the compiled loop computes: the rules refuse folds whose new values would leave
    # the type's range (float16/bfloat16 weights, every bias), and NaN/Inf weights stay NaN/Inf.
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            np.multiply(array, factor, out=out, dtype=np.float64, casting="unsafe")
        except TypeError:  # a dtype without a float64 -> type ufunc cast: go through float64 explicitly
            out[...] = (to_float64(array) * factor).astype(out.dtype)
    return out


class ScaledWeight:
    """``weight * factor`` for a float32/float64 weight and a factor varying along one axis,
    computed in float64 and rounded once to the weight's type — only when asked for: whole by
    ``to_bytes()``, or chunk by chunk while it is written (``write_to``), so that folding a big
    model never holds a second full copy of its weights (``bnfold.io.payloads`` stores these)."""

    CHUNK_BYTES = 1 << 20

    def __init__(self, weight: np.ndarray, axis: int, per_channel: np.ndarray):
        self.weight = weight
        self.shape = weight.shape
        self.dtype = weight.dtype
        self.nbytes = weight.nbytes
        self.channels = weight.shape[axis]
        self.inner = int(np.prod(weight.shape[axis + 1 :], dtype=np.int64))
        self.rows = int(np.prod(weight.shape[: axis + 1], dtype=np.int64))
        self.per_channel = per_channel
        # Set by the fold pass once this product is final (not re-read by a later fold): its
        # subnormals are then flushed as it is computed, and ``flushed`` says how many there were.
        self.flush = False
        self.flushed: int | None = None

    @classmethod
    def of(cls, array, factor, data_type: int):
        """The lazy product, or None when the compiled loop does not apply (other types, a
        factor varying along several axes or enlarging the result, an empty weight)."""
        target = numpy_type(data_type)
        axis = _single_scaled_axis(np.shape(array), np.shape(factor))
        if not (
            axis is not None
            and target in (np.float32, np.float64)
            and isinstance(array, np.ndarray)
            and array.dtype == target
            and array.flags.c_contiguous
            and array.size
        ):
            return None
        per_channel = np.ascontiguousarray(
            np.broadcast_to(np.asarray(factor, dtype=np.float64), np.shape(factor)).reshape(-1)
        )
        if per_channel.size == 1:
            per_channel = np.full(array.shape[axis], per_channel[0])
        return cls(array, axis, per_channel)

    def reshape(self, shape) -> ScaledWeight:
        """The same product seen with another shape of as many elements (C order)."""
        if int(np.prod(shape, dtype=np.int64)) != self.weight.size:
            raise ValueError(f"cannot reshape {self.shape} to {tuple(shape)}")
        copy = object.__new__(ScaledWeight)
        copy.__dict__.update(self.__dict__)
        copy.shape = tuple(shape)
        return copy

    # Below this a parallel region costs more than it saves: waking the OpenMP team can take a
    # scheduler time slice when another thread (the input checker) holds the other core.
    PARALLEL_BYTES = 16 << 20

    def _n_threads(self) -> int:
        from bnfold._threads import effective_n_threads

        return effective_n_threads(None) if self.nbytes >= self.PARALLEL_BYTES else 1

    def to_bytes(self) -> bytes:
        from bnfold._fold_math import scale_channels_to_bytes

        product = scale_channels_to_bytes(
            self.weight.reshape(-1).view(np.uint8),
            self.rows // self.channels,
            self.channels,
            self.inner,
            self.per_channel,
            self.dtype == np.float64,
            self._n_threads(),
        )
        if not self.flush:
            return product
        flushed, self.flushed = flush_subnormals(np.frombuffer(product, dtype=self.dtype))
        # A copy only when there was something to flush (the bytes object is immutable).
        return product if self.flushed == 0 else flushed.tobytes()

    def count_subnormals(self) -> int:
        """How many subnormals the product holds (what ``flush`` removes), computed a chunk at a
        time and dropped: for a report on a product that is never written (``inspect``)."""
        counter = _SubnormalCounter(self.dtype)
        self._compute_chunks(counter)
        return counter.count

    def write_to(self, file) -> None:
        """Compute the product a chunk at a time and ``file.write`` each chunk; every chunk is a
        new buffer, so ``file`` may keep it and write it later (bnfold's writer does). With
        ``flush``, each chunk's subnormals are flushed before it is handed over, and counted."""
        flushed = self._compute_chunks(file, self.flush)
        if self.flush:
            self.flushed = flushed

    def _compute_chunks(self, file, flush: bool = False) -> int:
        """``write_to``'s loop; returns the number of subnormals flushed (0 without ``flush``)."""
        from bnfold._fold_math import scale_rows_into

        source = self.weight.reshape(-1).view(np.uint8)
        row_bytes = self.inner * self.dtype.itemsize
        rows_per_chunk = max(1, self.CHUNK_BYTES // row_bytes)
        flushed = 0
        for first in range(0, self.rows, rows_per_chunk):
            n = min(rows_per_chunk, self.rows - first) * row_bytes
            chunk = np.empty(n, dtype=np.uint8)
            # One thread: a 1 MiB chunk is ~0.1 ms of work, less than a parallel region costs
            # when another thread (the writer, the input checker) holds the second core.
            scale_rows_into(
                source[first * row_bytes : first * row_bytes + n],
                chunk,
                first,
                self.channels,
                self.inner,
                self.per_channel,
                self.dtype == np.float64,
                1,
            )
            if flush:
                flushed += flush_subnormals(chunk.view(self.dtype), in_place=True)[1]
            file.write(chunk)
        return flushed


class _SubnormalCounter:
    """A ``file`` for ``ScaledWeight._compute_chunks`` that only counts the subnormals it is given."""

    def __init__(self, dtype) -> None:
        self.dtype = dtype
        self.count = 0

    def write(self, chunk: np.ndarray) -> None:
        self.count += count_subnormals(chunk.view(self.dtype))


def _single_scaled_axis(shape, factor_shape):
    """The axis along which ``factor`` (broadcast against ``shape``) varies, if it varies along
    at most one axis and does not enlarge the result; None otherwise."""
    if len(factor_shape) > len(shape):
        return None
    padded = (1,) * (len(shape) - len(factor_shape)) + tuple(factor_shape)
    varying = [k for k, n in enumerate(padded) if n != 1]
    if len(varying) > 1 or any(padded[k] != shape[k] for k in varying) or not shape:
        return None
    return varying[0] if varying else 0


def _bytes_behind(array: np.ndarray):
    """The bytes object ``array`` views in full (as made by scale_in_float64), else None."""
    root = array
    while isinstance(root, np.ndarray) and root.base is not None:
        root = root.base
    if (
        isinstance(root, bytes)
        and array.flags.c_contiguous
        and array.nbytes == len(root)
        and array.__array_interface__["data"][0] == np.frombuffer(root, np.uint8).__array_interface__["data"][0]
    ):
        return root
    return None


def write_tensor(tensor: TensorProto, array: np.ndarray, data_type: int, name: str, payloads=None) -> int | None:
    """Overwrite ``tensor`` (e.g. an initializer in place) with ``array``: float64 values are cast
    once to ``data_type``, arrays already of that type are written as they are. The doc string is
    kept. Writes raw bytes directly: no intermediate proto copy. With ``payloads`` (a
    ``bnfold.io.payloads.TensorPayloads``) a big result stays there, not in the proto.

    Returns how many subnormals the written values hold (``count_subnormals``; none are flushed
    here), or None for a ``ScaledWeight`` left to be computed when written."""
    if isinstance(array, ScaledWeight) and (payloads is None or sys.byteorder != "little"):
        array = np.frombuffer(array.to_bytes(), dtype=array.dtype).reshape(array.shape)
    doc = tensor.doc_string
    if payloads is not None:
        payloads.release(tensor)
    if isinstance(array, ScaledWeight):  # computed when written
        data, shape, nbytes = array, array.shape, array.nbytes
    else:
        target = numpy_type(data_type)
        typed = np.ascontiguousarray(
            array if np.asarray(array).dtype == target else np.asarray(array, dtype=np.float64).astype(target)
        )
        raw = _bytes_behind(typed)
        data, shape, nbytes = (raw if raw is not None else typed.reshape(-1).view(np.uint8)), typed.shape, typed.nbytes
    if sys.byteorder != "little":  # ONNX raw_data is little-endian; let onnx handle the swap
        tensor.CopyFrom(numpy_helper.from_array(typed, name))
    else:
        tensor.Clear()
        tensor.name = name
        tensor.data_type = data_type
        tensor.dims.extend(shape)
        if payloads is not None and (isinstance(data, ScaledWeight) or nbytes >= payloads.threshold):
            payloads.put(tensor, data)
        else:
            tensor.raw_data = bytes(data)
    if doc:
        tensor.doc_string = doc
    return None if isinstance(data, ScaledWeight) else count_subnormals(typed)


def read_tensor(tensor: TensorProto, payloads=None) -> np.ndarray:
    """numpy value of a TensorProto; float raw data is viewed, not copied (read-only result).
    Tensors whose data ``payloads`` holds are read from there."""
    if payloads is not None and payloads.holds(tensor):
        return payloads.array(tensor)
    if (
        sys.byteorder == "little"
        and tensor.data_type in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16)
        and tensor.HasField("raw_data")
        and tensor.data_location != TensorProto.EXTERNAL
    ):
        return np.frombuffer(tensor.raw_data, dtype=FLOAT_TYPES[tensor.data_type]).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


def constant_node_value(node: onnx.NodeProto):
    """Value of a Constant node as a numpy array, or None for sparse/string values."""
    for attr in node.attribute:
        if attr.name == "value" and attr.type == AttributeProto.TENSOR:
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def constant_node_type(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.name == "value" and attr.type == AttributeProto.TENSOR:
            return attr.t.data_type
        if attr.name in ("value_float", "value_floats"):
            return TensorProto.FLOAT
        if attr.name in ("value_int", "value_ints"):
            return TensorProto.INT64
    return None
