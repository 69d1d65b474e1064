"""The compose topology as local processes: database, ``SERVER_COUNT`` replicas, balancer.

``Stack`` is the one owner of every process it starts.  ``start()`` brings them up in
compose's order (database, replicas, balancer) and returns when a request through the
balancer succeeds; ``stop()`` is the one ordered shutdown: the balancer first (it stops
accepting and drains), then the replicas (they drain), then the database, each with a
deadline after which it is killed.  As a library it is an async context manager, so test
suites start the same topology ``make run`` does::

    async with Stack(StackConfig.from_env(os.environ, lb_port=free_port())) as stack:
        stack.replicas[0].kill()          # a crash; the restart policy brings it back
        ...                               # talk to stack.url
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lb.config
import services.config
from common.loops import loop_factory
from common.net import is_ip_address
from stack.config import ConfigError, StackConfig, _reachable, host_port
from stack.pg import EmbeddedPostgres, EmbeddedPostgresError, StopMode, free_port, process_alive
from stack.process import Child, Output, RestartPolicy, exit_status

SUPERVISOR = "stack"
DATABASE = "database"
BALANCER = "load_balancer"
# How long PostgreSQL gets for a fast shutdown (compose.yaml's stop_grace_period for it).
DATABASE_STOP_TIMEOUT = 30.0
#: After a second signal: PostgreSQL's immediate shutdown gets this long before SIGKILL.
DATABASE_KILL_TIMEOUT = 3.0
#: Connections the embedded PostgreSQL allows beyond the replicas' pools: psql and other
#: tools, a replica's old connections not yet closed when it restarts.
DATABASE_CONNECTIONS_HEADROOM = 20
#: PostgreSQL's own default max_connections, all a server is known to allow unchecked.
POSTGRES_DEFAULT_MAX_CONNECTIONS = 100
#: PostgreSQL's default superuser_reserved_connections: slots ordinary roles cannot take.
POSTGRES_RESERVED_CONNECTIONS = 3
#: Beyond this the embedded PostgreSQL's shared memory (per-slot lock tables, ...) grows past
#: what a laptop or a small VM has: refuse the configuration rather than fail at start.
DATABASE_MAX_CONNECTIONS = 10000
_PACKAGES = str(Path(__file__).resolve().parent.parent)


class StackError(RuntimeError):
    """The stack could not start (the message says which part and why)."""


def database_connections(server_count: int, pool_max_size: int) -> int:
    """max_connections for the embedded PostgreSQL: every replica's full pool, plus headroom
    (and never below PostgreSQL's default)."""
    return max(POSTGRES_DEFAULT_MAX_CONNECTIONS,
               server_count * pool_max_size + DATABASE_CONNECTIONS_HEADROOM)


async def http_status(host: str, port: int, path: str, timeout: float = 2.0) -> int:
    """The status of ``GET path`` on a new connection; 0 when there is no HTTP answer."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host_port(host, port)}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            await writer.drain()
            status_line = await reader.readline()
        parts = status_line.split()
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
    except (OSError, TimeoutError, ValueError):
        return 0
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def port_in_use(host: str, port: int) -> bool:
    """Would a listener fail to bind ``host:port``? (SO_REUSEADDR, as the programs bind.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


class Stack:
    """The database, the replicas and the balancer, owned and stopped in order."""

    def __init__(
        self,
        config: StackConfig,
        *,
        output: Output | None = None,
        python: str = sys.executable,
    ) -> None:
        self.config = config
        self.output = output if output is not None else Output()
        self.python = python
        self.database: EmbeddedPostgres | None = None
        self.replicas: list[Child] = []
        self.balancer: Child | None = None
        #: Set when a process the stack cannot serve without has given up (restart policy
        #: exhausted): the database, the balancer, or every replica.
        self.failed = asyncio.Event()
        #: Set to skip the drains: every process still running is killed at once.
        self.force_stop = asyncio.Event()
        self.ready = False
        self._db_policy = self._policy()
        self._db_starting: asyncio.Future[None] | None = None
        # Set by stop(): a database start still running in its thread stops what it started.
        self._db_cancel = threading.Event()
        self._service_config: services.config.Config | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._stopped = False
        #: What the start waits for now, for the message when STACK_READY_TIMEOUT runs out.
        self._awaiting = "the database"
        #: Held while this stack owns its data directory (two stacks would share one cluster).
        self._data_lock: int | None = None

    # -- what a client needs ----------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{host_port(self.config.client_host, self.config.lb_port)}"

    @property
    def admin_url(self) -> str | None:
        if not self.config.lb_admin_port:
            return None
        return f"http://{host_port(self.config.admin_client_host, self.config.lb_admin_port)}"

    @property
    def replica_addresses(self) -> list[str]:
        """Where the balancer (and a person) reaches each replica: ``host:port``."""
        host = _reachable(self.config.backend_host)
        return [host_port(host, port) for port in self.config.replica_ports]

    @property
    def processes(self) -> list[Child]:
        return [*self.replicas, *([self.balancer] if self.balancer else [])]

    @property
    def stopping(self) -> bool:
        return self._stopping

    def log(self, text: str) -> None:
        self.output.line(SUPERVISOR, text)

    # -- start --------------------------------------------------------------------------

    async def __aenter__(self) -> Stack:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start everything and return once a request through the balancer succeeds.

        On any failure (or cancellation) what was started is stopped before this raises.
        A setting the programs would refuse raises :class:`ConfigError` before anything
        starts."""
        self._loop = asyncio.get_running_loop()
        self.check_config()
        try:
            if self.config.embedded:
                # First: a second stack on this data directory is told so, not that its ports
                # are taken (by the first one).
                self._data_lock = _lock_data_dir(self.config.data_dir)
            self._check_ports()
            async with asyncio.timeout(self.config.ready_timeout):
                pg_env = await self._start_database()
                await self._start_replicas(pg_env)
                await self._start_balancer()
        except TimeoutError:
            error = StackError(
                f"the stack did not answer through {self.url} within "
                f"{self.config.ready_timeout:g}s (STACK_READY_TIMEOUT): it was waiting for "
                f"{self._awaiting}; see the logs above")
            self.log(f"error: {error}")  # before the stop's own lines, which follow from it
            await self.stop()
            raise error from None
        except StackError as exc:
            self.log(f"error: {exc}")
            await self.stop()
            raise
        except BaseException:
            await self.stop()
            raise
        self.ready = True

    def check_config(self) -> services.config.Config:
        """Validate the replicas' and the balancer's settings as they will read them, with
        the environment each will get, before anything starts (a bad ``SERVICE_*`` or
        ``LB_*`` is exit 2 at once, not a restart loop). Raises :class:`ConfigError`;
        returns a replica's configuration."""
        cfg = self.config
        if cfg.embedded:  # its port and password are known once it runs: stand-ins
            pg_env = {"PGSQL_HOST": "127.0.0.1", "PGSQL_PORT": str(cfg.embedded_pg_port or 5432),
                      "PGSQL_DBNAME": cfg.pg_dbname, "PGSQL_USER": cfg.pg_user,
                      "PGSQL_PASSWORD": "-"}
        else:
            pg_env = self._external_pg_env()
        service = None
        for i, port in enumerate(cfg.replica_ports, 1):
            service = services.config.load_config(self._replica_env(i, port, pg_env), argv=[])
        assert service is not None
        loop_factory(service.loop, variable="SERVICE_LOOP")
        balancer = lb.config.Config.from_env(self._balancer_env(), argv=[])
        loop_factory(balancer.loop, variable="LB_LOOP")
        if cfg.embedded:
            wanted = database_connections(cfg.server_count, service.pool_max_size)
            if wanted > DATABASE_MAX_CONNECTIONS:
                raise ConfigError(
                    f"SERVER_COUNT {cfg.server_count} x SERVICE_POOL_MAX_SIZE "
                    f"{service.pool_max_size} needs {wanted} database connections; the embedded "
                    f"PostgreSQL allows at most {DATABASE_MAX_CONNECTIONS}: lower one of them"
                )
        self._check_listen_hosts()
        if cfg.embedded:
            _check_data_dir(cfg.data_dir)
        self._service_config = service
        return service

    def _check_listen_hosts(self) -> None:
        """A listening address that is a name must resolve: else each program would fail to
        bind it at start, and be restarted until its policy gives up."""
        cfg = self.config
        hosts = [("LB_HOST", cfg.lb_host), ("STACK_BACKEND_HOST", cfg.backend_host)]
        if cfg.lb_admin_port:
            hosts.append(("LB_ADMIN_HOST", cfg.lb_admin_host))
        for name, host in hosts:
            if is_ip_address(host):
                continue
            try:
                socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            except (OSError, UnicodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise ConfigError(f"{name} {host!r} is not an address to listen on "
                                  f"(cannot resolve it: {reason})") from None

    def _check_ports(self) -> None:
        cfg = self.config
        wanted = [(cfg.lb_host, cfg.lb_port, "LB_PORT")]
        if cfg.lb_admin_port:
            wanted.append((cfg.lb_admin_host, cfg.lb_admin_port, "LB_ADMIN_PORT"))
        wanted += [(cfg.backend_host, p, f"replica {i} (STACK_BACKEND_PORT + {i - 1})")
                   for i, p in enumerate(cfg.replica_ports, 1)]
        # A PostgreSQL left behind on this data directory holds its port: start() finds and
        # stops it, so only a port held by something else is reported here.
        leftover = (cfg.data_dir / "pgdata" / "postmaster.pid").exists()
        if cfg.embedded and cfg.embedded_pg_port and not leftover:
            wanted.append(("127.0.0.1", cfg.embedded_pg_port, "STACK_PG_PORT"))
        busy = [f"{host}:{port} ({what})" for host, port, what in wanted if port_in_use(host, port)]
        if busy:
            raise StackError("already in use: " + ", ".join(busy) + "; choose other ports")

    def _policy(self) -> RestartPolicy:
        cfg = self.config
        return RestartPolicy(cfg.restart_max_attempts, cfg.restart_window, cfg.restart_delay)

    def _external_pg_env(self) -> dict[str, str]:
        cfg = self.config
        return {
            "PGSQL_HOST": cfg.pg_host,
            "PGSQL_PORT": str(cfg.pg_port),
            "PGSQL_DBNAME": cfg.pg_dbname,
            "PGSQL_USER": cfg.pg_user,
            "PGSQL_PASSWORD": cfg.pg_password,
        }

    async def _start_database(self) -> dict[str, str]:
        """The ``PGSQL_*`` the replicas get: the external database's, or the embedded one's."""
        cfg = self.config
        pool_max = self._service_config.pool_max_size if self._service_config else 10
        connections = cfg.server_count * pool_max
        if not cfg.embedded:
            self.log(f"database: external PostgreSQL at {host_port(cfg.pg_host, cfg.pg_port)}")
            ordinary = POSTGRES_DEFAULT_MAX_CONNECTIONS - POSTGRES_RESERVED_CONNECTIONS
            if connections > ordinary:
                self.log(
                    f"warning: the replicas may open up to {connections} connections "
                    f"(SERVER_COUNT {cfg.server_count} x SERVICE_POOL_MAX_SIZE {pool_max}), more "
                    f"than the {ordinary} that PostgreSQL's default max_connections "
                    f"({POSTGRES_DEFAULT_MAX_CONNECTIONS}, {POSTGRES_RESERVED_CONNECTIONS} of them "
                    "kept for superusers) leaves: make sure the external database allows more"
                )
            return self._external_pg_env()
        data = cfg.data_dir.resolve()
        try:
            if (data / "pgdata" / "PG_VERSION").exists() and not (data / "pgpassword").exists():
                raise StackError(
                    f"{data / 'pgdata'} holds a database but its password file "
                    f"{data / 'pgpassword'} is gone; restore it, or delete the data directory "
                    "to start afresh"
                )
            password = _local_password(data / "pgpassword")
        except OSError as exc:
            raise _unusable_data_dir(cfg.data_dir, exc) from None
        self.database = EmbeddedPostgres(
            data_dir=data / "pgdata",
            port=cfg.embedded_pg_port or free_port(),
            host="127.0.0.1",
            user=cfg.pg_user,
            password=password,
            dbname=cfg.pg_dbname,
            log_file=data / "postgres.log",
            max_connections=database_connections(cfg.server_count, pool_max),
            log=self._log_from_thread,
        )
        log_file = data / "postgres.log"
        offset = log_file.stat().st_size if log_file.exists() else 0
        self._tasks.append(asyncio.create_task(self._tail(log_file, offset), name="database-log"))
        self.log(f"database: embedded PostgreSQL, data in {data / 'pgdata'}, max_connections "
                 f"{self.database.max_connections} (SERVER_COUNT {cfg.server_count} x "
                 f"SERVICE_POOL_MAX_SIZE {pool_max} + {DATABASE_CONNECTIONS_HEADROOM})")
        try:
            await self._start_database_thread(self.database)
        except EmbeddedPostgresError as exc:
            raise StackError(f"the embedded PostgreSQL did not start: {exc}") from exc
        self._tasks.append(asyncio.create_task(self._watch_database(), name="database-watch"))
        return self.database.env

    async def _start_database_thread(self, db: EmbeddedPostgres) -> None:
        """``db.start()`` in a thread. A thread cannot be cancelled, so the start is shielded
        and remembered: stop() cancels it through ``_db_cancel`` and waits for it, and only
        then stops the database (else a start finishing late would outlive us)."""
        starting = asyncio.ensure_future(asyncio.to_thread(db.start, cancel=self._db_cancel))
        # Its outcome is seen even when nobody awaits it any more (a cancelled shield drops it).
        starting.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._db_starting = starting
        await asyncio.shield(starting)

    def _log_from_thread(self, text: str) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.log, text)
        else:
            self.log(text)

    async def _tail(self, path: Path, offset: int) -> None:
        """Copy the embedded PostgreSQL's log file to the output, prefixed (it writes a file,
        not a pipe we own)."""
        pending = b""
        while True:
            try:
                with path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read(1 << 20)
            except FileNotFoundError:
                chunk = b""
            if chunk:
                offset += len(chunk)
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    self.output.line(DATABASE, line.decode("utf-8", "replace"))
            elif self._stopped:
                return
            await asyncio.sleep(0.2)

    async def _watch_database(self) -> None:
        """The restart policy for the embedded database (it is a process we own too): on
        failure, restarted within the policy; an exit with status 0 is final (on-failure), and
        the stack cannot serve without it."""
        db = self.database
        assert db is not None
        while not self._stopping:
            await asyncio.sleep(0.5)
            if self._stopping or db.running:
                continue
            code = db.returncode
            if code == 0:
                self.log("database: exited with status 0; not restarted (restart policy: "
                         "on-failure): stopping the stack, it cannot serve without it")
                self.failed.set()
                return
            if not self._db_policy.allow():
                self.log(f"database: {exit_status(code)}; restart policy exhausted, "
                         "stopping the stack")
                self.failed.set()
                return
            self.log(f"database: {exit_status(code)}; restarting in "
                     f"{self.config.restart_delay:g}s")
            await asyncio.sleep(self.config.restart_delay)
            if self.stopping:  # stop() may have run during the delay
                return
            try:
                await self._start_database_thread(db)
            except EmbeddedPostgresError as exc:
                self.log(f"database: restart failed: {exc}")

    def _child_env(self, extra: Mapping[str, str]) -> dict[str, str]:
        env = dict(self.config.environ)
        env["PYTHONUNBUFFERED"] = "1"  # lines reach the prefixer as they are written
        # The programs are found where this package is (a checkout or site-packages), from
        # whatever directory the stack is started in.
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = f"{_PACKAGES}{os.pathsep}{path}" if path else _PACKAGES
        env.update(extra)
        return env

    def _replica_env(self, i: int, port: int, pg_env: Mapping[str, str]) -> dict[str, str]:
        """Replica ``i``'s environment. Its ``X-Served-By`` (``SERVICE_NAME``) is the address
        the balancer, ``/stats`` and the banner show, or the user's ``SERVICE_NAME`` with
        ``-i`` appended (one name for every replica would hide which one answered)."""
        cfg = self.config
        name = cfg.environ.get("SERVICE_NAME", "").strip()
        served_by = f"{name}-{i}" if name else host_port(_reachable(cfg.backend_host), port)
        return self._child_env({**pg_env, "SERVICE_HOST": cfg.backend_host,
                                "SERVICE_PORT": str(port), "SERVICE_NAME": served_by})

    def _balancer_env(self) -> dict[str, str]:
        cfg = self.config
        env = self._child_env({
            "LB_HOST": cfg.lb_host,
            "LB_PORT": str(cfg.lb_port),
            "LB_ADMIN_HOST": cfg.lb_admin_host,
            "LB_ADMIN_PORT": str(cfg.lb_admin_port),
            "SERVER_COUNT": str(cfg.server_count),
            "LB_BACKENDS": ",".join(self.replica_addresses),
        })
        env.pop("PGSQL_PASSWORD", None)  # the balancer never talks to the database
        return env

    async def _start_replicas(self, pg_env: Mapping[str, str]) -> None:
        cfg = self.config
        for i, port in enumerate(cfg.replica_ports, 1):
            child = Child(
                f"backend-{i}",
                [self.python, "-m", "services"],
                self._replica_env(i, port, pg_env),
                self.output,
                self._policy(),
                on_end=self._replica_ended,
            )
            await child.start()
            self.replicas.append(child)
            self._tasks.append(asyncio.create_task(child.supervise(), name=f"{child.name}-watch"))
        host = _reachable(cfg.backend_host)
        for child, port in zip(self.replicas, cfg.replica_ports, strict=True):
            await self._until(host, port, child)
            self.log(f"{child.name}: healthy on {host_port(host, port)}")

    async def _start_balancer(self) -> None:
        cfg = self.config
        self.balancer = Child(BALANCER, [self.python, "-m", "lb"], self._balancer_env(),
                              self.output, self._policy(), on_end=self._essential_ended)
        await self.balancer.start()
        self._tasks.append(asyncio.create_task(self.balancer.supervise(), name="balancer-watch"))
        await self._until(cfg.client_host, cfg.lb_port, self.balancer)
        self.log(f"{BALANCER}: answering on {self.url}")

    async def _until(self, host: str, port: int, child: Child) -> None:
        """Poll ``GET /healthcheck`` on ``host:port`` until 200; fail early when ``child``
        gives up or the stack failed. The caller's timeout bounds it."""
        self._awaiting = f"{child.name} to answer 200 on http://{host_port(host, port)}/healthcheck"
        while True:
            if child.ended or self.failed.is_set():
                raise StackError(f"{child.name} exited during start; see its log above")
            if await http_status(host, port, "/healthcheck") == 200:
                return
            await asyncio.sleep(0.2)

    def _replica_ended(self, child: Child) -> None:
        left = [r for r in self.replicas if not r.ended]
        if not left and len(self.replicas) == self.config.server_count:
            self.log("every replica has ended: stopping the stack, it cannot serve without one")
            self.failed.set()
        else:
            self.log(f"{child.name} will not run again; {len(left)} of "
                     f"{self.config.server_count} replica(s) left")

    def _essential_ended(self, child: Child) -> None:
        why = "its restart policy gave up" if child.gave_up else "it exited with status 0"
        self.log(f"{child.name} will not run again ({why}): stopping the stack, it cannot "
                 "serve without it")
        self.failed.set()

    # -- stop ---------------------------------------------------------------------------

    async def stop(self) -> None:
        """The one ordered shutdown; safe to call at any point, and more than once."""
        if self._stopping:
            while not self._stopped:
                await asyncio.sleep(0.05)
            return
        self._stopping = True
        self._db_cancel.set()  # a database start in progress undoes itself
        self.ready = False
        timeout = self.config.stop_timeout
        # No restart from here on: an exit during shutdown is the shutdown.
        for child in self.processes:
            child.prevent_restart()
        for task in self._tasks:
            if not task.get_name().endswith("-log"):
                task.cancel()
        try:
            if self.balancer is not None:
                self.log(f"stopping {BALANCER} (it stops accepting, then drains)")
                await self.balancer.stop(timeout, self.force_stop)
            running = [r for r in self.replicas if r.running]
            if running:
                self.log(f"stopping {len(running)} replica(s) (they drain)")
            # Every one, running or not: none may be restarted, and each pipe is drained.
            await asyncio.gather(*(r.stop(timeout, self.force_stop) for r in self.replicas))
            if self._db_starting is not None and not self._db_starting.done():
                # Cancelled above, it ends at its next step (initdb may take seconds); a
                # second signal does not wait for it (it still stops what it started).
                self.log("waiting for the database's start to end")
                forced = asyncio.ensure_future(self.force_stop.wait())
                waits: list[asyncio.Future[Any]] = [self._db_starting, forced]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                forced.cancel()
            if self.database is not None:
                await self._stop_database(self.database)
        finally:
            if self._data_lock is not None:
                os.close(self._data_lock)
                self._data_lock = None
            self._stopped = True
            # The log tail makes one last pass, then ends; the others were cancelled.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*self._tasks, return_exceptions=True), timeout=2.0
                )
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks.clear()
            self.log("stopped")

    async def _stop_database(self, db: EmbeddedPostgres) -> None:
        """A fast shutdown within its deadline; a second signal, before or during it, kills."""
        forced = self.force_stop.is_set()
        mode: StopMode = "immediate" if forced else "fast"
        if db.running:
            self.log(f"stopping the database ({mode})")
        stopping = asyncio.ensure_future(asyncio.to_thread(
            db.stop, mode, DATABASE_KILL_TIMEOUT if forced else DATABASE_STOP_TIMEOUT))
        if not forced:
            force = asyncio.ensure_future(self.force_stop.wait())
            await asyncio.wait([stopping, force], return_when=asyncio.FIRST_COMPLETED)
            force.cancel()
            if not stopping.done():
                self.log("killing the database")
                await asyncio.to_thread(db.kill)
        await stopping

    # -- for people -----------------------------------------------------------------------

    def banner(self) -> list[str]:
        """What to point curl, wrk and hey at, once ready."""
        url = self.url
        get = f"'{url}/get_var?key=greeting'"
        lines = [
            f"varstack is ready: {len(self.replicas)} "
            f"{'replica' if len(self.replicas) == 1 else 'replicas'} behind the balancer at {url}",
            f"  curl -i -X POST {url}/set_var -H 'Content-Type: application/json' "
            "-d '{\"key\": \"greeting\", \"value\": \"hello\"}'",
            f"  curl -i {get}",
            f"  wrk -t2 -c64 -d30s {get}",
            f"  hey -z 30s -c 64 {get}",
        ]
        if self.admin_url:
            lines.append(f"  balancer: {self.admin_url}/stats (JSON), {self.admin_url}/metrics, "
                         f"{self.admin_url}/")
        lines.append("  replicas: " + ", ".join(self.replica_addresses))
        if self.database is not None:
            data = self.config.data_dir.resolve()
            lines.append(
                f"  database: embedded PostgreSQL on 127.0.0.1:{self.database.port}, "
                f"data in {data / 'pgdata'} (password in {data / 'pgpassword'})"
            )
        else:
            lines.append(f"  database: {host_port(self.config.pg_host, self.config.pg_port)}")
        lines.append("Ctrl-C (or SIGTERM) stops everything.")
        return lines


def _check_data_dir(data: Path) -> None:
    """What is already there must be usable as the embedded database's directory."""
    try:
        _check_data_dir_paths(data)
    except OSError as exc:  # a folder on the way that this user may not search
        raise ConfigError(f"STACK_DATA_DIR {data}: {exc.strerror or exc}: "
                          f"{exc.filename or data}") from None


def _check_data_dir_paths(data: Path) -> None:
    for path, kind in ((data, "a directory"), (data / "pgdata", "a directory"),
                       (data / "pgpassword", "a file")):
        exists = path.is_dir() if kind == "a directory" else path.is_file()
        if path.exists() and not exists:
            where = "STACK_DATA_DIR" if path == data else f"STACK_DATA_DIR's {path.name}"
            raise ConfigError(f"{where} {path} must be {kind}")
    existing = next((p for p in (data, *data.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"STACK_DATA_DIR {data}: {existing} is not a directory")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"STACK_DATA_DIR {data}: {existing} is not writable")


def _unusable_data_dir(path: Path, exc: OSError) -> StackError:
    return StackError(f"STACK_DATA_DIR {path}: cannot use it: {exc.strerror or exc}: "
                      f"{exc.filename or path.resolve()}")


def _lock_data_dir(path: Path) -> int:
    """Lock the data directory for this process (released when it exits, even by SIGKILL);
    StackError naming the holder when another stack has it."""
    data = path.resolve()
    try:
        data.mkdir(parents=True, exist_ok=True)
        fd = os.open(data / "stack.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _unusable_data_dir(path, exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise StackError(f"STACK_DATA_DIR {data} is in use by another stack (pid {holder}); "
                         "stop it first, or choose another STACK_DATA_DIR") from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _lock_holder(fd: int) -> str:
    """The pid the lock's holder wrote; it writes it just after locking, so a stack that
    lost a race may look before it is there (or see the last holder's): look again, briefly."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit() and process_alive(int(text)):
            return text
        time.sleep(0.05)
    return "?"



def _local_password(path: Path) -> str:
    """The embedded database's password: generated once, kept beside its data (0600), so the
    same data directory keeps working across restarts and nothing is hard-coded."""
    if path.exists():
        return path.read_text().strip()
    password = secrets.token_urlsafe(18)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password
