"""Drain and stop, with the real process and real signals."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import signal

import pytest

from tests.lb.lbkit import (
    EchoBackend,
    FuncBackend,
    LbProcess,
    close,
    connect,
    exchange,
    how_it_ends,
    loop_name,
    pattern,
    read_to_end,
)

CHUNKS = pattern(64 * 65536)


def lb_env(*ports: int, **extra: str) -> dict[str, str]:
    env = {
        "LB_HOST": "127.0.0.1",
        "LB_PORT": "0",
        "LB_BACKENDS": ",".join(f"127.0.0.1:{p}" for p in ports),
        "SERVER_COUNT": str(len(ports)),
        "LB_ADMIN_PORT": "0",
        "LB_CHECK_MODE": "tcp",
        "LB_CHECK_INTERVAL": "0.2",
        "LB_LOOP": loop_name(),
    }
    env.update(extra)
    return env


async def paced_download(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A download that takes a while: 64 chunks of 64 KiB, 15 ms apart."""
    for chunk in CHUNKS:
        writer.write(chunk)
        await writer.drain()
        await asyncio.sleep(0.015)
    writer.write_eof()
    await reader.read()


async def refused(port: int) -> bool:
    try:
        _, writer = await connect(port)
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        # Queued in the accept backlog as the listener closed: the kernel resets it. Listening
        # is stopping; the next probe tells.
        return False
    await close(writer)
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
async def test_signal_drains_a_transfer_in_flight(signum: signal.Signals) -> None:
    async with FuncBackend(paced_download) as backend, LbProcess(
        lb_env(backend.port, LB_DRAIN_TIMEOUT="8")
    ) as lb:
            reader, writer = await connect(lb.port)
            try:
                first = await reader.readexactly(65536)
                lb.signal(signum)
                # Listening stops at once...
                async with asyncio.timeout(5):
                    while not await refused(lb.port):
                        await asyncio.sleep(0.02)
                # ...while the transfer in flight finishes, byte-exact.
                rest = await asyncio.wait_for(read_to_end(reader), 10)
            finally:
                await close(writer)
            expected = hashlib.sha256(b"".join(CHUNKS)).digest()
            assert hashlib.sha256(first + rest).digest() == expected
            assert await lb.wait() == 0
    out = lb.output()
    assert re.search(r"draining \d+ connections", out)  # ours, and maybe a probe's
    assert "still open at the drain deadline" not in out


async def test_drain_deadline_closes_what_is_left() -> None:
    async with EchoBackend() as echo, LbProcess(
        lb_env(echo.port, LB_DRAIN_TIMEOUT="0.5")
    ) as lb:
            reader, writer = await connect(lb.port)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            lb.signal(signal.SIGTERM)
            # The idle keep-alive connection never ends on its own: the deadline ends it, with
            # a FIN, as its answer came whole before.
            assert await asyncio.wait_for(how_it_ends(reader), 10) == (0, "eof")
            await close(writer)
            assert await lb.wait() == 0
    assert "closing 1 connections still open at the drain deadline" in lb.output()


async def test_a_transfer_still_moving_at_the_drain_deadline_is_reset() -> None:
    """The client reads as fast as the answer comes, so no buffer holds bytes back when the
    deadline ends the connection; the bytes passed on during the last look make it a reset
    all the same: a FIN would make the part the client got look whole."""
    async with FuncBackend(paced_download) as backend, LbProcess(
        lb_env(backend.port, LB_DRAIN_TIMEOUT="0.3")
    ) as lb:
        reader, writer = await connect(lb.port)
        try:
            first = await reader.readexactly(3 * 65536)  # several chunks in: a stream
            lb.signal(signal.SIGTERM)
            got, end = await asyncio.wait_for(how_it_ends(reader), 10)
            assert await lb.wait(timeout=10) == 0
        finally:
            await close(writer)
    assert len(first) + got < len(CHUNKS) * 65536
    assert end == "reset"


BIG = 64 << 20  # more than every buffer on the way (kernel's and the balancer's) holds


async def send_big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        writer.write(b"x" * BIG)
        await writer.drain()
        writer.write_eof()
        await reader.read()


@pytest.mark.parametrize(("drain", "signals"), [("0.5", 1), ("9", 2)],
                         ids=["drain deadline", "second signal"])
async def test_a_transfer_cut_short_by_the_stop_is_reset_not_closed(
    drain: str, signals: int
) -> None:
    # The client reads nothing while the stop ends its connection, so bytes are held back:
    # a FIN would make what it got look like the whole answer.
    async with FuncBackend(send_big) as backend, LbProcess(
        lb_env(backend.port, LB_DRAIN_TIMEOUT=drain)
    ) as lb:
        reader, writer = await connect(lb.port)
        try:
            first = await reader.readexactly(65536)
            for _ in range(signals):
                lb.signal(signal.SIGTERM)
                async with asyncio.timeout(5):
                    while "draining 1 connections" not in lb.output():
                        await asyncio.sleep(0.02)
            assert await lb.wait(timeout=10) == 0
            got, end = await asyncio.wait_for(how_it_ends(reader), 10)
        finally:
            await close(writer)
    assert len(first) + got < BIG
    assert end == "reset"


async def test_second_signal_exits_at_once() -> None:
    async with EchoBackend() as echo, LbProcess(lb_env(echo.port, LB_DRAIN_TIMEOUT="9")) as lb:
        reader, writer = await connect(lb.port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        lb.signal(signal.SIGTERM)
        async with asyncio.timeout(5):
            while "draining 1 connections" not in lb.output():
                await asyncio.sleep(0.02)
        lb.signal(signal.SIGTERM)
        # Far sooner than the 9 s drain: the second signal closed the quiet connection.
        assert await asyncio.wait_for(how_it_ends(reader), 4) == (0, "eof")
        assert await lb.wait(timeout=4) == 0
        await close(writer)
    assert "again: closing every connection now" in lb.output()


async def test_idle_balancer_stops_at_once_and_serves_until_then() -> None:
    async with EchoBackend() as echo, LbProcess(lb_env(echo.port)) as lb:
        assert await exchange(lb.port, b"hello") == b"hello"
        lb.signal(signal.SIGTERM)
        assert await lb.wait(timeout=5) == 0
        with contextlib.suppress(ConnectionRefusedError):
            assert await refused(lb.port)


async def test_under_nohup_a_hangup_does_not_stop_it() -> None:
    """``nohup`` asks that a closed terminal not stop the program: SIGHUP stays ignored."""
    async with EchoBackend() as echo, LbProcess(lb_env(echo.port), prefix=["nohup"]) as lb:
        lb.signal(signal.SIGHUP)
        # The signal is handled (or not) before the loop serves this exchange.
        assert await exchange(lb.port, b"still here") == b"still here"
        assert lb.proc is not None
        assert lb.proc.returncode is None
        lb.signal(signal.SIGTERM)
        assert await lb.wait() == 0
    assert "SIGHUP" not in lb.output()
    assert "SIGTERM: draining" in lb.output()
