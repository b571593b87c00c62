"""Files in and out: ONNX loading and validation, tensor payloads and the protobuf wire format,
output-path safety, atomic saving (external data included) through hidden locked temporaries, streaming
writes, atomic JSON."""

# What other stages use (they import from the package, never from its modules).
from bnfold.io.load import (
    PROTOBUF_LIMIT,
    file_uses_external_data,
    fits_in_one_message,
    load_model,
    load_model_deferred,
    read_as_ir4_if_initializers_unlisted,
)
from bnfold.io.paths import check_output_path, check_outputs, files_size
from bnfold.io.save import save_model_atomic, write_json_atomic
from bnfold.io.temporaries import scratch_directory

__all__ = [
    "PROTOBUF_LIMIT",
    "check_output_path",
    "check_outputs",
    "file_uses_external_data",
    "files_size",
    "fits_in_one_message",
    "load_model",
    "load_model_deferred",
    "read_as_ir4_if_initializers_unlisted",
    "save_model_atomic",
    "scratch_directory",
    "write_json_atomic",
]
