"""PreciseBN: re-estimate every BatchNormalization's population statistics from data.

``calibrate(model, data)`` streams calibration data through onnxruntime in batches, collects the
input of every BatchNormalization (BN) of the main graph, reduces it per channel with bnfold's
kernels (``Moments``, merged across batches with Chan's formula in float64) and writes the exact
population mean and biased variance into the BN's running_mean / running_var. Scale, bias and all
other weights are untouched.

Two modes:

* ``"batch"`` (PreciseBN, Wu & Johnson 2021): a copy of the graph in which every inference BN
  normalizes by the statistics of the *current batch* (training-mode behaviour, written as explicit
  ReduceMean/Sub/Mul/Div ops so any onnxruntime build runs it) and exposes its input as an extra
  output. One onnxruntime run per batch yields all BN inputs. The first BN's statistics are exact
  population statistics; deeper BNs see activations normalized per batch, so their statistics
  depend on the batch size, as in PreciseBN.
* ``"sequential"``: every BN's statistics are computed with all earlier BNs already normalizing by
  their *new* population statistics (inference mode) -- what each BN sees at inference time,
  independent of the batch size. BNs are grouped into levels (level = number of calibrated BNs on
  the longest path from the inputs to the BN, itself included); the BNs of one level do not depend
  on each other and share one pass over the data, on a graph pruned to the nodes they need.

A model whose inputs fix the batch dimension (``torch.onnx.export``'s default) runs at that batch
in sequential mode (the data fed in chunks of it); batch mode runs a calibration graph with the
batch made symbolic when running it checks out, else the fixed batch too (see
``bnfold.calibration.fixed_batch``). The report's notes say what was done.

Data flows: data source -> ``data.Dataset`` (validated parts, streamed and re-batched along axis 0)
-> onnxruntime run of the calibration graph (``graphs``, ``sessions``) -> ``Moments.from_array`` per
BN input -> merge -> model (``graphs.write_statistics``). Memory stays bounded by one batch plus its
activations (see ``data.Dataset`` for how .npy/.npz files are read without loading them whole).

This module holds ``calibrate`` itself: screening the BNs, planning the runs (fixed batch or not),
the passes over the data, the per-BN accumulator of Moments, and progress.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfold.calibration.data import Dataset, model_input_specs
from bnfold.calibration.fixed_batch import FixedSizeFeeds, fixed_batch_of, verified_symbolic_batch
from bnfold.calibration.graphs import (
    BNToCalibrate,
    assign_levels,
    expose_bn_inputs,
    initial_statistics,
    prune_to_outputs,
    rewrite_batch_mode,
    static_shape,
    subgraph_bns,
    value_types,
    write_statistics,
)
from bnfold.calibration.report import BNCalibration, CalibrationReport
from bnfold.calibration.sessions import calibration_session, run_calibration_graph
from bnfold.common import count
from bnfold.errors import InputError
from bnfold.folding import GraphView, ModelContext, get_attr, is_batch_norm, remove_unused, screen_batch_norm
from bnfold.io import load_model

MODES = ("batch", "sequential")


@dataclass
class _RunPlan:
    """Where the calibration graphs come from and at which batch onnxruntime runs them."""

    mode: str
    base: onnx.ModelProto  # the model the calibration graphs are built from
    shift: int = 0  # nodes ``base`` has before the model's own (BN indices move by this much)
    run_at: int | None = None  # exact samples per run (a fixed batch), None = any
    first_pass: Iterator | None = None  # the first pass's data stream when its first batch was read
    batch_mode_at_fixed: bool = False  # batch mode wanted batch_size but runs at the fixed batch
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # onnxruntime time of the symbolic-batch check


def _plan_runs(
    model, view, bns, dataset, mode, batch_size, max_batches, fixed, elem_types, shapes, n_threads
) -> _RunPlan:
    """How to run a model whose batch dimension is ``fixed`` (None: dynamic, nothing to plan).

    Sequential mode runs at the fixed batch. Batch mode tries a symbolic batch on the first data
    batch (``verified_symbolic_batch``) and otherwise runs at the fixed batch -- unless some BN would then
    see one value per channel, where batch statistics are undefined: then sequential mode."""
    plan = _RunPlan(mode=mode, base=model)
    if fixed is None:
        return plan
    plan.run_at = fixed
    if mode == "batch" and batch_size != fixed:
        stream = dataset.batches(batch_size, max_batches)
        first = next(stream)
        plan.first_pass = itertools.chain([first], stream)
        # A first batch of exactly `fixed` samples is what running at the fixed batch gives anyway
        # (all the data, or batch_size == fixed); any other size needs the symbolic batch.
        if len(next(iter(first.values()))) != fixed:
            t0 = time.perf_counter()
            symbolic, shift, rewritten, problem = verified_symbolic_batch(
                model, view, bns, elem_types, shapes, first, fixed, n_threads
            )
            plan.seconds = time.perf_counter() - t0
            if symbolic is not None:
                plan.base, plan.shift, plan.run_at = symbolic, shift, None
                plan.notes.append(
                    f"the model's batch dimension is fixed at {fixed}: batch mode ran a calibration graph with it made "
                    f"symbolic ({count(rewritten, 'shape')} rewritten; checked against the fixed-batch model on the "
                    "first batch)"
                )
                return plan
            degenerate = _one_value_per_channel(bns, shapes)
            if degenerate is not None:
                # Batch statistics of one value per channel are undefined; sequential statistics are
                # not, and they are what this BN's input becomes at inference time.
                plan.mode = "sequential"
                plan.notes.append(
                    "calibrated in sequential mode, not batch mode: the model's batch dimension is fixed at "
                    f"{fixed} and could not be made symbolic ({problem}), and at that batch BN '{degenerate}' sees "
                    "one value per "
                    "channel (undefined batch statistics)"
                )
            else:
                plan.batch_mode_at_fixed = True
                plan.notes.append(
                    f"batch mode ran at the model's fixed batch {fixed}, not {batch_size}: its batch dimension "
                    f"could not be made symbolic ({problem}); batch statistics are over {count(fixed, 'sample')} at "
                    "a time"
                )
    if plan.mode == "sequential" and batch_size != fixed:
        plan.notes.append(
            f"the model's batch dimension is fixed at {fixed}: sequential mode ran it "
            f"{count(fixed, 'sample')} at a time (its statistics do not depend on the batch size)"
        )
    return plan


# Per-channel statistics need this many values per channel: the variance of one value is 0
# whatever the data (a BN calibrated on it divides by sqrt(eps) at inference), and a batch-mode BN
# normalizing by it outputs 0 or NaN. Batch mode needs it per batch (the batch is what each BN
# normalizes by), both modes over all the data (the population written to the model).
_MIN_VALUES_PER_CHANNEL = 2


def _values_per_channel(shape) -> int:
    """Values each channel of a BN input of ``shape`` (N, C, ...) holds: N times the spatial size."""
    return math.prod(int(d) for d in shape) // int(shape[1]) if int(shape[1]) else 0


def _too_few_values(values_per_channel: int) -> bool:
    """Whether statistics of ``values_per_channel`` values per channel are undefined (a single
    value; an empty input, no channels or no samples, is refused elsewhere)."""
    return 0 < values_per_channel < _MIN_VALUES_PER_CHANNEL


def _one_value_per_channel(bns: list[BNToCalibrate], shapes: dict):
    """Label of the first BN whose input has one value per channel at the fixed batch (from the
    fixed-batch model's static shapes), else None."""
    for b in bns:
        shape = static_shape(shapes, b.x)
        if shape is not None and len(shape) >= 2 and shape[1] > 0 and _too_few_values(_values_per_channel(shape)):
            return b.label
    return None


class _NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass


def _progress(enabled, total, label):
    if not enabled:
        return _NullProgress()
    try:
        from bnfold.progress import Progress
    except ImportError:
        return _NullProgress()
    return Progress(total, label)


class _Accumulator:
    """Per-BN Moments merged across batches, and the time spent on them."""

    def __init__(self, labels, one_value_is_error: bool, n_threads=None, fixed_batch=None):
        from bnfold.kernels import Moments

        self._moments_cls = Moments
        self.moments = dict.fromkeys(labels)
        self.samples = dict.fromkeys(labels, 0)
        self.seconds = 0.0
        self._one_value_is_error = one_value_is_error
        self._n_threads = n_threads
        self._fixed_batch = fixed_batch  # the model runs at this fixed batch; batch_size cannot help

    def add(self, label, x, batch_number):
        if x.ndim < 2:
            raise InputError(f"BN '{label}': input of rank {x.ndim}; BatchNormalization needs (N, C, ...)")
        one_value = _too_few_values(_values_per_channel(x.shape))
        if self._one_value_is_error and one_value and self._fixed_batch is not None:
            raise InputError(
                f"batch {batch_number}: BN '{label}' sees one value per channel at the model's fixed batch "
                f"{self._fixed_batch}, whose batch dimension could not be made symbolic (see the note); batch "
                "statistics "
                "are undefined there -- use --mode sequential"
            )
        if self._one_value_is_error and one_value:
            raise InputError(
                f"batch {batch_number}: BN '{label}' sees one value per channel (batch of 1 sample without spatial "
                "positions); batch statistics are undefined -- use a batch size >= 2 that leaves no final batch of 1, "
                "or --mode sequential (which needs 2 samples in all)"
            )
        t0 = time.perf_counter()
        activation_dtype = x.dtype
        if x.dtype not in (np.float32, np.float64):
            # float16 (and other narrow float) activations: the kernels take float32/float64 and
            # accumulate in float64, so upcasting first is exact.
            x = x.astype(np.float32)
        m = self._moments_cls.from_array(x, axis=1, n_threads=self._n_threads)
        if not (np.isfinite(m.mean).all() and np.isfinite(m.m2).all()):
            # The data was checked finite as it was read: the network itself overflowed.
            raise InputError(
                f"batch {batch_number}: BN '{label}' gets non-finite inputs (NaN/Inf) from finite calibration data; "
                f"the network overflows {activation_dtype} or produces NaN on this data"
            )
        prev = self.moments[label]
        self.moments[label] = m if prev is None else prev.merge(m)
        self.seconds += time.perf_counter() - t0
        self.samples[label] += x.shape[0]

    def population(self, label):
        """The merged Moments of ``label`` over all the data, the population written to the
        model; InputError when they hold a single value per channel (``_too_few_values``): one
        sample in all, for a BN without spatial positions. (Batch mode refuses such a batch in
        ``add`` already; sequential mode, which merges single values, gets here.)"""
        m = self.moments[label]
        if _too_few_values(m.count):
            samples = self.samples[label]
            raise InputError(
                f"BN '{label}' sees one value per channel in all the calibration data ({count(samples, 'sample')}); "
                "one value is not a population (its variance is 0 for every channel) -- give at least 2 samples"
            )
        return m


def calibrate(model_or_path, data, *, mode="batch", batch_size=32, max_batches=None, progress=False, n_threads=None):
    """Re-estimate the running mean/variance of every main-graph BatchNormalization from data.

    Returns ``(calibrated ModelProto, CalibrationReport)``; the input model is never modified.
    ``data``: a .npy / .npz path or a directory of them, a dict input name -> array, a single
    array (single-input model), or an iterable of such dicts. Samples are streamed in batches of
    ``batch_size`` along axis 0; ``max_batches`` limits the number of batches per pass.
    ``mode``: "batch" (PreciseBN, statistics of deeper BNs depend on the batch size) or
    "sequential" (inference-consistent, batch-size independent, one pass per BN level).
    A model with a fixed batch dimension F works with any ``batch_size``: sequential mode runs it
    F samples at a time; batch mode at ``batch_size`` with the batch made symbolic when that is
    verified on the first batch, else at F (``report.notes`` says which; samples that do not fill a
    last batch of F are not used, and a note says how many).
    ``n_threads``: threads of onnxruntime and of the statistics kernels (None: all cores).
    Raises InputError for unusable data; nothing is returned half-calibrated. Data that gives a
    BN one value per channel in all (one sample, for a BN on (N, C)) is unusable in both modes,
    and in batch mode so is any batch that does (see ``_MIN_VALUES_PER_CHANNEL``).
    """
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, (int, np.integer)) or max_batches < 1
    ):
        raise InputError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    batch_size = int(batch_size)
    if n_threads is not None and (
        isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)) or n_threads < 1
    ):
        raise InputError(f"n_threads must be a positive integer or None, got {n_threads!r}")
    t_start = time.perf_counter()

    source = load_model(model_or_path)
    model = onnx.ModelProto()
    model.CopyFrom(source)
    specs, optional = model_input_specs(model)
    if not specs:
        raise InputError("model has no inputs to feed calibration data into")
    dataset = Dataset(data, specs, optional)
    fixed = fixed_batch_of(specs)

    report = CalibrationReport(mode=mode, batch_size=batch_size, fixed_batch=fixed, run_batch_size=batch_size)
    # The main graph seen as the fold pass sees it: BN parameters are read and written through it.
    view = GraphView(model.graph, ModelContext(model))
    elem_types, shapes = value_types(model)
    # Screening: the fold pass's screen for a BN whose statistics are about to be replaced; one not
    # in inference mode is reported as skipped and left alone.
    bns = []
    for i, node in enumerate(view.nodes):
        if not is_batch_norm(node):
            continue
        label = view.labels[i]
        entry = BNCalibration(bn=label, epsilon=float(get_attr(node, "epsilon", 1e-5)))
        failure = screen_batch_norm(view, i, statistics_replaced=True)
        if failure is not None:
            entry.status, entry.reason = "skipped", f"{failure.reason}: {failure.message}; left alone"
        else:
            entry.old_mean, entry.old_var = initial_statistics(view, node)
            bns.append(BNToCalibrate(index=i, label=label, x=node.input[0]))
        report.entries.append(entry)
    for label, path in subgraph_bns(model.graph, ""):
        report.entries.append(
            BNCalibration(
                bn=label,
                graph=path,
                status="skipped",
                reason="subgraph: BNs inside If/Loop/Scan bodies are not calibrated",
            )
        )
    if not bns:
        report.notes.append("no BatchNormalization in the main graph can be calibrated; model unchanged")
        report.seconds_total = time.perf_counter() - t_start
        return model, report

    assign_levels(model, bns)
    plan = _plan_runs(model, view, bns, dataset, mode, batch_size, max_batches, fixed, elem_types, shapes, n_threads)
    switched = plan.mode != mode  # batch mode impossible at the fixed batch: sequential instead
    mode = report.mode = plan.mode
    report.notes += plan.notes
    report.run_batch_size = plan.run_at or batch_size
    report.seconds_forward += plan.seconds
    base, shift, run_at, first_pass = plan.base, plan.shift, plan.run_at, plan.first_pass
    if mode == "batch":
        groups = [bns]
    else:
        levels = sorted({b.level for b in bns})
        groups = [[b for b in bns if b.level == lv] for lv in levels]
        if dataset.one_shot and len(groups) > 1:
            why = f"{plan.notes[0]}; " if switched else ""
            raise InputError(
                f"{why}sequential mode reads the data once per BN level ({len(groups)} levels); pass a list, dict, "
                "array "
                "or path instead of a one-shot iterator"
            )
    n_batches = dataset.n_batches(batch_size, max_batches)
    total = None if n_batches is None else n_batches * len(groups)

    results = {}
    with _progress(progress, total, f"calibrate ({mode})") as bar:
        for group_number, group in enumerate(groups):
            work = onnx.ModelProto()
            work.CopyFrom(base)
            group_copy = [BNToCalibrate(b.index + shift, b.label, b.x, b.level) for b in group]
            fetch = expose_bn_inputs(work, group_copy, elem_types)
            if mode == "batch":
                rewrite_batch_mode(work, group_copy, elem_types, view.ctx.opset)
            names = list(dict.fromkeys(fetch.values()))
            prune_to_outputs(work, names, elem_types)
            session = calibration_session(work, n_threads)
            acc = _Accumulator(
                [b.label for b in group],
                one_value_is_error=(mode == "batch"),
                n_threads=n_threads,
                fixed_batch=fixed if plan.batch_mode_at_fixed else None,
            )
            runs = seen_samples = 0
            feeds = FixedSizeFeeds(run_at) if run_at is not None else None
            batches = (
                first_pass if group_number == 0 and first_pass is not None else dataset.batches(batch_size, max_batches)
            )
            for batch in batches:
                for feed in feeds.cut(batch) if feeds is not None else [batch]:
                    runs += 1
                    t0 = time.perf_counter()
                    outputs = run_calibration_graph(session, feed, runs)
                    report.seconds_forward += time.perf_counter() - t0
                    by_name = dict(zip(names, outputs))
                    for b in group:
                        acc.add(b.label, by_name[fetch[b.label]], runs)
                    seen_samples += len(next(iter(feed.values())))
                bar.update(1)
            if feeds is not None:
                feeds.finish()
                if runs == 0:
                    raise InputError(
                        f"no complete batch: the model's batch dimension is fixed at {fixed} and the data holds "
                        f"{count(feeds.dropped, 'sample')}"
                    )
                if feeds.dropped:
                    note = (
                        f"the last {count(feeds.dropped, 'sample')} of the data were not used: the model's batch "
                        f"dimension is fixed at {fixed} and they do not fill a batch"
                    )
                    if note not in report.notes:
                        report.notes.append(note)
            report.seconds_statistics += acc.seconds
            report.n_batches, report.n_samples = runs, seen_samples
            report.passes += 1
            for b in group:
                m = acc.population(b.label)
                results[b.label] = (m, acc.samples[b.label])
                if mode == "sequential":
                    write_statistics(view, b.index, b.label, m.mean, m.var(), elem_types)
    if mode == "batch":
        for b in bns:
            m, _ = results[b.label]
            write_statistics(view, b.index, b.label, m.mean, m.var(), elem_types)
    remove_unused(model, view.released)

    level_of = {b.label: b.level for b in bns}
    for entry in report.entries:
        if entry.status != "calibrated" or entry.graph:
            continue
        m, samples = results[entry.bn]
        entry.new_mean = np.asarray(m.mean, dtype=np.float64)
        entry.new_var = np.asarray(m.var(), dtype=np.float64)
        entry.channels = int(entry.new_mean.shape[0])
        entry.samples = int(samples)
        entry.values_per_channel = int(m.count)
        entry.level = level_of[entry.bn]
    report.seconds_total = time.perf_counter() - t_start
    return model, report
