"""bnfold: batch-normalization toolkit for CPU inference.

Public API (see README.md): the BN kernels, the ONNX fold pass, parity checks, benchmarks and
PreciseBN calibration. Everything a user needs is importable from ``bnfold`` directly.
"""

from bnfold._openmp import openmp_enabled
from bnfold._version import __version__
from bnfold.calibration import CalibrationReport, calibrate
from bnfold.errors import BnfoldError, BnfoldWarning, InputError, ParityError
from bnfold.fold_pass import FoldReport, fold, fold_file, inspect
from bnfold.kernels import (
    Moments,
    batch_norm_backward,
    batch_norm_infer,
    batch_norm_train,
    batch_renorm_train,
    batch_stats,
    onnx_momentum,
)
from bnfold.parity import CheckReport, check

__all__ = ["__version__", "openmp_enabled", "BnfoldError", "BnfoldWarning", "InputError", "ParityError"]
__all__ += ["check", "CheckReport"]
__all__ += [
    "Moments", "batch_stats", "batch_norm_train", "batch_norm_infer", "batch_norm_backward",
    "batch_renorm_train", "onnx_momentum",
]
__all__ += ["calibrate", "CalibrationReport"]
__all__ += ["fold", "fold_file", "inspect", "FoldReport"]
