"""The database going away: start before it exists, stop and restart under the running
service, replicas applying the schema at the same moment, a full pool."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from services.db import Database
from stack.pg import EmbeddedPostgres, StopMode
from tests.services.conftest import RunningService, config_for, run_service, stopped

JSON = {"Accept": "application/json"}


async def wait_for_status(
    http: aiohttp.ClientSession, url: str, status: int, *, timeout: float = 30
) -> None:
    # Polling is the only way to see a remote server's state change; bounded by timeout.
    async with asyncio.timeout(timeout):
        while True:
            async with http.get(url) as r:
                if r.status == status:
                    return
            await asyncio.sleep(0.05)


async def test_starts_before_the_database_exists_and_heals_itself(
    own_postgres: EmbeddedPostgres,
) -> None:
    async with run_service(config_for(own_postgres), wait_ready=False) as service, \
            aiohttp.ClientSession() as http:
        async with http.get(f"{service.url}/healthcheck") as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "1"
            assert (await r.text()).startswith("database unavailable")
        async with http.post(f"{service.url}/set_var", json={"key": "k", "value": "v"}) as r:
            assert (r.status, await r.text()) == (503, "database unavailable")
        async with http.get(f"{service.url}/get_var?key=k", headers=JSON) as r:
            assert (r.status, await r.json()) == (503, {"error": "database unavailable"})

        await asyncio.to_thread(own_postgres.start)
        async with asyncio.timeout(30):
            await service.database.ready.wait()
        async with http.get(f"{service.url}/healthcheck") as r:
            assert r.status == 200
        async with http.post(f"{service.url}/set_var", json={"key": "k", "value": "v"}) as r:
            assert r.status == 201


@contextlib.asynccontextmanager
async def table_locked(pg: EmbeddedPostgres) -> AsyncIterator[asyncpg.Connection]:
    """A connection that stored ('k', 'v') and holds the table locked in a transaction, until
    the block ends (or the database it talks to is killed)."""
    locker = await asyncpg.connect(pg.dsn)
    try:
        await locker.execute("INSERT INTO public.variables VALUES ('k', 'v')")
        await locker.execute("BEGIN; LOCK TABLE public.variables IN ACCESS EXCLUSIVE MODE")
        yield locker
    finally:
        locker.terminate()


@contextlib.asynccontextmanager
async def service_on(pg: EmbeddedPostgres, **overrides: Any) -> AsyncIterator[RunningService]:
    await asyncio.to_thread(pg.start)
    async with run_service(config_for(pg, **overrides)) as service:
        yield service


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_database_restart_gives_503_then_recovers_without_restart(
    own_postgres: EmbeddedPostgres, mode: StopMode, caplog: pytest.LogCaptureFixture
) -> None:
    async with service_on(own_postgres, pool_min_size=4) as service, \
            aiohttp.ClientSession() as http:
        async with http.post(f"{service.url}/set_var", json={"key": "k", "value": "1"}) as r:
            assert r.status == 201
        await asyncio.to_thread(own_postgres.stop, mode)

        for _ in range(3):
            async with http.get(f"{service.url}/get_var?key=k") as r:
                assert (r.status, await r.text()) == (503, "database unavailable")
                assert r.headers["Retry-After"] == "1"
        async with http.get(f"{service.url}/healthcheck") as r:
            assert r.status == 503

        await asyncio.to_thread(own_postgres.start)
        await wait_for_status(http, f"{service.url}/healthcheck", 200)
        # Every pooled connection was broken by the restart; none may fail a request now.
        for i in range(20):
            async with http.get(f"{service.url}/get_var?key=k") as r:
                assert (r.status, await r.text()) == (200, "1"), i
        async with http.get(f"{service.url}/metrics") as r:
            assert 'varstack_db_errors_total{kind="connection"}' in await r.text()
    pool_records = [r for r in caplog.records if r.name == "asyncpg.pool"]
    assert all(r.exc_info is None for r in pool_records), "connection tracebacks are folded"


async def test_database_killed_mid_request_is_503_not_500(
    own_postgres: EmbeddedPostgres,
) -> None:
    async with service_on(own_postgres) as service, aiohttp.ClientSession() as http, \
            table_locked(own_postgres) as locker:
        request = asyncio.ensure_future(
            http.put(f"{service.url}/edit_var", json={"key": "k", "value": "w"})
        )
        await wait_for_lock_waiter(locker)
        await asyncio.to_thread(own_postgres.kill)
        response = await request
        assert response.status == 503
        assert await response.text() == "database unavailable"
        response.release()


async def wait_for_lock_waiter(conn: asyncpg.Connection, count: int = 1) -> None:
    """Until ``count`` sessions wait for a lock. ``conn`` may be in a transaction, where
    pg_stat_activity keeps the snapshot it first read: each look drops it."""
    async with asyncio.timeout(10):
        while True:
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            if await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            ) >= count:
                return
            await asyncio.sleep(0.02)


async def test_replicas_starting_together_apply_the_schema_once(
    own_postgres: EmbeddedPostgres,
) -> None:
    await asyncio.to_thread(own_postgres.start)
    databases = [Database(config_for(own_postgres)) for _ in range(8)]
    try:
        for database in databases:
            database.start()
        async with asyncio.timeout(30):
            await asyncio.gather(*(d.ready.wait() for d in databases))
        assert all(d.last_error == "" for d in databases)
    finally:
        await asyncio.gather(*(d.close() for d in databases))
    conn = await asyncpg.connect(own_postgres.dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('public.variables')::text") == "variables"
    finally:
        await conn.close()


async def test_full_pool_answers_503_at_once_with_retry_after(
    postgres: Any, clean_db: asyncpg.Connection
) -> None:
    await clean_db.execute("INSERT INTO public.variables VALUES ('k', 'v')")
    config = config_for(postgres, pool_min_size=1, pool_max_size=1, max_waiting=0)
    async with run_service(config) as service, aiohttp.ClientSession() as http:
        await clean_db.execute("BEGIN; LOCK TABLE public.variables IN ACCESS EXCLUSIVE MODE")
        slow = asyncio.ensure_future(http.get(f"{service.url}/get_var?key=k"))
        await wait_for_lock_waiter(clean_db)
        async with http.get(f"{service.url}/get_var?key=k") as r:
            assert (r.status, await r.text()) == (503, "database busy, retry later")
            assert r.headers["Retry-After"] == "1"
        # A busy replica is not a dead database: /healthcheck has a connection of its own, so
        # a balancer does not take every replica out under load.
        async with http.get(f"{service.url}/healthcheck") as r:
            assert (r.status, await r.text()) == (200, "server is healthy")
        await clean_db.execute("ROLLBACK")
        response = await slow
        assert (response.status, await response.text()) == (200, "v")
        response.release()


async def test_waiting_for_a_connection_is_bounded_by_the_acquire_timeout(
    postgres: Any, clean_db: asyncpg.Connection
) -> None:
    await clean_db.execute("INSERT INTO public.variables VALUES ('k', 'v')")
    config = config_for(
        postgres, pool_min_size=1, pool_max_size=1, max_waiting=10, pool_acquire_timeout=0.2
    )
    async with run_service(config) as service, aiohttp.ClientSession() as http:
        await clean_db.execute("BEGIN; LOCK TABLE public.variables IN ACCESS EXCLUSIVE MODE")
        slow = asyncio.ensure_future(http.get(f"{service.url}/get_var?key=k"))
        await wait_for_lock_waiter(clean_db)
        async with http.get(f"{service.url}/get_var?key=k") as r:
            assert r.status == 503
        await clean_db.execute("ROLLBACK")
        response = await slow
        assert response.status == 200
        response.release()


async def test_a_statement_over_the_command_timeout_is_503(
    postgres: Any, clean_db: asyncpg.Connection
) -> None:
    await clean_db.execute("INSERT INTO public.variables VALUES ('k', 'v')")
    # Long enough for the GET after it (on a new connection) on a loaded machine.
    config = config_for(postgres, db_command_timeout=1.5)
    async with run_service(config) as service, aiohttp.ClientSession() as http:
        await clean_db.execute("BEGIN; LOCK TABLE public.variables IN ACCESS EXCLUSIVE MODE")
        async with http.put(f"{service.url}/edit_var", json={"key": "k", "value": "w"}) as r:
            assert (r.status, await r.text()) == (503, "database unavailable")
        # By the 503 PostgreSQL has cancelled the UPDATE: nothing still waits for the lock, to
        # write "w" once it is released (a client that only hangs up leaves it waiting).
        waiting = await clean_db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'varstack-service'"
            " AND state = 'active' AND query LIKE 'UPDATE%'")
        assert waiting == 0
        await clean_db.execute("ROLLBACK")
        # The cancelled statement left its connection usable and the row untouched.
        async with http.get(f"{service.url}/get_var?key=k") as r:
            assert (r.status, await r.text()) == (200, "v")
        async with http.get(f"{service.url}/metrics") as r:
            assert 'varstack_db_errors_total{kind="timeout"} 1.0' in await r.text()


async def test_a_database_that_lost_its_table_gets_it_back_and_no_request_fails(
    own_postgres: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    """A new, empty database at the same address (recreated without its volume): the table
    is made again on the first request that misses it, not a 500 for every request."""
    async with service_on(own_postgres) as service, aiohttp.ClientSession() as http:
        async with http.post(f"{service.url}/set_var", json={"key": "k", "value": "v"}) as r:
            assert r.status == 201
        async with http.get(f"{service.url}/get_var?key=k") as r:
            assert r.status == 200  # the pool's connection has the statement prepared
        conn = await asyncpg.connect(own_postgres.dsn)
        await conn.execute("DROP TABLE public.variables")
        await conn.close()
        async with http.get(f"{service.url}/get_var?key=k") as r:
            assert (r.status, await r.text()) == (404, "variable not found")
        async with http.post(f"{service.url}/set_var", json={"key": "k", "value": "w"}) as r:
            assert r.status == 201
        async with http.get(f"{service.url}/get_var?key=k") as r:
            assert (r.status, await r.text()) == (200, "w")
    assert caplog.text.count("the table public.variables is missing") == 1


async def test_unexpected_database_state_is_a_logged_500_in_the_clients_format(
    own_postgres: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    async with service_on(own_postgres) as service, aiohttp.ClientSession() as http:
        conn = await asyncpg.connect(own_postgres.dsn)
        await conn.execute("ALTER TABLE public.variables RENAME COLUMN value TO renamed")
        await conn.close()
        async with http.get(f"{service.url}/get_var?key=k", headers=JSON) as r:
            assert (r.status, await r.json()) == (500, {"error": "internal server error"})
            assert r.headers["X-Served-By"] == "test-replica:1"
        async with http.get(f"{service.url}/metrics") as r:
            assert 'route="/get_var",status="500"} 1.0' in await r.text()
    assert "GET /get_var failed" in caplog.text
    assert "UndefinedColumnError" in caplog.text


async def test_a_hung_database_answers_within_one_command_timeout(
    own_postgres: EmbeddedPostgres,
) -> None:
    import time

    async with service_on(own_postgres, db_command_timeout=2.0) as service, \
            aiohttp.ClientSession() as http:
        async with http.post(f"{service.url}/set_var", json={"key": "k", "value": "v"}) as r:
            assert r.status == 201
        with stopped(own_postgres):
            started = time.monotonic()
            async with http.get(f"{service.url}/get_var?key=k") as r:
                assert (r.status, await r.text()) == (503, "database unavailable")
            # Not two timeouts: the connection is dropped, not handed back after asyncpg's
            # cancel request (which a stopped server never answers) times out too.
            assert time.monotonic() - started < 2.0 * 1.75
