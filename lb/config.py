"""The balancer's configuration: one typed, frozen object, read once from the environment and flags.

``LB_HOST``, ``LB_PORT`` and ``SERVER_COUNT`` are the original system's contract (its compose file
sets them); everything else is prefixed ``LB_``.  Flags win over the environment.  A bad value stops
the start with a message that names the variable (:class:`ConfigError`); ``python -m lb`` turns it
into exit status 2 without a traceback.

This module is the only place in ``lb`` that reads the environment.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar

import common.env

# ConfigError is re-exported: callers catch lb.config.ConfigError.
from common.env import ConfigError as ConfigError
from common.env import ascii_number
from common.loops import IO_URING, LOOPS
from common.net import host_name_problem, host_port

T = TypeVar("T")

LOG_LEVELS = ("debug", "info", "warning", "error")
CHECK_MODES = ("http", "tcp")
#: A container gets 10 s between SIGTERM and SIGKILL; the drain must end before that.
STOP_GRACE = 10.0
#: The shortest health-check or resolve period: shorter ones only keep a core busy.
MIN_INTERVAL = 0.01

CheckMode = Literal["http", "tcp"]
LoopName = Literal["auto", "uvloop", "asyncio"]
IoUring = Literal["off", "on"]


@dataclass(frozen=True, kw_only=True)
class Setting(common.env.Setting):
    """A balancer variable: every one also has a flag, named after it."""

    @property
    def flag(self) -> str:
        name = self.env.removeprefix("LB_").lower().replace("_", "-")
        return f"--{name}"


# One row per variable: the README's configuration table is written from this list.
SETTINGS: tuple[Setting, ...] = (
    Setting(env="LB_HOST", attr="host", default="0.0.0.0",
            help="address the proxy listens on"),
    Setting(env="LB_PORT", attr="port", default="3000",
            help="TCP port the proxy listens on"),
    Setting(env="SERVER_COUNT", attr="server_count", default="3",
            help="backend replicas expected; a warning is logged when another number is found"),
    Setting(env="LB_BACKENDS", attr="backends", default="",
            help="explicit backends `host:port,host:port`, used instead of `LB_BACKEND_HOST`; "
                 "a host name is one backend, at its first address (IPv4 first, numeric order)"),
    Setting(env="LB_BACKEND_HOST", attr="backend_host", default="backend",
            help="DNS name whose every address is a backend (when `LB_BACKENDS` is empty)"),
    Setting(env="LB_BACKEND_PORT", attr="backend_port", default="5000",
            help="port of the backends found through `LB_BACKEND_HOST`"),
    Setting(env="LB_RESOLVE_INTERVAL", attr="resolve_interval", default="5",
            help="seconds between two resolutions of `LB_BACKEND_HOST` (or the names in "
                 "`LB_BACKENDS`); at least 0.01"),
    Setting(env="LB_ADMIN_HOST", attr="admin_host", default="127.0.0.1",
            help="address of the admin listener (`/`, `/stats`, `/metrics`)"),
    Setting(env="LB_ADMIN_PORT", attr="admin_port", default="8404",
            help="port of the admin listener; 0 disables it"),
    Setting(env="LB_CHECK_MODE", attr="check_mode", default="http",
            help="active check: `http` (GET `LB_CHECK_PATH` expects 200) or `tcp` (connect)"),
    Setting(env="LB_CHECK_PATH", attr="check_path", default="/healthcheck",
            help="path of the HTTP health check"),
    Setting(env="LB_CHECK_INTERVAL", attr="check_interval", default="2",
            help="seconds between two health checks of a backend; at least 0.01"),
    Setting(env="LB_CHECK_RISE", attr="check_rise", default="2",
            help="consecutive passed checks that bring a down backend up"),
    Setting(env="LB_CHECK_FALL", attr="check_fall", default="3",
            help="consecutive failed checks that take an up backend down"),
    Setting(env="LB_CHECK_TIMEOUT", attr="check_timeout", default="1",
            help="seconds one health check may take"),
    Setting(env="LB_CONNECT_TIMEOUT", attr="connect_timeout", default="3",
            help="seconds a connect to a backend may take before the next backend is tried"),
    Setting(env="LB_CONNECT_RETRIES", attr="connect_retries", default="3",
            help="retries after a connect that timed out (HAProxy's `retries`): a client waits "
                 "through at most 1 + this many connect timeouts; refused connects move on at "
                 "once (each backend is tried at most once per client)"),
    Setting(env="LB_IDLE_TIMEOUT", attr="idle_timeout", default="300",
            help="seconds without a byte either way before a connection is closed"),
    Setting(env="LB_HALF_CLOSE_TIMEOUT", attr="half_close_timeout", default="30",
            help="idle seconds allowed once one side has half-closed (`LB_IDLE_TIMEOUT` when "
                 "that is shorter)"),
    Setting(env="LB_MAX_CONNECTIONS", attr="max_connections", default="4096",
            help="concurrent client connections; beyond it new clients wait in the kernel backlog"),
    Setting(env="LB_BACKLOG", attr="backlog", default="1024",
            help="length of the kernel accept queue, 1-65535 (capped by `net.core.somaxconn`)"),
    Setting(env="LB_BUFFER_SIZE", attr="buffer_size", default="262144",
            help="the most bytes read at once, and held per direction for a slow reader "
                 "before reading from the sender pauses (1024 to 1 GiB)"),
    Setting(env="LB_DRAIN_TIMEOUT", attr="drain_timeout", default="8",
            help="seconds open connections get to finish on SIGTERM; below 10 (Docker's default "
                 "stop grace; `compose.yaml` gives 15 s)"),
    Setting(env="LB_LOOP", attr="loop", default="auto",
            help="event loop: `auto` (uvloop when installed), `uvloop` or `asyncio`"),
    Setting(env="LB_IO_URING", attr="io_uring", default="off",
            help="`on` lets uvloop's libuv batch `epoll_ctl` through io_uring; `off` keeps it "
                 "on plain `epoll_ctl` by creating the loop in a short-lived thread that a seccomp "
                 "filter keeps from io_uring (as container engines do; no effect under "
                 "`LB_LOOP=asyncio`)"),
    Setting(env="LB_LOG_LEVEL", attr="log_level", default="info",
            help="`debug` (one line per closed connection), `info`, `warning` or `error`"),
)

ENV_VARS: tuple[str, ...] = tuple(s.env for s in SETTINGS)
_BY_ATTR: dict[str, Setting] = {s.attr: s for s in SETTINGS}
#: A health check's path (and query): what can go on a request line as it is.
_CHECK_PATH = re.compile(r"/[!-~]*")


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything the balancer needs, validated; build it with :meth:`from_env` or by keywords."""

    host: str = "0.0.0.0"
    port: int = 3000
    server_count: int = 3
    backends: tuple[tuple[str, int], ...] = ()
    backend_host: str = "backend"
    backend_port: int = 5000
    resolve_interval: float = 5.0
    admin_host: str = "127.0.0.1"
    admin_port: int = 8404
    check_mode: CheckMode = "http"
    check_path: str = "/healthcheck"
    check_interval: float = 2.0
    check_rise: int = 2
    check_fall: int = 3
    check_timeout: float = 1.0
    connect_timeout: float = 3.0
    connect_retries: int = 3
    idle_timeout: float = 300.0
    half_close_timeout: float = 30.0
    max_connections: int = 4096
    backlog: int = 1024
    buffer_size: int = 262144
    drain_timeout: float = 8.0
    loop: LoopName = "auto"
    io_uring: IoUring = "off"
    log_level: str = "info"

    def __post_init__(self) -> None:
        for attr in ("host", "admin_host") if self.admin_port else ("host",):
            problem = host_name_problem(getattr(self, attr))
            if problem:
                _fail(attr, problem)
        _check_port("port", self.port)
        _check_port("admin_port", self.admin_port)
        _check_port("backend_port", self.backend_port, allow_zero=False)
        _check_int("server_count", self.server_count, low=1)
        for host, port in self.backends:
            problem = host_name_problem(host)
            if problem:
                _fail("backends", f"host {problem} in {host_port(host, port)}")
            _check_port("backends", port, allow_zero=False)
        if not self.backends:
            if not self.backend_host:
                _fail("backend_host", "must name a host when LB_BACKENDS is empty")
            problem = host_name_problem(self.backend_host)
            if problem:
                _fail("backend_host", problem)
        _check_positive("resolve_interval", self.resolve_interval, low=MIN_INTERVAL)
        if self.check_mode not in CHECK_MODES:
            _fail("check_mode", f"must be one of {', '.join(CHECK_MODES)}, got {self.check_mode!r}")
        if not _CHECK_PATH.fullmatch(self.check_path):
            _fail("check_path", "must be a path starting with '/', in printable ASCII without "
                  f"spaces (percent-encode the rest), got {self.check_path!r}")
        _check_positive("check_interval", self.check_interval, low=MIN_INTERVAL)
        _check_int("check_rise", self.check_rise, low=1)
        _check_int("check_fall", self.check_fall, low=1)
        _check_positive("check_timeout", self.check_timeout)
        _check_positive("connect_timeout", self.connect_timeout)
        _check_int("connect_retries", self.connect_retries, low=0)
        _check_positive("idle_timeout", self.idle_timeout)
        _check_positive("half_close_timeout", self.half_close_timeout)
        _check_int("max_connections", self.max_connections, low=1)
        _check_int("backlog", self.backlog, low=1, high=65535)  # the kernel's own ceiling
        _check_int("buffer_size", self.buffer_size, low=1024, high=1 << 30)
        _check_positive("drain_timeout", self.drain_timeout)
        if self.drain_timeout >= STOP_GRACE:
            _fail("drain_timeout", f"must be below the {STOP_GRACE:g} s stop grace, "
                                   f"got {self.drain_timeout:g}")
        if self.loop not in LOOPS:
            _fail("loop", f"must be one of {', '.join(LOOPS)}, got {self.loop!r}")
        if self.io_uring not in IO_URING:
            _fail("io_uring", f"must be one of {', '.join(IO_URING)}, got {self.io_uring!r}")
        if self.log_level not in LOG_LEVELS:
            _fail("log_level", f"must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")

    @property
    def log_level_number(self) -> int:
        return int(getattr(logging, self.log_level.upper()))

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, argv: Sequence[str] | None = None
    ) -> Config:
        """Read every setting once: flags first, then the environment, then the default."""
        env = os.environ if environ is None else environ
        flags = _parser().parse_args(argv)
        raw: dict[str, str] = {}
        for setting in SETTINGS:
            value = getattr(flags, setting.attr)
            if value is None:
                value = env.get(setting.env)
            if value is not None:
                raw[setting.attr] = value
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in raw:
                kwargs[f.name] = _PARSERS[f.name](f.name, raw[f.name].strip())
        return cls(**kwargs)


def parse_backends(text: str) -> tuple[tuple[str, int], ...]:
    """Parse ``host:port,host:port`` (``[v6]:port`` for IPv6); order is kept, duplicates dropped."""
    result: list[tuple[str, int]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item.startswith("["):
            host, sep, port_text = item[1:].partition("]:")
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                sep = ""
        else:
            host, sep, port_text = item.rpartition(":")
            if ":" in host:
                sep = ""  # a bare IPv6 address is ambiguous; ask for brackets
        if not sep or not host:
            raise ValueError(f"{item!r} is not host:port ([v6]:port for IPv6)")
        port = int(port_text) if port_text.isascii() and port_text.isdigit() else -1
        if not 0 < port < 65536:
            raise ValueError(f"{item!r} has no valid port")
        if (host, port) not in result:
            result.append((host, port))
    if not result and text.strip():
        raise ValueError(f"{text!r} names no backend: list host:port entries, or leave it "
                         "empty to find the backends through LB_BACKEND_HOST")
    return tuple(result)


def _fail(attr: str, message: str) -> None:
    raise ConfigError(f"{_BY_ATTR[attr].env}: {message}")


def _check_port(attr: str, value: int, *, allow_zero: bool = True) -> None:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        _fail(attr, f"must be a port number in {low}..65535, got {value}")


def _check_int(attr: str, value: int, *, low: int, high: int | None = None) -> None:
    if value < low:
        _fail(attr, f"must be an integer >= {low}, got {value}")
    if high is not None and value > high:
        _fail(attr, f"must be an integer <= {high}, got {value}")


def _check_positive(attr: str, value: float, *, low: float = 0.0) -> None:
    if not (math.isfinite(value) and value > 0):
        _fail(attr, f"must be a number of seconds > 0, got {value}")
    if value < low:
        _fail(attr, f"must be at least {low:g} s (a shorter period keeps a core busy), "
                    f"got {value:g}")


def _typed(kind: Callable[[str], T], what: str) -> Callable[[str, str], T]:
    def parse(attr: str, text: str) -> T:
        try:
            return kind(text)
        except ValueError:
            raise ConfigError(f"{_BY_ATTR[attr].env}: must be {what}, got {text!r}") from None

    return parse


def _parse_backends(attr: str, text: str) -> tuple[tuple[str, int], ...]:
    try:
        return parse_backends(text)
    except ValueError as exc:
        raise ConfigError(f"{_BY_ATTR[attr].env}: {exc}") from None


def _lower(attr: str, text: str) -> str:
    return text.lower()


def _as_str(attr: str, text: str) -> str:
    return text


_int = _typed(ascii_number(int), "an integer")
_float = _typed(ascii_number(float), "a number")

_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "host": _as_str,
    "port": _int,
    "server_count": _int,
    "backends": _parse_backends,
    "backend_host": _as_str,
    "backend_port": _int,
    "resolve_interval": _float,
    "admin_host": _as_str,
    "admin_port": _int,
    "check_mode": _lower,
    "check_path": _as_str,
    "check_interval": _float,
    "check_rise": _int,
    "check_fall": _int,
    "check_timeout": _float,
    "connect_timeout": _float,
    "connect_retries": _int,
    "idle_timeout": _float,
    "half_close_timeout": _float,
    "max_connections": _int,
    "backlog": _int,
    "buffer_size": _int,
    "drain_timeout": _float,
    "loop": _lower,
    "io_uring": _lower,
    "log_level": _lower,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="varstack-lb",
        description="varstack-lb: a Layer-4 round-robin TCP proxy with health checks. "
        "Every flag has an environment variable; the flag wins.",
    )
    for setting in SETTINGS:
        parser.add_argument(
            setting.flag,
            dest=setting.attr,
            default=None,
            metavar=setting.env,
            # argparse formats help with %: a literal one is written %%.
            help=f"{setting.help} (default: {setting.default or 'empty'})".replace("%", "%%"),
        )
    return parser


def table() -> str:
    """The README's configuration rows: variable | default | meaning."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for s in SETTINGS:
        default = f"`{s.default}`" if s.default else "(empty)"
        rows.append(f"| `{s.env}` | {default} | {s.help} |")
    return "\n".join(rows)
