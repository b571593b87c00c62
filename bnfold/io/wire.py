"""Just enough of the protobuf wire format to move ONNX tensor payloads around without protobuf.

Python's protobuf copies every ``bytes`` field on the way in and on the way out. For a 100 MB
model that means several 100 MB copies, each paying for fresh pages. ``bnfold.io.payloads`` uses
these helpers to find the big ``raw_data`` payloads inside a serialized ModelProto (so they can
stay in the memory-mapped file) and to build the small rest that protobuf parses;
``bnfold.io.stream`` uses them to write a model back field by field. Field numbers are those of onnx.proto.
"""

from __future__ import annotations

# Wire types (https://protobuf.dev/programming-guides/encoding/).
VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5

# onnx.proto field numbers used here.
MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
GRAPH_SPARSE_INITIALIZER = 15
TENSOR_DIMS = 1
TENSOR_DATA_TYPE = 2
TENSOR_SEGMENT = 3
TENSOR_NAME = 8
TENSOR_RAW_DATA = 9
# float_data, int32_data, string_data, int64_data, double_data, uint64_data
TENSOR_TYPED_DATA = (4, 5, 6, 7, 10, 11)
TENSOR_EXTERNAL_DATA = 13
TENSOR_DATA_LOCATION = 14
STRING_ENTRY_KEY = 1
STRING_ENTRY_VALUE = 2


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message (or use a feature this reader skips)."""


def encode_varint(n: int) -> bytes:
    if n < 0:
        raise ValueError("negative varint")
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    return encode_varint(field << 3 | wire_type)


def length_delimited(field: int, payload_length: int) -> bytes:
    """Key and length prefix of a length-delimited field whose payload follows."""
    return key(field, LENGTH_DELIMITED) + encode_varint(payload_length)


def read_varint(buf, pos: int, end: int):
    """``(value, next position)`` of the varint at ``pos``; ``buf`` indexes to ints."""
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def fields(buf, start: int, end: int):
    """Yield ``(field, wire_type, field_start, value_start, value_end, varint_value)`` for every
    field of the message in ``buf[start:end]``. For varints ``varint_value`` is the value; for
    length-delimited fields ``value_start:value_end`` is the payload. Groups (wire types 3/4,
    unused by ONNX) raise WireError."""
    pos = start
    while pos < end:
        field_start = pos
        tag, pos = read_varint(buf, pos, end)
        field, wire_type = tag >> 3, tag & 7
        if field == 0:
            raise WireError("field number 0")
        if wire_type == VARINT:
            value, pos = read_varint(buf, pos, end)
            yield field, wire_type, field_start, field_start, pos, value
            continue
        if wire_type == LENGTH_DELIMITED:
            length, value_start = read_varint(buf, pos, end)
            pos = value_start + length
        elif wire_type == FIXED64:
            value_start, pos = pos, pos + 8
        elif wire_type == FIXED32:
            value_start, pos = pos, pos + 4
        else:
            raise WireError(f"unsupported wire type {wire_type}")
        if pos > end:
            raise WireError("field runs past the end of its message")
        yield field, wire_type, field_start, value_start, pos, None
