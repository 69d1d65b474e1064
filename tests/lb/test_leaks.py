"""No leaks: after a churn of connections, descriptors and tasks are back, nothing in CLOSE_WAIT."""

from __future__ import annotations

import asyncio
import contextlib
import gc

import pytest

from lb.pipe import Pipe, Side
from tests.lb.lbkit import (
    EchoBackend,
    close,
    close_wait_of_process,
    connect,
    eventually,
    exchange,
    lb_config,
    open_fds,
    refusing_addresses,
    reset,
    running_lb,
    tcp_states,
)


async def one_connection(port: int, i: int) -> None:
    """A mix of how clients end: clean, half-closed early, reset, gone before any byte, and a
    stream handed to the event loop (several chunks each way) ended cleanly or reset."""
    kind = i % 6
    if kind == 0:
        assert await exchange(port, b"clean %d" % i) == b"clean %d" % i
        return
    reader, writer = await connect(port)
    try:
        if kind == 1:
            writer.write_eof()
            assert await reader.read() == b""
        elif kind == 2:
            writer.write(b"reset me")
            await reader.readexactly(8)
            reset(writer)
        elif kind in (4, 5):
            for n in range(4):  # a stream of several chunks each way
                writer.write(b"stream %d" % n)
                await reader.readexactly(8)
            if kind == 4:
                writer.write_eof()
                assert await reader.read() == b""
            else:
                reset(writer)
        # kind 3: closes at once, maybe before the backend is even connected
    finally:
        await close(writer)


async def churn(count: int, *, concurrency: int = 50) -> None:
    async with EchoBackend() as echo:
        with refusing_addresses(1) as (dead,):  # every round of failover adds a refused connect
            config = lb_config(echo.address, dead, check_interval=0.05, check_rise=1,
                               connect_timeout=3.0)
            async with running_lb(config) as lb:
                for i in range(8):  # warm up: imports, caches, the first checks
                    await one_connection(lb.port, i)
                await eventually(lambda: not lb.pipes)
                await asyncio.sleep(0.1)
                gc.collect()  # what earlier tests dropped is not counted in the baseline
                fds = open_fds()
                tasks = len(asyncio.all_tasks())

                semaphore = asyncio.Semaphore(concurrency)

                async def limited(i: int) -> None:
                    async with semaphore:
                        with contextlib.suppress(ConnectionError):
                            await one_connection(lb.port, i)

                async with asyncio.timeout(120):
                    await asyncio.gather(*(limited(i) for i in range(count)))
                await eventually(lambda: not lb.pipes, timeout=10)
                await eventually(lambda: open_fds() <= fds, timeout=10)
                # Health checks come and go every 50 ms; between two rounds, only the owners remain.
                await eventually(lambda: len(asyncio.all_tasks()) <= tasks, timeout=10, step=0.001)
                assert not [t for t in asyncio.all_tasks() if "Pipe." in repr(t.get_coro())]
                gc.collect()
                assert not [o for o in gc.get_objects()
                            if isinstance(o, (Pipe, Side))]
                # A health check's socket may still be closing at this instant; a leaked one
                # stays in CLOSE_WAIT for good.
                await eventually(lambda: close_wait_of_process() == 0
                                 and tcp_states(lb.port).get("CLOSE_WAIT", 0) == 0
                                 and tcp_states(echo.port).get("CLOSE_WAIT", 0) == 0, timeout=10)
                totals = lb.stats()["totals"]
                assert totals["finished_connections"] == totals["accepted_connections"]
                assert lb.pool.backends[0].active == 0


async def test_churn_returns_to_baseline() -> None:
    await churn(1000)


@pytest.mark.slow
async def test_many_thousand_connections_return_to_baseline() -> None:
    await churn(6000, concurrency=200)
