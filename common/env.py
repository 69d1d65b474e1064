"""Typed parsing of environment variables, with errors that name the variable.

Each parser factory returns ``parse(name, raw) -> value`` that raises :class:`ConfigError`
with a message starting with the variable's name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from common.net import host_name_problem

T = TypeVar("T", int, float)


class ConfigError(ValueError):
    """A setting has a value the program cannot run with; the message names the variable."""


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One variable: its env name, the config attribute it fills, its default as the README
    writes it, its meaning."""

    env: str
    attr: str
    default: str
    help: str


#: A number as people write one in a setting. Python's int() and float() also take Arabic-Indic
#: or fullwidth digits (LB_PORT in them read as 3000), a leading +, and _ between digits (3_000),
#: none of which a user means to type there.
_INTEGER = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
                      r"|-?(?:inf|infinity|nan)", re.IGNORECASE)  # the last two: ranges refuse them


def ascii_number(kind: Callable[[str], T]) -> Callable[[str], T]:
    """``int`` or ``float`` on plain decimal text only (see ``_INTEGER``)."""
    syntax = _INTEGER if kind is int else _DECIMAL

    def parse(text: str) -> T:
        text = text.strip()  # as int() and float() allow
        if not syntax.fullmatch(text):
            raise ValueError(f"not a plain number: {text!r}")
        return kind(text)

    return parse


def integer(lo: int, hi: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = ascii_number(int)(raw.strip())
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}")
        return value

    return parse


def seconds(lo: float, hi: float) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = ascii_number(float)(raw.strip())
        except ValueError:
            raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
        if not math.isfinite(value) or not lo <= value <= hi:
            raise ConfigError(f"{name} must be between {lo:g} and {hi:g} seconds, got {raw!r}")
        return value

    return parse


def choice(options: Sequence[str]) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ConfigError(f"{name} must be one of {', '.join(options)}, got {raw!r}")
        return value

    return parse


def text(*, empty_ok: bool = False) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if empty_ok:
            return raw
        value = raw.strip()
        if not value:
            raise ConfigError(f"{name} must not be empty")
        return value

    return parse


def host(*, paths_ok: bool = False) -> Callable[[str, str], str]:
    """An IP address or a host name the resolver can look up (with ``paths_ok``, also a
    directory, as libpq takes a Unix socket's)."""

    def parse(name: str, raw: str) -> str:
        value = raw.strip()
        if paths_ok and value.startswith("/"):
            return value
        problem = host_name_problem(value)
        if problem:
            raise ConfigError(f"{name} {problem}")
        return value

    return parse
