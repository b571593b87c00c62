"""PreciseBN calibration: re-estimate BN population statistics from data with bnfold's kernels."""

# What other stages use (they import from the package, never from its modules).
from bnfold.calibration.data import iter_batches
from bnfold.calibration.report import CalibrationReport
from bnfold.calibration.runner import calibrate

__all__ = [
    "CalibrationReport",
    "calibrate",
    "iter_batches",
]
