"""A tiny progress bar on stderr for long runs (benchmarks, calibration); no dependencies.

    with Progress(total=200, label="calibrating") as p:
        for batch in batches:
            ...
            p.update(1)

The bar is drawn only when the stream is a terminal (``enabled=None``, the default) or when
forced (``enabled=True``); ``enabled=False`` turns it off. Redraws are throttled so a bar never
slows the loop it reports on, and the line is cleared when the block ends so the command's own
output starts on a clean line.
"""

from __future__ import annotations

import sys
import time

_BAR_WIDTH = 28
_MIN_REDRAW_SECONDS = 0.1


class Progress:
    def __init__(self, total=None, label: str = "", *, enabled=None, stream=None):
        """``total``: number of steps (None when unknown: only the count is shown)."""
        self.total = total
        self.label = label
        self.count = 0
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = bool(enabled)
        self._start = None
        self._last_draw = 0.0
        self._drawn = False

    def __enter__(self):
        self._start = time.perf_counter()
        self._draw(force=True)
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False

    def update(self, n=1) -> None:
        self.count += n
        self._draw()

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\r\033[K" if _is_tty(self.stream) else "\n")
            self.stream.flush()
            self._drawn = False

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        done = self.total is not None and self.count >= self.total
        if not force and not done and now - self._last_draw < _MIN_REDRAW_SECONDS:
            return
        self._last_draw = now
        elapsed = now - (self._start or now)
        if self.total:
            fraction = min(max(self.count / self.total, 0.0), 1.0)
            filled = round(fraction * _BAR_WIDTH)
            bar = "#" * filled + "." * (_BAR_WIDTH - filled)
            text = f"{self.label} [{bar}] {fraction:4.0%} {elapsed:5.1f}s"
        else:
            text = f"{self.label} {self.count} {elapsed:5.1f}s"
        self.stream.write("\r" + text.strip())
        self.stream.flush()
        self._drawn = True


def _is_tty(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
