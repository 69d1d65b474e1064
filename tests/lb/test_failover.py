"""Failover and health: refused and hanging connects, killed backends, checks, panic mode."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import struct

import pytest

from common.net import listening_socket
from lb.server import own_address_check
from tests.lb.lbkit import (
    HOST,
    Blackhole,
    EchoBackend,
    FuncBackend,
    HttpBackend,
    accept_from,
    close,
    connect,
    eventually,
    exchange,
    http_get,
    lb_config,
    read_to_end,
    refusing_addresses,
    reset,
    running_lb,
)


def backend_state(lb: object, address: str) -> str:
    for b in lb.stats()["backends"]:  # type: ignore[attr-defined]
        if b["address"] == address:
            return str(b["state"])
    raise KeyError(address)


async def test_killed_backend_is_skipped_then_used_again_once_it_passes_checks() -> None:
    async with HttpBackend() as a, HttpBackend() as b, HttpBackend() as c:
        config = lb_config(a.address, b.address, c.address, check_mode="http",
                           check_interval=0.05, check_rise=2, check_fall=2)
        async with running_lb(config) as lb:
            served = {(await http_get(lb.port))[1]["x-served-by"] for _ in range(6)}
            assert served == {a.label, b.label, c.label}

            # An open (keep-alive) connection to b, then b dies.
            reader, writer = await connect(lb.port)
            sent_to = ""
            while sent_to != b.label:
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                sent_to = head.split(b"X-Served-By: ")[1].split(b"\r\n")[0].decode()
                await reader.readexactly(len(sent_to))
                if sent_to != b.label:
                    await close(writer)
                    reader, writer = await connect(lb.port)
            await b.stop()
            # The connection to the dead backend is closed, not left hanging.
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(5):
                with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                    await reader.readuntil(b"\r\n\r\n")
            await close(writer)

            # Every new client is served, none by b (a refused connect moves on at once).
            for _ in range(12):
                status, headers, _ = await http_get(lb.port)
                assert status == 200
                assert headers["x-served-by"] != b.label
            assert backend_state(lb, b.label) == "down"

            # b comes back on its port; after `rise` passed checks it gets its share again.
            await b.start()
            await eventually(lambda: backend_state(lb, b.label) == "up")
            again = [(await http_get(lb.port))[1]["x-served-by"] for _ in range(6)]
            assert again.count(b.label) == 2


async def test_blackholed_backend_connect_times_out_then_next_backend() -> None:
    async with Blackhole() as hole, EchoBackend() as echo:
        config = lb_config(hole.address, echo.address, connect_timeout=1.0, check_interval=60)
        async with running_lb(config) as lb:
            # The first client is sent to the blackhole first, waits one connect timeout,
            # and is then served by the next backend: it never sees the failure.
            assert await exchange(lb.port, b"first") == b"first"
            hole_stats = lb.stats()["backends"][0]
            assert hole_stats["failed_connects"] == 1
            assert hole_stats["state"] == "down"
            # The blackhole is now down: later clients do not wait for it.
            for i in range(5):
                assert await exchange(lb.port, b"next %d" % i) == b"next %d" % i
            assert lb.stats()["backends"][0]["failed_connects"] == 1


async def test_client_bytes_sent_during_failover_arrive_once() -> None:
    async with Blackhole() as hole, EchoBackend() as echo:
        config = lb_config(hole.address, echo.address, connect_timeout=1.0, check_interval=60)
        async with running_lb(config) as lb:
            reader, writer = await connect(lb.port)
            writer.write(b"sent before any backend answered")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b"sent before any backend answered"
            await close(writer)


async def test_connect_timeouts_are_bounded_by_retries() -> None:
    async with Blackhole() as hole1, Blackhole() as hole2, EchoBackend() as echo:
        backends = (hole1.address, hole2.address, echo.address)
        # One retry (HAProxy's meaning): hole1 times out, the retry on hole2 times out too,
        # and the client is closed: two timeouts in all.
        config = lb_config(*backends, connect_timeout=1.0, connect_retries=1, check_interval=60)
        async with running_lb(config) as lb:
            assert await exchange(lb.port, b"lost") == b""
            assert lb.stats()["totals"]["failed_connects"] == 2
        # Two retries: the third backend is reached.
        config = lb_config(*backends, connect_timeout=1.0, connect_retries=2, check_interval=60)
        async with running_lb(config) as lb:
            assert await exchange(lb.port, b"kept") == b"kept"


async def test_refused_connects_try_every_backend_once() -> None:
    """Refusals cost no timeout: with 4 dead backends and one alive, the client is served."""
    with refusing_addresses(4) as dead:
        async with EchoBackend() as echo:
            config = lb_config(*dead, echo.address, connect_retries=0, check_interval=60)
            async with running_lb(config) as lb:
                assert await exchange(lb.port, b"hello") == b"hello"
                assert lb.stats()["totals"]["failed_connects"] == 4


async def test_failing_health_checks_take_a_backend_out_and_passing_bring_it_back() -> None:
    async with HttpBackend() as a, HttpBackend() as b:
        config = lb_config(a.address, b.address, check_mode="http", check_interval=0.05,
                           check_rise=3, check_fall=2)
        async with running_lb(config) as lb:
            b.healthy = False  # draining: /healthcheck answers 503, the port still accepts
            await eventually(lambda: backend_state(lb, b.label) == "down")
            assert lb.pool.backends[1].last_check == "HTTP 503"
            served = {(await http_get(lb.port))[1]["x-served-by"] for _ in range(6)}
            assert served == {a.label}
            b.healthy = True
            await eventually(lambda: backend_state(lb, b.label) == "up")
            served = {(await http_get(lb.port))[1]["x-served-by"] for _ in range(6)}
            assert served == {a.label, b.label}


async def test_a_backend_answering_garbage_fails_its_own_check_not_everyone_s() -> None:
    """200 KB without a line end (no HTTP status line within the reader's limit): that check
    fails; the other backends are still judged in the same round."""
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"x" * 200_000)
        await writer.drain()
        writer.close()

    async with FuncBackend(garbage) as bad, HttpBackend() as sick:
        sick.healthy = False
        config = lb_config(bad.address, sick.address, check_mode="http", check_interval=0.05,
                           check_fall=2)
        async with running_lb(config) as lb:
            await eventually(lambda: lb.pool.up_count == 0)
            assert lb.pool.backends[0].last_check == "not HTTP (no status line)"
            assert lb.pool.backends[1].last_check == "HTTP 503"


async def test_a_backend_resetting_every_connection_before_any_byte_is_marked_down() -> None:
    """A listener that accepts and resets every connection (a port forward whose target is
    gone) passes a TCP check for ever: check_fall resets in a row take it down."""

    async def reset_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reset(writer)

    async with FuncBackend(reset_at_once) as resetting, EchoBackend() as echo:
        config = lb_config(resetting.address, echo.address, check_interval=60, check_fall=2)
        async with running_lb(config) as lb:
            broken = lb.pool.backends[0]
            clients = []
            for i in range(2):  # each sends nothing yet, so it is moved to the echo backend
                clients.append(await connect(lb.port))
                await eventually(lambda i=i: lb.pool.backends[1].active == i + 1)
                assert broken.up is (i == 0)
            assert broken.last_change == \
                "connect failed (2 connections in a row reset before any byte)"
            for i, (reader, writer) in enumerate(clients):
                writer.write(b"client %d" % i)
                writer.write_eof()
                assert await asyncio.wait_for(read_to_end(reader), 5) == b"client %d" % i
                await close(writer)


async def test_a_check_that_hangs_holds_up_no_other_backend_s_checks() -> None:
    """One backend accepts and never answers, with a long check timeout: the others are still
    checked every interval (they waited for the slowest check of each round)."""
    never = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await never.wait()

    async with FuncBackend(silent) as hung, HttpBackend() as sick:
        config = lb_config(hung.address, sick.address, check_mode="http", check_interval=0.05,
                           check_timeout=30, check_fall=2)
        async with running_lb(config) as lb:
            await eventually(lambda: sick.checks >= 2)
            sick.healthy = False
            # Within one of the hung backend's checks, the sick one is found out.
            await eventually(lambda: backend_state(lb, sick.label) == "down", timeout=10)
            assert lb.pool.backends[0].last_check == "none"  # its first check still hangs
        never.set()


async def test_all_backends_down_still_get_traffic() -> None:
    """Panic: every check fails, yet the replicas answer, so clients get the service's answer."""
    async with HttpBackend() as a, HttpBackend() as b:
        a.healthy = b.healthy = False
        config = lb_config(a.address, b.address, check_mode="http", check_interval=0.05)
        async with running_lb(config) as lb:
            await eventually(lambda: lb.pool.up_count == 0)
            served = []
            for _ in range(4):
                status, headers, _ = await http_get(lb.port)
                assert status == 200
                served.append(headers["x-served-by"])
            assert set(served) == {a.label, b.label}


async def test_no_backend_accepts_client_is_closed_at_once() -> None:
    with refusing_addresses(3) as dead:
        async with running_lb(lb_config(*dead, check_interval=60)) as lb:
            reader, writer = await connect(lb.port)
            writer.write(b"anyone?")
            assert await asyncio.wait_for(read_to_end(reader), 5) == b""
            await close(writer)
            await eventually(lambda: not lb.pipes)


async def test_a_backend_dying_with_the_connection_in_its_accept_queue_costs_the_client_nothing(
) -> None:
    """A replica killed before it accepted: the kernel resets its queued connections. Nothing
    has passed yet, so the client is moved to the next backend; the next client's connect to
    the dead one is refused, which marks it down."""
    queue_only = socket.socket()  # listens, never accepts: a process about to be killed
    queue_only.bind(("127.0.0.1", 0))
    queue_only.listen(8)
    try:
        async with EchoBackend() as echo, running_lb(
            lb_config(queue_only.getsockname(), echo.address, check_interval=60)
        ) as lb:
            reader, writer = await connect(lb.port)
            await eventually(lambda: lb.pool.backends[0].active == 1)  # queued there
            queue_only.close()  # the kill: its queue is reset
            await eventually(lambda: lb.pool.backends[1].active == 1)
            writer.write(b"sent after the move")
            writer.write_eof()
            assert await asyncio.wait_for(read_to_end(reader), 5) == b"sent after the move"
            await close(writer)
            assert lb.pool.backends[0].failed_connects == 0
            # The next client is sent to the dead one first: refused, moved on at once.
            assert await exchange(lb.port, b"next client") == b"next client"
            assert lb.pool.backends[0].failed_connects == 1
            assert lb.stats()["backends"][0]["state"] == "down"
    finally:
        queue_only.close()


async def test_a_live_backend_resetting_a_silent_connection_is_not_marked_down() -> None:
    """A backend that resets a connection on which nothing came for a while (nginx's
    reset_timedout_connection; a browser's preconnect sends nothing): the client is moved to
    another backend, and the backend, healthy, stays up."""

    async def reset_when_silent(reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.3)
        reset(writer)

    async with FuncBackend(reset_when_silent) as resetting, EchoBackend() as echo:
        config = lb_config(resetting.address, echo.address, check_interval=60)
        async with running_lb(config) as lb:
            reader, writer = await connect(lb.port)
            await eventually(lambda: lb.pool.backends[1].active == 1, timeout=5)
            assert lb.pool.backends[0].failed_connects == 0
            assert lb.stats()["backends"][0]["state"] == "up"
            writer.write(b"after the move")
            writer.write_eof()
            assert await asyncio.wait_for(read_to_end(reader), 5) == b"after the move"
            await close(writer)


async def test_no_replay_once_bytes_were_relayed() -> None:
    """A backend that takes the request and dies: the client is closed; no other backend sees it."""
    seen: list[bytes] = []

    async def take_and_die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(100)
        if data:
            seen.append(data)
            writer.transport.abort()

    async with FuncBackend(take_and_die) as dying, EchoBackend() as echo:
        config = lb_config(dying.address, echo.address, check_interval=60)
        async with running_lb(config) as lb:
            reader, writer = await connect(lb.port)
            writer.write(b"POST /once")
            with pytest.raises(ConnectionError):  # noqa: PT012
                async with asyncio.timeout(5):
                    assert await reader.read() == b""
                    raise ConnectionResetError  # a clean EOF would be fine too
            await close(writer)
            assert seen == [b"POST /once"]
            assert echo.eofs == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("listen_host", ["127.0.0.1", "0.0.0.0"])
async def test_the_balancer_s_own_address_is_never_a_backend(
    listen_host: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A backend listed at the balancer's own address (or, listening on every address, at any
    of this machine's on its port) connected to itself until the cap was full: left out."""
    port = free_port()
    async with EchoBackend() as echo, running_lb(
        lb_config(("127.0.0.1", port), echo.address, host=listen_host, port=port)
    ) as lb:
        assert [b.address for b in lb.pool.backends] == [f"127.0.0.1:{echo.port}"]
        for _ in range(3):
            assert await exchange(port, b"once") == b"once"
        assert len(lb.pipes) <= 1
    assert (f"backend 127.0.0.1:{port} is this balancer's own listening address: left out"
            in caplog.text)


@pytest.mark.parametrize(("listen_host", "own", "not_own"), [
    ("127.0.0.1", ["127.0.0.1", "0.0.0.0", "::ffff:127.0.0.1"], ["127.0.0.2", "::1", "::"]),
    ("0.0.0.0", ["127.0.0.1", "127.0.0.2", "0.0.0.0"], ["::1", "::", "192.0.2.1"]),
    ("::", ["::1", "::", "127.0.0.1", "0.0.0.0"], ["192.0.2.1", "2001:db8::1"]),
    ("::1", ["::1", "::"], ["127.0.0.1", "0.0.0.0"]),
])
def test_which_backend_addresses_are_the_balancer_s_own(
    listen_host: str, own: list[str], not_own: list[str]
) -> None:
    """A connect to an unspecified address reaches loopback, so 0.0.0.0 on the balancer's port
    loops too; an IPv6 listener of one family does not take the other's clients."""
    with listening_socket(listen_host, 0, backlog=1) as sock:
        port = sock.getsockname()[1]
        is_own = own_address_check(sock)
        assert [host for host in own if not is_own(host, port)] == []
        assert [host for host in not_own if is_own(host, port)] == []
        assert not is_own(own[0], port + 1 if port < 65535 else port - 1)


def _wait_ready(fd: int, events: int) -> None:
    """Block (the event loop too, on purpose) until the kernel reports ``events`` on ``fd``."""
    poller = select.poll()
    poller.register(fd, events)
    assert poller.poll(5000), f"descriptor {fd} never became ready for {events:#x}"


@pytest.mark.parametrize("first", ["request", "reset"])
async def test_a_reset_met_by_the_clients_first_bytes_moves_them_to_the_next_backend(
    first: str,
) -> None:
    """A replica killed with the balancer's connection in its accept queue resets it, and the
    client's first bytes are read in the same round. Request first: sending it failed, it was
    counted as passed, so the client was not moved and got a reset; it now goes, with the
    client, to the next backend. Reset first: the client, moved already, was still read in that
    round, with nowhere to send to (an internal error, and a reset)."""
    with socket.socket() as dying:
        dying.bind((HOST, 0))
        dying.listen(16)
        async with EchoBackend() as echo:
            config = lb_config((HOST, dying.getsockname()[1]), echo.address, check_interval=60)
            async with running_lb(config) as lb:
                client = socket.create_connection((HOST, lb.port))
                with client:
                    await eventually(lambda: bool(lb.pipes) and all(
                        p.upstream is not None and not p.upstream.connecting for p in lb.pipes))
                    (pipe,) = lb.pipes
                    assert pipe.backend is lb.pool.backends[0]  # the dying one, first in turn
                    upstream = pipe.upstream
                    assert upstream is not None
                    # Without yielding to the loop: the request and the reset both wait for
                    # the balancer's next round, in the order asked.
                    conn = accept_from(dying, upstream.sock.getsockname()[1])
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    for step in (first, "reset" if first == "request" else "request"):
                        if step == "request":
                            client.sendall(b"request")
                            _wait_ready(pipe.client.fd, select.POLLIN)
                        else:
                            conn.close()
                            _wait_ready(upstream.fd, select.POLLERR)
                    client.shutdown(socket.SHUT_WR)
                    client.setblocking(False)
                    loop = asyncio.get_running_loop()
                    got = b""
                    async with asyncio.timeout(5):
                        while chunk := await loop.sock_recv(client, 65536):
                            got += chunk
                assert got == b"request"
                await eventually(lambda: not lb.pipes)
                stats = lb.stats()["backends"]
                assert [b["bytes_to_backend"] for b in stats] == [0, len(b"request")]
