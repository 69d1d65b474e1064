"""The event loop a program runs on: uvloop when installed (or asked for), else asyncio's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

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
