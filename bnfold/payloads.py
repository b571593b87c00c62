"""Big tensor payloads kept outside the ModelProto they belong to.

Python's protobuf copies a ``bytes`` field whenever it is set or read, and on this kind of model
(100 MB of weights) each copy into fresh memory costs tens of milliseconds. ``bnfold fold``
therefore leaves the big ``raw_data`` payloads where they are — in the memory-mapped input file —
and lets protobuf parse only the small rest of the model (``split_serialized_model``). The fold
math reads weights as read-only numpy views of the file, stores the new weights it computes here
(no copy into the proto), and the streaming writer in ``bnfold.model_io`` writes every payload
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
from onnx import TensorProto, helper, numpy_helper

from bnfold import proto_wire as wire

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
        such as ``bnfold.graph.ScaledWeight``."""
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

    Returns None when the model is better parsed whole: it keeps tensors in external data files,
    its graph field is repeated (protobuf would merge them), or the machine is big-endian.
    Raises ``proto_wire.WireError`` for bytes that are not a protobuf message.
    """
    if sys.byteorder != "little":
        return None
    end = len(buf)
    graphs = [f for f in wire.fields(buf, 0, end) if f[0] == wire.MODEL_GRAPH]
    if len(graphs) != 1 or graphs[0][1] != wire.LENGTH_DELIMITED:
        return None
    _, _, graph_field_start, graph_start, graph_end, _ = graphs[0]
    view = memoryview(buf)
    graph_pieces = []
    copied_up_to = graph_start
    for field, wire_type, field_start, start, stop, _ in wire.fields(buf, graph_start, graph_end):
        if field != wire.GRAPH_INITIALIZER or wire_type != wire.LENGTH_DELIMITED:
            continue
        raw_fields, typed_data = [], False
        for t_field, _, t_field_start, t_start, t_stop, t_value in wire.fields(buf, start, stop):
            if t_field == wire.TENSOR_RAW_DATA:
                raw_fields.append((t_field_start, t_start, t_stop))
            elif t_field == wire.TENSOR_EXTERNAL_DATA or (t_field == wire.TENSOR_DATA_LOCATION and t_value):
                return None
            elif t_field in wire.TENSOR_TYPED_DATA:
                typed_data = True
        if len(raw_fields) != 1 or typed_data or raw_fields[0][2] - raw_fields[0][1] < payloads.threshold:
            # (raw_data next to a typed data field is invalid: left in the proto for the checker)
            continue
        raw_field_start, raw_start, raw_stop = raw_fields[0]
        tensor = TensorProto()
        tensor.ParseFromString(bytes(view[start:raw_field_start]) + bytes(view[raw_stop:stop]))
        if _expected_nbytes(tensor) != raw_stop - raw_start:
            continue  # malformed or packed: left in the proto, where it gets the usual treatment
        payloads.put(tensor, view[raw_start:raw_stop])
        rest = tensor.SerializeToString()
        graph_pieces.append(view[copied_up_to:field_start])
        graph_pieces.append(wire.length_delimited(wire.GRAPH_INITIALIZER, len(rest)) + rest)
        copied_up_to = stop
    graph_pieces.append(view[copied_up_to:graph_end])
    graph_bytes = b"".join(graph_pieces)
    return b"".join((view[:graph_field_start], wire.length_delimited(wire.MODEL_GRAPH, len(graph_bytes)),
                     graph_bytes, view[graph_end:]))


_ITEM_SIZES = {
    TensorProto.FLOAT: 4, TensorProto.DOUBLE: 8, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2,
    TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.INT16: 2, TensorProto.UINT16: 2,
    TensorProto.INT32: 4, TensorProto.UINT32: 4, TensorProto.INT64: 8, TensorProto.UINT64: 8,
    TensorProto.BOOL: 1,
}


def _expected_nbytes(tensor: TensorProto):
    """Payload size the tensor's dims and element type call for; None for types not kept here."""
    size = _ITEM_SIZES.get(tensor.data_type)
    if size is None:
        return None
    for d in tensor.dims:
        size *= d
    return size


def map_file(path):
    """``(file, mmap)`` of a file for reading, or None where it cannot be mapped (empty files,
    special files)."""
    file = open(path, "rb")
    try:
        if os.fstat(file.fileno()).st_size == 0:
            raise ValueError
        return file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except (ValueError, OSError):
        file.close()
        return None
