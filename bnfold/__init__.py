"""bnfold: batch-normalization toolkit for CPU inference.

Public API (see README.md): the BN kernels, the ONNX fold pass, parity checks, benchmarks and
PreciseBN calibration. Everything a user needs is importable from ``bnfold`` directly.

The names are resolved on first use (PEP 562): ``import bnfold`` itself loads neither onnx,
onnxruntime nor the compiled kernels, so the ``bnfold`` command starts by installing its signal
handlers and a Ctrl-C or SIGTERM during its start-up ends with the documented exit code instead
of a traceback.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from bnfold import _moved
from bnfold._version import __version__
from bnfold.errors import BnfoldError, BnfoldWarning, InputError, ParityError, unbuilt_extension_error

_moved.install()

# public name -> the module that defines it
_LAZY = {
    "openmp_enabled": "bnfold._openmp",
    "CalibrationReport": "bnfold.calibration",
    "calibrate": "bnfold.calibration",
    "FoldReport": "bnfold.folding",
    "fold": "bnfold.folding",
    "fold_file": "bnfold.folding",
    "inspect": "bnfold.folding",
    "Moments": "bnfold.kernels",
    "batch_norm_backward": "bnfold.kernels",
    "batch_norm_infer": "bnfold.kernels",
    "batch_norm_train": "bnfold.kernels",
    "batch_renorm_train": "bnfold.kernels",
    "batch_stats": "bnfold.kernels",
    "onnx_momentum": "bnfold.kernels",
    "CheckReport": "bnfold.verify",
    "check": "bnfold.verify",
}

if TYPE_CHECKING:  # what static tools and IDEs see
    from bnfold._openmp import openmp_enabled
    from bnfold.calibration import CalibrationReport, calibrate
    from bnfold.folding import FoldReport, fold, fold_file, inspect
    from bnfold.kernels import (
        Moments,
        batch_norm_backward,
        batch_norm_infer,
        batch_norm_train,
        batch_renorm_train,
        batch_stats,
        onnx_momentum,
    )
    from bnfold.verify import CheckReport, check


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ImportError as e:
        unbuilt = unbuilt_extension_error(e)
        if unbuilt is None:
            raise
        raise unbuilt from e
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["__version__", "openmp_enabled", "BnfoldError", "BnfoldWarning", "InputError", "ParityError"]
__all__ += ["check", "CheckReport"]
__all__ += [
    "Moments",
    "batch_stats",
    "batch_norm_train",
    "batch_norm_infer",
    "batch_norm_backward",
    "batch_renorm_train",
    "onnx_momentum",
]
__all__ += ["calibrate", "CalibrationReport"]
__all__ += ["fold", "fold_file", "inspect", "FoldReport"]
