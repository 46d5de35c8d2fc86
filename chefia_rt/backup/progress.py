"""What a backup, verify or restore shows while it runs."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """A per-table progress bar on a terminal; nothing but the final summary line otherwise
    (a timer's journal gets one line per run)."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._label = ""
        self._total: int | None = None
        self._done = 0
        self._shown = 0.0

    def start(self, label: str, total: int | None) -> None:
        self._label, self._total, self._done, self._shown = label, total, 0, 0.0
        self._draw(force=True)

    def advance(self, rows: int = 1) -> None:
        self._done += rows
        if self.tty and time.monotonic() - self._shown >= 0.1:
            self._draw()

    def finish(self) -> None:
        if self.tty:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()

    def summary(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        if not self.tty:
            return
        self._shown = time.monotonic()
        if self._total:
            share = min(1.0, self._done / self._total)
            bar = "#" * int(share * 24)
            text = f"{self._label:<30} [{bar:<24}] {self._done:>10,}/{self._total:,} rows"
        else:
            text = f"{self._label:<30} {self._done:>10,} rows"
        self.stream.write("\r" + text)
        self.stream.flush()
