"""The event loop a program runs on: uvloop when installed (or asked for), else asyncio's."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from common.env import ConfigError

LOOPS = ("auto", "uvloop", "asyncio")


def loop_factory(choice: str, *, variable: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The factory for ``choice`` (one of :data:`LOOPS`); ``variable`` names the setting."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError(f"{variable}=uvloop but uvloop is not installed") from None
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def loop_name(factory: Callable[[], asyncio.AbstractEventLoop]) -> str:
    return "uvloop" if factory.__module__.startswith("uvloop") else "asyncio"


def run(
    main: Coroutine[Any, Any, None],
    *,
    factory: Callable[[], asyncio.AbstractEventLoop],
    address: str,
    log: logging.Logger,
) -> int:
    """Run a server's ``main`` to its end on a new loop: exit status 0, or 1 (logged) when it
    cannot listen on ``address``."""
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            runner.run(main)
        except OSError as exc:
            log.error("cannot serve on %s: %s", address, exc)
            return 1
    return 0
