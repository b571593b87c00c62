"""Big tensor payloads kept outside the ModelProto they belong to.

Python's protobuf copies a ``bytes`` field whenever it is set or read, and on this kind of model
(100 MB of weights) each copy into fresh memory costs tens of milliseconds. ``bnfold fold``
therefore leaves the big ``raw_data`` payloads where they are — in the memory-mapped input file —
and lets protobuf parse only the small rest of the model (``split_serialized_model``). The fold
math reads weights as read-only numpy views of the file, stores the new weights it computes here
(no copy into the proto), and the streaming writer in ``bnfold.io.stream`` writes every payload
from here straight to the output.

A tensor whose payload lives in a ``TensorPayloads`` carries, in the proto, ``data_location =
EXTERNAL`` and an external-data ``location`` naming this store (``bnfold-payload-<id>``), so any
code that forgets the store fails loudly (no such external file) instead of reading empty data.
``materialize`` puts every payload back into the proto when a complete ModelProto is needed.
"""

from __future__ import annotations

import mmap
import os
import sys
import uuid

import numpy as np
from onnx import SparseTensorProto, TensorProto, helper, numpy_helper

from bnfold.io import wire

# Payloads at least this big stay out of the proto; smaller ones are not worth the bookkeeping.
DEFER_THRESHOLD = 1 << 16

# The payload's key rides in the external-data "offset" entry (a key onnx knows, so nothing warns).
_KEY_ENTRY = "offset"


class TensorPayloads:
    """Payload bytes of some tensors, by key; see the module docstring for the proto marker."""

    def __init__(self, source=None, threshold=None):
        self.marker = f"bnfold-payload-{uuid.uuid4().hex}"
        # payloads smaller than this stay in the proto
        self.threshold = DEFER_THRESHOLD if threshold is None else threshold
        self._buffers: dict[str, object] = {}
        self._next_key = 0
        self._source = source  # (file, mmap) behind the views, closed by close()

    # ----- lookup ----------------------------------------------------------------------------
    def _key(self, tensor: TensorProto):
        if tensor.data_location != TensorProto.EXTERNAL:
            return None
        entries = {e.key: e.value for e in tensor.external_data}
        if entries.get("location") != self.marker:
            return None
        return entries.get(_KEY_ENTRY)

    def holds(self, tensor: TensorProto) -> bool:
        return self._key(tensor) in self._buffers

    def buffer(self, tensor: TensorProto):
        """The payload (bytes-like, no copy) of a tensor this store holds; a payload computed on
        demand is computed now, once."""
        key = self._key(tensor)
        payload = self._buffers[key]
        if hasattr(payload, "to_bytes"):
            payload = self._buffers[key] = payload.to_bytes()
        return payload

    def deferred(self, tensor: TensorProto):
        """The payload of a held tensor that is still to be computed on demand (an object with
        ``to_bytes()`` and ``write_to(file)``, see ``put``), without computing it; None for a
        payload that is plain bytes, or a tensor this store does not hold. The fold pass marks
        such a product final through it (its subnormals flushed as it is written)."""
        payload = self._buffers.get(self._key(tensor))
        return payload if hasattr(payload, "write_to") else None

    def nbytes(self, tensor: TensorProto) -> int:
        payload = self._buffers[self._key(tensor)]
        return payload.nbytes if hasattr(payload, "to_bytes") else memoryview(payload).nbytes

    def write(self, tensor: TensorProto, file) -> None:
        """Write the payload of a held tensor to ``file`` (computed ones chunk by chunk)."""
        payload = self._buffers[self._key(tensor)]
        if hasattr(payload, "write_to"):
            payload.write_to(file)
        else:
            file.write(payload)

    def total_bytes(self, tensors) -> int:
        return sum(self.nbytes(t) for t in tensors if self.holds(t))

    def array(self, tensor: TensorProto) -> np.ndarray:
        """numpy value of a tensor this store holds: a read-only view for float32/64/16, a
        decoded copy for other element types."""
        dims = tuple(tensor.dims)
        if tensor.data_type in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
            dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
            return np.frombuffer(self.buffer(tensor), dtype=dtype).reshape(dims)
        return numpy_helper.to_array(self.tensor_with_payload(tensor))

    def tensor_without_payload(self, tensor: TensorProto) -> TensorProto:
        """A copy of ``tensor`` without the store's marker and without data (small)."""
        copy = TensorProto()
        copy.CopyFrom(tensor)
        copy.ClearField("external_data")
        copy.ClearField("data_location")
        return copy

    def tensor_with_payload(self, tensor: TensorProto) -> TensorProto:
        copy = self.tensor_without_payload(tensor)
        copy.raw_data = bytes(self.buffer(tensor))
        return copy

    # ----- edits -----------------------------------------------------------------------------
    def put(self, tensor: TensorProto, payload) -> None:
        """Make ``payload`` the raw data of ``tensor``, whose name, type and dims the caller has
        set. ``payload``: a bytes-like object (the store keeps a reference, not a copy), or one
        computed on demand — an object with ``nbytes``, ``to_bytes()`` and ``write_to(file)``
        such as ``bnfold.folding.tensors.ScaledWeight``."""
        self.release(tensor)
        key = self._mark(tensor)
        self._buffers[key] = payload

    def release(self, tensor: TensorProto) -> None:
        """Forget the payload of ``tensor`` (before it is overwritten or deleted)."""
        self._buffers.pop(self._key(tensor), None)

    def _mark(self, tensor: TensorProto) -> str:
        key = str(self._next_key)
        self._next_key += 1
        tensor.ClearField("raw_data")
        tensor.ClearField("external_data")
        tensor.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.marker), (_KEY_ENTRY, key)):
            entry = tensor.external_data.add()
            entry.key, entry.value = k, v
        return key

    def materialize(self, tensors) -> None:
        """Put the payload of every held tensor among ``tensors`` back into its ``raw_data`` (the
        store keeps its own reference: other copies of the model may still point here)."""
        for tensor in tensors:
            if self.holds(tensor):
                payload = self.buffer(tensor)
                tensor.ClearField("external_data")
                tensor.ClearField("data_location")
                tensor.raw_data = bytes(payload)

    def close(self) -> None:
        """Drop every payload and unmap the source file (views still alive keep it mapped)."""
        self._buffers.clear()
        if self._source is not None:
            file, mapping = self._source
            self._source = None
            try:
                mapping.close()
            except BufferError:  # a numpy view still refers to it: the GC unmaps it later
                pass
            file.close()


def split_serialized_model(buf, payloads: TensorPayloads):
    """Serialized ModelProto ``buf`` (bytes-like, e.g. an mmap) -> the bytes of the same model
    with every main-graph initializer's ``raw_data`` of at least ``payloads.threshold`` bytes
    left out and kept in ``payloads`` as a zero-copy view of ``buf``.

    The checker sees a kept-apart initializer only as a graph input of its type and shape (see
    ``bnfold.io.load``), so only tensors that pass every check it would make of them are kept
    apart (``_fit_to_keep_apart``); any other tensor stays in the proto, where the checker and
    the fold treat it as in a model loaded whole.

    Returns None when the model is better parsed whole: it keeps tensors in external data files,
    its graph field is repeated (protobuf would merge them), a kept-apart initializer shares its
    name with another one (the checker must see the clash), or the machine is big-endian.
    Raises ``proto_wire.WireError`` for bytes that are not a protobuf message, and protobuf's
    DecodeError for a tensor header it cannot parse.
    """
    if sys.byteorder != "little":
        return None
    end = len(buf)
    graphs = [f for f in wire.fields(buf, 0, end) if f[0] == wire.MODEL_GRAPH]
    if len(graphs) != 1 or graphs[0][1] != wire.LENGTH_DELIMITED:
        return None
    _, _, graph_field_start, graph_start, graph_end, _ = graphs[0]
    view = memoryview(buf)
    apart = []  # (initializer field start, its end, header without raw_data, payload view)
    names_left = []  # names of the initializers left in the proto, as bytes
    sparse_ranges = []
    for field, wire_type, field_start, start, stop, _ in wire.fields(buf, graph_start, graph_end):
        if wire_type != wire.LENGTH_DELIMITED:
            continue  # protobuf keeps such a field as an unknown one: nothing to look at
        if field == wire.GRAPH_SPARSE_INITIALIZER:
            sparse_ranges.append((start, stop))
            continue
        if field != wire.GRAPH_INITIALIZER:
            continue
        layout = _TensorLayout(buf, start, stop)
        if layout.external:
            return None
        if not layout.raw_data_alone or layout.raw_stop - layout.raw_start < payloads.threshold:
            names_left.append(layout.name)
            continue
        header = TensorProto()
        header.ParseFromString(bytes(view[start : layout.raw_field_start]) + bytes(view[layout.raw_stop : stop]))
        if not _fit_to_keep_apart(header, layout.raw_stop - layout.raw_start):
            names_left.append(layout.name)
            continue
        apart.append((field_start, stop, header, view[layout.raw_start : layout.raw_stop]))
    if apart and _names_clash([header.name.encode() for _, _, header, _ in apart], names_left, buf, sparse_ranges):
        return None
    graph_pieces = []
    copied_up_to = graph_start
    for field_start, stop, header, payload in apart:
        payloads.put(header, payload)
        rest = header.SerializeToString()
        graph_pieces.append(view[copied_up_to:field_start])
        graph_pieces.append(wire.length_delimited(wire.GRAPH_INITIALIZER, len(rest)) + rest)
        copied_up_to = stop
    graph_pieces.append(view[copied_up_to:graph_end])
    graph_bytes = b"".join(graph_pieces)
    return b"".join(
        (
            view[:graph_field_start],
            wire.length_delimited(wire.MODEL_GRAPH, len(graph_bytes)),
            graph_bytes,
            view[graph_end:],
        )
    )


class _TensorLayout:
    """Where the fields of one serialized TensorProto are, as far as the split needs to know.

    Read with the rules protobuf applies: a field with the wrong wire type is an unknown field,
    and of a repeated singular field (``name``) the last one counts. Field kinds the split does
    not keep apart (typed data, a segment, a data_location, a raw_data of the wrong wire type)
    only clear ``raw_data_alone``."""

    def __init__(self, buf, start: int, stop: int):
        self.name = b""
        self.external = False
        self.raw_data_alone = True
        raw_fields = []
        for field, wire_type, field_start, value_start, value_stop, value in wire.fields(buf, start, stop):
            if field == wire.TENSOR_RAW_DATA and wire_type == wire.LENGTH_DELIMITED:
                raw_fields.append((field_start, value_start, value_stop))
            elif field == wire.TENSOR_NAME and wire_type == wire.LENGTH_DELIMITED:
                self.name = bytes(buf[value_start:value_stop])
            elif field == wire.TENSOR_EXTERNAL_DATA or (
                field == wire.TENSOR_DATA_LOCATION and wire_type == wire.VARINT and value
            ):
                self.external = True  # the whole-file loader resolves (or refuses) external data
            elif field in _NOT_KEPT_APART_WITH:
                self.raw_data_alone = False
        if len(raw_fields) != 1:
            self.raw_data_alone = False
            raw_fields = raw_fields or [(stop, stop, stop)]
        self.raw_field_start, self.raw_start, self.raw_stop = raw_fields[-1]


# A tensor with one of these fields stays in the proto: raw_data plus a typed data field is
# invalid (the checker must see both), numpy_helper refuses a segment, and an explicit
# data_location (even DEFAULT) would not survive being marked and unmarked as kept apart.
_NOT_KEPT_APART_WITH = frozenset(wire.TENSOR_TYPED_DATA) | {
    wire.TENSOR_RAW_DATA,
    wire.TENSOR_SEGMENT,
    wire.TENSOR_DATA_LOCATION,
}


def _fit_to_keep_apart(header: TensorProto, payload_nbytes: int) -> bool:
    """Whether a tensor whose only data is a raw_data of ``payload_nbytes`` passes every check
    onnx.checker makes of an initializer's own fields (``check_tensor``, and ``check_graph``'s
    non-empty name; unique names are ``_names_clash``'s part): a known element type that may be
    stored raw, dims that are all >= 0 and whose product, times the item size, is exactly the
    payload size (the checker accepts a longer payload, which no reader of the tensor does).
    With non-negative dims an exact match also rules out the product overflowing int64."""
    if not header.name or not header.HasField("data_type"):
        return False
    if any(d < 0 for d in header.dims):
        return False
    return expected_payload_nbytes(header) == payload_nbytes


def _names_clash(names_apart, names_left, buf, sparse_ranges) -> bool:
    """Whether a kept-apart initializer's name is also the name of another initializer or of a
    sparse initializer: the checker refuses such a model, but it would see the kept-apart one as
    a graph input, which may share a name with an initializer."""
    seen = set(names_left)
    for name in names_apart:
        if name in seen:
            return True
        seen.add(name)
    for start, stop in sparse_ranges:
        sparse = SparseTensorProto()
        sparse.ParseFromString(bytes(buf[start:stop]))
        if sparse.values.name.encode() in names_apart:
            return True
    return False


_ITEM_SIZES = {
    TensorProto.FLOAT: 4,
    TensorProto.DOUBLE: 8,
    TensorProto.FLOAT16: 2,
    TensorProto.BFLOAT16: 2,
    TensorProto.INT8: 1,
    TensorProto.UINT8: 1,
    TensorProto.INT16: 2,
    TensorProto.UINT16: 2,
    TensorProto.INT32: 4,
    TensorProto.UINT32: 4,
    TensorProto.INT64: 8,
    TensorProto.UINT64: 8,
    TensorProto.BOOL: 1,
}


def expected_payload_nbytes(tensor: TensorProto):
    """Payload size the tensor's dims and element type call for; None for types not kept here
    and for negative dims (no payload fits them)."""
    size = _ITEM_SIZES.get(tensor.data_type)
    if size is None or any(d < 0 for d in tensor.dims):
        return None
    for d in tensor.dims:
        size *= d
    return size


def map_file(path):
    """``(file, mmap)`` of a file for reading, or None where it cannot be mapped (empty files,
    special files)."""
    file = open(path, "rb")  # noqa: SIM115 - returned open, with the map that reads it
    try:
        if os.fstat(file.fileno()).st_size == 0:
            raise ValueError
        return file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except (ValueError, OSError):
        file.close()
        return None
