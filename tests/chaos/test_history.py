"""The history recorder against a real replica, its answer classification, and the final
state check."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from chaos.client import Reply, call
from chaos.history import (
    Outcome,
    Workload,
    classify,
    dump_history,
    final_state_check,
    load_history,
    record,
)
from chaos.linearizability import Verdict, check
from chaos.model import Kind, Op, State
from stack.pg import EmbeddedPostgres
from tests.services.conftest import RunningService, config_for, run_service

KEYS = ("k0", "k1", "ключ", "a+b&c=d")


def reader(db: asyncpg.Connection) -> Callable[[str], Awaitable[State]]:
    async def read(key: str) -> State:
        value: State = await db.fetchval("SELECT value FROM public.variables WHERE key = $1", key)
        return value

    return read


# -- classification ------------------------------------------------------------------


def reply(status: int, text: str = "", payload: object = None, *, json: bool = False) -> Reply:
    return Reply(status, text, payload, "replica:1", None, json)


@pytest.mark.parametrize(
    ("kind", "answer", "outcome", "status", "value"),
    [
        ("set", reply(201, "variable created"), Outcome.DEFINITE, 201, None),
        ("set", reply(409, "variable already exists"), Outcome.DEFINITE, 409, None),
        ("set", reply(409, "", {"error": "variable already exists"}, json=True),
         Outcome.DEFINITE, 409, None),
        ("get", reply(200, "{not json}"), Outcome.DEFINITE, 200, "{not json}"),
        ("get", reply(200, "", {"key": "k", "value": "v"}, json=True), Outcome.DEFINITE, 200, "v"),
        ("get", reply(200, "garbage", None, json=True), Outcome.UNKNOWN, None, None),
        ("get", reply(404, "variable not found"), Outcome.DEFINITE, 404, None),
        ("edit", reply(404, "no such endpoint: /edit_var"), Outcome.UNKNOWN, None, None),
        ("delete", reply(204), Outcome.DEFINITE, 204, None),
        ("edit", reply(503, "database unavailable"), Outcome.NOT_APPLIED, None, None),
        ("edit", reply(504, "database did not confirm the write in time: it may have been "
                             "applied; read the variable before retrying"),
         Outcome.UNKNOWN, None, None),
        ("set", reply(502, "bad gateway"), Outcome.UNKNOWN, None, None),
        ("set", reply(503, "database busy, retry later"), Outcome.NOT_APPLIED, None, None),
        ("delete", reply(400, "key must not be empty"), Outcome.NOT_APPLIED, None, None),
        ("set", None, Outcome.UNKNOWN, None, None),
    ],
)
def test_answers_are_classified_by_what_they_prove(
    kind: Kind, answer: Reply | None, outcome: Outcome, status: int | None, value: str | None,
) -> None:
    verdict = classify(kind, answer)
    assert (verdict.outcome, verdict.status, verdict.value) == (outcome, status, value)


def test_histories_survive_a_round_trip_through_a_file(tmp_path: Path) -> None:
    ops = [Op("ключ", "set", "ü✓", 201, 1.5, 2.0, 3), Op("k", "edit", "x", None, 2.5, None, 4)]
    dump_history(ops, tmp_path / "h.jsonl")
    assert load_history(tmp_path / "h.jsonl") == ops
    (tmp_path / "bad.jsonl").write_text('{"key": "k"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        load_history(tmp_path / "bad.jsonl")


def test_a_workload_must_be_bounded() -> None:
    with pytest.raises(ValueError, match="unbounded"):
        Workload("http://127.0.0.1:1", max_seconds=0)


# -- against a real replica ----------------------------------------------------------


async def test_a_recorded_history_is_linearizable_and_matches_the_database(
    replica: RunningService, db: asyncpg.Connection
) -> None:
    recording = await record(Workload(replica.url, keys=KEYS, workers=6, max_ops=400,
                                      max_seconds=30, seed=7))
    assert len(recording.records) == 400, recording.summary()
    assert recording.count(Outcome.DEFINITE) == 400, recording.summary()
    assert {(r.style, r.accept) for r in recording.records} == {
        ("json", "text"), ("json", "json"), ("query", "text"), ("query", "json")
    }
    history = recording.history
    assert {op.key for op in history} == set(KEYS)
    assert recording.acknowledged_writes
    assert all(op.is_write and op.succeeded for op in recording.acknowledged_writes)
    result = check(history)
    assert result.ok, result

    final = await final_state_check(history, reader(db), keys=KEYS)
    assert final.ok, final


async def test_the_final_state_check_catches_a_lost_and_a_forged_write(
    replica: RunningService, db: asyncpg.Connection
) -> None:
    recording = await record(Workload(replica.url, keys=KEYS, workers=4, max_ops=150,
                                      max_seconds=30, seed=8))
    history = recording.history
    assert check(history).ok
    present = [r["key"] for r in await db.fetch("SELECT key FROM public.variables")]
    assert present, recording.summary()
    await db.execute("UPDATE public.variables SET value = 'forged' WHERE key = $1", present[0])
    result = await final_state_check(history, reader(db), keys=KEYS)
    assert result.verdict is Verdict.NOT_LINEARIZABLE
    assert [r.key for r in result.failures] == [present[0]]
    assert "no operation writes 'forged'" in str(result)

    # An acknowledged create, then the row vanishes behind the API's back.
    async with aiohttp.ClientSession() as http:
        invoke = time.monotonic()
        answer = await call(http, replica.url, "set", "fresh", "kept")
        ack = Op("fresh", "set", "kept", answer.status, invoke, time.monotonic())
    assert ack.status == 201
    await db.execute("DELETE FROM public.variables WHERE key = 'fresh'")
    result = await final_state_check([ack], reader(db))
    assert not result.ok
    assert "get('fresh') -> 404" in str(result)


async def test_calls_to_a_replica_without_its_database_are_not_applied(
    own_postgres: EmbeddedPostgres,
) -> None:
    """The database never started: every call answers 503, which says nothing was stored;
    the history holds none of them."""
    async with run_service(config_for(own_postgres), wait_ready=False) as service:
        recording = await record(Workload(service.url, keys=KEYS, workers=3, max_ops=30,
                                          max_seconds=20, retry_after_cap=0.01))
    assert len(recording.records) == 30
    assert {r.http_status for r in recording.records} == {503}
    assert recording.count(Outcome.NOT_APPLIED) == 30
    assert recording.acknowledged_writes == []
    assert recording.history == []
    assert check(recording.history).ok


async def test_a_workload_stops_at_its_time_bound(replica: RunningService) -> None:
    started = time.monotonic()
    recording = await record(Workload(replica.url, keys=KEYS, workers=2, max_ops=10**9,
                                      max_seconds=0.5))
    assert time.monotonic() - started < 0.5 + 2.0 + 10  # deadline + one request timeout + slack
    assert 0 < len(recording.records) < 10**9
    assert check(recording.history).ok


@pytest.mark.slow
async def test_a_database_restart_mid_run_leaves_a_linearizable_history(
    own_postgres: EmbeddedPostgres,
) -> None:
    """A taste of issue 6: the database stops and comes back under a running workload."""
    await asyncio.to_thread(own_postgres.start)
    async with run_service(config_for(own_postgres)) as service:
        workload = Workload(service.url, keys=KEYS, workers=6, max_ops=3000, max_seconds=12,
                            retry_after_cap=0.2)
        recorder = asyncio.create_task(record(workload))
        # Early: on a fast machine the 3000 calls take under 2 s, and a fault after the
        # workload has ended tests nothing (half a second is hundreds of calls either way).
        await asyncio.sleep(0.5)
        await asyncio.to_thread(own_postgres.stop, "immediate")
        await asyncio.sleep(2)
        await asyncio.to_thread(own_postgres.start)
        recording = await recorder
        async with asyncio.timeout(30):
            await service.database.ready.wait()
    # The restart was met: its calls got 503, which says nothing was stored (a write whose
    # COMMIT it cut off would be a 504, unknown: a narrow window, rarely hit).
    assert recording.count(Outcome.NOT_APPLIED) > 0, recording.summary()
    assert recording.count(Outcome.DEFINITE) > 100, recording.summary()
    result = check(recording.history)
    assert result.ok, result
    conn = await asyncpg.connect(own_postgres.dsn)
    try:
        final = await final_state_check(recording.history, reader(conn), keys=KEYS)
    finally:
        await conn.close()
    assert final.ok, final
