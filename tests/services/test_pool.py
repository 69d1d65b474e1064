"""The connection pool on a real PostgreSQL: the size cap, first come first served, waiters that
give up, connections that break, and closing with connections still lent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from services.pool import Pool, PoolClosing, PoolTimeout

APP = "varstack-pool-test"


@contextlib.asynccontextmanager
async def pool_on(postgres: Any, **kwargs: Any) -> AsyncIterator[tuple[Pool, list[int]]]:
    """A started pool, and the list of how many connections it had opened at each connect."""
    opened: list[int] = []

    async def connect() -> asyncpg.Connection:
        conn = await asyncpg.connect(postgres.dsn, server_settings={"application_name": APP})
        opened.append(len(opened) + 1)
        return conn

    pool = Pool(connect, **kwargs)
    await pool.start()
    try:
        yield pool, opened
    finally:
        await pool.close(timeout=2)


async def server_side_count(postgres: Any) -> int:
    conn = await asyncpg.connect(postgres.dsn)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", APP))
    finally:
        await conn.close()


async def waiting_acquire(pool: Pool) -> asyncio.Task[asyncpg.Connection]:
    """An acquire started and queued behind the lent connections."""
    before = pool.waiting
    task = asyncio.create_task(pool.acquire(timeout=10))
    while pool.waiting == before:
        await asyncio.sleep(0)
    return task


async def test_never_more_than_max_size_connections(postgres: Any) -> None:
    async with pool_on(postgres, min_size=0, max_size=3) as (pool, opened):
        async def query(i: int) -> int:
            conn = await pool.acquire(timeout=10)
            try:
                return int(await conn.fetchval("SELECT $1::int FROM pg_sleep(0.01)", i))
            finally:
                pool.release(conn)

        assert await asyncio.gather(*(query(i) for i in range(60))) == list(range(60))
        assert len(opened) == 3
        assert (pool.size, pool.in_use, pool.waiting) == (3, 0, 0)
        assert await server_side_count(postgres) == 3


async def test_waiters_are_served_in_arrival_order(postgres: Any) -> None:
    async with pool_on(postgres, min_size=1, max_size=1) as (pool, _):
        held = await pool.acquire()
        served: list[int] = []

        async def waiter(i: int) -> None:
            conn = await pool.acquire(timeout=10)
            served.append(i)
            await asyncio.sleep(0)  # let newcomers try to overtake while this one holds it
            pool.release(conn)

        tasks = [asyncio.create_task(waiter(i)) for i in range(20)]
        while pool.waiting < 20:
            await asyncio.sleep(0)
        pool.release(held)
        # Newcomers arriving while the queue drains must queue behind it.
        late = [asyncio.create_task(waiter(100 + i)) for i in range(5)]
        await asyncio.gather(*tasks, *late)
        assert served == list(range(20)) + [100 + i for i in range(5)]


async def test_waiting_is_bounded_and_a_timed_out_waiter_leaves_no_trace(postgres: Any) -> None:
    async with pool_on(postgres, min_size=1, max_size=1) as (pool, _):
        held = await pool.acquire()
        with pytest.raises(PoolTimeout, match=r"no connection free within 0\.1s"):
            await pool.acquire(timeout=0.1)
        assert pool.waiting == 0
        pool.release(held)
        conn = await pool.acquire(timeout=1)
        assert await conn.fetchval("SELECT 1") == 1
        pool.release(conn)


async def test_a_cancelled_waiter_does_not_take_a_connection_with_it(postgres: Any) -> None:
    async with pool_on(postgres, min_size=1, max_size=1) as (pool, opened):
        held = await pool.acquire()
        gone = await waiting_acquire(pool)
        # Handed the connection and cancelled in the same loop step: it must come back.
        pool.release(held)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert (pool.in_use, pool.waiting, pool.size) == (0, 0, 1)
        conn = await pool.acquire(timeout=1)
        assert conn is held
        assert len(opened) == 1
        pool.release(conn)


async def test_a_discarded_connection_frees_its_slot_for_a_waiter(postgres: Any) -> None:
    async with pool_on(postgres, min_size=1, max_size=1) as (pool, opened):
        broken = await pool.acquire()
        waiting = await waiting_acquire(pool)
        pool.release(broken, discard=True)
        fresh = await waiting
        assert broken.is_closed()
        assert fresh is not broken
        assert len(opened) == 2
        assert await fresh.fetchval("SELECT 2") == 2
        pool.release(fresh)
        assert pool.size == 1


async def test_a_connection_closed_while_idle_is_replaced(postgres: Any) -> None:
    async with pool_on(postgres, min_size=1, max_size=2) as (pool, opened):
        conn = await pool.acquire()
        pool.release(conn)
        conn.terminate()
        again = await pool.acquire()
        assert again is not conn
        assert await again.fetchval("SELECT 3") == 3
        pool.release(again)
        assert pool.size == 1
        assert len(opened) == 2


async def test_a_connection_left_in_a_transaction_is_not_lent_again(postgres: Any) -> None:
    async with pool_on(postgres, min_size=1, max_size=1) as (pool, _):
        conn = await pool.acquire()
        await conn.execute("BEGIN")
        pool.release(conn)
        assert conn.is_closed()
        again = await pool.acquire()
        assert not again.is_in_transaction()
        pool.release(again)


async def test_a_connection_given_back_twice_is_lent_once(postgres: Any) -> None:
    async with pool_on(postgres, min_size=1, max_size=2) as (pool, _):
        conn = await pool.acquire()
        pool.release(conn)
        pool.release(conn)
        first = await pool.acquire()
        second = await pool.acquire()
        assert first is conn
        assert second is not conn
        pool.release(first)
        pool.release(second)
        assert pool.size == 2


async def test_expire_drops_idle_connections_only(postgres: Any) -> None:
    async with pool_on(postgres, min_size=2, max_size=3) as (pool, _):
        lent = await pool.acquire()
        idle = await pool.acquire()
        pool.release(idle)
        pool.expire()
        assert idle.is_closed()
        assert not lent.is_closed()
        assert (pool.size, pool.in_use) == (1, 1)
        pool.release(lent)


async def test_a_failed_connect_frees_its_slot(postgres: Any) -> None:
    fail = True

    async def connect() -> asyncpg.Connection:
        if fail:
            raise ConnectionRefusedError("refused")
        return await asyncpg.connect(postgres.dsn)

    pool = Pool(connect, min_size=0, max_size=1)
    with pytest.raises(ConnectionRefusedError):
        await pool.acquire()
    assert pool.size == 0
    fail = False
    conn = await pool.acquire()
    assert await conn.fetchval("SELECT 4") == 4
    pool.release(conn)
    await pool.close()


async def test_close_waits_for_lent_connections_then_terminates_them(postgres: Any) -> None:
    async with pool_on(postgres, min_size=2, max_size=2) as (pool, _):
        returned = await pool.acquire()
        kept = await pool.acquire()
        waiter = await waiting_acquire(pool)
        closing = asyncio.create_task(pool.close(timeout=0.5))
        with pytest.raises(PoolClosing):
            await waiter
        pool.release(returned)  # given back while closing: closed, not lent again
        assert returned.is_closed()
        await closing
        assert kept.is_closed()
        with pytest.raises(PoolClosing):
            await pool.acquire()
        pool.release(kept)  # the request finishing late: no error
        assert pool.size == 0
    # A terminated connection's server process exits on its own time: wait for it.
    async with asyncio.timeout(10):
        while await server_side_count(postgres):
            await asyncio.sleep(0.05)


def test_bad_sizes_are_refused() -> None:
    async def connect() -> asyncpg.Connection:
        raise AssertionError

    with pytest.raises(ValueError, match="min_size <= max_size"):
        Pool(connect, min_size=3, max_size=2)
    with pytest.raises(ValueError, match="max_size >= 1"):
        Pool(connect, min_size=0, max_size=0)
