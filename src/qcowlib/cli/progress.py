"""A plain-text progress indicator on stderr (qemu-img's ``-p`` style)."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """Prints ``(NN.NN/100%)`` updates, at most ten times a second."""

    def __init__(self) -> None:
        self._last = 0.0
        self._shown = -1.0

    def update(self, done: int, total: int) -> None:
        pct = 100.0 * done / total if total else 100.0
        now = time.monotonic()
        if pct < 100.0 and (now - self._last < 0.1 or pct == self._shown):
            return
        self._last, self._shown = now, pct
        sys.stderr.write(f"    ({pct:.2f}/100%)\r")
        sys.stderr.flush()

    def finish(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()
