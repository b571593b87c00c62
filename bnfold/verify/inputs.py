"""The inputs a check or benchmark runs on: synthesized from the models' input specs (sized
against the memory available before anything is drawn) or given as a dict or an .npz file
(validated against the specs), and the seed and sample count that choose them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
import onnx

from bnfold.common import first_line, format_bytes
from bnfold.errors import ArgumentTypeError, InputError
from bnfold.verify.models import name_differences
from bnfold.verify.shapes import format_shape, reject_zero_dims, resolve_shapes

DEFAULT_INT_HIGH = 10


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
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
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
        return (
            INPUT_MEMORY_FALLBACK,
            f"a fixed {format_bytes(INPUT_MEMORY_FALLBACK)}, the available memory being unknown",
        )
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
        where = f"input {spec.name!r} of shape {format_shape(shape)}"
        if elements > _MAX_ELEMENTS:
            raise InputError(
                f"{where} has {elements:.3g} elements, more than int64 can count (2**63 - 1); give smaller dimensions"
            )
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
        f"input {spec.name!r} of shape {format_shape(shape)} {spec.dtype} takes {format_bytes(size)} per sample "
        f"({samples} sample(s), each input drawn in 64 bits first){advice}"
    )


def prepare_input_sets(
    input_specs, model: onnx.ModelProto, *, inputs=None, shapes=None, seed=0, samples: int = 1
) -> list:
    """The input sets a check or benchmark runs on: ``inputs`` (a dict or an .npz path) validated
    against the specs, one set; or ``samples`` sets synthesized from one generator seeded with
    ``seed``, at the shapes ``resolve_shapes`` gives, refused before anything is drawn when they
    would not fit (``check_input_budget``). ``model``: the structure whose Gather tables narrow
    integer inputs (``index_bounds``)."""
    if inputs is not None:
        return [load_inputs(inputs, input_specs)]
    concrete = resolve_shapes(input_specs, shapes)
    check_input_budget(input_specs, concrete, samples)
    rng = np.random.default_rng(seed)
    bounds = index_bounds(model)
    return [synthesize_inputs(input_specs, concrete, rng, bounds) for _ in range(samples)]


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
    except Exception as e:  # noqa: BLE001 - whatever the library raises, it is the input's fault
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
            except Exception as e:  # noqa: BLE001 - whatever the library raises, it is the input's fault
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
        raise ArgumentTypeError(
            f"inputs must be a dict of arrays or a path to an .npz file, got {type(inputs).__name__}"
        )
    names = [s.name for s in input_specs]
    differences = name_differences(names, arrays, "missing ", "not model inputs: ", quote=True)
    if differences:
        raise InputError(f"{where}: {differences} (model inputs: {', '.join(names)})")
    for spec in input_specs:
        array = arrays[spec.name]
        if array.dtype != np.dtype(spec.dtype):
            raise InputError(f"{where}: input {spec.name!r} has dtype {array.dtype}, the model expects {spec.dtype}")
        if spec.shape is not None and (
            array.ndim != len(spec.shape) or any(isinstance(d, int) and d != n for d, n in zip(spec.shape, array.shape))
        ):
            raise InputError(
                f"{where}: input {spec.name!r} has shape {format_shape(array.shape)}, "
                f"the model expects {format_shape(spec.shape)}"
            )
        reject_zero_dims(spec.name, array.shape, where)
    return {s.name: arrays[s.name] for s in input_specs}


def check_seed(seed, argument: str = "seed") -> None:
    """A seed is what ``numpy.random.default_rng`` takes as one number: a non-negative integer
    (of any size). Anything else is an error naming ``argument`` (ArgumentTypeError for a wrong
    type, InputError for a negative value) instead of numpy's "expected non-negative integer"."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ArgumentTypeError(f"{argument} must be a non-negative integer, got {seed!r}")
    if seed < 0:
        raise InputError(
            f"{argument} must be a non-negative integer (numpy's random generator takes no negative seeds), got {seed}"
        )


def checked_samples(samples) -> int:
    if isinstance(samples, (bool, np.bool_)) or not isinstance(samples, (int, np.integer)):
        raise ArgumentTypeError(f"samples must be a positive integer, got {samples!r}")
    if samples < 1:
        raise InputError(f"samples must be a positive integer, got {samples!r}")
    if samples > MAX_SAMPLES:
        raise InputError(
            f"samples must be at most {MAX_SAMPLES} (each sample is a full run of both models "
            f"and of the reference's noise run), got {samples}"
        )
    return int(samples)
