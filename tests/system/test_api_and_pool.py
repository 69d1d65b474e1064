"""The API through the balancer against a dict model, and a full pool under the whole
stack: excess requests get a fast 503 with Retry-After instead of joining a queue."""

from __future__ import annotations

import asyncio
import time

import asyncpg
from hypothesis import HealthCheck, settings

from chaos.api_machine import check_api_against_model
from chaos.rawhttp import Connection, HttpError, RawReply
from chaos.system import baseline, check_leaks, every_replica_healthy, wait_until
from tests.system.conftest import StackFactory

POOL, WAITING = 2, 3


async def test_the_api_through_the_balancer_behaves_like_a_dict(system: StackFactory) -> None:
    async with system() as (stack, _lines):
        base = await baseline(stack)
        await check_api_against_model(stack.url, machine_settings=settings(
            max_examples=15, stateful_step_count=25, deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ))
        leaks = await check_leaks(stack, base)
        assert leaks.ok, leaks.problems


async def test_a_full_pool_answers_503_with_retry_after_at_once(system: StackFactory) -> None:
    env = {
        "SERVICE_POOL_MIN_SIZE": "1",
        "SERVICE_POOL_MAX_SIZE": str(POOL),
        "SERVICE_MAX_WAITING": str(WAITING),
        "SERVICE_POOL_ACQUIRE_TIMEOUT": "60",
        "SERVICE_DB_COMMAND_TIMEOUT": "60",
    }
    async with system(env=env) as (stack, _lines):
        assert stack.database is not None
        base = await baseline(stack)
        host, port = stack.config.client_host, stack.config.lb_port

        async def call(method: str, target: str) -> tuple[RawReply | None, float]:
            conn = Connection(host, port)
            try:
                async with asyncio.timeout(90):
                    await conn.open()
                    reply = await conn.request(method, target, close=True)
                    return reply, time.monotonic()
            except (OSError, HttpError):
                return None, time.monotonic()
            finally:
                await conn.close()

        reply, _ = await call("POST", "/set_var?key=slow&value=0")
        assert reply is not None
        assert reply.status == 201
        # A transaction holds the row: every edit of it waits, holding a pool connection.
        lock = await asyncpg.connect(stack.database.dsn)
        released = 0.0
        try:
            tx = lock.transaction()
            await tx.start()
            await lock.execute("SELECT 1 FROM public.variables WHERE key = 'slow' FOR UPDATE")
            replicas = len(stack.replicas)
            admitted_max = replicas * (POOL + WAITING)
            total = admitted_max + 3 * replicas * 2
            calls = [asyncio.create_task(call("PUT", f"/edit_var?key=slow&value={i}"))
                     for i in range(total)]
            # Everything past what the replicas admit is answered while the lock is held.
            await wait_until(lambda: sum(c.done() for c in calls) >= total - admitted_max,
                             timeout=30, what="the excess answered while the pool is full")
            early = [c.result() for c in calls if c.done()]
            await asyncio.sleep(0.5)
            still_waiting = sum(not c.done() for c in calls)
            released = time.monotonic()
            await tx.rollback()
        finally:
            await lock.close()
        results = await asyncio.gather(*calls)
        busy = [r for r, t in results if r is not None and r.status == 503]
        ok = [r for r, t in results if r is not None and r.status == 200]
        print(f"{total} concurrent slow edits over {replicas} replicas (pool {POOL}, "
              f"{WAITING} may wait): {len(early)} answered while the pool was full, "
              f"{still_waiting} held; {len(busy)} x 503, {len(ok)} x 200 after the release")
        assert all(r is not None for r, _ in results)
        assert still_waiting <= admitted_max
        assert len(busy) >= total - admitted_max
        assert len(busy) + len(ok) == total
        for r in busy:
            assert r.text == "database busy, retry later", r.text
            assert r.headers.get("retry-after") == "1"
        assert all(t < released for r, t in results if r is not None and r.status == 503)
        # And all is well again: every replica healthy, the balancer takes them all back.
        await wait_until(lambda: every_replica_healthy(stack), timeout=30)
        reply, _ = await call("GET", "/get_var?key=slow")
        assert reply is not None
        edited = {str(i) for i, (r, _) in enumerate(results) if r is not None and r.status == 200}
        assert reply.status == 200
        assert reply.text in edited  # the last edit let through, none of the refused ones
        leaks = await check_leaks(stack, base)
        assert leaks.ok, leaks.problems
