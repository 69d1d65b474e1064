"""Log lines that a burst of one event would repeat thousands of times a second."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any


class Throttled:
    """One kind of log line, at most once per ``interval`` seconds.

    Under overload every request can meet the same failure: a line each would flood the log
    and spend the CPU the overload lacks. The first line of an interval is written as it is;
    the ones after it are counted, and when the interval ends the last of them is written with
    their count (the metrics keep the exact counts).
    """

    __slots__ = ("_held", "_last", "_latest", "_summary", "interval", "level", "logger")

    def __init__(self, logger: logging.Logger, level: int, *, interval: float = 1.0) -> None:
        self.logger = logger
        self.level = level
        self.interval = interval
        self._last = -math.inf
        self._held = 0
        self._latest: tuple[str, tuple[Any, ...]] = ("", ())
        self._summary: asyncio.TimerHandle | None = None

    def log(self, msg: str, *args: Any) -> None:
        """Log now, or hold the line for the interval's summary. Called from the loop."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self._last >= self.interval and self._summary is None:
            self._last = now
            self.logger.log(self.level, msg, *args)
            return
        self._held += 1
        self._latest = (msg, args)
        if self._summary is None:
            self._summary = loop.call_at(self._last + self.interval, self._say_held)

    def _say_held(self) -> None:
        self._summary = None
        held, self._held = self._held, 0
        msg, args = self._latest
        self._latest = ("", ())
        # The summary is this interval's line: a line right after it would be one too many.
        self._last = asyncio.get_running_loop().time()
        lines = "line" if held == 1 else "lines"
        self.logger.log(self.level, f"{msg} [%d {lines} like this held back over %g s]", *args,
                        held, self.interval)

    def close(self) -> None:
        """Say what is held now (the loop is going away)."""
        if self._summary is not None:
            self._summary.cancel()
            self._say_held()
