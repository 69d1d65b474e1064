"""The service's configuration: one typed object, read once from the environment and flags.

The ``PGSQL_*`` names are the original system's contract (its compose file sets them);
everything else is prefixed ``SERVICE_``.  A bad value stops the start with a message
that names the variable (:class:`ConfigError`).
"""

from __future__ import annotations

import argparse
import logging
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import common.env
from common.env import ConfigError, choice, host, integer, seconds, text
from common.loops import LOOPS

__all__ = ["ENV_VARS", "SETTINGS", "Config", "ConfigError", "load_config"]

LOG_LEVELS = ("debug", "info", "warning", "error")
ACCESS_LOG_LEVELS = ("info", "debug", "off")


@dataclass(frozen=True, kw_only=True)
class Setting(common.env.Setting):
    """A service variable; ``flag`` is the command-line flag of the few that have one."""

    flag: str | None = None


# One row per variable: the README's configuration table is written from this list.
SETTINGS: tuple[Setting, ...] = (
    Setting(env="SERVICE_HOST", attr="host", default="0.0.0.0", flag="--host",
            help="address to listen on"),
    Setting(env="SERVICE_PORT", attr="port", default="5000", flag="--port",
            help="TCP port to listen on"),
    Setting(env="SERVICE_NAME", attr="served_by", default="<hostname>:<port>",
            help="value of the X-Served-By response header (no control characters but tab)"),
    Setting(env="PGSQL_HOST", attr="pg_host", default="database", help="PostgreSQL host"),
    Setting(env="PGSQL_PORT", attr="pg_port", default="5432", help="PostgreSQL port"),
    Setting(env="PGSQL_DBNAME", attr="pg_dbname", default="se_lab6", help="database name"),
    Setting(env="PGSQL_USER", attr="pg_user", default="postgres", help="database user"),
    Setting(env="PGSQL_PASSWORD", attr="pg_password", default="",
            help="database password (never logged)"),
    Setting(env="SERVICE_POOL_MIN_SIZE", attr="pool_min_size", default="1",
            help="connections opened at start"),
    Setting(env="SERVICE_POOL_MAX_SIZE", attr="pool_max_size", default="10",
            help="most connections the pool opens (kept open once opened)"),
    Setting(env="SERVICE_POOL_ACQUIRE_TIMEOUT", attr="pool_acquire_timeout", default="2.0",
            help="seconds a request waits for a free connection before 503"),
    Setting(env="SERVICE_MAX_WAITING", attr="max_waiting", default="512",
            help="requests allowed to wait for a connection; beyond it, 503 at once"),
    Setting(env="SERVICE_READ_CONCURRENCY", attr="read_concurrency", default="1",
            help="GET statements run at once; GETs arriving meanwhile wait and are read together, "
                 "in one statement"),
    Setting(env="SERVICE_DB_COMMAND_TIMEOUT", attr="db_command_timeout", default="5.0",
            help="seconds one SQL statement may take before 503 (a write's `BEGIN`, statement and "
                 "`COMMIT` share this + 0.5 s; an unconfirmed `COMMIT` is 504)"),
    Setting(env="SERVICE_DB_CONNECT_TIMEOUT", attr="db_connect_timeout", default="5.0",
            help="seconds one connection attempt may take, name lookup included"),
    Setting(env="SERVICE_DB_RETRY_MAX_DELAY", attr="db_retry_max_delay", default="5.0",
            help="longest pause between connection attempts at start (backoff cap)"),
    Setting(env="SERVICE_HEALTH_TIMEOUT", attr="health_timeout", default="1.0",
            help="seconds /healthcheck waits for the database"),
    Setting(env="SERVICE_MAX_BODY_BYTES", attr="max_body_bytes", default="1048576",
            help="largest request body; larger gets 413"),
    Setting(env="SERVICE_MAX_KEY_BYTES", attr="max_key_bytes", default="1024",
            help="longest key in UTF-8 bytes; longer gets 400"),
    Setting(env="SERVICE_SHUTDOWN_TIMEOUT", attr="shutdown_timeout", default="8.0",
            help="seconds in-flight requests get to finish on SIGTERM; keep it below the stop "
                 "grace (Docker's default 10 s; `compose.yaml` gives 15 s)"),
    Setting(env="SERVICE_LOOP", attr="loop", default="auto",
            help="event loop: auto (uvloop when installed), uvloop or asyncio"),
    Setting(env="SERVICE_LOG_LEVEL", attr="log_level", default="info",
            help="debug, info, warning or error"),
    Setting(env="SERVICE_ACCESS_LOG", attr="access_log", default="info",
            help="level of the one line per request: info, debug or off"),
)

ENV_VARS: tuple[str, ...] = tuple(s.env for s in SETTINGS)


@dataclass(frozen=True, kw_only=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 5000
    served_by: str = ""
    pg_host: str = "database"
    pg_port: int = 5432
    pg_dbname: str = "se_lab6"
    pg_user: str = "postgres"
    pg_password: str = field(default="", repr=False)
    pool_min_size: int = 1
    pool_max_size: int = 10
    pool_acquire_timeout: float = 2.0
    max_waiting: int = 512
    read_concurrency: int = 1
    db_command_timeout: float = 5.0
    db_connect_timeout: float = 5.0
    db_retry_max_delay: float = 5.0
    health_timeout: float = 1.0
    max_body_bytes: int = 1024 * 1024
    max_key_bytes: int = 1024
    shutdown_timeout: float = 8.0
    loop: str = "auto"
    log_level: str = "info"
    access_log: str = "info"

    def served_by_for(self, bound_port: int) -> str:
        """The X-Served-By value: SERVICE_NAME, else this host and the port actually bound."""
        return self.served_by or f"{socket.gethostname()}:{bound_port}"

    @property
    def log_level_number(self) -> int:
        return int(getattr(logging, self.log_level.upper()))

    def redacted(self) -> dict[str, Any]:
        """The settings for a start-up log line: the password is never shown."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["pg_password"] = "***" if self.pg_password else ""
        return out


def _header_value(name: str, raw: str) -> str:
    """Text that can go in a response header: no control character but tab (RFC 9110 5.5);
    aiohttp refuses to send such a header, so every answer would fail at its first byte."""
    for char in raw:
        if (char < " " and char != "\t") or char == "\x7f":
            raise ConfigError(
                f"{name} must not contain control characters (it is sent as the X-Served-By "
                f"header), got {raw!r}")
    return raw


# Config field <- parser; the variable is the field's row in SETTINGS.
_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "host": text(),
    "port": integer(0, 65535),
    "served_by": _header_value,
    "pg_host": host(paths_ok=True),
    "pg_port": integer(1, 65535),
    "pg_dbname": text(),
    "pg_user": text(),
    "pg_password": text(empty_ok=True),
    "pool_min_size": integer(0, 1000),
    "pool_max_size": integer(1, 1000),
    "pool_acquire_timeout": seconds(0.001, 300),
    "max_waiting": integer(0, 100_000),
    "read_concurrency": integer(1, 1000),
    "db_command_timeout": seconds(0.001, 3600),
    "db_connect_timeout": seconds(0.001, 300),
    "db_retry_max_delay": seconds(0.01, 300),
    "health_timeout": seconds(0.001, 60),
    "max_body_bytes": integer(1024, 1 << 30),
    "max_key_bytes": integer(1, 2000),
    "shutdown_timeout": seconds(0, 3600),
    "loop": choice(LOOPS),
    "log_level": choice(LOG_LEVELS),
    "access_log": choice(ACCESS_LOG_LEVELS),
}
assert set(_PARSERS) == {s.attr for s in SETTINGS}


def _arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="varstack-service",
        description="The varstack variables API (aiohttp + asyncpg). "
        "Every setting is an environment variable; flags override them.",
    )
    for setting in SETTINGS:
        if setting.flag:
            parser.add_argument(
                setting.flag, dest=setting.env, metavar=setting.env,
                help=f"{setting.help} (env {setting.env}, default {setting.default})",
            )
    return parser


def load_config(
    environ: Mapping[str, str], argv: Sequence[str] | None = None
) -> Config:
    """Build the config from ``environ`` and command-line ``argv`` (flags win)."""
    values: dict[str, str] = {name: raw for name, raw in environ.items() if name in ENV_VARS}
    if argv is not None:
        args = _arg_parser().parse_args(list(argv))
        values.update({k: v for k, v in vars(args).items() if v is not None})
    kwargs: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.env in values:
            kwargs[setting.attr] = _PARSERS[setting.attr](setting.env, values[setting.env])
    config = Config(**kwargs)
    if config.pool_min_size > config.pool_max_size:
        raise ConfigError(
            "SERVICE_POOL_MIN_SIZE must not exceed SERVICE_POOL_MAX_SIZE "
            f"({config.pool_min_size} > {config.pool_max_size})"
        )
    return config
