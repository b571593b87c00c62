"""Writing a model to a file without serializing it in one piece: the big payloads go to the file
as they are (from the proto, or from a ``TensorPayloads``), protobuf encodes only the small rest
of each message around them, and a background thread writes while the next piece is computed.
"""

from __future__ import annotations

import threading

import onnx

from bnfold.io import wire

_STREAM_THRESHOLD = 1 << 16


def write_model_streaming(model: onnx.ModelProto, path, payloads=None) -> None:
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
    sizes = [
        len(head) + len(tail) + (0 if n is None else len(wire.length_delimited(wire.TENSOR_RAW_DATA, n)) + n)
        for _, head, tail, n in pieces
    ]
    graph_len = (
        len(graph_head)
        + len(graph_tail)
        + sum(len(wire.length_delimited(wire.GRAPH_INITIALIZER, n)) + n for n in sizes)
    )
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
