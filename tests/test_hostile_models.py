"""Hostile models (issue 11): malformed big initializers on the memory-mapped path, a seeded fuzz
of that path against the whole-file loader, and fold math on NaN / Inf / near-limit constants.

* A big (>= 64 KiB, kept apart by ``bnfold.io.payloads``) initializer is refused exactly as the
  same initializer small (left in the proto, seen by the checker) is: exit 2, one line.
* ``test_split_path_fuzz``: mutated copies of models with big initializers (byte flips,
  truncations, varint tweaks and field edits in the tensor headers) load through
  ``load_model_deferred`` + its ``wait_for_check`` to the model ``onnx.load`` reads, or raise
  InputError; never another exception, never a hang, never accepted where the whole-file loader
  (``onnx.checker`` on the file's bytes) refuses.
* Fold math never warns (numpy RuntimeWarning) on NaN / Inf / near-limit constants: it folds
  with them carried over as IEEE arithmetic carries them, or refuses with a reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import BnfoldWarning, InputError
from bnfold.folding.fold_pass import fold, fold_file
from bnfold.io import load_model, load_model_deferred, wire
from bnfold.io.payloads import DEFER_THRESHOLD


def _run_cli(*argv, warnings_as_errors=False):
    flags = ["-W", "error::RuntimeWarning"] if warnings_as_errors else []
    return subprocess.run([sys.executable, *flags, "-m", "bnfold", *argv], capture_output=True, text=True, timeout=120)


# ----- negative dims on the memory-mapped path ------------------------------------------------


def _conv_bn_model(cout, cin, weight_dims=None):
    """Conv -> BN; ``weight_dims`` replaces the weight's dims (its payload stays as it was)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((cout, cin, 3, 3)).astype(np.float32), "w")
    if weight_dims is not None:
        del weight.dims[:]
        weight.dims.extend(weight_dims)
    inits = [weight] + [
        numpy_helper.from_array(rng.uniform(0.5, 2, cout).astype(np.float32), name)
        for name in ("gamma", "beta", "mean", "var")
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, 8, 8])],
        inits,
    )
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 15)])


@pytest.mark.parametrize("cout,cin", [(256, 64), (8, 4)], ids=["big", "small"])
def test_negative_dims_matching_the_payload_are_refused_in_one_line(cout, cin, tmp_path):
    """dims [-256, -64, 3, 3] multiply to the payload's element count; the checker refuses them
    whether the payload is kept apart (big) or parsed with the proto (small)."""
    model = _conv_bn_model(cout, cin, weight_dims=[-cout, -cin, 3, 3])
    assert (cout * cin * 9 * 4 >= DEFER_THRESHOLD) == (cout == 256)
    src = tmp_path / "m.onnx"
    onnx.save_model(model, str(src))
    before = src.read_bytes()
    out = tmp_path / "o.onnx"
    proc = _run_cli("fold", str(src), "-o", str(out), "--no-check")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid ONNX model" in lines[0] and "Negative dimension" in lines[0], proc.stderr
    assert not out.exists() and src.read_bytes() == before
    with pytest.raises(InputError, match="Negative dimension"):
        fold_file(str(src), str(out))


# ----- fuzz of the split path -----------------------------------------------------------------

FUZZ_SECONDS = 15.0
FUZZ_MAX_CASES = 4000
HANG_SECONDS = 30.0


def _fuzz_base_models():
    """Two valid models whose main graph holds initializers above the payload threshold next to
    small ones: Conv -> BN (a float32 weight of 144 KiB), and Gemm with a float32 B of 80 KiB, an
    unused int64 tensor and a float16 tensor of 64+ KiB, and a sparse initializer whose name a
    mutation may copy."""
    conv = _conv_bn_model(64, 64)
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((128, 160)).astype(np.float32), "B"),
        numpy_helper.from_array(rng.standard_normal(160).astype(np.float32), "C"),
        numpy_helper.from_array(np.arange(8200, dtype=np.int64), "ids"),
        numpy_helper.from_array(rng.standard_normal(33000).astype(np.float16), "half"),
    ]
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.ones(3, np.float32), "sparse"),
        numpy_helper.from_array(np.array([0, 5, 9], np.int64), "sparse_indices"),
        [10],
    )
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["a", "B", "C"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 160])],
        inits,
        sparse_initializer=[sparse],
    )
    gemm = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 13)])
    for model in (conv, gemm):
        onnx.checker.check_model(model)
    return [conv.SerializeToString(), gemm.SerializeToString()]


class _Layout:
    """Byte positions in a serialized model: the graph field, each initializer field, and the
    raw payloads (the bytes a header mutation should not waste itself on)."""

    def __init__(self, data: bytes):
        graph = next(f for f in wire.fields(data, 0, len(data)) if f[0] == wire.MODEL_GRAPH)
        self.graph_field_start, self.graph_start, self.graph_end = graph[2], graph[3], graph[4]
        self.initializers = []  # (field start, value start, value end)
        self.payloads = []  # (start, end), in file order
        for field, _, field_start, start, stop, _ in wire.fields(data, self.graph_start, self.graph_end):
            if field == wire.GRAPH_INITIALIZER:
                self.initializers.append((field_start, start, stop))
                for t_field, _, _, t_start, t_stop, _ in wire.fields(data, start, stop):
                    if t_field == wire.TENSOR_RAW_DATA:
                        self.payloads.append((t_start, t_stop))

    def payloads_within(self, start, stop):
        return [(a - start, b - start) for a, b in self.payloads if start <= a < stop]


def _position_outside(rng, size: int, excluded) -> int:
    """A uniformly drawn position in ``range(size)`` outside the sorted, disjoint ``excluded`` ranges."""
    position = int(rng.integers(size - sum(b - a for a, b in excluded)))
    for a, b in excluded:
        if position < a:
            break
        position += b - a
    return position


def _initializer_field(tensor: bytes) -> bytes:
    return wire.length_delimited(wire.GRAPH_INITIALIZER, len(tensor)) + tensor


def _reframe(data: bytes, layout: _Layout, index: int, *new_tensors: bytes) -> bytes:
    """``data`` with initializer ``index`` replaced by ``new_tensors`` (none: removed; two: a
    copy added) and the graph's length prefix fixed, so that the mutation is seen as an edit of
    the initializers, not as broken framing."""
    field_start, _, stop = layout.initializers[index]
    graph = (
        data[layout.graph_start : field_start]
        + b"".join(_initializer_field(t) for t in new_tensors)
        + data[stop : layout.graph_end]
    )
    return (
        data[: layout.graph_field_start]
        + wire.length_delimited(wire.MODEL_GRAPH, len(graph))
        + graph
        + data[layout.graph_end :]
    )


def _varint_values(rng):
    return [
        0,
        1,
        2,
        7,
        127,
        128,
        2**31 - 1,
        2**32,
        2**63 - 1,
        2**64 - 1,
        int(rng.integers(0, 2**62)),
        (1 << 64) - int(rng.integers(1, 1000)),
    ]  # the last: a negative int64, as protobuf encodes it


_EXTERNAL_ENTRY = wire.length_delimited(1, 8) + b"location" + wire.length_delimited(2, 5) + b"x.bin"


def _tensor_field_edit(rng, tensor: bytes, names) -> bytes:
    """A TensorProto encoding with one varint re-encoded (a tag, a length — which breaks the
    tensor's own framing — or a value), its dims negated, or one field added."""
    try:
        fields = list(wire.fields(tensor, 0, len(tensor)))
    except wire.WireError:  # broken by an earlier edit: only additions at the start apply
        fields = []
    kind = rng.integers(0, 9)
    if kind <= 2 and fields:  # re-encode one varint (a tag, a length or a value) as another value
        _, wire_type, field_start, value_start, value_stop, _ = fields[rng.integers(len(fields))]
        values = _varint_values(rng)
        new_varint = wire.encode_varint(values[rng.integers(len(values))])
        _, after_tag = wire.read_varint(tensor, field_start, value_stop)
        if wire_type == wire.VARINT:  # its value
            start, stop = after_tag, value_stop
        elif wire_type == wire.LENGTH_DELIMITED and rng.random() < 0.5:  # its length
            start, stop = after_tag, value_start
        else:  # its tag
            start, stop = field_start, after_tag
        return tensor[:start] + new_varint + tensor[stop:]
    if kind == 3:  # negate one or all dims (10-byte varints), or make one dim 0
        dims = [i for i, f in enumerate(fields) if f[0] == wire.TENSOR_DIMS]
        if not dims:
            return tensor
        out = bytearray()
        pick = dims[rng.integers(len(dims))]
        for i, (field, wire_type, field_start, _value_start, value_stop, value) in enumerate(fields):
            if i in dims and wire_type == wire.VARINT and (i == pick or rng.random() < 0.5):
                replacement = 0 if rng.random() < 0.2 else (1 << 64) - value
                out += wire.key(field, wire_type) + wire.encode_varint(replacement % (1 << 64))
            else:
                out += tensor[field_start:value_stop]
        return bytes(out)
    # add a field at a random field boundary
    boundaries = [0] + [f[4] for f in fields]
    at = boundaries[rng.integers(len(boundaries))]
    additions = [
        wire.key(wire.TENSOR_DATA_TYPE, wire.VARINT) + wire.encode_varint(int(rng.integers(0, 26))),
        wire.length_delimited(4, 4) + np.float32(1.0).tobytes(),  # packed float_data
        wire.length_delimited(wire.TENSOR_RAW_DATA, 8) + bytes(8),  # a second raw_data
        wire.key(wire.TENSOR_DATA_LOCATION, wire.VARINT) + wire.encode_varint(int(rng.integers(0, 3))),
        wire.length_delimited(wire.TENSOR_SEGMENT, 4) + bytes([8, 0, 16, 1]),
        wire.length_delimited(wire.TENSOR_EXTERNAL_DATA, len(_EXTERNAL_ENTRY)) + _EXTERNAL_ENTRY,
        wire.length_delimited(wire.TENSOR_NAME, 0),
        wire.key(wire.TENSOR_DIMS, wire.VARINT) + wire.encode_varint(int(rng.integers(0, 3))),
        wire.key(900, wire.VARINT) + wire.encode_varint(5),  # unknown to this onnx
    ]
    name = names[rng.integers(len(names))].encode()
    additions.append(wire.length_delimited(wire.TENSOR_NAME, len(name)) + name)  # another tensor's name
    addition = additions[rng.integers(len(additions))]
    return tensor[:at] + addition + tensor[at:]


def _mutate(rng, data: bytes, layout: _Layout, names) -> bytes:
    kind = rng.integers(0, 11)
    if kind <= 2:  # flip bytes, nearly always outside the payloads
        out = bytearray(data)
        for _ in range(rng.integers(1, 4)):
            position = _position_outside(rng, len(data), layout.payloads if rng.random() < 0.9 else [])
            out[position] ^= 1 << int(rng.integers(0, 8))
        return bytes(out)
    if kind == 3:  # truncate
        return data[: int(rng.integers(0, len(data)))]
    index = int(rng.integers(len(layout.initializers)))
    _, start, stop = layout.initializers[index]
    tensor = data[start:stop]
    if kind == 5:  # an initializer removed, or written twice
        return _reframe(data, layout, index, *([tensor, tensor] if rng.random() < 0.7 else []))
    if kind == 4:  # a tensor header byte flipped, framing fixed
        flipped = bytearray(tensor)
        flipped[_position_outside(rng, len(tensor), layout.payloads_within(start, stop))] ^= 1 << int(rng.integers(8))
        return _reframe(data, layout, index, bytes(flipped))
    edited = _tensor_field_edit(rng, tensor, names)
    if rng.random() < 0.3:
        edited = _tensor_field_edit(rng, edited, names)
    if rng.random() < 0.8:
        return _reframe(data, layout, index, edited)
    return data[:start] + edited + data[stop:]  # framing left stale: the lengths around disagree


def _within(seconds, function):
    """``function()``'s result, or its exception re-raised; fails the test when it hangs."""
    outcome = {}

    def run():
        try:
            outcome["value"] = function()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            outcome["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"no answer within {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _load_deferred_and_check(path):
    model, payloads, wait_for_check = load_model_deferred(path)
    try:
        wait_for_check()
        complete = onnx.ModelProto()
        complete.CopyFrom(model)
        payloads.materialize(complete.graph.initializer)
        return complete, sum(payloads.holds(t) for t in model.graph.initializer)
    finally:
        payloads.close()


def _outcome(function):
    try:
        return function(), None
    except Exception as e:  # noqa: BLE001 - compared by the caller
        return None, e


def test_split_path_fuzz(tmp_path):
    """Seeded; bounded to FUZZ_SECONDS. The reference is what reads the file whole: onnx.load
    (the model), onnx.checker.check_model on the file's bytes and bnfold's whole-file loader
    (the verdict; it differs from the checker only for IR < 4 files it reads as IR 4)."""
    rng = np.random.default_rng(20240611)
    bases = [
        (data, _Layout(data), [t.name for t in onnx.load_model_from_string(data).graph.initializer] + ["sparse"])
        for data in _fuzz_base_models()
    ]
    path = str(tmp_path / "mutant.onnx")
    deadline = time.monotonic() + FUZZ_SECONDS
    tally = {"accepted": 0, "refused": 0, "kept_apart": 0}
    cases = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BnfoldWarning)  # IR 3 files read as IR 4 say so
        while cases < FUZZ_MAX_CASES and time.monotonic() < deadline:
            data, layout, names = bases[cases % len(bases)]
            mutant = _mutate(rng, data, layout, names)
            cases += 1
            with open(path, "wb") as f:
                f.write(mutant)
            label = f"case {cases} ({len(mutant)} bytes, left in {path})"
            whole, whole_error = _outcome(lambda: load_model(path))
            result, error = _outcome(lambda: _within(HANG_SECONDS, lambda: _load_deferred_and_check(path)))
            if error is not None and not isinstance(error, InputError):
                raise AssertionError(f"{label}: {type(error).__name__}: {error}") from error
            assert (error is None) == (whole_error is None), (
                f"{label}: deferred {'accepts' if error is None else 'refuses'} what the whole-file loader "
                f"{'refuses' if error is None else 'accepts'} ({error or whole_error})"
            )
            if error is not None:
                tally["refused"] += 1
                continue
            deferred_model, kept_apart = result
            tally["accepted"] += 1
            tally["kept_apart"] += kept_apart > 0
            assert deferred_model == whole, label
            parsed = onnx.load_model_from_string(mutant)
            if parsed.ir_version >= 4:
                assert deferred_model == parsed, label
                onnx.checker.check_model(mutant)  # accepted only what the checker accepts
    os.unlink(path)
    assert cases >= 200, f"only {cases} cases in {FUZZ_SECONDS} s"
    assert tally["accepted"] and tally["refused"] and tally["kept_apart"], tally


# ----- fold math on NaN / Inf / near-limit constants ------------------------------------------

BACKWARD_RULES = ("conv_bn", "convtranspose_bn", "gemm_bn", "matmul_bn")
FORWARD_RULES = ("bn_conv", "bn_gemm", "bn_matmul")
CORRUPTIONS = (
    "nan_weight",
    "inf_weight",
    "max_weight",
    "nan_bias",
    "inf_bias",
    "max_bias",
    "nan_var",
    "inf_gamma",
    "zero_gamma_inf_weight",
    "huge_gamma",
    "chain_inf",
    "chain_tiny_divisor",
)

_LAYERS = {  # rule -> (op, weight shape, axis of the weight the BN channels run along, input shape)
    "conv_bn": ("Conv", (6, 4, 3, 3), 0, (1, 4, 5, 5)),
    "convtranspose_bn": ("ConvTranspose", (4, 6, 3, 3), 1, (1, 4, 5, 5)),
    "gemm_bn": ("Gemm", (4, 6), 1, (2, 4)),
    "matmul_bn": ("MatMul", (4, 6), 1, (2, 4)),
    "bn_conv": ("Conv", (6, 4, 3, 3), 1, (1, 4, 5, 5)),
    "bn_gemm": ("Gemm", (4, 6), 0, (2, 4)),
    "bn_matmul": ("MatMul", (4, 6), 0, (2, 4)),
}


def hostile_model(rule: str, corruption: str, dtype=np.float32):
    """A layer and a BN that ``rule`` folds, with one hostile constant (``none``: none):

    * ``nan_weight`` / ``inf_weight`` / ``max_weight``: one weight element NaN, +Inf, or the
      type's largest finite value; ``nan_bias`` / ``inf_bias`` / ``max_bias``: the same for the
      layer's bias (MatMul has none: the model is then ordinary);
    * ``nan_var`` / ``inf_gamma``: BN statistics; ``zero_gamma_inf_weight``: a zero BN scale meets
      an infinite weight (0 * Inf); ``huge_gamma``: a finite BN scale that takes ordinary weights
      beyond the type's range;
    * ``chain_inf`` / ``chain_tiny_divisor`` (backward rules): a per-channel Mul by +Inf or a Div by
      1e-300 between the layer and the BN."""
    op, w_shape, bn_axis, x_shape = _LAYERS[rule]
    forward = rule in FORWARD_RULES
    np_type = np.dtype(dtype)
    element_type = helper.np_dtype_to_tensor_dtype(np_type)
    rng = np.random.default_rng(0)
    w = rng.uniform(-1, 1, w_shape)
    channels = w_shape[bn_axis]
    bias = rng.uniform(-1, 1, w_shape[1] if op in ("Gemm", "MatMul", "ConvTranspose") else w_shape[0])
    stats = {
        "gamma": rng.uniform(0.5, 2, channels),
        "beta": rng.uniform(-1, 1, channels),
        "mean": rng.uniform(-1, 1, channels),
        "var": rng.uniform(0.5, 2, channels),
    }
    largest = float(np.finfo(np_type).max)
    first = (0,) * len(w_shape)
    hostile = {
        "nan_weight": (w, first, np.nan),
        "inf_weight": (w, first, np.inf),
        "max_weight": (w, first, largest),
        "zero_gamma_inf_weight": (w, first, np.inf),
        "nan_bias": (bias, 0, np.nan),
        "inf_bias": (bias, 0, np.inf),
        "max_bias": (bias, 0, largest),
        "nan_var": (stats["var"], 0, np.nan),
        "inf_gamma": (stats["gamma"], 0, np.inf),
    }
    if corruption in hostile:
        array, where, value = hostile[corruption]
        array[where] = value
    if corruption == "zero_gamma_inf_weight":
        stats["gamma"][:] = 0.0
    if corruption == "huge_gamma":
        stats["gamma"][:] = largest
    inits = [numpy_helper.from_array(w.astype(np_type), "w"), numpy_helper.from_array(bias.astype(np_type), "b")]
    inits += [numpy_helper.from_array(v.astype(np_type), name) for name, v in stats.items()]
    layer = helper.make_node(
        op, ["bn_out" if forward else "x", "w"] + ([] if op == "MatMul" else ["b"]), ["y" if forward else "layer_out"]
    )
    nodes, bn_input = [layer], "x" if forward else "layer_out"
    if corruption.startswith("chain_"):
        chain_op, value = ("Mul", np.inf) if corruption == "chain_inf" else ("Div", 1e-300)
        constant = np.ones((1, channels, 1, 1) if op in ("Conv", "ConvTranspose") else (channels,))
        constant.reshape(-1)[0] = value
        inits.append(numpy_helper.from_array(constant.astype(np_type), "chain_constant"))
        nodes.append(helper.make_node(chain_op, ["layer_out", "chain_constant"], ["chain_out"]))
        bn_input = "chain_out"
    bn = helper.make_node(
        "BatchNormalization", [bn_input, "gamma", "beta", "mean", "var"], ["bn_out" if forward else "y"]
    )
    nodes = [bn, layer] if forward else nodes + [bn]
    graph = helper.make_graph(
        nodes,
        f"{rule}_{corruption}",
        [helper.make_tensor_value_info("x", element_type, x_shape)],
        [helper.make_tensor_value_info("y", element_type, [None] * len(x_shape))],
        inits,
    )
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 15)])


HOSTILE_CASES = [
    (rule, corruption, dtype)
    for rule in BACKWARD_RULES + FORWARD_RULES
    for corruption in CORRUPTIONS
    for dtype in (np.float32, np.float64, np.float16)
    if not (corruption.startswith("chain_") and rule in FORWARD_RULES)
]


@pytest.mark.parametrize(
    "rule,corruption,dtype", HOSTILE_CASES, ids=[f"{r}-{c}-{np.dtype(d).name}" for r, c, d in HOSTILE_CASES]
)
def test_fold_math_never_warns_on_hostile_constants(rule, corruption, dtype, tmp_path, monkeypatch):
    """In memory and through the memory-mapped path (every payload kept apart), no numpy
    warning, from any thread (recorded rather than raised, so that no ``except`` on the way can
    hide one): each BN folds or stays with a reason, and a fold never makes a finite bias
    element infinite or NaN."""
    import bnfold.io.payloads

    model = hostile_model(rule, corruption, dtype)
    onnx.checker.check_model(model, full_check=True)
    src = str(tmp_path / "in.onnx")
    onnx.save_model(model, src)
    monkeypatch.setattr(bnfold.io.payloads, "DEFER_THRESHOLD", 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded, report = fold(model)
        file_report = fold_file(src, str(tmp_path / "out.onnx"))
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    assert report.n_folded + report.n_remaining == 1
    assert file_report.to_dict() == report.to_dict()
    if report.n_remaining:
        assert report.remaining[0].message
        return
    onnx.checker.check_model(folded, full_check=True)
    bias_name = next(n for n in folded.graph.node if n.op_type != "BatchNormalization").input[2]
    new_bias = numpy_helper.to_array(next(t for t in folded.graph.initializer if t.name == bias_name))
    old_bias = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b"))
    if len(new_bias) == len(old_bias) and rule not in ("matmul_bn", "bn_matmul"):
        assert np.all(np.isfinite(new_bias) | ~np.isfinite(old_bias)), (new_bias, old_bias)
    else:
        assert np.all(np.isfinite(new_bias)), new_bias


@pytest.mark.parametrize(
    "rule,corruption,expected",
    [
        ("conv_bn", "nan_var", "invalid_statistics"),
        ("conv_bn", "chain_inf", "invalid_statistics"),  # Inf * conv output: no finite affine map
        ("bn_conv", "inf_weight", "would_overflow"),  # Inf * t summed into the bias
        ("bn_gemm", "nan_weight", "would_overflow"),
        ("gemm_bn", "max_bias", "would_overflow"),  # a finite float32 bias scaled past 3.4e38
        ("conv_bn", "inf_weight", "conv_bn"),  # Inf * finite scale: the same Inf, folded
        ("conv_bn", "nan_bias", "conv_bn"),
        ("conv_bn", "zero_gamma_inf_weight", "conv_bn"),  # NaN in both models
    ],
)
def test_hostile_constants_fold_or_stay_for_the_reason_given(rule, corruption, expected):
    _, report = fold(hostile_model(rule, corruption))
    outcome = report.remaining[0].reason if report.remaining else report.folded[0].rule
    assert outcome == expected, report.to_dict()


@pytest.mark.parametrize(
    "rule,corruption,options",
    [
        ("conv_bn", "nan_weight", []),  # with the parity check: NaN outputs in both models
        ("conv_bn", "chain_inf", ["--no-check"]),  # Inf * 0 while combining the chain
        ("bn_conv", "zero_gamma_inf_weight", ["--no-check"]),
        ("gemm_bn", "max_bias", ["--no-check"]),  # a float32 bias scaled past 3.4e38
    ],
)
def test_cli_fold_prints_no_numpy_warning(rule, corruption, options, tmp_path):
    """``python -W error::RuntimeWarning -m bnfold fold``: a numpy warning would be an exit 3."""
    src = tmp_path / "in.onnx"
    onnx.save_model(hostile_model(rule, corruption), str(src))
    proc = _run_cli("fold", str(src), "-o", str(tmp_path / "out.onnx"), *options, warnings_as_errors=True)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    assert "Warning" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("forward", [False, True], ids=["gemm_bn", "bn_gemm"])
def test_gemm_c_that_does_not_broadcast_to_the_product_is_refused(forward):
    """Gemm(x, W, W) with transB=1 and W (5, 4): C (5, 4) does not broadcast to the (M, 5)
    product. The checker lets it pass (onnxruntime fails at run time); the rule must say
    not_per_channel instead of failing inside its arithmetic."""
    rng = np.random.default_rng(0)
    channels = 4 if forward else 5
    inits = [numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "w")]
    inits += [
        numpy_helper.from_array(rng.uniform(0.5, 2, channels).astype(np.float32), name)
        for name in ("gamma", "beta", "mean", "var")
    ]
    gemm = helper.make_node("Gemm", ["bn_out" if forward else "x", "w", "w"], ["y" if forward else "g"], transB=1)
    bn = helper.make_node(
        "BatchNormalization", ["x" if forward else "g", "gamma", "beta", "mean", "var"], ["bn_out" if forward else "y"]
    )
    graph = helper.make_graph(
        [bn, gemm] if forward else [gemm, bn],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
        inits,
    )
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    _, report = fold(model)
    assert [r.reason for r in report.remaining] == ["not_per_channel"], report.to_dict()
    assert "does not broadcast" in report.remaining[0].message


@pytest.mark.parametrize("rule", ["conv_bn", "convtranspose_bn", "bn_conv"])
def test_conv_bias_that_is_not_a_vector_is_refused(rule):
    """Conv(x, W, W): the weight is also the bias, of rank 4. The checker lets it pass; the rule
    says not_per_channel instead of failing inside its arithmetic."""
    model = hostile_model(rule, "none")
    layer = next(n for n in model.graph.node if n.op_type != "BatchNormalization")
    layer.input[2] = "w"
    onnx.checker.check_model(model)
    _, report = fold(model)
    assert [r.reason for r in report.remaining] == ["not_per_channel"], report.to_dict()
    assert "bias 'w' has shape" in report.remaining[0].message


@pytest.mark.parametrize("rule", ["convtranspose_bn", "bn_conv"])
@pytest.mark.parametrize("group", [0, -1])
def test_group_below_one_is_refused(rule, group):
    """The checker does not look at ``group``; the rules that divide by it say not_per_channel."""
    model = hostile_model(rule, "none")
    next(n for n in model.graph.node if n.op_type != "BatchNormalization").attribute.append(
        helper.make_attribute("group", group)
    )
    onnx.checker.check_model(model)
    _, report = fold(model)
    assert [r.reason for r in report.remaining] == ["not_per_channel"], report.to_dict()
