"""Models whose inputs fix the batch dimension.

torch.onnx.export fixes the batch at the example's (usually 1) unless told otherwise; the tf2onnx
exports measured in issue 10 are fixed-batch too. Sequential statistics do not depend on the batch
size, so sequential mode runs such a model at its fixed batch, feeding the data in chunks of that
size (``FixedSizeFeeds``). Batch mode needs batches of batch_size: the calibration graph gets a
symbolic batch dimension (inputs, and the Reshape / Expand shape constants that spell the batch
out) and is used only after onnxruntime, run on the first data batch, reproduces the fixed-batch
model's BN inputs sample for sample (``verified_symbolic_batch``); otherwise batch mode runs at the
fixed batch too, with a note.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.calibration.graphs import NAME_PREFIX, BNToCalibrate, expose_bn_inputs, prune_to_outputs, static_shape
from bnfold.calibration.sessions import calibration_session, run_calibration_graph
from bnfold.common import first_line
from bnfold.errors import InputError
from bnfold.folding import GraphView, get_attr

_BATCH_DIM = "bnfold_batch"
# Relative tolerance of the symbolic-batch check: far above float rounding (the two runs differ
# only in how onnxruntime blocks its loops), far below what a wrong shape does (samples mixed up).
_SYMBOLIC_RTOL = {onnx.TensorProto.FLOAT16: 1e-2, onnx.TensorProto.BFLOAT16: 5e-2}
_SYMBOLIC_RTOL_DEFAULT = 1e-3


def fixed_batch_of(specs: dict) -> int | None:
    """The fixed batch dimension shared by the model's inputs, None when every one is dynamic."""
    fixed = {spec.name: spec.dims[0] for spec in specs.values() if spec.dims and spec.dims[0] is not None}
    if len(set(fixed.values())) > 1:
        listed = ", ".join(f"'{name}': {dim}" for name, dim in fixed.items())
        raise InputError(
            f"model inputs have different fixed batch dimensions ({listed}); calibration needs one batch axis"
        )
    return next(iter(fixed.values()), None)


class FixedSizeFeeds:
    """Re-cuts a stream of data batches into feeds of exactly ``size`` samples, for a model run at
    its fixed batch: samples carry over from one data batch into the next, and the samples left at
    the end that do not fill a feed are counted in ``dropped`` (padding them would need the BN
    inputs' rows to be attributable to samples, which a reshape can hide)."""

    def __init__(self, size: int):
        self.size = size
        self.dropped = 0
        self._pending: list[dict] = []
        self._rows = 0

    def cut(self, batch: dict) -> list[dict]:
        self._pending.append(batch)
        self._rows += len(next(iter(batch.values())))
        if self._rows < self.size:
            return []
        merged = {
            n: np.concatenate([p[n] for p in self._pending]) if len(self._pending) > 1 else self._pending[0][n]
            for n in batch
        }
        used = self._rows - self._rows % self.size
        feeds = [
            {n: np.ascontiguousarray(v[i : i + self.size]) for n, v in merged.items()}
            for i in range(0, used, self.size)
        ]
        self._rows -= used
        self._pending = [{n: v[used:] for n, v in merged.items()}] if self._rows else []
        return feeds

    def finish(self) -> None:
        self.dropped, self._rows, self._pending = self._rows, 0, []


def _reshape_result(target, in_shape, allowzero: bool):
    """Output shape of Reshape(x of ``in_shape``, ``target``), or None when it cannot be known."""
    out = []
    for k, d in enumerate(int(v) for v in target):
        if d == 0 and not allowzero:
            if in_shape is None or k >= len(in_shape) or in_shape[k] is None:
                return None
            d = in_shape[k]
        out.append(d)
    if out.count(-1) == 1:
        if in_shape is None or any(d is None for d in in_shape):
            return None
        known = int(np.prod([d for d in out if d != -1], dtype=np.int64))
        total = int(np.prod(in_shape, dtype=np.int64))
        if known <= 0 or total % known:
            return None
        out[out.index(-1)] = total // known
    return tuple(out) if all(d >= 0 for d in out) else None


# What _symbolic_batch_model may rewrite, tried in this order (the first variant that passes the
# check is used): a rewrite the model does not need can break it (an Expand building a Conv's zero
# bias of 512 channels is no batch even when the batch is 1), so the fewer the better.
_SYMBOLIC_VARIANTS = ((), ("Reshape",), ("Reshape", "Expand"))


def _symbolic_batch_model(model, view: GraphView, fixed: int, shapes: dict, ops=("Reshape", "Expand")):
    """A copy of ``model`` whose inputs' fixed batch dimension ``fixed`` is symbolic.

    Returns ``(model, shift, rewritten)``: ``shift`` nodes computing the runtime batch were put
    before the original nodes (which keep their order), ``rewritten`` shape constants were
    replaced. What is rewritten (op types in ``ops``), from the shapes of the fixed-batch model,
    for results of rank >= 2 whose leading dimension is ``fixed * k`` (k rows per sample, the
    batch on axis 0):

    * Reshape to a constant shape -> ``[-1, *rest]``, the leading dimension following the data;
    * Expand to a constant shape that spells out the leading dimension -> the same shape with
      ``batch * k`` computed from the first input's runtime shape;
    * every value_info and output shape is dropped (onnxruntime infers them again).

    Anything else that bakes the batch in (a Concat with a constant of batch 1, a Squeeze of axis
    0, ...) is not recognized; ``_SymbolicBatchCheck`` finds those by running the result.
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)
    graph = work.graph
    initializers = {t.name for t in graph.initializer}
    batch_inputs = []
    for vi in graph.input:
        dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []
        if vi.name not in initializers and len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == fixed:
            dims[0].Clear()
            dims[0].dim_param = _BATCH_DIM
            batch_inputs.append(vi.name)
    del graph.value_info[:]
    for vi in graph.output:
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")

    p = f"{NAME_PREFIX}/batch"
    prologue = []  # nodes computing runtime shapes; they read only the input's shape and constants
    runtime_batch = None

    def constant(name, values):
        graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def batch_times(k: int) -> str:
        """Name of a (1,) int64 tensor holding runtime batch * k / fixed."""
        nonlocal runtime_batch
        if runtime_batch is None:
            runtime_batch = f"{p}/n"
            prologue.append(helper.make_node("Shape", [batch_inputs[0]], [f"{p}/input_shape"], name=f"{p}/input_shape"))
            prologue.append(
                helper.make_node(
                    "Gather",
                    [f"{p}/input_shape", constant(f"{p}/axis0", [0])],
                    [runtime_batch],
                    name=runtime_batch,
                    axis=0,
                )
            )
        if k == fixed:
            return runtime_batch
        scaled = f"{p}/n_times_{k}"
        if scaled not in {o for n in prologue for o in n.output}:
            prologue.append(
                helper.make_node(
                    "Mul", [runtime_batch, constant(f"{scaled}/k", [k])], [f"{scaled}/mul"], name=f"{scaled}/mul"
                )
            )
            prologue.append(
                helper.make_node("Div", [f"{scaled}/mul", constant(f"{scaled}/fixed", [fixed])], [scaled], name=scaled)
            )
        return scaled

    rewritten = 0
    for i, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ops or len(node.input) < 2:
            continue
        data, target_name, out = node.input[0], node.input[1], node.output[0]
        target = view.constant(target_name)
        if target is None:
            continue  # computed at run time: follows the runtime batch by itself
        target = np.asarray(target).astype(np.int64).reshape(-1)
        if node.op_type == "Reshape":
            if view.constant(data) is not None:
                continue  # a constant reshaped: no batch in it
            allowzero = bool(get_attr(node, "allowzero", 0))
            result = static_shape(shapes, out) or _reshape_result(target, static_shape(shapes, data), allowzero)
            if not result or len(result) < 2 or result[0] % fixed or any(d <= 0 for d in result[1:]):
                continue
            new = [-1, *result[1:]]
            if list(target) == new:
                continue
            node.input[1] = constant(f"{p}/reshape_{i}", new)
        else:
            result = static_shape(shapes, out)
            if (
                not batch_inputs
                or not result
                or len(result) < 2
                or len(target) != len(result)
                or target[0] != result[0]
                or result[0] % fixed
            ):
                continue
            prologue.append(
                helper.make_node(
                    "Concat",
                    [batch_times(int(result[0])), constant(f"{p}/expand_{i}/rest", result[1:])],
                    [f"{p}/expand_{i}"],
                    name=f"{p}/expand_{i}",
                    axis=0,
                )
            )
            node.input[1] = f"{p}/expand_{i}"
        rewritten += 1
    nodes = prologue + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return work, len(prologue), rewritten


def _bn_input_session(model, bns: list[BNToCalibrate], shift: int, elem_types: dict, n_threads):
    """An onnxruntime session computing only the inputs of ``bns`` (inference-mode BNs before
    them), and the output names in the order it returns them, with BN labels."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    copies = [BNToCalibrate(b.index + shift, b.label, b.x, b.level) for b in bns]
    types = dict(elem_types)
    fetch = expose_bn_inputs(work, copies, types)
    names = list(dict.fromkeys(fetch.values()))
    prune_to_outputs(work, names, types)
    label_of = {}
    for label, name in fetch.items():
        label_of.setdefault(name, label)
    return calibration_session(work, n_threads), names, label_of


class _SymbolicBatchCheck:
    """Whether a calibration graph with a symbolic batch is the fixed-batch model on ``batch``.

    Every BN input of the symbolic graph, run on the whole batch, must equal sample for sample the
    fixed-batch model's, run on chunks of ``fixed`` samples (in inference mode samples are
    independent, so any difference is a shape that still spells out the batch). The fixed-batch
    chunks are compared as they come, so memory holds one batch of BN inputs plus one chunk's, as
    a calibration run does."""

    def __init__(self, model, bns: list[BNToCalibrate], elem_types: dict, batch: dict, fixed: int, n_threads):
        self.model, self.bns, self.elem_types, self.batch, self.fixed, self.n_threads = (
            model,
            bns,
            elem_types,
            batch,
            fixed,
            n_threads,
        )
        self.n = len(next(iter(batch.values())))
        self._fixed_session = None

    def problem(self, symbolic, shift: int) -> str:
        """ "" when ``symbolic`` passes, else why not (one line)."""
        n, fixed = self.n, self.fixed
        try:
            session, names, label_of = _bn_input_session(symbolic, self.bns, shift, self.elem_types, self.n_threads)
            got = session.run(None, self.batch)
        except Exception as e:  # noqa: BLE001 - any failure means: not usable at this batch size
            return f"onnxruntime cannot run it at batch {n}: {first_line(e, 160)}"
        del session
        if self._fixed_session is None:
            self._fixed_session = _bn_input_session(self.model, self.bns, 0, self.elem_types, self.n_threads)
        fixed_session, fixed_names, _ = self._fixed_session
        if fixed_names != names:
            return "its BN inputs are not the fixed-batch model's"
        errors = [0.0] * len(names)
        scales = [0.0] * len(names)
        for start in range(0, n, fixed):
            # A last chunk shorter than the fixed batch (or a whole batch smaller than it) is
            # padded, and only its real samples' rows are compared. The filler must differ from
            # the real samples (float inputs: their negation): a fixed-batch model that mixes
            # samples (say, each with the one F/2 rows away) then gives rows that depend on the
            # filler, which a symbolic graph run without it cannot match -- padding with copies
            # of the same samples would make such mixing invisible whenever n divides F.
            real = min(fixed, n - start)
            chunk_feed = {k: _padded(v[start : start + real], fixed) for k, v in self.batch.items()}
            want = run_calibration_graph(fixed_session, chunk_feed, start // fixed + 1)
            for j, name in enumerate(names):
                label, chunk, value = label_of[name], want[j], got[j]
                rows = chunk.shape[0] if chunk.ndim else 0
                if (
                    chunk.ndim == 0
                    or (rows * n) % fixed
                    or (rows * real) % fixed
                    or value.shape != ((rows * n) // fixed,) + chunk.shape[1:]
                ):
                    return (
                        f"BN '{label}' input has shape {value.shape} at batch {n}, the fixed-batch model's "
                        f"{chunk.shape} at {fixed}"
                    )
                first, real_rows = start // fixed * rows, (rows * real) // fixed
                have = value[first : first + real_rows].astype(np.float64)
                chunk = chunk[:real_rows]
                # A network that overflows gives Inf in both runs, and Inf - Inf warns; the
                # calibration run refuses a non-finite BN input anyway (runner._Accumulator.add).
                with np.errstate(invalid="ignore", over="ignore"):
                    errors[j] = max(errors[j], float(np.max(np.abs(have - chunk))) if chunk.size else 0.0)
                scales[j] = max(scales[j], float(np.max(np.abs(chunk))) if chunk.size else 0.0)
        for j, name in enumerate(names):
            rtol = _SYMBOLIC_RTOL.get(self.elem_types.get(name), _SYMBOLIC_RTOL_DEFAULT)
            if not errors[j] <= rtol * scales[j] + 1e-30:  # NaN fails too
                return (
                    f"BN '{label_of[name]}' input differs from the fixed-batch model's (max abs error {errors[j]:.3g} "
                    f"of {scales[j]:.3g})"
                )
        return ""


def _padded(rows: np.ndarray, size: int) -> np.ndarray:
    """``rows`` followed by filler rows up to ``size``: the rows again, negated where they are
    floats (any values the model takes, and different from the real ones)."""
    if len(rows) >= size:
        return rows
    filler = rows[np.arange(size - len(rows)) % len(rows)]
    if np.issubdtype(filler.dtype, np.floating):
        filler = -filler
    return np.concatenate([rows, filler])


def verified_symbolic_batch(
    model, view: GraphView, bns: list[BNToCalibrate], elem_types: dict, shapes: dict, batch: dict, fixed: int, n_threads
):
    """``(symbolic model, shift, shapes rewritten, "")`` for the first variant of
    ``_SYMBOLIC_VARIANTS`` that passes ``_SymbolicBatchCheck`` on ``batch``, else
    ``(None, 0, 0, why the last one failed)``."""
    check = _SymbolicBatchCheck(model, bns, elem_types, batch, fixed, n_threads)
    problem, previous = "", None
    for ops in _SYMBOLIC_VARIANTS:
        symbolic, shift, rewritten = _symbolic_batch_model(model, view, fixed, shapes, ops)
        if rewritten == previous:
            continue  # each variant rewrites a superset of the one before: nothing new, same graph
        previous = rewritten
        problem = check.problem(symbolic, shift)
        if not problem:
            return symbolic, shift, rewritten, ""
    return None, 0, 0, problem
