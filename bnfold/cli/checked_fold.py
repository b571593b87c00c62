"""Folding a file with the parity check run on the written bytes: the one code path of ``bnfold
fold`` and ``bnfold calibrate --fold``.

``bnfold.fold_file`` writes the folded model complete into a temporary file beside OUT and calls
``verify(tmp_path)`` before moving it into place; the check (``bnfold.check`` with intermediate
values) runs there, on exactly the bytes that OUT will hold — also during fold_file's float16
precision search, which retries with fewer folds when a check fails.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class CheckedFold:
    """What ``fold_checked`` did: the fold report, the last parity check (None when the check was
    skipped) and the time until the folded model was complete in its temporary file."""

    report: object
    check: object
    fold_seconds: float

    @property
    def failed(self) -> bool:
        return self.check is not None and not self.check.passed


def fold_checked(
    source, output, *, force: bool, check_options: dict | None, could_not_run_hint: str = ""
) -> CheckedFold:
    """Fold the model file ``source`` into ``output``, checking each result against ``source``
    (``check_options``: keyword arguments of ``bnfold.check``; None skips the check). A result
    that fails the check is not written unless ``force``. A check that cannot run at all is a
    one-line InputError, followed by ``could_not_run_hint``."""
    from bnfold.errors import InputError
    from bnfold.folding import fold_file
    from bnfold.verify import check

    outcome = {"check": None}

    def verify(tmp_path):
        outcome["fold_seconds"] = time.perf_counter() - start
        if check_options is None:
            return True
        try:
            # bnfold's fold keeps every value's name and meaning, so its intermediate values are
            # compared too: each folded layer is checked directly, whatever the head hides.
            outcome["check"] = check(source, tmp_path, candidate_label=output, intermediates=True, **check_options)
        except InputError as e:
            raise InputError(f"parity check could not run: {e}{could_not_run_hint}") from None
        return outcome["check"].passed

    start = time.perf_counter()
    report = fold_file(source, output, verify=verify, write_refused=force)
    return CheckedFold(report, outcome["check"], outcome["fold_seconds"])
