"""The whole stack under faults: start it tuned for fault runs, fire faults, judge the load.

Shared by the system test suite (``tests/system``) and ``python -m chaos run``: the
functions here only *measure* (when a fault took effect, when the system recovered, which
requests failed and whether the fault explains each); the tests assert on the numbers and
the command prints them.

A fault is judged against the promises it tests:

- replica killed (SIGKILL): a request may fail only if its connection was opened before
  the replica was dead *and* that connection was piped to that replica;
- replica hung (SIGSTOP): likewise, with "marked down by the balancer" instead of "dead";
- PostgreSQL restarted or hung (SIGSTOP): while it is away, a request may get ``503 database
  unavailable`` (or ``busy``, its connections all stuck), or a write ``504`` (its COMMIT cut
  off: outcome unknown), never a 500, never silence; after it is back, nothing may fail;
- anything else (garbage from other clients, ...): nothing may fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import asyncpg

from chaos.history import final_state_check
from chaos.linearizability import CheckResult, check
from chaos.load import Attempt, Load, backends_by_port, reasons
from chaos.model import State
from chaos.rawhttp import Connection, HttpError
from services.db import STATEMENT_TIMEOUT_BACKSTOP
from stack.config import StackConfig
from stack.process import Child
from stack.supervisor import Stack, http_status, port_in_use

#: Settings that make faults visible within seconds instead of minutes (the defaults are
#: HAProxy's production ones).  Every one is an ordinary documented variable.
FAST_ENV: dict[str, str] = {
    "SERVICE_ACCESS_LOG": "off",
    "SERVICE_DB_RETRY_MAX_DELAY": "0.5",
    # A request's longest answer while the database hangs, a pool wait (1 s) then a connect
    # (1.5 s) or a write's whole budget (1.5 + 0.5 s), 3 s, stays below LB_IDLE_TIMEOUT: it
    # gets its 503.
    "SERVICE_DB_CONNECT_TIMEOUT": "1.5",
    "SERVICE_DB_COMMAND_TIMEOUT": "1.5",
    "SERVICE_POOL_ACQUIRE_TIMEOUT": "1",
    "SERVICE_HEALTH_TIMEOUT": "0.5",
    "LB_LOG_LEVEL": "debug",  # one line per closed connection: which replica a port went to
    "LB_CHECK_INTERVAL": "0.25",
    "LB_CHECK_RISE": "2",
    "LB_CHECK_FALL": "2",
    "LB_CHECK_TIMEOUT": "0.5",
    "LB_CONNECT_TIMEOUT": "1",
    "LB_IDLE_TIMEOUT": "3.5",
    "LB_DRAIN_TIMEOUT": "2",
}


def setting(env: Mapping[str, str], name: str) -> float:
    return float(env.get(name, FAST_ENV[name]))


# -- the stack's output, kept -----------------------------------------------------------


class Lines(io.StringIO):
    """A stream for :class:`stack.process.Output` that keeps every line (and may copy them
    to a file)."""

    def __init__(self, copy: TextIO | None = None) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.copy = copy
        self._partial = ""

    def write(self, text: str) -> int:
        if self.copy is not None:
            self.copy.write(text)
        *done, self._partial = (self._partial + text).split("\n")
        self.lines.extend(done)
        return len(text)

    def flush(self) -> None:
        if self.copy is not None:
            self.copy.flush()

    def of(self, name: str) -> list[str]:
        prefix = f"{name:<13}|"
        return [line for line in self.lines if line.startswith(prefix)]

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])


def free_port_run(count: int, *, low: int = 20000, high: int = 32000) -> int:
    """The first of ``count`` consecutive free ports below the ephemeral range."""
    for _ in range(200):
        first = random.randrange(low, high - count)
        if not any(port_in_use("127.0.0.1", p) for p in range(first, first + count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports in {low}-{high}")


def stack_config(
    data_dir: Path, *, loop: str = "auto", server_count: int = 3,
    env: Mapping[str, str] | None = None, **overrides: Any,
) -> StackConfig:
    """A Stack on loopback, free ports, an embedded PostgreSQL in ``data_dir``, fast checks,
    the programs under ``loop`` (``asyncio``, ``uvloop`` or ``auto``)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PGSQL_", "STACK_"))}
    base.update(FAST_ENV)
    base.update({"SERVICE_LOOP": loop, "LB_LOOP": loop})
    base.update(env or {})
    # One run below the ephemeral range: no port of it can be handed out (to the embedded
    # PostgreSQL's pick, to a connect) before the stack binds it.
    first = free_port_run(server_count + 2)
    values: dict[str, Any] = {
        "server_count": server_count,
        "lb_host": "127.0.0.1",
        "lb_port": first,
        "lb_admin_port": first + 1,
        "backend_port": first + 2,
        "data_dir": data_dir,
        "restart_delay": 1.0,
        "stop_timeout": 10.0,
        "ready_timeout": 120.0,
    }
    values.update(overrides)
    return StackConfig.from_env(base, **values)


def replica_address(stack: Stack, index: int) -> str:
    return f"127.0.0.1:{stack.config.replica_ports[index]}"


def port_of(address: str | None) -> int | None:
    """``host:port`` (or ``[v6]:port``) -> port; the replicas are told apart by port."""
    if not address or ":" not in address:
        return None
    tail = address.rsplit(":", 1)[1]
    return int(tail) if tail.isdigit() else None


# -- looking at the running system --------------------------------------------------------


async def get_json(host: str, port: int, path: str, timeout: float = 3.0) -> Any:
    conn = Connection(host, port)
    try:
        async with asyncio.timeout(timeout):
            await conn.open()
            reply = await conn.request("GET", path, close=True)
    finally:
        await conn.close()
    if reply.status != 200:
        raise HttpError(f"GET {path} answered {reply.status}")
    return json.loads(reply.body)


async def lb_stats(stack: Stack) -> dict[str, Any]:
    assert stack.config.lb_admin_port, "the chaos stack needs the balancer's admin listener"
    stats: dict[str, Any] = await get_json(stack.config.admin_client_host,
                                           stack.config.lb_admin_port, "/stats")
    return stats


async def backend_states(stack: Stack) -> dict[str, str]:
    return {b["address"]: b["state"] for b in (await lb_stats(stack))["backends"]}


async def wait_until(
    predicate: Callable[[], Any], *, timeout: float, step: float = 0.05, what: str = "",
) -> float:
    """Poll ``predicate`` (sync or async) until true; return the time it became true."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:g}s: {what or predicate}")
        await asyncio.sleep(step)


async def wait_backend(stack: Stack, address: str, state: str, *, timeout: float) -> float:
    async def seen() -> bool:
        with contextlib.suppress(OSError, HttpError, TimeoutError, ValueError):
            return (await backend_states(stack)).get(address) == state
        return False

    return await wait_until(seen, timeout=timeout, step=0.05,
                            what=f"the balancer sees {address} {state}")


async def every_replica_healthy(stack: Stack) -> bool:
    statuses = await asyncio.gather(*(
        http_status("127.0.0.1", port, "/healthcheck", timeout=1.0)
        for port in stack.config.replica_ports))
    return all(s == 200 for s in statuses)


# -- faults --------------------------------------------------------------------------------


@dataclass
class Fault:
    """One fault as it happened: when, to what, and when the system was whole again."""

    name: str
    kind: str
    """``replica`` (failures allowed on connections to ``target`` opened before
    ``effective``), ``database`` (the service's 503s, and a write's 504, allowed until
    ``recovered``) or ``none`` (nothing may fail)."""
    started: float
    effective: float
    """When the fault was in full effect: the replica reaped, marked down, the database
    stopped."""
    recovered: float
    target: int | None = None
    """The replica's port, for a replica fault."""
    recovery: float | None = None
    """Seconds from the end of the fault (restart, SIGCONT, database start) to whole again."""
    details: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


async def kill_replica(stack: Stack, index: int, *, timeout: float = 60.0) -> Fault:
    """SIGKILL a replica; the supervisor restarts it; wait until the balancer takes it back."""
    child = stack.replicas[index]
    address = replica_address(stack, index)
    proc = child.proc
    assert proc is not None
    assert child.running
    restarts = child.restarts
    started = time.monotonic()
    child.kill()
    dead = await wait_until(lambda: proc.returncode is not None, timeout=10,
                            what=f"{child.name} reaped")
    await wait_until(lambda: child.restarts > restarts and child.running, timeout=timeout,
                     what=f"{child.name} restarted")
    restarted = time.monotonic()
    back = await wait_backend(stack, address, "up", timeout=timeout)
    return Fault(f"replica {index + 1} killed (SIGKILL)", "replica", started, dead, back,
                 target=port_of(address), recovery=back - restarted,
                 details={"restart": restarted - started, "back": back - started})


async def hang_replica(stack: Stack, index: int, *, hold: float = 1.0,
                       timeout: float = 30.0) -> Fault:
    """SIGSTOP a replica until the balancer marks it down (and ``hold`` more), then SIGCONT
    and wait until it is taken back."""
    child = stack.replicas[index]
    address = replica_address(stack, index)
    started = time.monotonic()
    child.signal(signal.SIGSTOP)
    try:
        down = await wait_backend(stack, address, "down", timeout=timeout)
        await asyncio.sleep(hold)
    finally:
        child.signal(signal.SIGCONT)
    resumed = time.monotonic()
    up = await wait_backend(stack, address, "up", timeout=timeout)
    return Fault(f"replica {index + 1} hung (SIGSTOP)", "replica", started, down, up,
                 target=port_of(address), recovery=up - resumed,
                 details={"marked_down": down - started, "back_after_sigcont": up - resumed})


async def restart_database(stack: Stack, mode: str, *, down_for: float = 2.0,
                           timeout: float = 60.0) -> Fault:
    """Stop the embedded PostgreSQL (``fast`` or ``immediate``), start it again after
    ``down_for`` seconds, and wait until every replica is healthy and a write goes through
    the balancer, with no process restarted."""
    db = stack.database
    assert db is not None, "the database faults need the embedded PostgreSQL"
    if mode not in ("fast", "immediate"):
        raise ValueError(f"stop mode must be fast or immediate, got {mode!r}")
    pids = [c.pid for c in stack.processes]
    started = time.monotonic()
    await asyncio.to_thread(db.stop, "fast" if mode == "fast" else "immediate", 30.0)
    stopped = time.monotonic()
    await asyncio.sleep(down_for)
    restarting = time.monotonic()
    await asyncio.to_thread(db.start)
    db_up = time.monotonic()
    recovered = await _database_whole(stack, timeout=timeout)
    fault = Fault(f"PostgreSQL restarted ({mode})", "database", started, stopped, recovered,
                  recovery=recovered - db_up,
                  details={"down": restarting - stopped, "start": db_up - restarting})
    if [c.pid for c in stack.processes] != pids:
        fault.notes.append("a replica or the balancer was restarted")
    return fault


@contextlib.contextmanager
def stopped_postgres(postmaster_pid: int) -> Iterator[None]:
    """Every process of the PostgreSQL whose postmaster is ``postmaster_pid`` SIGSTOPped for
    the block (a frozen machine, a stalled VM), then SIGCONT."""
    import psutil  # the test extra, which `make chaos` installs

    postmaster = psutil.Process(postmaster_pid)
    # The postmaster first, so that it forks no backend the list below would miss; then every
    # backend, each the leader of its own process group (PostgreSQL calls setsid()).
    postmaster.send_signal(signal.SIGSTOP)
    server = [postmaster, *postmaster.children(recursive=True)]
    for process in server[1:]:
        with contextlib.suppress(psutil.NoSuchProcess):  # a short-lived worker that ended
            process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for process in server:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGCONT)


async def hang_database(stack: Stack, *, past_budget: float = 1.5,
                        timeout: float = 60.0) -> Fault:
    """SIGSTOP the embedded PostgreSQL, every process of it (a frozen machine, a stalled VM),
    for ``past_budget`` seconds longer than a write's whole budget (so writes in flight meet
    it), then SIGCONT; wait until every replica is healthy and a write goes through the
    balancer. The writes answered 503 meanwhile must never be applied: the history check
    counts them as not applied."""
    hold = (setting(stack.config.environ, "SERVICE_DB_COMMAND_TIMEOUT")
            + STATEMENT_TIMEOUT_BACKSTOP + past_budget)
    db = stack.database
    assert db is not None, "the database faults need the embedded PostgreSQL"
    assert db.pid is not None, "the embedded PostgreSQL is not running"
    started = time.monotonic()
    with stopped_postgres(db.pid):
        await asyncio.sleep(hold)
    resumed = time.monotonic()
    recovered = await _database_whole(stack, timeout=timeout)
    return Fault("PostgreSQL hung (SIGSTOP)", "database", started, started, recovered,
                 recovery=recovered - resumed, details={"hung": resumed - started})


async def _database_whole(stack: Stack, *, timeout: float) -> float:
    """When every replica is healthy again and a write goes through the balancer."""
    async def whole() -> bool:
        if not await every_replica_healthy(stack):
            return False
        return await _write_through(stack)

    return await wait_until(whole, timeout=timeout, step=0.05,
                            what="every replica healthy and a write through the balancer")


async def _write_through(stack: Stack) -> bool:
    key = f"probe-{time.monotonic_ns()}"
    conn = Connection(stack.config.client_host, stack.config.lb_port)
    try:
        async with asyncio.timeout(3):
            await conn.open()
            reply = await conn.request("POST", f"/set_var?key={key}&value=1", close=True)
        return reply.status == 201
    except (OSError, HttpError, TimeoutError):
        return False
    finally:
        await conn.close()


# -- judging the load --------------------------------------------------------------------


@dataclass
class Judged:
    fault: Fault
    requests: int
    failures: list[Attempt]
    explained: list[Attempt]
    unexplained: list[Attempt]

    @property
    def untested(self) -> bool:
        """A fault whose window holds no request met no load: it tested nothing. (The steady
        window is empty by choice with ``--settle 0``.)"""
        return not self.requests and self.fault.kind != "none"

    @property
    def ok(self) -> bool:
        return not self.untested and not self.unexplained \
            and "a replica or the balancer was restarted" not in self.fault.notes

    def why(self) -> str:
        if self.untested:
            return "no request ended in this window (the load had stopped): nothing was tested"
        counted = reasons(self.failures)
        return ", ".join(f"{n} x {r}" for r, n in counted.most_common(4)) or "-"


def judge(fault: Fault, load: Load, lb_lines: Iterable[str], *, until: float) -> Judged:
    """Every request that ended in [fault.started, until) (so each request belongs to one
    window when faults follow one another): which failed, and does the fault explain each
    failure?"""
    ports = backends_by_port(lb_lines)
    window = [a for a in load.attempts if fault.started <= a.complete < until]
    failures = [a for a in window if a.failed]
    explained: list[Attempt] = []
    unexplained: list[Attempt] = []
    for a in failures:
        (explained if _explains(fault, a, ports) else unexplained).append(a)
    return Judged(fault, len(window), failures, explained, unexplained)


def replica_of(attempt: Attempt, ports: Mapping[int, list[tuple[str, str]]]) -> set[int]:
    """The replica ports this attempt's connection may have been piped to: the one that
    answered on it before (certain), else what the balancer logged for its local port
    (several when the port was reused during the run)."""
    found = set()
    if attempt.conn_served_by:
        port = port_of(attempt.conn_served_by)
        if port is not None:
            return {port}
    if attempt.local_port is not None:
        for backend, _end in ports.get(attempt.local_port, []):
            port = port_of(backend)
            if port is not None:
                found.add(port)
    return found


def _explains(fault: Fault, a: Attempt, ports: Mapping[int, list[tuple[str, str]]]) -> bool:
    if fault.kind == "replica":
        return (a.opened is not None and a.opened < fault.effective
                and fault.target in replica_of(a, ports))
    if fault.kind == "database":
        # 504: a write whose COMMIT the fault cut off, which may have been applied; busy: a
        # pool whose connections all wait on a database that hangs.
        return (((a.status == 503 and a.message.startswith(("database unavailable",
                                                             "database busy")))
                 or (a.status == 504 and a.message.startswith("database did not confirm")))
                and a.invoke < fault.recovered)
    return False


# -- after the run: nothing lost, nothing leaked -----------------------------------------


async def read_database(dsn: str, prefix: str) -> dict[str, str]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT key, value FROM public.variables WHERE starts_with(key, $1)", prefix)
    finally:
        await conn.close()
    return {r["key"]: r["value"] for r in rows}


@dataclass
class Durability:
    acknowledged_once: int
    lost_once: list[str]
    """Write-once keys answered 201 but absent or different in the database."""
    history: CheckResult
    """The contended keys' history with the database's final state appended."""
    acknowledged_writes: int
    #: Where the final state was read: the database, or (``--url``) through the API.
    read_from: str = "the database"

    @property
    def untested(self) -> bool:
        """No write was acknowledged: there was nothing to check (not a stack that stores)."""
        return self.acknowledged_once == 0 and self.acknowledged_writes == 0

    @property
    def ok(self) -> bool:
        return not self.lost_once and self.history.ok and not self.untested


async def check_durability(load: Load, dsn: str) -> Durability:
    stored = await read_database(dsn, load.config.run_id + "-")
    once = load.write_once_acknowledged()
    lost = sorted(k for k, v in once.items() if stored.get(k) != v)
    recording = load.recording
    contended = [op for op in recording.history if "-once-" not in op.key]

    async def final(key: str) -> State:
        return stored.get(key)

    result = await final_state_check(
        contended, final,
        keys={f"{load.config.run_id}-{k}" for k in load.config.contended_keys})
    return Durability(len(once), lost, result,
                      sum(1 for op in recording.acknowledged_writes))


def linearizable(load: Load) -> CheckResult:
    return check([op for op in load.recording.history if "-once-" not in op.key])


# -- leaks -----------------------------------------------------------------------------


def fd_count(pid: int | None = None) -> int:
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))


def close_wait(pid: int | None = None) -> int:
    """Sockets of process ``pid`` (default: this one) in CLOSE_WAIT."""
    inodes = set()
    fd_dir = f"/proc/{pid or os.getpid()}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            target = os.readlink(f"{fd_dir}/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "08" and fields[9] in inodes:
                    count += 1
    return count


@dataclass
class Target:
    """What the leak check looks at: the balancer (and its admin listener) and the replicas,
    of a :class:`Stack` or of a topology put together by hand."""

    admin_host: str
    admin_port: int
    balancer: Child
    replicas: list[Child]

    @classmethod
    def of(cls, stack: Stack) -> Target:
        assert stack.balancer is not None
        return cls(stack.config.admin_client_host, stack.config.lb_admin_port, stack.balancer,
                   stack.replicas)


@dataclass
class Baseline:
    own_fds: int
    own_tasks: int
    lb_fds: int


async def baseline(target: Stack | Target) -> Baseline:
    """Taken once the system is up and before any load."""
    target = Target.of(target) if isinstance(target, Stack) else target
    assert target.balancer.pid is not None
    return Baseline(fd_count(), len(asyncio.all_tasks()), fd_count(target.balancer.pid))


@dataclass
class Leaks:
    problems: list[str]
    numbers: dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.problems


async def check_leaks(target: Stack | Target, base: Baseline, *,
                      timeout: float = 20.0) -> Leaks:
    """After the load has stopped: the balancer holds no connection (every accepted one
    finished), its descriptors and ours are back to the baseline, our tasks too, and no
    socket of ours, the balancer's or a replica's sits in CLOSE_WAIT."""
    target = Target.of(target) if isinstance(target, Stack) else target
    lb_pid = target.balancer.pid
    assert lb_pid is not None
    numbers: dict[str, int] = {}

    def measure() -> list[str]:
        problems = []
        numbers["own_fds"], numbers["own_tasks"] = fd_count(), len(asyncio.all_tasks())
        numbers["lb_fds"] = fd_count(lb_pid)
        numbers["close_wait"] = close_wait() + close_wait(lb_pid) + sum(
            close_wait(c.pid) for c in target.replicas if c.pid is not None)
        if numbers["own_fds"] > base.own_fds:
            problems.append(f"test process: {numbers['own_fds']} descriptors, "
                            f"{base.own_fds} before")
        if numbers["own_tasks"] > base.own_tasks:
            problems.append(f"test process: {numbers['own_tasks']} tasks, {base.own_tasks} before")
        if numbers["lb_fds"] > base.lb_fds:
            problems.append(f"balancer: {numbers['lb_fds']} descriptors, {base.lb_fds} before")
        if numbers["close_wait"]:
            problems.append(f"{numbers['close_wait']} sockets in CLOSE_WAIT")
        return problems

    # The verdict is the last sample the wait took. A fresh sample after a clean one could
    # catch a health check's or our /stats request's socket in flight: not a leak.
    problems: list[str] = []

    async def settled() -> bool:
        stats = await get_json(target.admin_host, target.admin_port, "/stats")
        totals = stats["totals"]
        numbers["lb_active"] = totals["active_connections"]
        numbers["lb_unfinished"] = totals["accepted_connections"] - totals["finished_connections"]
        problems[:] = measure()
        return not totals["active_connections"] and not numbers["lb_unfinished"] \
            and not problems

    with contextlib.suppress(TimeoutError):
        await wait_until(settled, timeout=timeout, step=0.1)
    if numbers.get("lb_active") or numbers.get("lb_unfinished"):
        problems.append(f"balancer: {numbers['lb_active']} connections still open, "
                        f"{numbers['lb_unfinished']} accepted but not finished")
    return Leaks(problems, numbers)


def summarize_failures(attempts: Iterable[Attempt], limit: int = 20) -> str:
    attempts = list(attempts)
    lines = [a.describe() for a in attempts[:limit]]
    if len(attempts) > limit:
        lines.append(f"... and {len(attempts) - limit} more")
    return "\n".join(lines)


def counter_text(counter: Counter[str]) -> str:
    return ", ".join(f"{n} x {r}" for r, n in counter.most_common()) or "-"


# -- a topology put together by hand (for what Stack cannot do) ---------------------------


def child_env(extra: Mapping[str, str], *, loop: str = "auto") -> dict[str, str]:
    """The environment of a hand-started replica or balancer (fast settings, the checkout
    on PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGSQL_", "STACK_"))}
    env.update(FAST_ENV)
    env.update({"SERVICE_LOOP": loop, "LB_LOOP": loop, "PYTHONUNBUFFERED": "1"})
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


async def stop_children(children: Iterable[Child], timeout: float = 10.0) -> None:
    children = list(children)
    for c in children:
        c.prevent_restart()
    await asyncio.gather(*(c.stop(timeout) for c in children))


def local_port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
