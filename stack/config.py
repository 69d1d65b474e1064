"""The supervisor's configuration: one typed, frozen object, read once from the environment.

The names and defaults are compose.yaml's, so ``make run`` and ``docker compose up`` start the
same topology from the same variables: ``SERVER_COUNT`` replicas, the balancer on
``LB_HOST:LB_PORT`` with its admin listener on ``LB_ADMIN_HOST:LB_ADMIN_PORT``, and the
database ``PGSQL_*`` names (an external PostgreSQL when ``PGSQL_HOST`` is set, else an
embedded one whose data stays in ``STACK_DATA_DIR``).  What only a local run needs is
prefixed ``STACK_``.  Every other variable (``SERVICE_*``, ``LB_*``) passes through to the
programs untouched, so they are tuned the same way in both worlds.

This module is the only place in ``stack`` that reads the environment.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from common.env import ConfigError, Setting, host, integer, seconds

__all__ = ["ENV_VARS", "SETTINGS", "ConfigError", "StackConfig", "host_port"]


# One row per variable: the README's configuration table is written from this list.
SETTINGS: tuple[Setting, ...] = (
    Setting(env="SERVER_COUNT", attr="server_count", default="3",
            help="service replicas to run (compose.yaml's default too)"),
    Setting(env="LB_HOST", attr="lb_host", default="0.0.0.0",
            help="address the balancer listens on"),
    Setting(env="LB_PORT", attr="lb_port", default="3000",
            help="port the balancer listens on: the one to point clients at"),
    Setting(env="LB_ADMIN_HOST", attr="lb_admin_host", default="127.0.0.1",
            help="address of the balancer's admin listener (`/stats`, `/metrics`)"),
    Setting(env="LB_ADMIN_PORT", attr="lb_admin_port", default="8404",
            help="port of the balancer's admin listener; 0 disables it"),
    Setting(env="STACK_BACKEND_HOST", attr="backend_host", default="127.0.0.1",
            help="address the replicas listen on (only the balancer needs to reach them)"),
    Setting(env="STACK_BACKEND_PORT", attr="backend_port", default="5001",
            help="port of the first replica; replica i listens on this + i - 1"),
    Setting(env="PGSQL_HOST", attr="pg_host", default="",
            help="an external PostgreSQL; empty: start the embedded one"),
    Setting(env="PGSQL_PORT", attr="pg_port", default="5432",
            help="its port (the embedded one takes a free port unless `STACK_PG_PORT` is set)"),
    Setting(env="PGSQL_DBNAME", attr="pg_dbname", default="se_lab6", help="database name"),
    Setting(env="PGSQL_USER", attr="pg_user", default="postgres", help="database user"),
    Setting(env="PGSQL_PASSWORD", attr="pg_password", default="",
            help="the external database's password (the embedded one generates its own)"),
    Setting(env="STACK_DATA_DIR", attr="data_dir", default=".varstack",
            help="where the embedded PostgreSQL keeps its data (`pgdata/`), log and password"),
    Setting(env="STACK_PG_PORT", attr="embedded_pg_port", default="0",
            help="port of the embedded PostgreSQL on 127.0.0.1; 0: a free one"),
    Setting(env="STACK_RESTART_MAX_ATTEMPTS", attr="restart_max_attempts", default="3",
            help="restarts of a failed process allowed within the window (compose's policy)"),
    Setting(env="STACK_RESTART_WINDOW", attr="restart_window", default="120",
            help="seconds of that window"),
    Setting(env="STACK_RESTART_DELAY", attr="restart_delay", default="5",
            help="seconds between a failure and the restart"),
    Setting(env="STACK_STOP_TIMEOUT", attr="stop_timeout", default="15",
            help="seconds a process gets after SIGTERM before SIGKILL "
                 "(compose's stop_grace_period)"),
    Setting(env="STACK_READY_TIMEOUT", attr="ready_timeout", default="60",
            help="seconds the whole stack may take to answer through the balancer"),
)

ENV_VARS: tuple[str, ...] = tuple(s.env for s in SETTINGS)


@dataclass(frozen=True, kw_only=True)
class StackConfig:
    """Everything the supervisor needs, validated; build it with :meth:`from_env` or by keywords."""

    server_count: int = 3
    lb_host: str = "0.0.0.0"
    lb_port: int = 3000
    lb_admin_host: str = "127.0.0.1"
    lb_admin_port: int = 8404
    backend_host: str = "127.0.0.1"
    backend_port: int = 5001
    pg_host: str = ""
    pg_port: int = 5432
    pg_dbname: str = "se_lab6"
    pg_user: str = "postgres"
    pg_password: str = field(default="", repr=False)
    data_dir: Path = Path(".varstack")
    embedded_pg_port: int = 0
    restart_max_attempts: int = 3
    restart_window: float = 120.0
    restart_delay: float = 5.0
    stop_timeout: float = 15.0
    ready_timeout: float = 60.0
    # The rest of the environment, handed to the children (SERVICE_*, LB_*, PATH, ...).
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.server_count <= 200:
            raise ConfigError(f"SERVER_COUNT must be between 1 and 200, got {self.server_count}")
        last = self.backend_port + self.server_count - 1
        if self.backend_port < 1 or last > 65535:
            raise ConfigError(
                f"STACK_BACKEND_PORT {self.backend_port} leaves no room for "
                f"{self.server_count} replicas on consecutive ports"
            )
        ports = {"LB_PORT": self.lb_port, "LB_ADMIN_PORT": self.lb_admin_port}
        if self.embedded:
            ports["STACK_PG_PORT"] = self.embedded_pg_port
        ports = {name: port for name, port in ports.items() if port}  # 0: none, or a free one
        for name, port in ports.items():
            if self.backend_port <= port <= last:
                raise ConfigError(
                    f"{name} {port} collides with the replicas' ports {self.backend_port}-{last}"
                )
        first_with: dict[int, str] = {}
        for name, port in ports.items():
            if port in first_with:
                raise ConfigError(f"{name} must differ from {first_with[port]} (both {port})")
            first_with[port] = name

    @property
    def embedded(self) -> bool:
        """No external database named: the supervisor runs PostgreSQL itself."""
        return not self.pg_host

    @property
    def replica_ports(self) -> list[int]:
        return [self.backend_port + i for i in range(self.server_count)]

    @property
    def client_host(self) -> str:
        """Where a client on this machine reaches the balancer (a wildcard is not an address)."""
        return _reachable(self.lb_host)

    @property
    def admin_client_host(self) -> str:
        return _reachable(self.lb_admin_host)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> StackConfig:
        """The config from ``environ`` (os.environ in the CLI); keywords win over it."""
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            raw = environ.get(setting.env)
            if raw is None or (raw.strip() == "" and setting.attr != "pg_password"):
                continue
            values[setting.attr] = _PARSERS[setting.attr](setting.env, raw)
        values["environ"] = dict(environ)
        values.update(overrides)
        return cls(**values)

    def redacted(self) -> dict[str, Any]:
        """The settings for the start-up line: the password hidden, and only the database
        settings that apply (the embedded one's, or the external one's)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "environ"}
        if self.embedded:
            for name in ("pg_host", "pg_port", "pg_password"):
                del out[name]
            out["embedded_pg_port"] = self.embedded_pg_port or "a free one"
        else:
            del out["data_dir"], out["embedded_pg_port"]
            out["pg_password"] = "***" if self.pg_password else ""
        return out


def _reachable(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets (``[::1]:5001``), as URLs and
    ``LB_BACKENDS`` write it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _text(name: str, raw: str) -> str:
    return raw.strip()


def _secret(name: str, raw: str) -> str:
    return raw


def _path(name: str, raw: str) -> Path:
    return Path(raw.strip()).expanduser()


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "server_count": integer(1, 200),
    "lb_host": host(),
    "lb_port": integer(1, 65535),
    "lb_admin_host": host(),
    "lb_admin_port": integer(0, 65535),
    "backend_host": host(),
    "backend_port": integer(1, 65535),
    "pg_host": _text,
    "pg_port": integer(1, 65535),
    "pg_dbname": _text,
    "pg_user": _text,
    "pg_password": _secret,
    "data_dir": _path,
    "embedded_pg_port": integer(0, 65535),
    "restart_max_attempts": integer(0, 1000),
    "restart_window": seconds(0, 86400),
    "restart_delay": seconds(0, 3600),
    "stop_timeout": seconds(0.1, 3600),
    "ready_timeout": seconds(1, 3600),
}
assert set(_PARSERS) == {s.attr for s in SETTINGS}
