"""A one-line progress bar on stderr, shown only when stderr is a terminal.

Long commands (verify, rebuild, seed) call a `Progress` with (done, total); it redraws at
most a few times a second so that it costs nothing next to the work it reports on.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

REDRAW_SECONDS = 0.2  # how often the line may be redrawn
BAR_WIDTH = 30


class Progress:
    """A callable `(done, total)` that draws `label [#####     ] 42% 420/1000` on a terminal."""

    def __init__(self, label: str, stream: TextIO | None = None, enabled: bool | None = None):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _isatty(self.stream) if enabled is None else enabled
        self._last_draw = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_draw < REDRAW_SECONDS and done < total:
            return
        self._last_draw = now
        self.stream.write("\r" + render(self.label, done, total))
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        """Erase the line, so that the command's own output starts on a clean line."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


def render(label: str, done: int, total: int) -> str:
    """The text of one progress line (pure, for tests)."""
    fraction = min(1.0, done / total) if total > 0 else 1.0
    filled = int(fraction * BAR_WIDTH)
    bar = "#" * filled + " " * (BAR_WIDTH - filled)
    return f"{label} [{bar}] {fraction * 100:3.0f}% {done:,}/{total:,}"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
