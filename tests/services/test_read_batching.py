"""GETs that wait for a connection are read together, in one statement: each gets its own
key's value, as fresh as a statement of its own would have read, and each meets the batch's
failure as its own 503."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from services.db import GET_BATCH_MAX_KEYS, Database, DatabaseBusy, DatabaseUnavailable
from stack.pg import EmbeddedPostgres
from tests.services.conftest import RunningService, config_for, run_service
from tests.services.test_database_faults import (
    service_on,
    table_locked,
    wait_for_lock_waiter,
)


async def metric(http: aiohttp.ClientSession, service: RunningService, name: str) -> float:
    async with http.get(f"{service.url}/metrics") as r:
        found = re.search(rf"^{name} (\S+)$", await r.text(), re.MULTILINE)
    assert found, name
    return float(found[1])


async def wait_for_reads_waiting(database: Database, count: int) -> None:
    # The requests travel through sockets and the server's tasks: no event marks their joining.
    async with asyncio.timeout(10):
        while database.read_batch_stats()[2] < count:
            await asyncio.sleep(0.01)


async def get_var(
    http: aiohttp.ClientSession, service: RunningService, key: str = "k"
) -> tuple[int, str]:
    async with http.get(f"{service.url}/get_var", params={"key": key}) as r:
        return r.status, await r.text()


@contextlib.asynccontextmanager
async def reads_blocked(
    postgres: Any, clean_db: asyncpg.Connection, *, running: int = 1, **overrides: Any
) -> AsyncIterator[tuple[RunningService, aiohttp.ClientSession, list[asyncio.Future[Any]]]]:
    """The service (``overrides`` on its config), a client, and ``running`` GETs of ``k`` that
    run into a lock ``clean_db`` holds on the table, so that GETs sent after them wait. The
    test ends the lock (ROLLBACK) when it wants."""
    async with run_service(config_for(postgres, **overrides)) as service, \
            aiohttp.ClientSession() as http:
        await clean_db.execute("BEGIN; LOCK TABLE public.variables IN ACCESS EXCLUSIVE MODE")
        first = [asyncio.ensure_future(get_var(http, service)) for _ in range(running)]
        await wait_for_lock_waiter(clean_db, running)  # each on a statement of its own
        yield service, http, first


async def test_gets_waiting_for_their_turn_are_read_in_one_statement(
    postgres: Any, clean_db: asyncpg.Connection
) -> None:
    await clean_db.executemany(
        "INSERT INTO public.variables VALUES ($1, $2)",
        [("k", "v")] + [(f"k{i}", f"v{i}") for i in range(10)] + [("snow", "☃ \x01 'quoted'")],
    )
    async with reads_blocked(postgres, clean_db) as (service, http, first):
        keys = [f"k{i}" for i in range(10)] * 2 + [f"missing-{i}" for i in range(5)] + ["snow"]
        waiting = [asyncio.ensure_future(get_var(http, service, key)) for key in keys]
        await wait_for_reads_waiting(service.database, len(keys))
        # They wait for their turn (read_concurrency 1), not for a connection: the pool has
        # nine more.
        assert service.database.pool_stats()[1] == 1
        await clean_db.execute("ROLLBACK")
        answers = await asyncio.gather(*waiting)
        assert await asyncio.gather(*first) == [(200, "v")]
        expected = [(200, f"v{i}") for i in range(10)] * 2 + [(404, "variable not found")] * 5
        assert answers == [*expected, (200, "☃ \x01 'quoted'")]
        assert await metric(http, service, "varstack_db_read_batches_total") == 1
        assert await metric(http, service, "varstack_db_batched_reads_total") == len(keys)
        assert await metric(http, service, "varstack_db_reads_waiting") == 0


async def test_read_concurrency_sets_how_many_gets_run_before_the_rest_wait(
    postgres: Any, clean_db: asyncpg.Connection
) -> None:
    await clean_db.execute("INSERT INTO public.variables VALUES ('k', 'v')")
    async with reads_blocked(postgres, clean_db, running=3, read_concurrency=3) as (
        service, http, running
    ):
        waiting = [asyncio.ensure_future(get_var(http, service)) for _ in range(5)]
        await wait_for_reads_waiting(service.database, 5)
        assert service.database.pool_stats()[1] == 3
        await clean_db.execute("ROLLBACK")
        assert await asyncio.gather(*running, *waiting) == [(200, "v")] * 8
        assert service.database.read_batch_stats() == (1, 5, 0)


async def test_a_full_batch_leaves_the_next_gets_to_another(
    postgres: Any, clean_db: asyncpg.Connection
) -> None:
    await clean_db.execute("INSERT INTO public.variables VALUES ('k', 'v')")
    async with reads_blocked(postgres, clean_db, pool_min_size=1, pool_max_size=1) as (
        service, http, first
    ):
        count = GET_BATCH_MAX_KEYS + 3
        waiting = [asyncio.ensure_future(get_var(http, service)) for _ in range(count)]
        await wait_for_reads_waiting(service.database, count)
        await clean_db.execute("ROLLBACK")
        assert await asyncio.gather(*first, *waiting) == [(200, "v")] * (count + 1)
        assert await metric(http, service, "varstack_db_read_batches_total") == 2
        assert await metric(http, service, "varstack_db_batched_reads_total") == count


@pytest.mark.parametrize(("overrides", "reason"), [
    ({}, "the reads ahead took over 0.3s"),
    # A second turn is free, but the only connection is not.
    ({"read_concurrency": 2, "pool_min_size": 1, "pool_max_size": 1},
     "no connection free within 0.3s"),
], ids=["for-its-turn", "for-a-connection"])
async def test_every_get_of_a_batch_that_waits_too_long_is_busy(
    postgres: Any, clean_db: asyncpg.Connection, overrides: dict[str, int], reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await clean_db.execute("INSERT INTO public.variables VALUES ('k', 'v')")
    async with reads_blocked(postgres, clean_db, pool_acquire_timeout=0.3, **overrides) as (
        service, http, first
    ):
        answers = await asyncio.gather(*(get_var(http, service, f"k{i}") for i in range(10)))
        assert answers == [(503, "database busy, retry later")] * 10
        assert await metric(http, service, 'varstack_db_errors_total{kind="busy"}') == 10
        await clean_db.execute("ROLLBACK")
        assert await asyncio.gather(*first) == [(200, "v")]
        assert await get_var(http, service) == (200, "v")  # the batch left nothing behind
    # One line, then the others' count (within the second, or when the service stops).
    busy = [r.getMessage() for r in caplog.records if "database busy" in r.getMessage()]
    line = f"GET /get_var: database busy: {reason}"
    assert busy == [line, f"{line} [9 lines like this held back over 1 s]"]


async def test_every_get_of_a_batch_whose_statement_times_out_is_unavailable(
    postgres: Any, clean_db: asyncpg.Connection
) -> None:
    await clean_db.execute("INSERT INTO public.variables VALUES ('k', 'v')")
    async with reads_blocked(postgres, clean_db, db_command_timeout=1.5) as (
        service, http, first
    ):
        waiting = [get_var(http, service, f"k{i}") for i in range(8)]
        assert await asyncio.gather(*waiting) == [(503, "database unavailable")] * 8
        assert await asyncio.gather(*first) == [(503, "database unavailable")]
        assert await metric(http, service, 'varstack_db_errors_total{kind="timeout"}') == 9
        # All eight were batched (in one batch, or two if the first timed out as they came).
        assert await metric(http, service, "varstack_db_batched_reads_total") == 8
        await clean_db.execute("ROLLBACK")
        assert await get_var(http, service) == (200, "v")


async def test_a_get_never_reads_older_than_a_write_acknowledged_before_it_was_sent(
    postgres: Any, clean_db: asyncpg.Connection
) -> None:
    """One writer counts up, each edit acknowledged before the next; readers keep reading
    (most of them batched). A read sent after version n was acknowledged returns n or later."""
    await clean_db.execute("INSERT INTO public.variables VALUES ('counter', '0')")
    async with run_service(config_for(postgres)) as service, aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0)
    ) as http:
        acknowledged = 0
        done = asyncio.Event()
        stale: list[tuple[int, int]] = []

        async def writer() -> None:
            nonlocal acknowledged
            for version in range(1, 151):
                async with http.put(f"{service.url}/edit_var",
                                    json={"key": "counter", "value": version}) as r:
                    assert r.status == 200
                acknowledged = version
            done.set()

        async def reader() -> int:
            reads = 0
            while not done.is_set():
                floor = acknowledged
                async with http.get(f"{service.url}/get_var?key=counter") as r:
                    assert r.status == 200
                    seen = int(await r.text())
                if seen < floor:
                    stale.append((floor, seen))
                reads += 1
            return reads

        results = await asyncio.gather(writer(), *(reader() for _ in range(24)))
        assert stale == []
        assert sum(r for r in results if r is not None) > 150
        assert await metric(http, service, "varstack_db_batched_reads_total") > 0


async def test_a_database_killed_under_a_waiting_batch_is_503_for_all_then_heals(
    own_postgres: EmbeddedPostgres,
) -> None:
    async with service_on(own_postgres) as service, aiohttp.ClientSession() as http:
        async with table_locked(own_postgres) as locker:
            first = asyncio.ensure_future(get_var(http, service))
            await wait_for_lock_waiter(locker)
            waiting = [asyncio.ensure_future(get_var(http, service)) for _ in range(6)]
            await wait_for_reads_waiting(service.database, 6)
            await asyncio.to_thread(own_postgres.kill)
            assert await asyncio.gather(first, *waiting) == [(503, "database unavailable")] * 7
        await asyncio.to_thread(own_postgres.start)
        # The service reconnects by itself; the row was committed before the kill.
        async with asyncio.timeout(30):
            while await get_var(http, service) != (200, "v"):
                await asyncio.sleep(0.05)
        assert service.database.read_batch_stats()[2] == 0


# -- on the Database itself: a test holds the pool's only connection ---------------------


@pytest.fixture
async def database(postgres: Any, clean_db: asyncpg.Connection) -> AsyncIterator[Database]:
    database = Database(config_for(postgres, pool_min_size=1, pool_max_size=1))
    database.start()
    try:
        async with asyncio.timeout(30):
            await database.ready.wait()
        yield database
    finally:
        await database.close()


@contextlib.asynccontextmanager
async def only_connection_held(database: Database) -> AsyncIterator[None]:
    """Keep the pool's only connection lent while the block runs: GETs made meanwhile wait
    in one batch, which reads once the block ends. (Blocking the table would also block a
    write made meanwhile, which is what the tests here need to commit.)"""
    pool = database._pool
    assert pool is not None
    assert pool.max_size == 1
    conn = await pool.acquire()
    try:
        yield
    finally:
        pool.release(conn)


async def test_a_batched_get_sees_a_write_acknowledged_before_it_arrived(
    database: Database, clean_db: asyncpg.Connection
) -> None:
    await clean_db.execute("INSERT INTO public.variables VALUES ('k', 'old')")
    async with only_connection_held(database):
        before = asyncio.ensure_future(database.get_var("k"))
        await wait_for_reads_waiting(database, 1)
        await clean_db.execute("UPDATE public.variables SET value = 'new' WHERE key = 'k'")
        await clean_db.execute("INSERT INTO public.variables VALUES ('created', 'c')")
        after = asyncio.ensure_future(database.get_var("k"))
        created = asyncio.ensure_future(database.get_var("created"))
        await wait_for_reads_waiting(database, 3)
    # "before" was concurrent with the write and could rightly read either value; the batch
    # reads once the connection is free, after the write, so it reads the new one.
    assert await before == "new"
    assert await after == "new"
    assert await created == "c"


async def test_a_cancelled_get_leaves_the_rest_of_its_batch_answered(
    database: Database, clean_db: asyncpg.Connection
) -> None:
    await clean_db.execute("INSERT INTO public.variables VALUES ('a', '1'), ('b', '2')")
    async with only_connection_held(database):
        gets = [asyncio.ensure_future(database.get_var(key)) for key in ("a", "b", "a")]
        await wait_for_reads_waiting(database, 3)
        gets[0].cancel()
    assert await gets[1] == "2"
    assert await gets[2] == "1"
    assert gets[0].cancelled()


async def test_a_batch_that_finds_the_table_gone_makes_it_again(
    database: Database, clean_db: asyncpg.Connection
) -> None:
    await clean_db.execute("INSERT INTO public.variables VALUES ('a', '1')")
    async with only_connection_held(database):
        gets = [asyncio.ensure_future(database.get_var(key)) for key in ("a", "b")]
        await wait_for_reads_waiting(database, 2)
        await clean_db.execute("DROP TABLE public.variables")
    assert await asyncio.gather(*gets) == [None, None]
    assert database.read_batch_stats() == (1, 2, 0)
    assert await clean_db.fetchval("SELECT count(*) FROM public.variables") == 0


async def test_closing_the_database_answers_a_waiting_batch_unavailable(
    database: Database,
) -> None:
    async with only_connection_held(database):
        gets = [asyncio.ensure_future(database.get_var(f"k{i}")) for i in range(5)]
        await wait_for_reads_waiting(database, 5)
        closing = asyncio.ensure_future(database.close(timeout=10))
        results = await asyncio.gather(*gets, return_exceptions=True)
    await closing
    assert all(isinstance(r, DatabaseUnavailable) for r in results), results
    assert len({id(r) for r in results}) == 5, "each request raises an exception of its own"
    with pytest.raises(DatabaseUnavailable):
        await database.get_var("k0")


async def test_a_batch_cancelled_before_it_ran_answers_its_gets_unavailable(
    database: Database,
) -> None:
    async with only_connection_held(database):
        get = asyncio.ensure_future(database.get_var("k"))
        await asyncio.sleep(0)  # the GET joins; the batch's task is scheduled, not yet run
        assert database.read_batch_stats()[2] == 1
        (batch_task,) = database._batch_tasks
        batch_task.cancel()  # as close() may, before the task's first step
        with pytest.raises(DatabaseUnavailable, match="shutting down"):
            await asyncio.wait_for(get, 10)  # not a hang
    assert database.read_batch_stats() == (0, 0, 0)


async def test_a_get_over_the_waiting_limit_is_refused_not_batched(
    postgres: Any, clean_db: asyncpg.Connection
) -> None:
    database = Database(config_for(postgres, pool_min_size=1, pool_max_size=1, max_waiting=3))
    database.start()
    try:
        await asyncio.wait_for(database.ready.wait(), 30)
        async with only_connection_held(database):
            # pool_max_size + max_waiting = 4 requests may use or wait for a connection (the
            # one this test holds is no request's).
            gets = [asyncio.ensure_future(database.get_var(f"k{i}")) for i in range(5)]
            with pytest.raises(DatabaseBusy):
                await gets[4]
            assert database.read_batch_stats()[2] == 4
        assert await asyncio.gather(*gets[:4]) == [None] * 4
    finally:
        await database.close()
