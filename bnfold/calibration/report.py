"""The calibration report: what calibration did to each BatchNormalization, run totals and timings,
as a table or JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bnfold.common import count, format_table
from bnfold.io import write_json_atomic


def _summary(values) -> dict | None:
    if values is None:
        return None
    v = np.asarray(values, dtype=np.float64)
    return {"min": float(v.min()), "mean": float(v.mean()), "max": float(v.max())}


@dataclass
class BNCalibration:
    """What calibration did to one BatchNormalization node.

    ``status`` is "calibrated" or "skipped" (then ``reason`` says why). ``graph`` is "" for the
    main graph, else the path of the subgraph ("If_3/then_branch"). ``values_per_channel`` counts
    the values each channel's statistics were computed from (samples x spatial positions).
    Relative changes: the mean's change is measured against max(|old mean|, old std) so a mean
    near zero does not make it explode; the variance's against old var + eps.
    """

    bn: str
    graph: str = ""
    status: str = "calibrated"
    reason: str = ""
    level: int | None = None
    channels: int = 0
    samples: int = 0
    values_per_channel: int = 0
    old_mean: np.ndarray | None = None
    old_var: np.ndarray | None = None
    new_mean: np.ndarray | None = None
    new_var: np.ndarray | None = None
    epsilon: float = 1e-5

    @property
    def max_rel_change_mean(self) -> float | None:
        if self.old_mean is None or self.new_mean is None:
            return None
        # A model's old statistics may be anything (Inf, NaN, a variance of 0 with epsilon 0):
        # the change is then Inf or NaN, which the report shows as such; numpy's warnings about
        # computing it would only be noise.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            old_std = np.sqrt(np.maximum(self.old_var, 0) + self.epsilon) if self.old_var is not None else 0.0
            denom = np.maximum(np.abs(self.old_mean), old_std)
            return float(np.max(np.abs(self.new_mean - self.old_mean) / denom))

    @property
    def max_rel_change_var(self) -> float | None:
        if self.old_var is None or self.new_var is None:
            return None
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # as max_rel_change_mean
            denom = np.abs(self.old_var) + self.epsilon
            return float(np.max(np.abs(self.new_var - self.old_var) / denom))

    def to_dict(self) -> dict:
        return {
            "bn": self.bn,
            "graph": self.graph,
            "status": self.status,
            "reason": self.reason,
            "level": self.level,
            "channels": self.channels,
            "samples": self.samples,
            "values_per_channel": self.values_per_channel,
            "old_mean": _summary(self.old_mean),
            "old_var": _summary(self.old_var),
            "new_mean": _summary(self.new_mean),
            "new_var": _summary(self.new_var),
            "max_rel_change_mean": self.max_rel_change_mean,
            "max_rel_change_var": self.max_rel_change_var,
        }


@dataclass
class CalibrationReport:
    """Per-BN results of ``calibrate`` plus run totals and where the time went."""

    mode: str
    batch_size: int  # samples per batch read from the data (the batch_size argument)
    entries: list[BNCalibration] = field(default_factory=list)
    fixed_batch: int | None = None  # the model inputs' fixed batch dimension, None when dynamic
    run_batch_size: int = 0  # samples per onnxruntime run: batch_size, or fixed_batch when run at it
    n_batches: int = 0  # onnxruntime runs per pass over the data
    n_samples: int = 0  # samples per pass over the data
    passes: int = 0
    seconds_total: float = 0.0
    seconds_forward: float = 0.0  # onnxruntime runs
    seconds_statistics: float = 0.0  # Moments.from_array + merge
    notes: list[str] = field(default_factory=list)

    @property
    def calibrated(self) -> list[BNCalibration]:
        return [e for e in self.entries if e.status == "calibrated"]

    @property
    def skipped(self) -> list[BNCalibration]:
        return [e for e in self.entries if e.status != "calibrated"]

    @property
    def n_calibrated(self) -> int:
        return len(self.calibrated)

    def entry(self, bn: str) -> BNCalibration:
        for e in self.entries:
            if e.bn == bn:
                return e
        raise KeyError(bn)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "batch_size": self.batch_size,
            "fixed_batch": self.fixed_batch,
            "run_batch_size": self.run_batch_size,
            "n_batches": self.n_batches,
            "n_samples": self.n_samples,
            "passes": self.passes,
            "n_calibrated": self.n_calibrated,
            "n_skipped": len(self.skipped),
            "seconds_total": self.seconds_total,
            "seconds_forward": self.seconds_forward,
            "seconds_statistics": self.seconds_statistics,
            "notes": list(self.notes),
            "bn": [e.to_dict() for e in self.entries],
        }

    def to_json(self, path) -> None:
        # Atomic: an interrupted or failing write never leaves a half-written report behind.
        write_json_atomic(self.to_dict(), path)

    def format_table(self) -> str:
        def average(values) -> str:
            # Old statistics are unknown when they are not constant (e.g. fed as a graph input).
            return "?" if values is None else f"{np.mean(values):.4g}"

        def change(value) -> str:
            return "-" if value is None else f"{value:.3g}"

        header = (
            "BN",
            "level",
            "samples",
            "values/ch",
            "mean old->new (avg)",
            "var old->new (avg)",
            "max rel chg mean",
            "max rel chg var",
        )
        rows = []
        for e in self.entries:
            if e.status != "calibrated":
                where = f" [{e.graph}]" if e.graph else ""
                rows.append((e.bn + where, "-", "-", "-", f"skipped: {e.reason}", "", "", ""))
                continue
            rows.append(
                (
                    e.bn,
                    "-" if e.level is None else str(e.level),
                    str(e.samples),
                    str(e.values_per_channel),
                    f"{average(e.old_mean)} -> {average(e.new_mean)}",
                    f"{average(e.old_var)} -> {average(e.new_var)}",
                    change(e.max_rel_change_mean),
                    change(e.max_rel_change_var),
                )
            )
        lines = format_table(header, rows)
        stat_share = self.seconds_statistics / self.seconds_total if self.seconds_total > 0 else 0.0
        lines.append(
            f"{self.n_calibrated} BN calibrated, {len(self.skipped)} skipped; mode={self.mode}, "
            f"{count(self.n_samples, 'sample')} in {count(self.n_batches, 'batch')} "
            f"of {self.run_batch_size or self.batch_size}, "
            f"{count(self.passes, 'pass')}, "
            f"{self.seconds_total:.2f} s ({100 * stat_share:.1f}% statistics)"
        )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
