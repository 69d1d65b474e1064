"""Record a history of real calls against a running API, and check its final state.

Concurrent workers call set/get/edit/delete on a small key set for a bounded number of
calls and a bounded time, and each call is recorded with ``time.monotonic()`` just before
the request leaves and just after its answer is read, plus what the answer proves:

- **definite**: the API's own answer (201/409, 200/404, 200/404, 204/404, with the
  message that goes with a 404 or 409): the call took effect exactly as it says.
- **unknown**: no answer (timeout, reset, refused after sending), a 5xx, anything
  unexpected: a write may or may not have happened, at any time after it was sent.
- **not applied**: the API says nothing was stored (a 400/405/413 client error, or a 503:
  ``database busy`` comes before any statement is sent, ``database unavailable`` before the
  write's COMMIT, which ``services.db`` sends only while the request still waits; a COMMIT
  the database did not confirm is a 504, unknown).  Such a call says nothing about the
  state, so the checker never sees it: were it applied after all, a read of its value would
  fail the check.

Written values are unique per call, so a read names the write it saw.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from chaos.client import Accept, Reply, Style, call
from chaos.linearizability import DEFAULT_MAX_STEPS, CheckResult, check
from chaos.model import KINDS, STATUSES, Kind, Op, State

NOT_FOUND_MESSAGE = "variable not found"
EXISTS_MESSAGE = "variable already exists"
CLIENT_ERRORS = frozenset({400, 405, 413})
"""Answers after which nothing was stored (README: 'Nothing is stored for any of these')."""
NOT_APPLIED_503 = frozenset({"database busy, retry later", "database unavailable"})
"""The service's 503s (README: *When the database goes away*); another 503 proves nothing."""


class Outcome(enum.Enum):
    DEFINITE = "definite"
    UNKNOWN = "unknown"
    NOT_APPLIED = "not applied"


@dataclass(frozen=True)
class Classified:
    outcome: Outcome
    status: int | None
    """The definite status the checker sees, else None."""
    value: str | None
    """For a get answered 200, the value read."""


def classify(kind: Kind, reply: Reply | None) -> Classified:
    """What an answer (None: no answer at all) proves about the call."""
    if reply is None:
        return Classified(Outcome.UNKNOWN, None, None)
    status, message = reply.status, reply.message
    if status in CLIENT_ERRORS or (status == 503 and message in NOT_APPLIED_503):
        return Classified(Outcome.NOT_APPLIED, None, None)
    ok, refused = STATUSES[kind]
    if status == ok and kind == "get":
        value = reply.text
        if reply.json:
            payload = reply.payload
            if not isinstance(payload, dict) or not isinstance(payload.get("value"), str):
                return Classified(Outcome.UNKNOWN, None, None)
            value = payload["value"]
        return Classified(Outcome.DEFINITE, ok, value)
    if status == ok:
        return Classified(Outcome.DEFINITE, ok, None)
    expected = EXISTS_MESSAGE if refused == 409 else NOT_FOUND_MESSAGE
    if status == refused and message == expected:
        return Classified(Outcome.DEFINITE, refused, None)
    return Classified(Outcome.UNKNOWN, None, None)


@dataclass(frozen=True)
class Record:
    """One call as made: the op the checker sees, and what came back."""

    op: Op
    outcome: Outcome
    http_status: int | None
    detail: str
    served_by: str | None = None
    style: Style = "json"
    accept: Accept = "text"


@dataclass
class Recording:
    records: list[Record] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    @property
    def history(self) -> list[Op]:
        """The ops the checker needs: every call except those known not to have applied."""
        return [r.op for r in self.records if r.outcome is not Outcome.NOT_APPLIED]

    @property
    def acknowledged_writes(self) -> list[Op]:
        """Writes the API said it made (201, 200 to an edit, 204)."""
        return [op for op in self.history if op.is_write and op.succeeded]

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.records if r.outcome is outcome)

    def summary(self) -> str:
        served = sorted({r.served_by for r in self.records if r.served_by})
        return (
            f"{len(self.records)} calls in {self.finished - self.started:.1f}s: "
            f"{self.count(Outcome.DEFINITE)} definite, {self.count(Outcome.UNKNOWN)} unknown, "
            f"{self.count(Outcome.NOT_APPLIED)} not applied; "
            f"{len(self.acknowledged_writes)} acknowledged writes; served by {served}"
        )


@dataclass(frozen=True)
class Workload:
    base_url: str
    keys: Sequence[str] = tuple(f"k{i}" for i in range(5))
    workers: int = 8
    max_ops: int = 1000
    max_seconds: float = 30.0
    request_timeout: float = 2.0
    weights: tuple[float, float, float, float] = (3, 4, 2, 1)
    """Relative frequency of set, get, edit, delete."""
    seed: int = 0
    fresh_connections: bool = False
    """A new TCP connection per call: behind an L4 round-robin balancer, keep-alive would
    pin each worker to one replica."""
    retry_after_cap: float = 1.0
    """After a 503, pause for its Retry-After, at most this long: a polite client, and one
    that does not fill the history with unknown writes while the database is away."""
    value_prefix: str = ""

    def __post_init__(self) -> None:
        if self.workers < 1 or self.max_ops < 0 or self.max_seconds <= 0 or not self.keys:
            raise ValueError(f"an empty or unbounded workload: {self}")


async def record(
    workload: Workload, session: aiohttp.ClientSession | None = None
) -> Recording:
    """Run the workload and return every call it made.  Bounded by ``max_ops`` calls and
    ``max_seconds`` (plus one request timeout for the calls in flight at the deadline)."""
    recording = Recording(started=time.monotonic())
    deadline = recording.started + workload.max_seconds
    tickets = itertools.count()
    new_process = itertools.count(workload.workers)

    async def worker(w: int, http: aiohttp.ClientSession) -> None:
        rng = random.Random(f"{workload.seed}/{w}")
        process = w
        while (n := next(tickets)) < workload.max_ops and time.monotonic() < deadline:
            kind: Kind = rng.choices(KINDS, workload.weights)[0]
            key = rng.choice(workload.keys)
            value = None
            if kind in ("set", "edit"):
                # Unique per call; sometimes non-ASCII, to keep the encodings honest.
                value = f"{workload.value_prefix}{w}.{n}" + ("-ü✓" if rng.random() < 0.2 else "")
            style: Style = rng.choice(("json", "query"))
            accept: Accept = rng.choice(("text", "json"))
            reply: Reply | None = None
            detail = ""
            invoke = time.monotonic()
            try:
                async with asyncio.timeout(workload.request_timeout):
                    reply = await call(http, workload.base_url, kind, key, value,
                                       style=style, accept=accept,
                                       ascii_json=rng.random() < 0.5)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                detail = f"{type(exc).__name__}: {exc}"
            complete = time.monotonic()
            verdict = classify(kind, reply)
            if reply is not None:
                detail = reply.message[:200]
            op_value = verdict.value if kind == "get" else value
            op = Op(key, kind, op_value, verdict.status, invoke, complete, process)
            recording.records.append(Record(
                op, verdict.outcome, reply.status if reply else None, detail,
                reply.served_by if reply else None, style, accept,
            ))
            if verdict.outcome is Outcome.UNKNOWN:
                # The call may still be in flight somewhere: what this worker does next is
                # concurrent with it, as if done by another client.
                process = next(new_process)
            if reply is not None and reply.status == 503:
                pause = reply.retry_after if reply.retry_after is not None else 1.0
                await asyncio.sleep(max(0.0, min(pause, workload.retry_after_cap)))

    own = session is None
    if session is None:
        connector = aiohttp.TCPConnector(limit=workload.workers,
                                         force_close=workload.fresh_connections)
        session = aiohttp.ClientSession(connector=connector)
    try:
        async with asyncio.timeout(workload.max_seconds + workload.request_timeout + 10):
            await asyncio.gather(*(worker(w, session) for w in range(workload.workers)))
    finally:
        if own:
            await session.close()
    recording.finished = time.monotonic()
    return recording


async def final_state_check(
    history: Sequence[Op],
    read_final: Callable[[str], Awaitable[State]],
    *,
    keys: Iterable[str] | None = None,
    initial: Mapping[str, State] | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> CheckResult:
    """Read each key's final value (straight from the database, say) and check the history
    with those reads appended after everything: every acknowledged write must be reflected
    in a final state that some linearization of the history ends in."""
    names = sorted(set(keys) if keys is not None else {op.key for op in history})
    latest = max((t for op in history for t in (op.invoke, op.complete) if t is not None),
                 default=0.0)
    finals: list[Op] = []
    for key in names:
        invoke = max(time.monotonic(), latest)
        value = await read_final(key)
        complete = max(time.monotonic(), invoke)
        finals.append(Op(key, "get", value, 404 if value is None else 200, invoke, complete,
                         process=-1))
    return check([*history, *finals], initial, max_steps=max_steps)


# -- histories on disk: one JSON object per line -------------------------------------


def dump_history(ops: Iterable[Op], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for op in ops:
            f.write(json.dumps(asdict(op), ensure_ascii=False) + "\n")


def load_history(path: Path) -> list[Op]:
    ops = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                ops.append(Op(**json.loads(line)))
            except (TypeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path}:{n}: not an operation: {exc}") from None
    return ops
