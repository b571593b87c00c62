"""onnxruntime sessions for calibration graphs, and one run of a batch through them."""

from __future__ import annotations

from bnfold.common import first_line
from bnfold.errors import InputError
from bnfold.verify import create_session


def calibration_session(model, n_threads):
    """An onnxruntime session running calibration graph ``model`` with ``n_threads`` threads."""
    # Extended fusions (Conv+activation, ...) speed the forward pass up; the layout-changing and
    # pattern-matching transformers of level "all" are not needed and could rewrite the explicit
    # normalization ops. Idle onnxruntime threads would otherwise spin after every run and steal
    # the cores bnfold's OpenMP statistics kernels run on (measured: statistics 4x slower). A
    # trial run (the symbolic-batch check) fails as an expected answer, logged nowhere.
    return create_session(
        model.SerializeToString(),
        opt_level="extended",
        threads=n_threads,
        spinning=False,
        failure="onnxruntime cannot run the calibration graph",
    )


def run_calibration_graph(session, batch, batch_number):
    """All outputs of ``session`` on feed ``batch``; an onnxruntime failure becomes a one-line InputError."""
    try:
        return session.run(None, batch)
    except Exception as e:  # noqa: BLE001 - whatever the library raises, it is the input's fault
        raise InputError(
            f"batch {batch_number}: onnxruntime failed on the calibration data ({first_line(e)})"
        ) from None
