"""common.logs.Throttled: a flood of one log line becomes one line per interval, nothing lost."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from common.logs import Throttled


class Lines(logging.Handler):
    """The messages logged, and an event per count reached."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self._waiters: dict[int, asyncio.Event] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        for count, event in self._waiters.items():
            if len(self.messages) >= count:
                event.set()

    async def reach(self, count: int) -> None:
        event = self._waiters.setdefault(count, asyncio.Event())
        if len(self.messages) >= count:
            return
        await asyncio.wait_for(event.wait(), 10)


@pytest.fixture
def lines() -> Iterator[tuple[logging.Logger, Lines]]:
    logger = logging.getLogger("tests.throttled")
    handler = Lines()
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


async def test_a_burst_is_its_first_line_then_its_last_with_the_count(
    lines: tuple[logging.Logger, Lines],
) -> None:
    logger, handler = lines
    throttled = Throttled(logger, logging.WARNING, interval=0.2)
    for i in range(5):
        throttled.log("request %d: database busy", i)
    assert handler.messages == ["request 0: database busy"]
    await handler.reach(2)
    assert handler.messages == [
        "request 0: database busy",
        "request 4: database busy [4 lines like this held back over 0.2 s]",
    ]


async def test_under_a_flood_one_line_per_interval(lines: tuple[logging.Logger, Lines]) -> None:
    logger, handler = lines
    throttled = Throttled(logger, logging.WARNING, interval=0.2)
    throttled.log("first")
    throttled.log("second")
    await handler.reach(2)
    throttled.log("third")  # right after the summary: held for the next one
    assert handler.messages == ["first", "second [1 line like this held back over 0.2 s]"]
    await handler.reach(3)
    assert handler.messages[2] == "third [1 line like this held back over 0.2 s]"


async def test_a_quiet_line_is_written_at_once(lines: tuple[logging.Logger, Lines]) -> None:
    logger, handler = lines
    throttled = Throttled(logger, logging.WARNING, interval=0.0)
    throttled.log("one")
    throttled.log("two")
    assert handler.messages == ["one", "two"]


async def test_close_says_what_is_held_at_once(lines: tuple[logging.Logger, Lines]) -> None:
    logger, handler = lines
    throttled = Throttled(logger, logging.WARNING, interval=60)
    throttled.log("a")
    throttled.log("b")
    throttled.close()
    assert handler.messages == ["a", "b [1 line like this held back over 60 s]"]
    throttled.close()  # nothing held: nothing said
    assert len(handler.messages) == 2
