"""A write the database did not answer in time: answered 503 and never applied later, even when
the database gets to it after the replica gave up; a COMMIT it did not confirm: 504, outcome
unknown, never "unavailable, retry"."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import psutil
import pytest

from services.api import WRITE_OUTCOME_UNKNOWN
from stack.pg import EmbeddedPostgres
from tests.services.conftest import RunningService, config_for, run_service, stopped
from tests.services.pgrelay import PgRelay, Rule, after_begin, is_commit

#: Short, so that each test waits for the replica to give up about 1.5 s.
COMMAND_TIMEOUT = 1.0


@dataclass(frozen=True)
class Write:
    method: str
    path: str
    body: dict[str, str]
    #: The table's content had the write been applied.
    applied: dict[str, str]
    #: The same statement, changing nothing: it prepares the statement on the connection.
    warm_up: dict[str, str]


BEFORE = {"edited": "v", "deleted": "v"}
WRITES = [
    Write("POST", "/set_var", {"key": "created", "value": "late"}, {**BEFORE, "created": "late"},
          warm_up={"key": "edited", "value": "v"}),
    Write("PUT", "/edit_var", {"key": "edited", "value": "late"}, {**BEFORE, "edited": "late"},
          warm_up={"key": "edited", "value": "v"}),
    Write("DELETE", "/delete_var", {"key": "deleted"}, {"edited": "v"},
          warm_up={"key": "absent"}),
]


async def table(conn: asyncpg.Connection) -> dict[str, str]:
    return dict(await conn.fetch("SELECT key, value FROM public.variables"))


async def seeded(conn: asyncpg.Connection) -> None:
    await conn.executemany("INSERT INTO public.variables VALUES ($1, $2)", BEFORE.items())


async def send(http: aiohttp.ClientSession, service: RunningService, write: Write,
               body: dict[str, str] | None = None, **kwargs: Any) -> tuple[int, str]:
    async with http.request(write.method, service.url + write.path,
                            json=write.body if body is None else body, **kwargs) as r:
        # Every 503 says when to retry; no other answer does (a 504's retry may meet its write).
        assert ("Retry-After" in r.headers) == (r.status == 503)
        return r.status, await r.text()


@contextlib.asynccontextmanager
async def service_behind(
    postgres: Any, http: aiohttp.ClientSession, write: Write, rule: Rule, **hold: Any
) -> AsyncIterator[tuple[RunningService, PgRelay]]:
    """The service with its one pool connection through a :class:`PgRelay`, armed once the
    service is ready and has served ``write.warm_up``: the write's statement is prepared on
    the connection, as on any replica that served a while, so one message executes it."""
    async with PgRelay((postgres.host, int(postgres.port)), rule, **hold) as relay:
        config = config_for(postgres, pg_host="127.0.0.1", pg_port=relay.port,
                            db_command_timeout=COMMAND_TIMEOUT, pool_min_size=1, pool_max_size=1)
        async with run_service(config) as service:
            status, _ = await send(http, service, write, write.warm_up)
            assert status < 500
            relay.arm()
            yield service, relay


@pytest.mark.parametrize("write", WRITES, ids=lambda w: w.path[1:])
async def test_a_statement_the_database_did_not_answer_is_rolled_back_when_it_gets_to_it(
    postgres: Any, clean_db: asyncpg.Connection, http: aiohttp.ClientSession, write: Write
) -> None:
    await seeded(clean_db)
    async with service_behind(postgres, http, write, after_begin, hold="requests") as (
        service, relay
    ):
        assert await send(http, service, write) == (503, "database unavailable")
        assert relay.holding.is_set()
        # The replica dropped the connection; the database now runs the statement it finds
        # in its socket, then meets the end of the connection with the transaction open.
        async with asyncio.timeout(10):
            await relay.ended.wait()
        assert relay.answered.is_set()  # it did run it
        assert await table(clean_db) == BEFORE
        # The replica serves on, with a new connection.
        assert (await send(http, service, write))[0] in (200, 201, 204)
        assert await table(clean_db) == write.applied


async def test_a_commit_the_database_did_not_confirm_is_a_504_outcome_unknown(
    postgres: Any, clean_db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    await seeded(clean_db)
    write = WRITES[0]
    async with service_behind(postgres, http, write, is_commit, hold="answers") as (
        service, relay
    ):
        status, text = await send(http, service, write, headers={"Accept": "application/json"})
        assert (status, json.loads(text)) == (504, {"error": WRITE_OUTCOME_UNKNOWN})
        assert relay.answered.is_set()  # the server did commit: the answer was lost
        async with asyncio.timeout(10):
            await relay.ended.wait()
        assert await table(clean_db) == write.applied
        async with http.get(f"{service.url}/metrics") as r:
            assert 'varstack_db_errors_total{kind="outcome_unknown"} 1.0' in await r.text()
        # What the answer tells the client to do: read before retrying.
        async with http.get(f"{service.url}/get_var?key=created") as r:
            assert (r.status, await r.text()) == (200, "late")


async def test_a_transaction_cut_off_from_its_replica_does_not_hold_its_row_lock(
    postgres: Any, clean_db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    """The network cut between the statement and the COMMIT: the replica answers 504, and the
    server, which never learns that the replica left, ends the idle transaction itself (its
    idle_in_transaction_session_timeout) instead of holding the row lock until TCP gives up."""
    await seeded(clean_db)
    write = WRITES[1]  # edit_var: it holds the row's lock until its transaction ends
    async with service_behind(postgres, http, write, is_commit, hold="cut") as (service, relay):
        assert (await send(http, service, write))[0] == 504
        async with asyncio.timeout(10):
            await relay.ended.wait()
        assert await table(clean_db) == BEFORE  # rolled back
        assert await send(http, service, write, {"key": "edited", "value": "now"}) == (
            200, "variable edited")
        assert await table(clean_db) == {**BEFORE, "edited": "now"}


@pytest.mark.parametrize("write", WRITES, ids=lambda w: w.path[1:])
async def test_a_write_sent_to_a_stopped_database_is_not_applied_when_it_resumes(
    own_postgres: EmbeddedPostgres, write: Write
) -> None:
    """The whole server SIGSTOPped (a frozen VM, a stalled disk): the write gets its 503, and
    is not applied after SIGCONT, when the server reads what waited in its socket (its BEGIN:
    the statement follows only an answer; the relay tests hold the statement itself)."""
    await asyncio.to_thread(own_postgres.start)
    conn = await asyncpg.connect(own_postgres.dsn)
    config = config_for(own_postgres, db_command_timeout=COMMAND_TIMEOUT,
                        pool_min_size=1, pool_max_size=1)
    try:
        async with run_service(config) as service, aiohttp.ClientSession() as http:
            await seeded(conn)
            assert (await send(http, service, write, write.warm_up))[0] < 500
            backend = psutil.Process(await conn.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'varstack-service'"))
            with stopped(own_postgres):
                assert await send(http, service, write) == (503, "database unavailable")
            # The dropped connection's backend reads what was sent, then the end of the
            # connection, and exits: after that, nothing more can be written in its name.
            await asyncio.to_thread(backend.wait, 20)
            assert await table(conn) == BEFORE
    finally:
        await conn.close()
