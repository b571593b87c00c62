"""Proof and measurement: onnxruntime sessions, parity of two models (outputs and intermediate
values) and latency benchmarks."""
