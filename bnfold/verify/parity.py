"""onnxruntime parity between two models: does the candidate compute what the reference computes?

``check(reference, candidate)`` runs both models in onnxruntime on the same inputs and compares
every output by name; with ``intermediates=True`` also every float value that both main graphs
produce under the same name (below). It is what ``bnfold check`` prints and what ``bnfold fold`` /
``calibrate`` / ``demo`` use, with intermediates, for their automatic check.

Inputs are either given (a dict or an .npz file, validated against the models' input specs) or
synthesized from the specs:

* dynamic dimensions come from ``shapes``; otherwise a symbolic dimension that another input
  already fixed gets the same value (symbols are shared by name), the leading dimension (batch)
  defaults to 1 and any other dynamic dimension to ``DEFAULT_DYNAMIC_DIM`` (32, large enough for
  typical convolution kernels and pooling windows);
* float inputs are standard normal, bool inputs fair coin flips, integer inputs small non-negative
  values in ``[0, 10)``, narrowed to the table size when the input indexes a constant with
  ``Gather`` / ``GatherElements``;
* before anything is drawn, the inputs of all samples are sized (``check_input_budget``): more
  than ``INPUT_MEMORY_SHARE`` (25 %) of the available memory, an element count beyond int64 or
  more than ``MAX_SAMPLES`` (10000) samples is refused with one line naming the input, its
  shape and size, and the limit.

Both models run at the same onnxruntime graph optimization level, ``"disabled"`` by default
(``opt_level``; ``candidate_opt_level`` only if a caller asks for a different one):

* the reference is then the model as written. From ``"basic"`` on, onnxruntime fuses Conv+BN
  (and folds constants) itself, so the reference would partly be onnxruntime's fold of the same
  BNs rather than the BNs: the check would compare one fold with another, and a mistake the two
  share would be invisible;
* the candidate runs the same kernels, so the only difference between the two runs is what the
  candidate changed, and a model checked against itself agrees bit for bit. With the reference at
  ``"disabled"`` and the candidate at ``"all"`` (the old defaults), deep float32 networks
  differed from *themselves* by more than the fixed tolerance: 8 of 49 real torch exports failed
  ``check M M``.

What a user deploys, ``"all"``, is where the noise is measured. Per sample, the reference runs a
second time, at ``noise_opt_level(opt_level)`` (``"all"``; ``"disabled"`` when the comparison is
at ``"all"``) on the inputs with every float value moved by one ulp up or down
(``nudge_inputs``; integer and bool inputs untouched; a fixed seed, so the check stays
deterministic). Its outputs' spread, ``noise = max |ref - ref'|`` over all samples, is the
reference's own float32 noise: onnxruntime's deployment optimizations round every layer
differently (including its own Conv+BN fusion, a fold in float32) and the ulp moves measure how
much the network amplifies rounding at its input - the same kind of error a correct fold makes.
A *default* atol becomes ``max(default, NOISE_FACTOR x noise)``; ``NOISE_FACTOR = 4`` because on
49 real torch exports and the suite's deep model a correct fold's error was 0.24-1.72 times the
noise, and every wrong fold tried (one Conv's weights x 1.01, a bias shifted by 0.01, one BN's
variance x 1.1) was at least 6 times the resulting atol, usually over 36 times
(docs/check-bench-demo.md has the table). The measured atol is capped at
``NOISE_CAP_OVER_DEFAULT`` (100) times the dtype's default atol and at ``NOISE_CAP_OF_SCALE``
(1%) of the output's scale, so a reference that is not reproducible (random ops, an optimizer
bug) cannot open the check to anything; the report says when the cap applied.
``measure_noise=False`` keeps the fixed defaults. The noise run costs one session and one run of
the reference per sample; it is skipped when every float output's atol is given.

Tolerances (``DEFAULT_TOLERANCES``) are per output dtype, loosened to the lowest float precision
either model computes in (initializers, Constant values, Cast targets, declared value types): a
mixed-precision model — float16 inside, float32 inputs and outputs — is compared with float16
tolerances, since its own rounding is float16's. An element passes when
``|cand - ref| <= atol + rtol * |ref|``. The *default* ``atol`` is relative to the output's scale
(multiplied by ``max(1, max|ref|)``) because folding changes rounding in proportion to the
magnitudes of the values involved, and raised to the noise floor above; explicit ``rtol`` /
``atol`` values are taken literally (an explicit ``rtol`` leaves the default atol, noise floor
included). Every ``OutputResult`` says where its tolerances came from (``rtol_source``,
``atol_source``: "default", "noise", "given" or "exact") and what noise was measured (``noise``,
``noise_atol``, ``noise_capped``); ``CheckReport.tolerance_note`` says it in one sentence. Integer
and bool outputs must match exactly. NaN or Inf on one side only (or a different Inf) is always a mismatch.
NaN (or the same Inf) at the same position on both sides is agreement, but it is counted
(``shared_nan`` / ``shared_inf``) and reported as a warning; an output that is non-finite at every
element on both sides does not pass, since no real value was compared.

Intermediate values (``intermediates=True``). Outputs alone miss wrong folds on real models: a
sigmoid map that random inputs saturate to 0/1 (PaddleOCR detection) or a softmax over 1000
classes whose probabilities are ~1e-3, under an atol of 1e-5 absolute (Keras EfficientNetB0),
moves by less than the tolerance when one folded layer's weights are off by 1 %. bnfold's fold
keeps value names (a folded layer's output takes the BN's output name; every other value keeps
its name and meaning), so every value both models produce denotes one quantity, and comparing
them checks each folded layer directly. ``bnfold.verify.intermediates.select`` picks them: produced by a
node of both main graphs, not a graph input, initializer or output, a float tensor of one element
type in both (value_info or onnx shape inference), dependent on a graph input and on no random
op (parameters behind Identity/Cast/Shape are constants a fold is meant to change). Both models
are given to onnxruntime again with those values as extra graph outputs (the serialized model
plus a small serialized ``graph.output`` message, which protobuf merges; the files are never
touched; external data still resolves). Each value gets the outputs' default rule: the dtype's
default (loosened to the working precision) scaled by its own max(1, max|ref|), raised to
NOISE_FACTOR x its own noise - not capped, since a value can only add failures and the outputs
keep the cap (capped, a float16 MobileNetV2's correct fold failed at 27 values whose own noise
exceeded 1 % of their scale); ``rtol`` / ``atol`` given by the caller apply to outputs only. Its
noise comes from a second noise run of the reference with the values exposed. The outputs are
judged exactly as without intermediates: their noise comes from the plain model (exposing a value
stops onnxruntime fusing the node that produces it, which changes the rounding at level "all":
ResNet-50 8.4e-5 -> 6.1e-5), and they come from the exposed runs only at level "disabled" in
float32/float64 models, where exposing changes nothing; at other levels, and in float16 models
(onnxruntime keeps float32 between nodes it runs in float32, but rounds an exposed value to
float16), the plain models run too (``_Runner``).
The check passes only if outputs and intermediates pass; the report counts the intermediates,
names the worst one relative to its tolerance and lists the first failing ones (``CheckReport.
intermediates``, ``failed_intermediates``), and a failing verdict names the first failing value
in node order - the wrong layer's output - and the node that produces it in each model. The
intermediates are outputs-only when comparing them would cost too much memory: more than
``bnfold.verify.intermediates.MAX_VALUES`` values, or (samples + 1) x one sample's values above
``MAX_BYTES`` (onnxruntime keeps every exposed value of a run alive to its end; sized by shape
inference on the concrete inputs before the first run and measured after it), or a model that
would exceed protobuf's 2 GiB with the extra outputs; ``intermediates_note`` says which. Off by
default in ``bnfold check``: two models that are not a model and its fold may use one name for
different things.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping

import numpy as np
import onnx

from bnfold.common import first_line, format_bytes, format_table
from bnfold.verify import intermediates as intermediates_module
from bnfold.verify.session import OPT_LEVELS, create_session, ort_level
from bnfold.errors import ArgumentTypeError, InputError
from bnfold.verify.intermediates import estimate_bytes, exposure_suffix
from bnfold.verify.intermediates import select as select_intermediates
from bnfold.io import (
    PROTOBUF_LIMIT,
    file_uses_external_data,
    fits_in_one_message,
    load_model,
    load_model_deferred,
    write_json_atomic,
)


# Both models run at this level unless told otherwise (see the module docstring for why).
DEFAULT_OPT_LEVEL = "disabled"

DEFAULT_DYNAMIC_DIM = 32
DEFAULT_BATCH_DIM = 1
DEFAULT_INT_HIGH = 10

# dtype name -> (rtol, atol); atol is scaled by max(1, max|reference|) when it is a default.
DEFAULT_TOLERANCES = {
    "float64": (1e-9, 1e-10),
    "float32": (1e-4, 1e-5),
    "float16": (1e-2, 1e-3),
    "bfloat16": (5e-2, 5e-3),
}

# The noise floor (see the module docstring): a default atol is at least NOISE_FACTOR times the
# reference's own measured spread, and a measured tolerance never exceeds NOISE_CAP_OVER_DEFAULT
# times the dtype's default atol nor NOISE_CAP_OF_SCALE of the output's scale.
NOISE_FACTOR = 4.0
NOISE_CAP_OVER_DEFAULT = 100.0
NOISE_CAP_OF_SCALE = 1e-2
# Seeds the random up/down choice of the one-ulp input moves; independent of ``seed`` so that
# given inputs (no seed) are moved deterministically too.
_NUDGE_STREAM = 0x6E6F697365

# TensorProto float element types by precision, lowest first.
_FLOAT_PRECISIONS = ((onnx.TensorProto.BFLOAT16, "bfloat16"), (onnx.TensorProto.FLOAT16, "float16"),
                     (onnx.TensorProto.FLOAT, "float32"), (onnx.TensorProto.DOUBLE, "float64"))

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}

# Values near their dtype's limit (a float64 output of 1e308 against -1e308, errors divided by
# tiny tolerances, an infinite noise atol) overflow to Inf or give NaN in the comparison's
# arithmetic: an infinite error is a mismatch and a NaN ratio is never the maximum, so the results
# are right, and numpy's RuntimeWarnings about them would only be noise on stderr.
def _float_limits_handled(function):
    """``function`` run under ``np.errstate(over="ignore", invalid="ignore")``, a fresh one per
    call (before numpy 2 an errstate object used as a decorator is not safe across threads)."""

    @functools.wraps(function)
    def guarded(*args, **kwargs):
        with np.errstate(over="ignore", invalid="ignore"):
            return function(*args, **kwargs)

    return guarded


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------

_SHAPE_SPEC = re.compile(r"^(?P<name>.+):(?P<dims>\d+(?:[xX]\d+)*)$")


def parse_shape_specs(specs) -> dict:
    """Turn ``["input:1x3x224x224", "mask:1x128"]`` into ``{"input": (1, 3, 224, 224), ...}``.

    The name is everything before the last colon (input names may contain colons); a scalar
    input cannot be given a shape (it has no dynamic dimensions). Raises InputError on malformed
    specs or when one name is given twice with different shapes.
    """
    shapes: dict = {}
    for spec in specs or ():
        if not isinstance(spec, str):
            raise InputError(f"--shape: expected NAME:D1xD2x..., got {spec!r}")
        match = _SHAPE_SPEC.match(spec.strip())
        if not match:
            raise InputError(
                f"--shape {spec!r}: expected NAME:D1xD2x... with positive integer dimensions, "
                "e.g. input:1x3x224x224"
            )
        name = match.group("name")
        dims = tuple(int(d) for d in re.split("[xX]", match.group("dims")))
        _reject_zero_dims(name, dims, f"--shape {spec.strip()!r}")
        if name in shapes and shapes[name] != dims:
            raise InputError(f"--shape: input {name!r} given twice with different shapes")
        shapes[name] = dims
    return shapes


def _reject_zero_dims(name: str, dims, where: str) -> None:
    """A 0-sized dimension makes every output empty: a parity check on it compares nothing."""
    for i, d in enumerate(dims):
        if d == 0:
            raise InputError(
                f"{where}: input {name!r} has size 0 in dimension {i}; zero-size inputs compare nothing, "
                "every dimension must be >= 1"
            )


def validated_shapes(shapes, argument: str = "shapes") -> dict:
    """``shapes`` (``{input name: dims}`` or None) as ``{name: tuple of int}``; anything else is
    an error naming ``argument`` and the input: ArgumentTypeError (a TypeError) for a wrong type,
    InputError (a ValueError) for a dimension that is not >= 1."""
    if shapes is None:
        return {}
    if not isinstance(shapes, Mapping):
        raise ArgumentTypeError(f"{argument} must be a dict of input name -> dimensions, got {type(shapes).__name__}")
    clean = {}
    for name, dims in shapes.items():
        if not isinstance(name, str):
            raise ArgumentTypeError(f"{argument}: keys must be input names (str), got {name!r}")
        if isinstance(dims, (str, bytes)) or not isinstance(dims, Iterable):
            raise ArgumentTypeError(f"{argument}[{name!r}] must be a sequence of integer dimensions, got {dims!r}")
        dims = tuple(dims)
        for i, d in enumerate(dims):
            if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)):
                raise ArgumentTypeError(f"{argument}[{name!r}]: dimension {i} must be an integer, got {d!r}")
        _reject_zero_dims(name, dims, argument)
        for i, d in enumerate(dims):
            if d < 0:
                raise InputError(f"{argument}[{name!r}]: dimension {i} is {d}; every dimension must be an integer >= 1")
        clean[name] = tuple(int(d) for d in dims)
    return clean


def _format_shape(shape) -> str:
    if shape is None:
        return "?"
    if len(shape) == 0:
        return "scalar"
    return "x".join("?" if d is None else str(d) for d in shape)


# --------------------------------------------------------------------------------------------
# Sessions and specs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A graph input or output as onnxruntime sees it. Dims: int, symbol name (str) or None."""

    name: str
    dtype: str
    shape: tuple | None


class LoadedModel:
    """A model loaded once for validation and spec extraction, with its label for messages.

    ``source`` is what onnxruntime gets: the path for files (so external data resolves), the
    serialized bytes for in-memory models, or a temporary file for in-memory models too large to
    serialize in one message.
    """

    def __init__(self, model_or_path, label: str):
        self.label = label
        self.path = None if isinstance(model_or_path, onnx.ModelProto) else os.fspath(model_or_path)
        if self.path is None:
            self.proto = load_model(model_or_path)
        else:
            # onnxruntime reads the file itself; here only the graph's structure is needed (value
            # specs, table shapes), so the weights stay on disk and ``proto`` has no tensor data
            # for the big initializers (see bnfold.io.payloads).
            if os.path.exists(self.path) and not (os.path.isfile(self.path) or os.path.isdir(self.path)):
                raise InputError(f"{self.path}: not a regular file (onnxruntime reads the model again after "
                                 "bnfold has); save it to a file first")
            self.proto, payloads, wait_for_check = load_model_deferred(self.path)
            payloads.close()
            wait_for_check()
        self._bytes = None
        self._tmpdir = None
        self._exposed = None  # (source, session config entries) once ``expose`` was called

    def ort_source(self):
        if self.path is not None:
            return self.path
        if self._bytes is None and self._tmpdir is None:
            if not fits_in_one_message(self.proto):
                self._tmpdir = tempfile.TemporaryDirectory(prefix="bnfold-")
                big_path = os.path.join(self._tmpdir.name, "model.onnx")
                # Saving with external data rewrites the tensors in place: work on a copy.
                copy = onnx.ModelProto()
                copy.CopyFrom(self.proto)
                onnx.save_model(copy, big_path, save_as_external_data=True, location="model.onnx.data")
            else:
                self._bytes = self.proto.SerializeToString()
        return self._bytes if self._bytes is not None else os.path.join(self._tmpdir.name, "model.onnx")

    def expose(self, suffix: bytes) -> None:
        """Prepare the model with extra graph outputs for ``session(..., exposed=True)``:
        ``suffix`` (``bnfold.verify.intermediates.exposure_suffix``) is appended to the serialized model,
        which protobuf reads as the model with those outputs added. The file on disk is never
        touched. Raises ExposureUnavailable when the result would exceed protobuf's 2 GiB."""
        if self.path is not None:
            if file_uses_external_data(self.path):
                # The .onnx holds the graph only; onnxruntime finds the data through the folder
                # given in the session options (a model read from bytes has no directory).
                with open(self.path, "rb") as f:
                    raw = f.read()
                self._check_exposable(len(raw) + len(suffix))
                folder = os.path.dirname(os.path.abspath(self.path))
                self._exposed = (raw + suffix, {"session.model_external_initializers_file_folder_path": folder})
                return
            self._check_exposable(os.path.getsize(self.path) + len(suffix))
            # A copy in our own temporary directory (the kernel copies it; no Python bytes).
            self._exposed = (self._copy_with_suffix(self.path, suffix), {})
            return
        source = self.ort_source()
        if isinstance(source, bytes):
            self._check_exposable(len(source) + len(suffix))
            self._exposed = (source + suffix, {})
        else:
            # Written with external data beside it (too big for one message): the small .onnx
            # gets the suffix, in the same directory so that the data still resolves.
            self._check_exposable(os.path.getsize(source) + len(suffix))
            self._exposed = (self._copy_with_suffix(source, suffix), {})

    def _check_exposable(self, size: int) -> None:
        if size > PROTOBUF_LIMIT:
            raise ExposureUnavailable(f"{self.label} is too large ({size / 2**30:.1f} GiB) to be given to onnxruntime "
                                      "again with its intermediate values as outputs (protobuf's 2 GiB limit)")

    def _copy_with_suffix(self, path: str, suffix: bytes) -> str:
        if self._tmpdir is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="bnfold-")
        directory = os.path.dirname(path) if path.startswith(self._tmpdir.name) else self._tmpdir.name
        exposed = os.path.join(directory, "exposed.onnx")
        shutil.copyfile(path, exposed)
        with open(exposed, "ab") as f:
            f.write(suffix)
        return exposed

    def session(self, opt_level: str, *, threads: int | None = None, exposed: bool = False):
        """An onnxruntime session at ``opt_level``; ``exposed``: of the model prepared by
        ``expose`` (its intermediate values are outputs too)."""
        if exposed:
            source, config = self._exposed
        else:
            source, config = self.ort_source(), None
        what = "the model with its intermediate values as outputs" if exposed else "the model"
        return create_session(source, opt_level=opt_level, threads=threads, config=config,
                              failure=f"{self.label}: onnxruntime cannot load {what}")

    def close(self):
        self._exposed = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


class ExposureUnavailable(Exception):
    """The intermediate values cannot be made outputs of this model (the message says why)."""


def session_specs(session, label: str):
    """(inputs, outputs) as lists of TensorSpec; non-tensor or unsupported types raise InputError."""

    def convert(args, kind):
        specs = []
        for arg in args:
            dtype = _ORT_TYPES.get(arg.type)
            if dtype is None:
                raise InputError(f"{label}: {kind} {arg.name!r} has type {arg.type}, which bnfold cannot compare")
            shape = None if arg.shape is None else tuple(d if isinstance(d, (int, str)) else None for d in arg.shape)
            specs.append(TensorSpec(arg.name, dtype, shape))
        return specs

    return convert(session.get_inputs(), "input"), convert(session.get_outputs(), "output")


def _static_dims_conflict(a, b) -> bool:
    if a is None or b is None:
        return False
    if len(a) != len(b):
        return True
    return any(isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a, b))


def compare_interfaces(ref_specs, cand_specs, ref_label="reference", cand_label="candidate") -> None:
    """Raise InputError naming the first disagreement in input/output names, dtypes or shapes."""
    for kind, ref, cand in (("input", ref_specs[0], cand_specs[0]), ("output", ref_specs[1], cand_specs[1])):
        ref_by_name = {s.name: s for s in ref}
        cand_by_name = {s.name: s for s in cand}
        only_ref = [n for n in ref_by_name if n not in cand_by_name]
        only_cand = [n for n in cand_by_name if n not in ref_by_name]
        if only_ref or only_cand:
            parts = []
            if only_ref:
                parts.append(f"only in {ref_label}: {', '.join(only_ref)}")
            if only_cand:
                parts.append(f"only in {cand_label}: {', '.join(only_cand)}")
            raise InputError(f"the models' {kind} names differ ({'; '.join(parts)})")
        for name, r in ref_by_name.items():
            c = cand_by_name[name]
            if r.dtype != c.dtype:
                raise InputError(f"{kind} {name!r}: dtype {r.dtype} in {ref_label} but {c.dtype} in {cand_label}")
            if _static_dims_conflict(r.shape, c.shape):
                raise InputError(
                    f"{kind} {name!r}: shape {_format_shape(r.shape)} in {ref_label} "
                    f"but {_format_shape(c.shape)} in {cand_label}"
                )


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def resolve_shapes(input_specs, shapes=None) -> dict:
    """Concrete shape for every input: static dims kept, dynamic dims from ``shapes`` or defaults."""
    shapes = validated_shapes(shapes)
    known = {s.name for s in input_specs}
    unknown = [n for n in shapes if n not in known]
    if unknown:
        raise InputError(
            f"--shape given for {', '.join(map(repr, unknown))}, which is not a model input "
            f"(inputs: {', '.join(sorted(known)) or 'none'})"
        )
    symbols: dict = {}
    resolved: dict = {}
    # Inputs the user shaped first, so their symbols propagate to the inputs they did not shape.
    ordered = sorted(input_specs, key=lambda s: s.name not in shapes)
    for spec in ordered:
        if spec.name in shapes:
            given = shapes[spec.name]
            if spec.shape is not None:
                if len(given) != len(spec.shape):
                    raise InputError(
                        f"--shape {spec.name}: {len(given)} dimensions given, the model's input has "
                        f"{len(spec.shape)} ({_format_shape(spec.shape)})"
                    )
                for i, (g, d) in enumerate(zip(given, spec.shape)):
                    if isinstance(d, int) and d != g:
                        raise InputError(
                            f"--shape {spec.name}: dimension {i} is fixed to {d} in the model, got {g}"
                        )
                    if isinstance(d, str):
                        symbols.setdefault(d, g)
            resolved[spec.name] = given
            continue
        if spec.shape is None:
            raise InputError(f"input {spec.name!r} has unknown rank; give its shape with --shape {spec.name}:D1xD2x...")
        dims = []
        for i, d in enumerate(spec.shape):
            if isinstance(d, int) and d >= 0:
                dims.append(d)
            elif isinstance(d, str) and d in symbols:
                dims.append(symbols[d])
            else:
                value = DEFAULT_BATCH_DIM if i == 0 else DEFAULT_DYNAMIC_DIM
                if isinstance(d, str):
                    symbols[d] = value
                dims.append(value)
        resolved[spec.name] = tuple(dims)
    return {s.name: resolved[s.name] for s in input_specs}


def index_bounds(model: onnx.ModelProto) -> dict:
    """Upper bounds for integer graph inputs that index a constant table through Gather(Elements)."""
    graph = model.graph
    const_shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            const_shapes[node.output[0]] = tuple(node.attribute[0].t.dims)
    for vi in list(graph.input) + list(graph.value_info):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            const_shapes.setdefault(vi.name, tuple(d.dim_value for d in dims))
    inputs = {i.name for i in graph.input}
    bounds: dict = {}
    for node in graph.node:
        if node.op_type not in ("Gather", "GatherElements") or len(node.input) < 2:
            continue
        data, indices = node.input[0], node.input[1]
        if indices not in inputs or data not in const_shapes:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        shape = const_shapes[data]
        if -len(shape) <= axis < len(shape) and shape[axis] > 0:
            bounds[indices] = min(bounds.get(indices, shape[axis]), shape[axis])
    return bounds


# What synthesized inputs may cost. Every sample's inputs are kept until the candidate has run on
# them (the reference runs on all samples first, for the noise floor), so their bytes add up over
# the samples; each input is drawn in float64 (or int64) before it is cast to its dtype.
# The check refuses, in one line, inputs that would take more than INPUT_MEMORY_SHARE of the
# memory available when it starts (the least of /proc/meminfo's MemAvailable and the cgroup's
# remaining limit), or INPUT_MEMORY_FALLBACK bytes where that cannot be read: the rest is the
# models', their activations' and the outputs kept per sample. Asking numpy for 224 GiB instead
# fails with a MemoryError (an internal error to the CLI) or, worse, makes the machine swap.
INPUT_MEMORY_SHARE = 0.25
INPUT_MEMORY_FALLBACK = 4 << 30
# Each sample is a full run of both models, plus the reference's noise run: more samples than this
# are a benchmark rather than a check (and keep their inputs and outputs in memory meanwhile).
MAX_SAMPLES = 10_000
# numpy and onnxruntime count elements in int64.
_MAX_ELEMENTS = 2**63 - 1
_DRAW_ITEMSIZE = 8  # bytes per element of the float64 / int64 array an input is drawn into


def _read_int(path: str):
    """The integer a one-line /proc or /sys file holds; None for "max", a missing or odd file."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def available_memory() -> tuple:
    """``(bytes, source)``: memory this process can still allocate without swapping, as the
    kernel estimates it (MemAvailable) and as the process's cgroup (a container's memory limit)
    still allows; ``(None, "")`` when neither can be read (not Linux)."""
    candidates = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    candidates.append((int(line.split()[1]) * 1024, "memory available"))
                    break
    except (OSError, ValueError, IndexError):
        pass
    # cgroup v2, then v1: a container's limit, which MemAvailable (the host's) does not show.
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:  # v1 says "no limit" with ~2**63
            candidates.append((max(limit - usage, 0), "memory left under the cgroup's limit"))
            break
    if not candidates:
        try:
            candidates.append((os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical memory"))
        except (AttributeError, OSError, ValueError):
            pass
    return min(candidates) if candidates else (None, "")


def input_memory_limit() -> tuple:
    """``(bytes, how)``: the most synthesized inputs may take (see INPUT_MEMORY_SHARE), and how
    that limit was chosen, for messages."""
    available, source = available_memory()
    if available is None:
        return INPUT_MEMORY_FALLBACK, f"a fixed {format_bytes(INPUT_MEMORY_FALLBACK)}, the available memory being unknown"
    return int(available * INPUT_MEMORY_SHARE), f"{INPUT_MEMORY_SHARE:.0%} of the {format_bytes(available)} of {source}"




def check_input_budget(input_specs, shapes: dict, samples: int = 1, *, what: str = "synthesized inputs") -> None:
    """Refuse, before anything is allocated, ``samples`` input sets of concrete ``shapes`` (see
    resolve_shapes) that would take more memory than ``input_memory_limit()``, or an input with
    more elements than int64 counts. The message is one line naming the largest input, its shape,
    dtype and size, and the limit; it says how many samples would fit where fewer would."""
    per_sample, draw = 0, 0
    largest = None  # (bytes, spec, shape)
    for spec in input_specs:
        shape = shapes[spec.name]
        elements = math.prod(int(d) for d in shape)  # Python ints: an absurd shape cannot wrap around
        where = f"input {spec.name!r} of shape {_format_shape(shape)}"
        if elements > _MAX_ELEMENTS:
            raise InputError(f"{where} has {elements:.3g} elements, more than int64 can count (2**63 - 1); "
                             "give smaller dimensions")
        size = elements * np.dtype(spec.dtype).itemsize
        per_sample += size
        draw = max(draw, elements * _DRAW_ITEMSIZE)
        if largest is None or size > largest[0]:
            largest = (size, spec, shape)
    if largest is None:
        return
    need = samples * per_sample + draw
    limit, how = input_memory_limit()
    if need <= limit:
        return
    size, spec, shape = largest
    static = spec.shape is not None and all(isinstance(d, int) for d in spec.shape)
    fitting = (limit - draw) // per_sample if per_sample else 0
    if samples > 1 and fitting >= 1:
        advice = f"; {fitting} sample(s) would fit"
    elif static:
        advice = f"; {spec.name!r} has this static shape in the model"
    else:
        advice = f"; give smaller dimensions, e.g. --shape {spec.name}:D1xD2x..."
    raise InputError(
        f"{what} would take {format_bytes(need)}, more than the limit of {format_bytes(limit)} ({how}): "
        f"input {spec.name!r} of shape {_format_shape(shape)} {spec.dtype} takes {format_bytes(size)} per sample "
        f"({samples} sample(s), each input drawn in 64 bits first){advice}"
    )


def synthesize_inputs(input_specs, shapes: dict, rng: np.random.Generator, index_bounds=None) -> dict:
    """One random input set (dict name -> array) for concrete ``shapes`` (see resolve_shapes)."""
    index_bounds = index_bounds or {}
    feeds = {}
    for spec in input_specs:
        shape = shapes[spec.name]
        dtype = np.dtype(spec.dtype)
        if dtype == np.bool_:
            value = rng.random(shape) < 0.5
        elif dtype.kind in "iu":
            high = min(DEFAULT_INT_HIGH, index_bounds.get(spec.name, DEFAULT_INT_HIGH))
            value = rng.integers(0, max(high, 1), size=shape)
        else:
            value = rng.standard_normal(shape)
        # numpy hands back scalars, not 0-d arrays, for shape (): onnxruntime wants arrays
        feeds[spec.name] = np.asarray(value, dtype=dtype)
    return feeds


def _read_npz(path: str) -> dict:
    """The arrays of an .npz archive by name; anything else is a one-line InputError.

    The file type is decided from its first bytes before numpy sees it: numpy takes any file that
    is neither zip nor .npy for a pickle and answers with a hint about ``allow_pickle``, which
    would send the user the wrong way (bnfold never loads pickles).
    """
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if magic.startswith(b"\x93NUMPY"):
        raise InputError(f"{path}: expected an .npz archive of arrays named by input, got a single .npy array")
    if not magic:
        raise InputError(f"{path}: not a valid .npz file (the file is empty)")
    if not magic.startswith(b"PK"):
        raise InputError(f"{path}: not a valid .npz file (not a zip archive of .npy arrays)")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:
        raise InputError(f"{path}: not a valid .npz file ({first_line(e)})") from None
    arrays = {}
    with npz:
        for name in npz.files:
            try:
                value = npz[name]
            except ValueError as e:
                if "allow_pickle" in str(e):
                    raise InputError(
                        f"{path}: not a valid .npz file (array {name!r} holds Python objects; "
                        "inputs must be numeric or bool arrays)"
                    ) from None
                raise InputError(f"{path}: not a valid .npz file (array {name!r}: {first_line(e)})") from None
            except Exception as e:
                raise InputError(f"{path}: not a valid .npz file (array {name!r}: {first_line(e)})") from None
            if not isinstance(value, np.ndarray):
                raise InputError(f"{path}: not a valid .npz file (member {name!r} is not an .npy array)")
            arrays[name] = value
    return arrays


def load_inputs(inputs, input_specs) -> dict:
    """Validate user-given inputs (dict name -> array, or a path to an .npz) against the specs."""
    if isinstance(inputs, (str, os.PathLike)):
        path = os.fspath(inputs)
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such file")
        arrays = _read_npz(path)
        where = path
    elif isinstance(inputs, Mapping):
        arrays = {name: np.asarray(a) for name, a in inputs.items()}
        where = "inputs"
    else:
        raise ArgumentTypeError(f"inputs must be a dict of arrays or a path to an .npz file, got {type(inputs).__name__}")
    names = [s.name for s in input_specs]
    missing = [n for n in names if n not in arrays]
    extra = [n for n in arrays if n not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"not model inputs: {', '.join(map(repr, extra))}")
        raise InputError(f"{where}: {'; '.join(parts)} (model inputs: {', '.join(names)})")
    for spec in input_specs:
        array = arrays[spec.name]
        if array.dtype != np.dtype(spec.dtype):
            raise InputError(f"{where}: input {spec.name!r} has dtype {array.dtype}, the model expects {spec.dtype}")
        if spec.shape is not None:
            if array.ndim != len(spec.shape) or any(
                isinstance(d, int) and d != n for d, n in zip(spec.shape, array.shape)
            ):
                raise InputError(
                    f"{where}: input {spec.name!r} has shape {_format_shape(array.shape)}, "
                    f"the model expects {_format_shape(spec.shape)}"
                )
        _reject_zero_dims(spec.name, array.shape, where)
    return {s.name: arrays[s.name] for s in input_specs}


def run_session(session, feeds: dict, label: str, output_names, shape_hint: str = "") -> dict:
    try:
        values = session.run(list(output_names), feeds)
    except Exception as e:
        raise InputError(f"{label}: onnxruntime failed to run the model{shape_hint} ({first_line(e)})") from None
    return dict(zip(output_names, values))


# --------------------------------------------------------------------------------------------
# The reference's own float noise
# --------------------------------------------------------------------------------------------


_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_LOW_PRECISION = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _layer_weight_names(model: onnx.ModelProto) -> set:
    return {n.input[1] for n in model.graph.node if n.op_type in _LAYER_OPS and len(n.input) > 1}


def has_low_precision_layer_weights(model: onnx.ModelProto) -> bool:
    """Whether some Conv / ConvTranspose / Gemm / MatMul of the main graph has a float16 or
    bfloat16 initializer as its weight."""
    names = _layer_weight_names(model)
    return any(t.name in names and t.data_type in _LOW_PRECISION for t in model.graph.initializer)


def rounded_once_more(model: onnx.ModelProto, seed: int = 5) -> onnx.ModelProto:
    """A copy of ``model`` whose float16 / bfloat16 layer weights (main graph initializers, with
    their data loaded) are rounded to their type once more at a random per-output-channel scale,
    then divided by the scale and rounded back (types unchanged: about sqrt(2) roundings).

    What storing folded weights in a low-precision type costs in any case -- a fold rounds
    ``W * gamma / sigma`` once -- measured on the model itself: the unavoidable part of a
    float16 fold's error, as opposed to a wrong fold's. The check's noise run uses it for float16
    / bfloat16 models (see ``check``)."""
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    names = _layer_weight_names(copy)
    for tensor in copy.graph.initializer:
        if tensor.name not in names or tensor.data_type not in _LOW_PRECISION or not tensor.dims:
            continue
        weights = numpy_helper.to_array(tensor)
        low = weights.dtype
        weights = weights.astype(np.float64)
        scale = rng.uniform(0.5, 2.0, (weights.shape[0],) + (1,) * (weights.ndim - 1))
        with np.errstate(over="ignore"):  # a weight near the type's limit, scaled up: Inf, kept as it was below
            again = (weights * scale).astype(low).astype(np.float64) / scale
        # Where the scaled weight leaves the type's range it cannot be rounded there: it stays.
        overflowed = ~np.isfinite(again) & np.isfinite(weights)
        again[overflowed] = weights[overflowed]
        tensor.CopyFrom(numpy_helper.from_array(again.astype(low), tensor.name))
    return copy


def noise_opt_level(opt_level: str) -> str:
    """Level of the noise run for a comparison at ``opt_level``: the deployment level ``"all"``,
    or ``"disabled"`` when the comparison itself runs at ``"all"`` (a second run at the same level
    would measure nothing)."""
    return "disabled" if opt_level == "all" else "all"


def nudge_inputs(feeds: dict, rng: np.random.Generator) -> dict:
    """``feeds`` with every float value moved by one unit in the last place of its dtype, up or
    down at random; integer and bool inputs (indices, shapes, masks) are left exactly as they are.
    NaN and Inf stay what they are."""
    nudged = {}
    for name, value in feeds.items():
        value = np.asarray(value)
        if value.dtype.kind != "f" or value.size == 0:
            nudged[name] = value
            continue
        up = rng.random(value.shape) < 0.5
        toward = np.where(up, np.array(np.inf, value.dtype), np.array(-np.inf, value.dtype))
        with np.errstate(over="ignore"):  # the dtype's largest value moved outwards: Inf, replaced below
            moved = np.nextafter(value, toward).astype(value.dtype)
        # A finite value must stay finite: at the dtype's limit the ulp move goes inwards instead.
        outwards = ~np.isfinite(moved) & np.isfinite(value)
        if outwards.any():
            moved[outwards] = np.nextafter(value[outwards], -toward[outwards])
        nudged[name] = np.where(np.isfinite(value), moved, value).astype(value.dtype)
    return nudged


def _nudge_rng(sample: int) -> np.random.Generator:
    return np.random.default_rng((_NUDGE_STREAM, sample))


@_float_limits_handled  # two finite values far apart: an infinite spread, which noise_tolerance caps
def _spread(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| over the positions where both are finite (0 when there are none)."""
    if a.shape != b.shape or a.size == 0:
        return 0.0
    a, b = np.atleast_1d(a), np.atleast_1d(b)  # 0-d operands would make the ufuncs return scalars
    if a.dtype.kind == "f" and b.dtype.kind == "f" and np.isfinite(a).all() and np.isfinite(b).all():
        diff = np.subtract(a, b, dtype=np.float64)
        return float(np.abs(diff, out=diff).max())
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    both = np.isfinite(a) & np.isfinite(b)
    if not both.any():
        return 0.0
    return float(np.abs(a[both] - b[both]).max())


def _output_scale(values) -> float:
    """max(1, max |finite value|) over one output's values from every sample."""
    scale = 1.0
    for v in values:
        v = np.asarray(v)
        if v.size and v.dtype.kind == "f" and np.isfinite(v).all():
            scale = max(scale, abs(float(v.max())), abs(float(v.min())))
        elif v.size:
            finite = np.abs(v[np.isfinite(v)]) if v.dtype.kind in "fc" else np.abs(v)
            if finite.size:
                scale = max(scale, float(finite.max()))
    return scale


def noise_tolerance(noise: float, default_atol: float, scale: float) -> tuple:
    """(atol, capped) from a measured ``noise``: NOISE_FACTOR x noise, but never above
    NOISE_CAP_OVER_DEFAULT x ``default_atol`` x ``scale`` nor NOISE_CAP_OF_SCALE x ``scale``."""
    cap = min(NOISE_CAP_OVER_DEFAULT * default_atol, NOISE_CAP_OF_SCALE) * scale
    wanted = NOISE_FACTOR * noise
    return (cap, True) if wanted > cap else (wanted, False)


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class OutputResult:
    """How one output of the candidate compares with the reference (over all samples)."""

    name: str
    dtype: str
    shape: tuple
    rtol: float
    atol: float
    max_abs: float = 0.0
    max_rel: float = 0.0
    mismatch_fraction: float = 0.0
    mismatches: int = 0
    elements: int = 0
    nonfinite_mismatch: int = 0
    shared_nan: int = 0  # positions where both models output NaN (agreement, but worth a warning)
    shared_inf: int = 0  # positions where both models output the same Inf
    passed: bool = True
    message: str = ""
    # Where the tolerances came from: "default" (per-dtype table), "noise" (the atol is the
    # measured noise floor, larger than the default), "given" (the caller's value, literal) or
    # "exact" (integer and bool outputs).
    rtol_source: str = "default"
    atol_source: str = "default"
    noise: float | None = None  # the reference's own spread: max |ref - ref at the noise run|
    noise_atol: float | None = None  # NOISE_FACTOR x noise, capped
    noise_capped: bool = False
    # max over elements of |cand - ref| / (atol + rtol |ref|): 1 is the limit, above fails.
    error_over_tolerance: float = 0.0

    @property
    def shared_nonfinite(self) -> int:
        return self.shared_nan + self.shared_inf

    @property
    def warning(self) -> str:
        """'' unless both models output NaN/Inf at the same positions (counted as agreement)."""
        if not self.shared_nonfinite:
            return ""
        parts = [f"{kind} at {n}" for kind, n in (("NaN", self.shared_nan), ("Inf", self.shared_inf)) if n]
        positions = "position" if self.shared_nonfinite == 1 else "positions"
        return f"both models output {' and '.join(parts)} {positions}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["warning"] = self.warning
        for key in ("max_abs", "max_rel", "atol", "rtol", "mismatch_fraction", "noise", "noise_atol",
                    "error_over_tolerance"):
            if d[key] is not None:
                d[key] = _json_float(d[key])
        return d

    @property
    def tolerance_text(self) -> str:
        """'rtol/atol (source)' as the table shows it."""
        if self.atol_source == "exact":
            return "exact"
        source = self.atol_source
        if self.rtol_source == "given" and self.atol_source != "given":
            source = f"rtol given, atol {self.atol_source}"
        if self.noise_capped:
            source += ", capped"
        return f"{self.rtol:.0e}/{self.atol:.1e} ({source})"


@dataclasses.dataclass
class IntermediateResult(OutputResult):
    """How one intermediate value (``bnfold.verify.intermediates``) compares: an OutputResult plus the
    node that produces it in each model and its position in the reference's node order."""

    producer: str = ""  # in the candidate, e.g. "Conv 'conv3'" (a folded layer)
    reference_producer: str = ""  # in the reference, e.g. "BatchNormalization 'bn3'"
    order: int = 0
    base_atol: float = 0.0  # the dtype's default atol before scaling by max(1, max|ref|)
    # Its own noise is above the outputs' cap (NOISE_CAP_*): its atol follows the noise uncapped.
    noise_over_cap: bool = False

    @property
    def tolerance_text(self) -> str:
        text = super().tolerance_text
        return text[:-1] + ", above the outputs' cap)" if self.noise_over_cap else text

    @property
    def producer_text(self) -> str:
        if self.reference_producer and self.reference_producer != self.producer:
            return f"{self.producer}; {self.reference_producer} in the reference"
        return self.producer

    def to_dict(self) -> dict:
        d = super().to_dict()
        del d["base_atol"]
        return d


# Rows of failing intermediate values shown in the table and the JSON (the first ones in node
# order; the count says how many more there are).
INTERMEDIATE_ROWS = 10


@dataclasses.dataclass
class CheckReport:
    """Result of ``check``: ``passed``, per-output results, and what was compared how."""

    outputs: list
    inputs: dict  # name -> {"dtype", "shape"}
    samples: int
    seed: int | None
    opt_level: str
    candidate_opt_level: str
    reference: str
    candidate: str
    # The noise run (see the module docstring): the reference again at this level on inputs
    # moved by one ulp; None when it did not run (every float atol given, measure_noise=False,
    # or it failed: ``noise_note`` says why).
    noise_opt_level: str | None = None
    noise_factor: float = NOISE_FACTOR
    noise_note: str = ""
    # check(intermediates=True): the IntermediateResults in the reference's node order, or none
    # and ``intermediates_note`` saying why (too many, too large, not exposable, ...).
    intermediates_requested: bool = False
    intermediates: list = dataclasses.field(default_factory=list)
    intermediates_note: str = ""
    intermediates_noise_measured: bool = False

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs) and all(v.passed for v in self.intermediates)

    @property
    def failed_outputs(self) -> list:
        return [o.name for o in self.outputs if not o.passed]

    @property
    def failed_intermediates(self) -> list:
        """The failing IntermediateResults, first in node order first."""
        return [v for v in self.intermediates if not v.passed]

    @property
    def worst_intermediate(self):
        """The IntermediateResult closest to (or furthest beyond) its tolerance, or None."""
        return max(self.intermediates, key=lambda v: (not v.passed, v.error_over_tolerance), default=None)

    @property
    def intermediates_brief(self) -> str:
        """A few words for one-line verdicts: how many intermediates were compared, or why none."""
        if not self.intermediates_requested:
            return ""
        if not self.intermediates:
            return f"intermediate values not compared: {self.intermediates_note}"
        failed = len(self.failed_intermediates)
        worst = self.worst_intermediate
        if failed:
            return f"{failed} of {len(self.intermediates)} intermediate values differ"
        return (f"{len(self.intermediates)} intermediate values match "
                f"(worst at {worst.error_over_tolerance:.2g} x its tolerance)")

    @property
    def warnings(self) -> list:
        """One line per output where both models output NaN/Inf at the same positions."""
        return [f"output {o.name!r}: {o.warning}" for o in self.outputs if o.warning]

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "failed_outputs": self.failed_outputs,
            "max_abs_error": _json_float(self.max_abs_error),
            "max_rel_error": _json_float(self.max_rel_error),
            "reference": self.reference,
            "candidate": self.candidate,
            "opt_level": self.opt_level,
            "candidate_opt_level": self.candidate_opt_level,
            "tolerance": self.tolerance_note,
            "noise": {
                "measured": self.noise_opt_level is not None,
                "opt_level": self.noise_opt_level,
                "inputs": "float inputs moved by one ulp" if self.noise_opt_level is not None else None,
                "factor": self.noise_factor,
                "note": self.noise_note,
            },
            "samples": self.samples,
            "seed": self.seed,
            "inputs": self.inputs,
            "warnings": self.warnings,
            "outputs": [o.to_dict() for o in self.outputs],
            "intermediates": self._intermediates_dict(),
        }

    def _intermediates_dict(self) -> dict:
        failed = self.failed_intermediates
        worst = self.worst_intermediate
        return {
            "requested": self.intermediates_requested,
            "compared": len(self.intermediates),
            "failed": len(failed),
            "passed": not failed,
            "note": self.intermediates_note,
            "noise_measured": self.intermediates_noise_measured,
            "atol_from_noise": sum(v.atol_source == "noise" for v in self.intermediates),
            "noise_over_cap": sum(v.noise_over_cap for v in self.intermediates),
            "shared_nonfinite": sum(v.shared_nonfinite > 0 for v in self.intermediates),
            "worst": worst.to_dict() if worst is not None else None,
            "failures": [v.to_dict() for v in failed[:INTERMEDIATE_ROWS]],
            "failures_left_off": max(0, len(failed) - INTERMEDIATE_ROWS),
        }

    def to_json(self, path) -> None:
        write_json_atomic(self.to_dict(), path)

    def summary(self) -> str:
        warnings = "".join(f"; warning: {w}" for w in self.warnings)
        inter = self._intermediates_summary()
        if self.passed:
            return (
                f"PASS: {len(self.outputs)} output(s) match "
                f"(max abs error {self.max_abs_error:.3g}, max rel error {self.max_rel_error:.3g})"
                f"{'; ' + inter if inter else ''}{warnings}"
            )
        details = [f"{o.name!r} ({_why(o)})" for o in self.outputs if not o.passed]
        if details:
            parts = [f"output {', '.join(details)}"] + ([inter] if inter else [])
        else:  # only intermediate values fail: they come first, since they are the verdict
            parts = [inter, f"the {len(self.outputs)} output(s) match"]
        return f"FAIL: {'; '.join(parts)}{warnings}"

    def _intermediates_summary(self) -> str:
        if not self.intermediates_requested:
            return ""
        if not self.intermediates:
            return f"intermediate values not compared ({self.intermediates_note})"
        failed = self.failed_intermediates
        if not failed:
            worst = self.worst_intermediate
            return (f"{len(self.intermediates)} intermediate value(s) match (worst {worst.name!r} at "
                    f"{worst.error_over_tolerance:.2g} x its tolerance)")
        first = failed[0]
        return (f"intermediate value {first.name!r} (produced by {first.producer_text}) differs ({_why(first)}); "
                f"it is the first in node order of {len(failed)} of {len(self.intermediates)} intermediate values "
                "that differ")

    @property
    def tolerance_brief(self) -> str:
        """A few words on the tolerances, for one-line verdicts (fold, calibrate, demo)."""
        floats = [o for o in self.outputs if o.atol_source != "exact"]
        if not floats:
            return "exact comparison"
        if all(o.atol_source == "given" for o in floats):
            return "atol as given for every float output (no noise run for the outputs)"
        from_noise = sum(o.atol_source == "noise" for o in floats)
        if from_noise:
            return (f"atol raised to {self.noise_factor:g} x the reference's own float noise on "
                    f"{from_noise} of {len(floats)} output(s)")
        return "default tolerances" + (" (noise not measured)" if self.noise_opt_level is None else "")

    @property
    def tolerance_note(self) -> str:
        """One sentence: how the tolerances were chosen (the table's and the JSON's footnote)."""
        floats = [o for o in self.outputs if o.atol_source != "exact"]
        if not floats:
            return "integer and bool outputs compared exactly"
        if all(o.atol_source == "given" for o in floats):
            return "atol as given for every float output (no noise run for the outputs)"
        if self.noise_opt_level is None:
            why = f" ({self.noise_note})" if self.noise_note else ""
            return f"default atol = dtype default x max(1, max|ref|); noise not measured{why}"
        from_noise = sum(o.atol_source == "noise" for o in floats)
        capped = sum(o.noise_capped for o in floats)
        text = (
            f"default atol = max(dtype default x max(1, max|ref|), {self.noise_factor:g} x ref noise), "
            f"ref noise = max |reference - reference at opt level {self.noise_opt_level}, inputs moved by one ulp|; "
            f"set by the noise for {from_noise} of {len(floats)} float output(s)"
        )
        if capped:
            text += (f"; capped for {capped} (the reference's own noise exceeds what a default may accept; "
                     "give --atol to accept more)")
        return text

    def format_table(self) -> str:
        header = ("output", "dtype", "shape", "max abs err", "max rel err", "mismatch", "non-finite (one side/both)",
                  "ref noise", "tol (rtol/atol)", "result")
        rows = [
            (
                o.name,
                o.dtype,
                _format_shape(o.shape),
                f"{o.max_abs:.3g}",
                f"{o.max_rel:.3g}",
                f"{o.mismatch_fraction:.2%}",
                f"{o.nonfinite_mismatch}/{o.shared_nonfinite}",
                "-" if o.noise is None else f"{o.noise:.2g}",
                o.tolerance_text,
                "ok" if o.passed else "FAIL",
            )
            for o in self.outputs
        ]
        lines = format_table(header, rows)
        inputs = ", ".join(f"{n} {_format_shape(i['shape'])} {i['dtype']}" for n, i in self.inputs.items())
        lines.append("")
        lines.append(
            f"inputs: {inputs or 'none'}; samples: {self.samples}; onnxruntime optimization: "
            f"reference {self.opt_level}, candidate {self.candidate_opt_level}"
        )
        lines.append(f"tolerance: {self.tolerance_note}")
        lines += self._intermediates_lines()
        lines.append(self.summary())
        return "\n".join(lines)

    def _intermediates_lines(self) -> list:
        """The table's intermediate section: one line of totals, the worst one, and the first
        failing ones as rows."""
        if not self.intermediates_requested:
            return []
        if not self.intermediates:
            return [f"intermediate values: not compared ({self.intermediates_note})"]
        failed = self.failed_intermediates
        from_noise = sum(v.atol_source == "noise" for v in self.intermediates)
        over_cap = sum(v.noise_over_cap for v in self.intermediates)
        noise = (f"raised to {self.noise_factor:g} x its own noise (for {from_noise} of {len(self.intermediates)}"
                 + (f"; {over_cap} noisier than the outputs' cap, not capped" if over_cap else "") + ")"
                 if self.intermediates_noise_measured else "noise not measured")
        lines = [f"intermediate values: {len(self.intermediates)} compared (float values both models produce "
                 f"under one name), {len(failed)} fail; default atol scaled by each one's own max|ref|, {noise}"]
        worst = self.worst_intermediate
        lines.append(f"  worst: {worst.name!r} from {worst.producer_text}: max abs err {worst.max_abs:.3g} = "
                     f"{worst.error_over_tolerance:.3g} x its tolerance {worst.tolerance_text}")
        if failed:
            header = ("intermediate value", "produced by", "shape", "max abs err", "x tol", "mismatch", "ref noise",
                      "tol (rtol/atol)")
            rows = [(v.name, v.producer_text, _format_shape(v.shape), f"{v.max_abs:.3g}",
                     f"{v.error_over_tolerance:.3g}", f"{v.mismatch_fraction:.2%}",
                     "-" if v.noise is None else f"{v.noise:.2g}", v.tolerance_text)
                    for v in failed[:INTERMEDIATE_ROWS]]
            lines += format_table(header, rows, indent="  ")
            if len(failed) > INTERMEDIATE_ROWS:
                lines.append(f"  ... and {len(failed) - INTERMEDIATE_ROWS} more failing (all in the JSON count, "
                             f"the first {INTERMEDIATE_ROWS} as rows)")
        return lines


def _why(result) -> str:
    """Why one output or intermediate value failed, in a few words."""
    return result.message or (
        f"{result.mismatch_fraction:.2%} of elements differ, max abs error {result.max_abs:.3g}, "
        f"tolerance {result.tolerance_text}"
    )


def _json_float(x):
    x = float(x)
    return x if math.isfinite(x) else str(x)


def _tolerance_for(name: str, dtype: str, value, kind: str, working_precision=None):
    """(value, is_default) for one output from a float, a dict {name: float} or None; the default
    is the looser of the output dtype's and the models' working precision's."""
    if isinstance(value, dict):
        value = value.get(name)
    if value is None:
        if dtype not in DEFAULT_TOLERANCES:
            return 0.0, True
        k = 0 if kind == "rtol" else 1
        default = DEFAULT_TOLERANCES[dtype][k]
        if working_precision in DEFAULT_TOLERANCES:
            default = max(default, DEFAULT_TOLERANCES[working_precision][k])
        return default, True
    return float(value), False


def working_precision(model: onnx.ModelProto):
    """Name of the lowest float precision the model computes in (see the module docstring), or
    None when it has no float tensors."""
    from bnfold.folding import iter_graphs

    seen = set()
    for graph in iter_graphs(model.graph):
        seen.update(t.data_type for t in graph.initializer)
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            seen.add(vi.type.tensor_type.elem_type)
        for node in graph.node:
            for attr in node.attribute:
                if attr.name == "to" and node.op_type in ("Cast", "CastLike", "RandomNormal", "RandomUniform"):
                    seen.add(attr.i)
                elif attr.type == onnx.AttributeProto.TENSOR:
                    seen.add(attr.t.data_type)
    for data_type, name in _FLOAT_PRECISIONS:
        if data_type in seen:
            return name
    return None


def _validate_tolerance(value, kind: str, output_names) -> None:
    items = value.items() if isinstance(value, dict) else ([(None, value)] if value is not None else [])
    for name, v in items:
        if name is not None and name not in output_names:
            raise InputError(
                f"--{kind} given for {name!r}, which is not a model output (outputs: {', '.join(output_names)})"
            )
        if v is None and name is not None:
            continue
        try:
            ok = float(v) >= 0 and math.isfinite(float(v))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InputError(f"--{kind}: expected a non-negative number, got {v!r}")


@_float_limits_handled
def _compare_into(result: OutputResult, ref: np.ndarray, cand: np.ndarray, base_atol: float, scaled_atol: bool,
                  noise_atol: float | None = None) -> None:
    """Fold one sample's comparison of one output into ``result`` (result.atol records the
    largest absolute tolerance actually applied). ``noise_atol``: the measured noise floor under
    a default atol (None: not measured, or the atol was given)."""
    if ref.shape != cand.shape:
        result.passed = False
        result.message = f"shape {_format_shape(cand.shape)} differs from the reference's {_format_shape(ref.shape)}"
        return
    result.elements += ref.size
    if ref.size == 0:
        return
    # numpy's ufuncs return scalars for 0-d operands, which the in-place steps below cannot take.
    ref, cand = np.atleast_1d(ref), np.atleast_1d(cand)
    if ref.dtype.kind == "f" and cand.dtype.kind == "f" and np.isfinite(ref).all() and np.isfinite(cand).all():
        # The common case, with a third of the passes over the data: every comparison of the
        # intermediate values of a big model goes through here.
        err_max, max_rel, mismatches = _compare_finite(result, ref, cand, base_atol, scaled_atol, noise_atol)
        result.max_abs = max(result.max_abs, err_max)
        result.max_rel = max(result.max_rel, max_rel)
        result.mismatches += mismatches
        result.mismatch_fraction = result.mismatches / result.elements
        if result.mismatches:
            result.passed = False
        return
    if ref.dtype.kind in "fc":
        r = ref.astype(np.float64)
        c = cand.astype(np.float64)
        finite_r, finite_c = np.isfinite(r), np.isfinite(c)
        both_finite = finite_r & finite_c
        shared_nan = np.isnan(r) & np.isnan(c)
        shared_inf = np.isinf(r) & np.isinf(c) & (r == c)
        same_nonfinite = shared_nan | shared_inf
        nonfinite_bad = ~both_finite & ~same_nonfinite
        err = np.zeros_like(r)
        np.subtract(r, c, out=err, where=both_finite)  # inf - inf would warn; non-finite pairs judged above
        np.abs(err, out=err)
        abs_ref = np.where(finite_r, np.abs(r), 0.0)
        atol = base_atol * max(1.0, float(abs_ref.max())) if scaled_atol else base_atol
        if noise_atol is not None:
            atol = max(atol, noise_atol)
        result.atol = max(result.atol, atol)
        allowed = atol + result.rtol * abs_ref
        bad = (err > allowed) | nonfinite_bad
        result.error_over_tolerance = max(result.error_over_tolerance, _worst_ratio(err, allowed, nonfinite_bad))
        significant = both_finite & (abs_ref > atol)
        max_rel = float((err[significant] / abs_ref[significant]).max()) if significant.any() else 0.0
        n_nonfinite = int(nonfinite_bad.sum())
        if n_nonfinite:
            where = np.argwhere(nonfinite_bad)[0]
            note = (
                f"{n_nonfinite} non-finite value(s) on one side only "
                f"(first at index {tuple(int(i) for i in where)}: reference {r[tuple(where)]}, candidate {c[tuple(where)]})"
            )
            result.message = result.message or note
        result.nonfinite_mismatch += n_nonfinite
        result.shared_nan += int(shared_nan.sum())
        result.shared_inf += int(shared_inf.sum())
    else:
        diff = ref.astype(np.int64) != cand.astype(np.int64) if ref.dtype != np.uint64 else ref != cand
        err = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
        bad = diff
        if bad.any():
            result.error_over_tolerance = math.inf
        max_rel = 0.0
        nz = ref != 0
        if nz.any():
            max_rel = float((err[nz] / np.abs(ref[nz].astype(np.float64))).max())
    result.max_abs = max(result.max_abs, float(err.max()))
    result.max_rel = max(result.max_rel, max_rel)
    result.mismatches += int(bad.sum())
    result.mismatch_fraction = result.mismatches / result.elements if result.elements else 0.0
    if result.mismatches:
        result.passed = False


def _compare_finite(result: OutputResult, ref: np.ndarray, cand: np.ndarray, base_atol: float, scaled_atol: bool,
                    noise_atol: float | None) -> tuple:
    """``(max abs error, max rel error, mismatches)`` of finite float arrays, as the general
    path of ``_compare_into`` computes them (float64, the same tolerance), recording the atol
    and the error over the tolerance in ``result``."""
    err = np.subtract(ref, cand, dtype=np.float64)
    np.abs(err, out=err)
    abs_ref = np.absolute(ref, dtype=np.float64)
    atol = base_atol * max(1.0, float(abs_ref.max())) if scaled_atol else base_atol
    if noise_atol is not None:
        atol = max(atol, noise_atol)
    result.atol = max(result.atol, atol)
    allowed = abs_ref * result.rtol
    allowed += atol
    mismatches = int(np.count_nonzero(err > allowed))
    err_max = float(err.max())
    if atol > 0:
        np.divide(err, allowed, out=allowed)
        ratio = float(allowed.max())
    else:  # nothing allowed where ref is 0: the general rule (inf for any error there)
        ratio = _worst_ratio(err, allowed, np.zeros(err.shape, bool))
    result.error_over_tolerance = max(result.error_over_tolerance, ratio)
    # Relative error where |ref| > atol; elsewhere the denominator is made infinite (ratio 0).
    abs_ref[abs_ref <= atol] = np.inf
    np.divide(err, abs_ref, out=err)
    return err_max, float(err.max()), mismatches


def _worst_ratio(err: np.ndarray, allowed: np.ndarray, nonfinite_bad: np.ndarray) -> float:
    """max err / allowed: how close the worst element came to its tolerance (1 = at the limit;
    inf for a non-finite mismatch or an error where nothing is allowed)."""
    if nonfinite_bad.any():
        return math.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err > 0, err / allowed, 0.0)
    return float(ratio.max()) if ratio.size else 0.0


def check_model_argument(model, argument: str) -> None:
    """A model argument is a path (str or os.PathLike) or an onnx.ModelProto; anything else is an
    ArgumentTypeError (a TypeError) naming ``argument``."""
    if not isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        raise ArgumentTypeError(f"{argument} must be a path or an onnx.ModelProto, got {type(model).__name__}")


def check_seed(seed, argument: str = "seed") -> None:
    """A seed is what ``numpy.random.default_rng`` takes as one number: a non-negative integer
    (of any size). Anything else is an error naming ``argument`` (ArgumentTypeError for a wrong
    type, InputError for a negative value) instead of numpy's "expected non-negative integer"."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ArgumentTypeError(f"{argument} must be a non-negative integer, got {seed!r}")
    if seed < 0:
        raise InputError(f"{argument} must be a non-negative integer (numpy's random generator takes no "
                         f"negative seeds), got {seed}")


def _checked_samples(samples) -> int:
    if isinstance(samples, (bool, np.bool_)) or not isinstance(samples, (int, np.integer)):
        raise ArgumentTypeError(f"samples must be a positive integer, got {samples!r}")
    if samples < 1:
        raise InputError(f"samples must be a positive integer, got {samples!r}")
    if samples > MAX_SAMPLES:
        raise InputError(f"samples must be at most {MAX_SAMPLES} (each sample is a full run of both models "
                         f"and of the reference's noise run), got {samples}")
    return int(samples)


def check(
    reference,
    candidate,
    *,
    shapes=None,
    inputs=None,
    seed=0,
    samples=1,
    rtol=None,
    atol=None,
    opt_level=DEFAULT_OPT_LEVEL,
    candidate_opt_level=None,
    measure_noise=True,
    candidate_label=None,
    intermediates=False,
) -> CheckReport:
    """Run ``reference`` and ``candidate`` (paths or ModelProtos) in onnxruntime on the same inputs
    and compare every output by name. See the module docstring for inputs and tolerances.

    ``opt_level``: onnxruntime's graph optimization level for both models (default
    ``"disabled"``); ``candidate_opt_level``: a different one for the candidate (default: the
    same). ``measure_noise``: run the reference once more per sample to measure its own float
    noise and raise default atols to ``NOISE_FACTOR`` times it (False: the fixed per-dtype
    defaults only). ``intermediates``: also compare every float value both models' main graphs
    produce under the same name (``bnfold.verify.intermediates``), each as if it were an output with a
    default tolerance; meant for a model and its fold by bnfold, where one name means one
    quantity in both. Raises InputError when a model is unreadable, the two models' interfaces
    disagree, or the inputs/options are unusable. A numerical difference is not an exception: it
    is ``report.passed == False`` with the failing outputs named. ``candidate_label``: how
    messages name the candidate (default: its path).

    Arguments are checked before any work, and errors name them: an argument of the wrong type
    raises ArgumentTypeError (a TypeError and an InputError), a bad value InputError (a
    ValueError). ``seed``: a non-negative integer (any size numpy takes). ``samples``: 1 to
    ``MAX_SAMPLES``. ``shapes``: ``{input: dims}`` with every dimension >= 1. Synthesized inputs
    of all samples together must fit in ``input_memory_limit()`` (see ``check_input_budget``).
    """
    check_model_argument(reference, "reference")
    check_model_argument(candidate, "candidate")
    samples = _checked_samples(samples)
    check_seed(seed)
    shapes = validated_shapes(shapes)
    if inputs is not None and not isinstance(inputs, (str, os.PathLike, Mapping)):
        raise ArgumentTypeError(f"inputs must be a dict of arrays or a path to an .npz file, got {type(inputs).__name__}")
    if candidate_label is not None and not isinstance(candidate_label, str):
        raise ArgumentTypeError(f"candidate_label must be a str or None, got {type(candidate_label).__name__}")
    if inputs is not None and samples != 1:
        raise InputError("samples > 1 cannot be combined with given inputs (one input set is given)")
    if candidate_opt_level is None:
        candidate_opt_level = opt_level
    for argument, level in (("opt_level", opt_level), ("candidate_opt_level", candidate_opt_level)):
        if not isinstance(level, str):
            raise ArgumentTypeError(f"{argument} must be one of {', '.join(OPT_LEVELS)}, got {level!r}")
        ort_level(level)
    ref_model = LoadedModel(reference, _label(reference, "reference"))
    cand_model = LoadedModel(candidate, candidate_label or _label(candidate, "candidate"))
    noise_model = ref_model
    try:
        precisions = [p for p in (working_precision(ref_model.proto), working_precision(cand_model.proto)) if p]
        lowest = min(precisions, key=[name for _, name in _FLOAT_PRECISIONS].index) if precisions else None
        values, inter_note = _prepare_intermediates(ref_model, cand_model) if intermediates else ([], "")
        # One run of the exposed model gives the outputs too only where exposing values cannot
        # change them (see _Runner); elsewhere the plain model computes the outputs.
        shared = opt_level == candidate_opt_level == "disabled" and lowest not in ("float16", "bfloat16")
        ref_run, cand_run, note = _open_runners(ref_model, cand_model, opt_level, candidate_opt_level,
                                                exposed=bool(values), shared=shared)
        if note:
            values, inter_note = [], note
        exposed_names = {v.name for v in values}

        def specs_of(runner):
            ins, outs = session_specs(runner.outputs_session, runner.model.label)
            return ins, [s for s in outs if s.name not in exposed_names]

        ref_specs = specs_of(ref_run)
        cand_specs = specs_of(cand_run)
        compare_interfaces(ref_specs, cand_specs, ref_model.label, cand_model.label)
        input_specs, output_specs = ref_specs
        output_names = [s.name for s in output_specs]
        _validate_tolerance(rtol, "rtol", output_names)
        _validate_tolerance(atol, "atol", output_names)

        if inputs is not None:
            if shapes:
                raise InputError("shapes cannot be combined with given inputs (their shapes are used)")
            input_sets = [load_inputs(inputs, input_specs)]
            shape_hint = ""
        else:
            concrete = resolve_shapes(input_specs, shapes)
            check_input_budget(input_specs, concrete, samples)
            rng = np.random.default_rng(seed)
            bounds = index_bounds(ref_model.proto)
            input_sets = [synthesize_inputs(input_specs, concrete, rng, bounds) for _ in range(samples)]
            dynamic = any(s.shape is None or any(not isinstance(d, int) for d in s.shape) for s in input_specs)
            shape_hint = (
                " on synthesized inputs with default sizes for dynamic dimensions; "
                "set them with --shape NAME:D1xD2x..."
                if dynamic
                else ""
            )

        if values:
            # Before any run: onnxruntime keeps every exposed value of a run alive to its end.
            per_sample, _ = estimate_bytes(ref_model.proto, values,
                                           {n: a.shape for n, a in input_sets[0].items()})
            too_big = _too_big_note(per_sample, len(input_sets), "estimated")
            if too_big:
                values, inter_note = [], too_big
                ref_run.drop_values()
                cand_run.drop_values()

        results = []
        scaled, base_atols = {}, {}
        for spec in output_specs:
            r, r_default = _tolerance_for(spec.name, spec.dtype, rtol, "rtol", lowest)
            a, a_default = _tolerance_for(spec.name, spec.dtype, atol, "atol", lowest)
            result = OutputResult(spec.name, spec.dtype, (), r, a, rtol_source="default" if r_default else "given",
                                  atol_source="default" if a_default else "given")
            if spec.dtype not in DEFAULT_TOLERANCES:  # integers and bools compare exactly
                result.rtol = result.atol = a = 0.0
                a_default = False
                result.rtol_source = result.atol_source = "exact"
            results.append(result)
            scaled[spec.name] = a_default
            base_atols[spec.name] = a

        # The reference first, on every sample, so that the noise floor is known (over all
        # samples) before anything is judged; then the candidate.
        noisy_outputs = [o.name for o in results if o.atol_source == "default"]
        noise_session, noise_level, noise_note = None, None, ""
        # float16 / bfloat16 models: the outputs' noise run also rounds the layer weights once
        # more, as any fold into them must (see rounded_once_more), so that a correct fold is not
        # refused for the rounding it cannot avoid. The intermediate values keep their own noise
        # run: deep inside a float16 network that rounding is as large as a 2 % error in one
        # layer, which they must still catch (and a correct fold passes them as it is).
        if measure_noise and lowest in ("float16", "bfloat16") and noisy_outputs:
            full = load_model(reference) if ref_model.path is not None else ref_model.proto
            if has_low_precision_layer_weights(full):
                noise_model = LoadedModel(rounded_once_more(full), ref_model.label)
            del full
        if noisy_outputs and measure_noise:
            noise_level = noise_opt_level(opt_level)
            try:
                noise_session = noise_model.session(noise_level)
            except InputError as e:
                noise_level, noise_note = None, f"the noise run failed: {e}"
        elif noisy_outputs:
            noise_note = "switched off: measure_noise=False / --no-noise"
        # The intermediates' noise comes from a run of the reference with them exposed (their
        # values are needed); the outputs' from the plain model, as without intermediates:
        # exposing values keeps onnxruntime from fusing the nodes that produce them, which
        # changes the rounding the outputs' noise run measures.
        inter_noise_session = None
        if values and measure_noise:
            try:
                inter_noise_session = ref_model.session(noise_opt_level(opt_level), exposed=True)
            except InputError as e:
                values, inter_note = [], f"the noise run with intermediate values as outputs failed: {e}; outputs only"
                ref_run.drop_values()
                cand_run.drop_values()
        spread = dict.fromkeys(noisy_outputs, 0.0)
        inter_spread = {v.name: 0.0 for v in values}
        ref_outs, ref_inters = [], []
        for i, feeds in enumerate(input_sets):
            try:
                outs, inters = ref_run.run(feeds, output_names, [v.name for v in values], shape_hint)
            except InputError as e:
                if not values:
                    raise
                # The plain model may still run: then only the exposure is at fault.
                values, inter_note = [], (f"onnxruntime failed to run the models with their intermediate values as "
                                          f"outputs ({e}); outputs only")
                ref_run.drop_values()
                cand_run.drop_values()
                outs, inters = ref_run.run(feeds, output_names, [], shape_hint)
            ref_outs.append(outs)
            ref_inters.append(inters)
            if i == 0 and values:
                measured = sum(np.asarray(a).nbytes for a in inters.values())
                too_big = _too_big_note(measured, len(input_sets), "measured")
                if too_big:
                    values, inter_note, ref_inters = [], too_big, [{}]
                    ref_run.drop_values()
                    cand_run.drop_values()
            del outs, inters
            if not values:
                inter_noise_session = None
            noise_runs = noise_session is not None or inter_noise_session is not None
            nudged = nudge_inputs(feeds, _nudge_rng(i)) if noise_runs else None
            if noise_session is not None:
                try:
                    again = run_session(noise_session, nudged, ref_model.label, noisy_outputs, shape_hint)
                except InputError as e:
                    noise_session, noise_level, noise_note = None, None, f"the noise run failed: {e}"
                else:
                    for name in noisy_outputs:
                        spread[name] = max(spread[name],
                                           _spread(np.asarray(ref_outs[-1][name]), np.asarray(again[name])))
            if inter_noise_session is not None:
                try:
                    again = run_session(inter_noise_session, nudged, ref_model.label, [v.name for v in values],
                                        shape_hint)
                except InputError as e:
                    values, inter_note, inter_noise_session = [], (
                        f"the noise run with intermediate values as outputs failed: {e}; outputs only"), None
                    ref_run.drop_values()
                    cand_run.drop_values()
                else:
                    for name, value in again.items():
                        inter_spread[name] = max(inter_spread[name], _spread(np.asarray(ref_inters[-1][name]),
                                                                             np.asarray(value)))
                    del again
        noise_atols = {}
        if noise_level is not None:
            for result in results:
                if result.name not in spread:
                    continue
                scale = _output_scale(out[result.name] for out in ref_outs)
                result.noise = spread[result.name]
                result.noise_atol, result.noise_capped = noise_tolerance(
                    result.noise, base_atols[result.name], scale)
                if result.noise_capped and noise_model is not ref_model:
                    # The noise includes what rounding the weights once more costs: a property
                    # of the model's low precision, not an irreproducible reference; not capped.
                    result.noise_atol, result.noise_capped = NOISE_FACTOR * result.noise, False
                noise_atols[result.name] = result.noise_atol
                # The noise decides the atol only where it exceeds the (scaled) default.
                if result.noise_atol > base_atols[result.name] * scale:
                    result.atol_source = "noise"
        inter_results = [_intermediate_result(v, lowest, [ref[v.name] for ref in ref_inters],
                                              inter_spread[v.name] if inter_noise_session is not None else None)
                         for v in values]

        for k, (feeds, ref_out) in enumerate(zip(input_sets, ref_outs)):
            cand_out, cand_inter = cand_run.run(feeds, output_names, [r.name for r in inter_results], shape_hint)
            for result in results:
                ref_value = np.asarray(ref_out[result.name])
                result.shape = tuple(ref_value.shape)
                _compare_into(result, ref_value, np.asarray(cand_out[result.name]), base_atols[result.name],
                              scaled[result.name], noise_atols.get(result.name))
            for result in inter_results:
                ref_value = np.asarray(ref_inters[k][result.name])
                result.shape = tuple(ref_value.shape)
                _compare_into(result, ref_value, np.asarray(cand_inter[result.name]), result.base_atol, True,
                              result.noise_atol)
            ref_inters[k] = None  # compared: nothing refers to this sample's values any more
            del cand_out, cand_inter
        for result in results:
            if result.passed and result.elements and result.shared_nonfinite == result.elements:
                result.passed = False
                result.message = (
                    f"all {result.elements} elements are NaN/Inf in both models: nothing real was compared"
                )
        if results and all(r.elements == 0 and r.passed for r in results):
            shapes_text = ", ".join(f"{r.name!r} {_format_shape(r.shape)}" for r in results)
            raise InputError(
                f"nothing was compared: every output has zero elements ({shapes_text}); "
                "give inputs whose outputs are not empty"
            )
        input_info = {
            name: {"dtype": str(array.dtype), "shape": list(array.shape)} for name, array in input_sets[0].items()
        }
        return CheckReport(
            outputs=results,
            inputs=input_info,
            samples=len(input_sets),
            seed=None if inputs is not None else seed,
            opt_level=opt_level,
            candidate_opt_level=candidate_opt_level,
            reference=ref_model.label,
            candidate=cand_model.label,
            noise_opt_level=noise_level,
            noise_note=noise_note,
            intermediates_requested=bool(intermediates),
            intermediates=inter_results,
            intermediates_note=inter_note,
            intermediates_noise_measured=inter_noise_session is not None and bool(inter_results),
        )
    finally:
        ref_model.close()
        cand_model.close()
        if noise_model is not ref_model:
            noise_model.close()


def _prepare_intermediates(ref_model: LoadedModel, cand_model: LoadedModel):
    """``(values, note)``: the intermediate values to compare, each model prepared to expose
    them, or none and why."""
    selection = select_intermediates(ref_model.proto, cand_model.proto)
    if not selection.values:
        return [], selection.note
    suffix = exposure_suffix(selection.values)
    try:
        ref_model.expose(suffix)
        cand_model.expose(suffix)
    except ExposureUnavailable as e:
        return [], f"{e}; outputs only"
    return selection.values, ""


class _Runner:
    """Runs one model for the check: its outputs and, while intermediate values are compared,
    those values. ``shared``: one run of the exposed model gives both - where exposing values
    cannot change the outputs: at level "disabled" in float32/float64 models. At higher levels
    an exposed value stops onnxruntime fusing the node that produces it, and in float16 models
    it becomes a float16 result where onnxruntime would otherwise keep float32 between nodes it
    runs in float32 (its inserted Casts): the outputs change. There the plain model computes
    the outputs, so that they are judged exactly as without intermediates."""

    def __init__(self, model: LoadedModel, opt_level: str, *, exposed: bool, shared: bool):
        self.model, self.opt_level = model, opt_level
        self.values_session = model.session(opt_level, exposed=True) if exposed else None
        self.outputs_session = self.values_session if exposed and shared else model.session(opt_level)

    def drop_values(self) -> None:
        """Outputs only from now on (a fallback; the plain model replaces a shared session)."""
        if self.values_session is not None and self.outputs_session is self.values_session:
            self.outputs_session = self.model.session(self.opt_level)
        self.values_session = None

    def run(self, feeds, output_names, value_names, shape_hint):
        """``(outputs, values)``, dicts by name (``values`` empty once dropped)."""
        label = self.model.label
        if self.values_session is None or not value_names:
            return run_session(self.outputs_session, feeds, label, output_names, shape_hint), {}
        if self.outputs_session is self.values_session:
            everything = run_session(self.values_session, feeds, label, list(output_names) + list(value_names),
                                     shape_hint)
            return ({n: everything[n] for n in output_names}, {n: everything[n] for n in value_names})
        return (run_session(self.outputs_session, feeds, label, output_names, shape_hint),
                run_session(self.values_session, feeds, label, value_names, shape_hint))


def _open_runners(ref_model, cand_model, opt_level, candidate_opt_level, *, exposed, shared):
    """``(reference runner, candidate runner, note)``. Exposed models that onnxruntime refuses
    fall back to the plain models (``note`` says why); the plain models' errors are the check's
    errors."""
    note = ""
    if exposed:
        try:
            return (_Runner(ref_model, opt_level, exposed=True, shared=shared),
                    _Runner(cand_model, candidate_opt_level, exposed=True, shared=shared), "")
        except InputError as e:
            note = f"{e}; outputs only"
    return (_Runner(ref_model, opt_level, exposed=False, shared=shared),
            _Runner(cand_model, candidate_opt_level, exposed=False, shared=shared), note)


def _too_big_note(per_sample: int, samples: int, how: str) -> str:
    held = (samples + 1) * per_sample
    if held <= intermediates_module.MAX_BYTES:
        return ""
    return (f"the intermediate values take {per_sample / 2**20:.0f} MiB per sample ({how}); holding {samples + 1} "
            f"sample(s) of them would exceed {intermediates_module.MAX_BYTES / 2**30:g} GiB; outputs only")


def _intermediate_result(value, lowest, ref_values, spread):
    """An IntermediateResult with the outputs' default rule: the dtype's default (loosened to the
    lowest working precision) scaled by the value's own max|ref|, raised to NOISE_FACTOR x its
    own measured spread (``spread``; None when not measured).

    Not capped: the outputs' cap keeps an irreproducible reference from passing anything, and
    the outputs keep it; an intermediate value can only add failures. Where a value's own noise
    is above the cap its tolerance follows the noise (``noise_over_cap`` says so): capping it
    failed correct folds - in a float16 MobileNetV2, 84 of 102 values were noisier than 1 % of
    their scale, and 27 failed with errors of 0.3-0.7 x their own noise."""
    rtol, _ = _tolerance_for(value.name, value.dtype, None, "rtol", lowest)
    atol, _ = _tolerance_for(value.name, value.dtype, None, "atol", lowest)
    result = IntermediateResult(value.name, value.dtype, (), rtol, atol, producer=value.producer,
                                reference_producer=value.reference_producer, order=value.order, base_atol=atol)
    if spread is not None:
        scale = _output_scale(ref_values)
        result.noise = spread
        result.noise_over_cap = noise_tolerance(spread, atol, scale)[1]
        result.noise_atol = NOISE_FACTOR * spread
        if result.noise_atol > atol * scale:
            result.atol_source = "noise"
    return result


def parse_tolerance_specs(values, kind: str):
    """``--rtol``/``--atol`` values ("1e-3" or "NAME:1e-3", repeatable) -> float, dict or None.

    A bare value applies to every output; ``NAME:value`` overrides it for one output. The result
    is what ``check(rtol=..., atol=...)`` takes: a dict when any per-output value was given
    (the bare value, if any, is then applied to all other outputs).
    """
    if not values:
        return None
    default = None
    per_output: dict = {}
    for raw in values:
        name, sep, number = raw.rpartition(":")
        try:
            value = float(number)
        except ValueError:
            raise InputError(f"--{kind} {raw!r}: expected a number or NAME:number") from None
        if not math.isfinite(value) or value < 0:
            raise InputError(f"--{kind} {raw!r}: must be a non-negative finite number")
        if sep:
            if not name:
                raise InputError(f"--{kind} {raw!r}: empty output name before ':'")
            per_output[name] = value
        else:
            default = value
    if not per_output:
        return default
    return _DefaultingDict(default, per_output)


class _DefaultingDict(dict):
    """Per-output tolerances with a fallback for outputs not named (None -> per-dtype default)."""

    def __init__(self, default, values):
        super().__init__(values)
        self.default = default

    def get(self, key, fallback=None):
        if key in self:
            return self[key]
        return self.default if self.default is not None else fallback


def _label(model_or_path, fallback: str) -> str:
    if isinstance(model_or_path, onnx.ModelProto):
        return f"{fallback} (in memory)"
    return os.fspath(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else fallback

