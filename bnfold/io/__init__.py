"""Files in and out: ONNX loading and validation, tensor payloads and the protobuf wire format,
output-path safety, atomic saving (external data included), streaming writes, atomic JSON."""
