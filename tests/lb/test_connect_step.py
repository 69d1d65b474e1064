"""The connect step: a non-blocking connect on the pipes' epoll set, with a timer of its own;
a pipe that ends mid-connect ends it."""

from __future__ import annotations

import asyncio

from tests.lb.lbkit import (
    Blackhole,
    connect,
    eventually,
    how_it_ends,
    lb_config,
    reset,
    running_lb,
    tcp_states,
)


async def test_a_stop_while_a_connect_hangs_ends_the_connect() -> None:
    """At the drain deadline, a pipe still connecting is ended with its connect step: the
    half-open socket to the backend is closed, the client's connection ends, and the backend
    is not blamed (the connect did not fail, it was given up)."""
    async with Blackhole() as hole:
        config = lb_config(hole.address, connect_timeout=30.0, check_interval=60.0,
                           check_timeout=0.2)
        async with running_lb(config) as lb:
            # The first health check's connect hangs too: counts are taken once it timed out.
            await eventually(lambda: lb.pool.backends[0].checks_failed >= 1)
            syn_sent = tcp_states(hole.port).get("SYN_SENT", 0)
            reader, writer = await connect(lb.port)
            writer.write(b"never delivered")
            await writer.drain()
            await eventually(lambda: tcp_states(hole.port).get("SYN_SENT", 0) == syn_sent + 1)
            (pipe,) = lb.pipes
            assert pipe.upstream is not None
            assert pipe.upstream.connecting
        # running_lb's exit stopped the balancer with a drain deadline of one second.
        assert pipe.end == "drain deadline"
        await eventually(lambda: tcp_states(hole.port).get("SYN_SENT", 0) == syn_sent)
        async with asyncio.timeout(5):
            got, _ = await how_it_ends(reader)
        assert got == 0
        totals = lb.stats()["totals"]
        assert totals["accepted_connections"] == 1
        assert totals["finished_connections"] == 1
        assert totals["failed_connects"] == 0
        writer.close()


async def test_a_client_leaving_while_its_connect_hangs_is_let_go_when_the_connect_ends() -> None:
    """The client is not read from until a backend accepts, so its reset is seen only when the
    connect step ends: its slot is held for at most the connect timeouts it may wait through."""
    async with Blackhole() as hole:
        config = lb_config(hole.address, connect_timeout=1.0, connect_retries=0,
                           check_interval=60.0, check_timeout=0.2)
        async with running_lb(config) as lb:
            await eventually(lambda: lb.pool.backends[0].checks_failed >= 1)
            _reader, writer = await connect(lb.port)
            writer.write(b"never delivered")
            await writer.drain()
            await eventually(lambda: bool(lb.pipes))
            (pipe,) = lb.pipes
            reset(writer)
            await eventually(lambda: not lb.pipes, timeout=5)
            assert pipe.end == "no backend accepted"
            totals = lb.stats()["totals"]
            assert totals["finished_connections"] == 1
            assert totals["failed_connects"] == 1
