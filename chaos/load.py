"""Bounded concurrent load through the balancer, every request recorded with its connection.

Two kinds of client run side by side:

- **fresh**: a new TCP connection per request (``Connection: close``), the way the
  balancer spreads load best (it balances connections, not requests);
- **keep-alive**: one connection reused for request after request; after a failure the
  client opens a new one, as any HTTP client does.

Each request is one of the API's calls on one of two kinds of key:

- a small set of **contended** keys with set/get/edit/delete, unique values per write:
  the history the linearizability checker reads;
- **write-once** keys, one fresh key per ``set``: every 201 must still be in the database
  at the end, a plain "no acknowledged write lost" check.

Every attempt keeps when its connection was opened, its local port (the balancer's debug
log names the replica that port was piped to), which replica answered earlier on that
connection, and what came back, so a scenario can say which failures happened, on which
connections, and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from chaos.client import Reply, Style, request_parts
from chaos.history import Outcome, Record, Recording, classify
from chaos.model import KINDS, Kind, Op
from chaos.rawhttp import Connection, HttpError, RawReply

Mode: TypeAlias = Literal["fresh", "keepalive"]


@dataclass(frozen=True)
class Attempt:
    """One request as a client made it."""

    worker: int
    mode: Mode
    conn_id: int
    opened: float | None
    """When its connection was opened (None: the connect itself failed)."""
    local_port: int | None
    conn_served_by: str | None
    """The replica that answered the previous request on this connection, if any."""
    kind: Kind
    key: str
    value: str | None
    invoke: float
    complete: float
    status: int | None
    message: str
    error: str | None
    """Why there was no answer: the exception, or None when there was one."""
    served_by: str | None
    retry_after: str | None
    outcome: Outcome
    record: Record
    server_closes: bool = False
    """The answer said ``Connection: close``."""

    @property
    def failed(self) -> bool:
        """No HTTP answer, or a 5xx."""
        return self.status is None or self.status >= 500

    @property
    def reason(self) -> str:
        """Why it failed, in a few words (for the tables)."""
        if self.status is None:
            assert self.error is not None
            return self.error.split(":", 1)[0]
        return f"{self.status} {self.message[:40]}"

    def describe(self) -> str:
        opened = "never" if self.opened is None else f"{self.opened:.3f}"
        return (f"{self.mode} w{self.worker} conn#{self.conn_id} port={self.local_port} "
                f"opened={opened} earlier_replica={self.conn_served_by} "
                f"{self.kind} {self.key!r} [{self.invoke:.3f}, {self.complete:.3f}] "
                f"-> {self.status or '-'} {self.error or self.message[:60]!r}")


@dataclass
class LoadConfig:
    host: str
    port: int
    fresh_workers: int = 4
    keepalive_workers: int = 4
    contended_keys: Sequence[str] = tuple(f"h{i}" for i in range(6))
    write_once_share: float = 0.25
    """Share of requests that create a new write-once key."""
    weights: tuple[float, float, float, float] = (3, 4, 2, 1)
    """set, get, edit, delete on the contended keys."""
    max_ops: int = 100_000
    max_seconds: float = 60.0
    request_timeout: float = 5.0
    pause: float = 0.002
    """Seconds each worker waits between two requests (keeps a 2-core machine usable)."""
    retry_after_cap: float = 0.2
    """After a 503, wait its Retry-After, at most this long."""
    run_id: str = "run"
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.max_ops < 0 or self.max_seconds <= 0 or not self.contended_keys
                or self.fresh_workers + self.keepalive_workers < 1):
            raise ValueError(f"an empty or unbounded load: {self}")


@dataclass
class Load:
    """Run with :meth:`run` (or as a task with :meth:`start`/:meth:`stop`)."""

    config: LoadConfig
    attempts: list[Attempt] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _tickets: itertools.count[int] = field(default_factory=itertools.count)
    _processes: itertools.count[int] = field(default_factory=lambda: itertools.count(10_000))

    # -- control ---------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="chaos-load")

    async def stop(self) -> None:
        """Ask every worker to stop after its current request, and wait for them."""
        self._stop.set()
        if self._task is not None:
            await self._task

    async def run(self) -> None:
        cfg = self.config
        self.started = time.monotonic()
        workers = [self._worker(w, "fresh") for w in range(cfg.fresh_workers)]
        workers += [self._worker(cfg.fresh_workers + w, "keepalive")
                    for w in range(cfg.keepalive_workers)]
        try:
            async with asyncio.timeout(cfg.max_seconds + cfg.request_timeout + 10):
                await asyncio.gather(*workers)
        finally:
            self.finished = time.monotonic()

    async def wait_for(self, count: int, *, timeout: float = 30.0) -> None:
        """Until ``count`` more requests have been answered (a warm-up, say)."""
        target = len(self.attempts) + count
        async with asyncio.timeout(timeout):
            while len(self.attempts) < target:
                if self._task is not None and self._task.done():
                    self._task.result()
                    return
                await asyncio.sleep(0.02)

    # -- one client --------------------------------------------------------------------

    async def _worker(self, w: int, mode: Mode) -> None:
        cfg = self.config
        rng = random.Random(f"{cfg.seed}/{w}")
        deadline = self.started + cfg.max_seconds
        process = w
        conn: Connection | None = None
        try:
            while (not self._stop.is_set() and time.monotonic() < deadline
                   and (n := next(self._tickets)) < cfg.max_ops):
                kind, key, value = self._choose(rng, w, n)
                style: Style = rng.choice(("json", "query"))
                if conn is None or not conn.is_open:
                    conn = Connection(cfg.host, cfg.port)
                attempt = await self._one(w, mode, conn, kind, key, value, style, process)
                self.attempts.append(attempt)
                if attempt.outcome is Outcome.UNKNOWN:
                    process = next(self._processes)
                if mode == "fresh" or attempt.failed or attempt.server_closes:
                    await conn.close()
                    conn = None
                pause = cfg.pause
                if attempt.status == 503:
                    hint = _float(attempt.retry_after)
                    pause = max(pause, min(1.0 if hint is None else hint, cfg.retry_after_cap))
                if pause:
                    await asyncio.sleep(pause)
        finally:
            if conn is not None:
                await conn.close()

    def _choose(self, rng: random.Random, w: int, n: int) -> tuple[Kind, str, str | None]:
        cfg = self.config
        if rng.random() < cfg.write_once_share:
            return "set", f"{cfg.run_id}-once-{w}-{n}", f"{cfg.run_id}.{w}.{n}"
        kind: Kind = rng.choices(KINDS, cfg.weights)[0]
        key = f"{cfg.run_id}-{rng.choice(cfg.contended_keys)}"
        value = f"{w}.{n}" + ("-ü" if rng.random() < 0.1 else "") if kind in ("set", "edit") \
            else None
        return kind, key, value

    async def _one(self, w: int, mode: Mode, conn: Connection, kind: Kind, key: str,
                   value: str | None, style: Style, process: int) -> Attempt:
        cfg = self.config
        method, target, body, headers = request_parts(kind, key, value, style=style,
                                                      accept="text")
        earlier = conn.served_by
        reply: RawReply | None = None
        error: str | None = None
        invoke = time.monotonic()
        try:
            async with asyncio.timeout(cfg.request_timeout):
                if not conn.is_open:
                    await conn.open()
                reply = await conn.request(method, target, body, headers, close=mode == "fresh")
        except TimeoutError:
            error = f"timeout: no answer within {cfg.request_timeout:g}s"
        except (OSError, HttpError, asyncio.IncompleteReadError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        complete = time.monotonic()
        if error is not None:
            conn.abort()
        api_reply = None if reply is None else Reply(
            reply.status, reply.text, None, reply.served_by,
            _float(reply.headers.get("retry-after")), False,
        )
        verdict = classify(kind, api_reply)
        op_value = verdict.value if kind == "get" else value
        op = Op(key, kind, op_value, verdict.status, invoke, complete, process)
        message = "" if reply is None else reply.text[:200]
        record = Record(op, verdict.outcome, reply.status if reply else None,
                        error or message, reply.served_by if reply else None, style, "text")
        return Attempt(
            w, mode, conn.id, conn.opened or None, conn.local_port, earlier, kind, key, value,
            invoke, complete, reply.status if reply else None, message, error,
            reply.served_by if reply else None,
            None if reply is None else reply.headers.get("retry-after"),
            verdict.outcome, record, reply is not None and not reply.keep_alive,
        )

    # -- what happened -------------------------------------------------------------------

    @property
    def recording(self) -> Recording:
        return Recording([a.record for a in self.attempts], self.started, self.finished)

    def write_once_acknowledged(self) -> dict[str, str]:
        """Write-once keys the API said it created (201), with their values."""
        return {a.key: a.value for a in self.attempts
                if "-once-" in a.key and a.status == 201 and a.value is not None}

    def failures(self, since: float = 0.0, until: float = float("inf")) -> list[Attempt]:
        return [a for a in self.attempts if a.failed and since <= a.invoke < until]

    def count(self, since: float = 0.0, until: float = float("inf")) -> int:
        return sum(1 for a in self.attempts if since <= a.invoke < until)


def _float(raw: str | None) -> float | None:
    if raw is None:
        return None
    with contextlib.suppress(ValueError):
        return float(raw)
    return None


def reasons(attempts: Iterable[Attempt]) -> Counter[str]:
    return Counter(a.reason for a in attempts)


_LB_LINE = re.compile(r"client=(?:\[?[\w.:]+?\]?):(\d+) backend=(\S+) .* end=(.*)$")


def backends_by_port(lines: Iterable[str]) -> dict[int, list[tuple[str, str]]]:
    """From the balancer's debug log (``LB_LOG_LEVEL=debug``): client port -> [(backend,
    how the connection ended)], in log order (a port may be reused)."""
    found: dict[int, list[tuple[str, str]]] = {}
    for line in lines:
        match = _LB_LINE.search(line)
        if match:
            found.setdefault(int(match.group(1)), []).append((match.group(2), match.group(3)))
    return found
