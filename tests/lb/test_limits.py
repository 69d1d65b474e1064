"""Limits and timeouts: connection cap, idle and half-close timeouts, running out of descriptors."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator

import psutil
import pytest

from lb.server import Server
from tests.lb.lbkit import (
    EchoBackend,
    FuncBackend,
    LbProcess,
    SourceBackend,
    close,
    connect,
    connections,
    eventually,
    exchange,
    how_it_ends,
    lb_config,
    loop_name,
    pattern,
    read_to_end,
    reset,
    running_lb,
)


async def echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    data: bytes) -> bytes:
    writer.write(data)
    return await reader.readexactly(len(data))


async def test_connection_cap_makes_new_clients_wait_and_spares_existing_ones() -> None:
    async with EchoBackend() as echo, running_lb(lb_config(echo.address, max_connections=2)) as lb:
        r1, w1 = await connect(lb.port)
        r2, w2 = await connect(lb.port)
        assert await echo_once(r1, w1, b"one") == b"one"
        assert await echo_once(r2, w2, b"two") == b"two"
        assert lb.stats()["totals"]["accepting"] is False

        # The third client's connect completes in the kernel backlog; nothing serves it yet.
        r3, w3 = await connect(lb.port)
        w3.write(b"three")
        waiting = asyncio.create_task(r3.readexactly(5))
        # The two served clients keep working at the cap.
        for i in range(10):
            assert await echo_once(r1, w1, b"again %d" % i) == b"again %d" % i
        assert not waiting.done()
        assert len(lb.pipes) == 2

        # A slot frees: the waiting client is served, byte-exact.
        await close(w1)
        assert await asyncio.wait_for(waiting, 5) == b"three"
        assert await echo_once(r2, w2, b"still") == b"still"
        await close(w2)
        await close(w3)
        await eventually(lambda: not lb.pipes)
        await eventually(lambda: lb.stats()["totals"]["accepting"] is True)
        assert await exchange(lb.port, b"after") == b"after"


async def test_cap_with_a_burst_of_clients_serves_them_all() -> None:
    async with EchoBackend() as echo, running_lb(lb_config(echo.address, max_connections=3)) as lb:
        peak = 0

        async def one(i: int) -> bytes:
            nonlocal peak
            peak = max(peak, len(lb.pipes))
            return await exchange(lb.port, b"client %d" % i, timeout=20)

        results = await asyncio.gather(*(one(i) for i in range(60)))
        assert results == [b"client %d" % i for i in range(60)]
        assert max(peak, len(lb.pipes)) <= 3
        await eventually(lambda: not lb.pipes)


async def test_idle_timeout_closes_a_silent_connection(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="lb.pipe")
    async with EchoBackend() as echo, running_lb(
        lb_config(echo.address, idle_timeout=1.0)
    ) as lb:
        # Traffic keeps a connection alive past the timeout (gaps far below it, so a stall of
        # a loaded machine cannot pass for silence)...
        reader, writer = await connect(lb.port)
        for i in range(15):
            assert await echo_once(reader, writer, b"%d" % i) == b"%d" % i
            await asyncio.sleep(0.1)
        # ...silence ends it, on both sides.
        assert await asyncio.wait_for(read_to_end(reader), 5) == b""
        await close(writer)
        await eventually(lambda: not lb.pipes)
    assert "end=idle timeout" in caplog.text


@pytest.mark.parametrize("half_closed", [False, True], ids=["open", "half-closed"])
async def test_idle_timeout_resets_a_connection_whose_client_stopped_reading(
    half_closed: bool, caplog: pytest.LogCaptureFixture,
) -> None:
    """Silence because the client does not read, with bytes held back: the cut is a reset, or
    the client would take the part it got for the whole answer. Full buffers that do not
    drain are no traffic, under either timeout (the client's EOF starts the half-close one)."""
    caplog.set_level(logging.DEBUG, logger="lb.pipe")
    big = 64 << 20  # more than every buffer on the way holds

    async def send_big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(b"x" * big)
            await writer.drain()

    timeouts = {"idle_timeout": 60, "half_close_timeout": 0.5} if half_closed \
        else {"idle_timeout": 0.5}
    async with FuncBackend(send_big) as backend, running_lb(
        lb_config(backend.address, **timeouts)
    ) as lb:
        reader, writer = await connect(lb.port)
        if half_closed:
            writer.write_eof()
        await reader.readexactly(65536)
        # The client stops reading: the pipe pauses, and its connection ends once the
        # timeout's length of silence has passed.
        await eventually(lambda: not lb.pipes, timeout=10)
        got, end = await asyncio.wait_for(how_it_ends(reader), 10)
        await close(writer)
    assert 65536 + got < big
    assert end == "reset"
    assert ("end=half-close timeout" if half_closed else "end=idle timeout") in caplog.text


@pytest.mark.parametrize("half_closed", [False, True], ids=["open", "half-closed"])
async def test_a_slow_but_steady_reader_is_not_cut_by_the_timeouts(
    half_closed: bool, caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that reads a big answer slowly, a little at a time, for many times the timeout:
    the balancer receives nothing for long stretches (its buffers, and the kernel's, are full and
    drain at the client's pace), yet bytes move, so neither the idle timeout nor (after the
    client's EOF) the half-close timeout may cut it. Only chunks received used to count: it was
    reset about a second in."""
    caplog.set_level(logging.DEBUG, logger="lb.pipe")
    size = 8 << 20  # more than the buffers on the way hold, so the backend cannot finish early
    timeouts = {"idle_timeout": 60, "half_close_timeout": 0.5} if half_closed \
        else {"idle_timeout": 0.5}
    loop = asyncio.get_running_loop()
    async with SourceBackend(size) as backend, running_lb(
        lb_config(backend.address, **timeouts)
    ) as lb:
        sock = socket.socket()
        with sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", lb.port))
            if half_closed:
                sock.shutdown(socket.SHUT_WR)
            digest = hashlib.sha256()
            got = 0
            started = loop.time()
            # About 3 MB/s: 64 KiB reads, 20 ms apart (a 25th of the timeout).
            while data := await asyncio.wait_for(loop.sock_recv(sock, 65536), 5):
                digest.update(data)
                got += len(data)
                await asyncio.sleep(0.02)
            lasted = loop.time() - started
        await eventually(lambda: not lb.pipes)
    assert got == size
    assert digest.hexdigest() == backend.digest
    assert lasted > 4 * 0.5  # it really read for several timeouts
    assert "end=idle timeout" not in caplog.text
    assert "end=half-close timeout" not in caplog.text


@pytest.mark.parametrize("ended_by", ["half-close timeout", "drain deadline"])
async def test_a_half_closed_client_that_takes_none_of_its_answer_is_still_cut(
    ended_by: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """The client sent its request and its EOF (as ``nc -N`` does), the backend its answer and
    its EOF, and the client reads none of it: the balancer holds a chunk for it and reads no
    more. Under the transport pipe such a connection, closed both ways, kept its slot of
    LB_MAX_CONNECTIONS for ever. The half-close timeout or the drain deadline cuts it, with a
    reset: the answer was cut short."""
    caplog.set_level(logging.DEBUG, logger="lb.pipe")
    size = 4 << 20  # more than the kernel's buffers on the way take, less than the balancer's
    answered = asyncio.Event()

    async def answer_and_close(reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        await reader.read()
        for chunk in pattern(size):
            writer.write(chunk)
        writer.write_eof()
        await writer.drain()
        answered.set()
        await reader.read()

    timeout = 0.5 if ended_by == "half-close timeout" else 60
    async with FuncBackend(answer_and_close) as backend:
        lb = Server(lb_config(backend.address, idle_timeout=60, half_close_timeout=timeout,
                              buffer_size=16 << 20))
        await lb.start()
        try:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", lb.port))
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"GET /big")
            writer.write_eof()  # as nc -N does; then it reads nothing
            await asyncio.wait_for(answered.wait(), 10)
            await eventually(lambda: bool(lb.pipes)
                             and all(pipe.client.pending for pipe in lb.pipes))
            if ended_by == "drain deadline":
                await lb.shutdown(drain_timeout=0.2)
            await eventually(lambda: not lb.pipes, timeout=10)
            got, end = await asyncio.wait_for(how_it_ends(reader), 10)
            await close(writer)
        finally:
            await lb.shutdown(drain_timeout=0.2)
    assert got < size
    assert end == "reset"
    assert f"end={ended_by}\n" in caplog.text
    [backend_stats] = lb.pool.backends
    assert backend_stats.bytes_to_client < size  # what was dropped is not counted as sent


async def test_half_close_timeout_ends_a_side_that_never_finishes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="lb.pipe")
    never = asyncio.Event()

    async def read_then_hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # the client's EOF arrives...
        await never.wait()  # ...and this side never answers nor closes

    async with FuncBackend(read_then_hang) as backend, running_lb(
        lb_config(backend.address, idle_timeout=60, half_close_timeout=0.3)
    ) as lb:
        reader, writer = await connect(lb.port)
        writer.write(b"request")
        writer.write_eof()
        assert await asyncio.wait_for(read_to_end(reader), 5) == b""
        await close(writer)
        await eventually(lambda: not lb.pipes)
    assert "end=half-close timeout" in caplog.text


async def test_timeouts_are_never_early_and_each_keeps_its_own_length(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A short half-close timeout must not shorten the idle timeout of other connections, and
    neither timeout ends a connection before its length of silence."""
    caplog.set_level(logging.DEBUG, logger="lb.pipe")
    loop = asyncio.get_running_loop()
    never = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await never.wait()

    async with FuncBackend(hang) as backend, running_lb(
        lb_config(backend.address, idle_timeout=1.2, half_close_timeout=0.3)
    ) as lb:
        # Each clock starts before the event the balancer times from, never after it.
        idle_since = loop.time()
        idle_reader, idle_writer = await connect(lb.port)
        await eventually(lambda: len(lb.pipes) == 1)
        half_reader, half_writer = await connect(lb.port)
        await eventually(lambda: len(lb.pipes) == 2)
        half_since = loop.time()
        half_writer.write_eof()

        assert await asyncio.wait_for(read_to_end(half_reader), 5) == b""
        half_lasted = loop.time() - half_since
        assert not idle_reader.at_eof()
        assert await asyncio.wait_for(read_to_end(idle_reader), 5) == b""
        idle_lasted = loop.time() - idle_since
        for writer in (idle_writer, half_writer):
            await close(writer)
        await eventually(lambda: not lb.pipes)
        never.set()
    assert half_lasted >= 0.3
    assert idle_lasted >= 1.2
    assert caplog.text.count("end=half-close timeout") == 1
    assert caplog.text.count("end=idle timeout") == 1


async def test_half_closed_connection_with_traffic_is_not_cut() -> None:
    """The half-close timeout is about silence: a long answer after the request's EOF flows."""

    async def slow_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        for i in range(20):  # 1.6 s in all, twice the timeout; gaps a tenth of it
            writer.write(b"%d," % i)
            await writer.drain()
            await asyncio.sleep(0.08)
        writer.write_eof()
        await reader.read()

    async with FuncBackend(slow_answer) as backend, running_lb(
        lb_config(backend.address, half_close_timeout=0.8)
    ) as lb:
        assert await exchange(lb.port, b"go") == b"".join(b"%d," % i for i in range(20))


async def served_again(port: int) -> None:
    """Once descriptors are free again, a new client is served (the first few may still meet
    the shortage: under uvloop, accepted and closed at once)."""
    async with asyncio.timeout(10):
        while True:
            with contextlib.suppress(OSError, TimeoutError):
                if await exchange(port, b"alive", timeout=2) == b"alive":
                    return
            await asyncio.sleep(0.2)


@pytest.mark.slow
async def test_out_of_descriptors_at_accept_neither_kills_nor_spins() -> None:
    """EMFILE at accept (or at the backend's socket): the balancer survives, does not burn
    CPU, and serves once fds free up.

    The balancer accepts on its own epoll set, under either loop: it logs the error, leaves
    clients in the backlog and tries accept() again a second later.
    The limit is lowered under the running balancer (``prlimit``): one it started with would
    have lowered its connection cap to fit, and accept() would not run out.
    """
    async with EchoBackend() as echo:
        env = {
            "LB_HOST": "127.0.0.1",
            "LB_PORT": "0",
            "LB_BACKENDS": f"127.0.0.1:{echo.port}",
            "LB_ADMIN_PORT": "0",
            "LB_CHECK_MODE": "tcp",
            "LB_CHECK_INTERVAL": "60",
            "LB_MAX_CONNECTIONS": "1000",
            "LB_LOOP": loop_name(),
        }
        async with LbProcess(env) as lb:
            psutil.Process(lb.pid).rlimit(psutil.RLIMIT_NOFILE, (48, 48))
            clients = []
            # Far more than 48 descriptors' worth of pipes, arriving over 3 s: each client
            # that finds no descriptor starts a retry, and retries out of step with each other
            # are what multiplied under the default loop.
            for _ in range(60):
                with contextlib.suppress(OSError, TimeoutError):
                    clients.append(await asyncio.wait_for(connect(lb.port), 2))
                    clients[-1][1].write(b"x")
                await asyncio.sleep(0.05)
            process = psutil.Process(lb.pid)
            assert process.num_fds() >= 44  # it really is out of descriptors
            # Twice, seconds apart: retries that multiply each second spin only later.
            for window in (1, 2):
                before = process.cpu_times()
                await asyncio.sleep(2.0)
                after = process.cpu_times()
                busy = (after.user + after.system) - (before.user + before.system)
                assert busy < 0.5, (
                    f"the balancer spins at accept: {busy:.2f} s CPU in window {window} of 2 s")
                if window == 1:
                    await asyncio.sleep(2.0)
            assert lb.proc is not None
            assert lb.proc.returncode is None
            for _, writer in clients:
                writer.transport.abort()
            await served_again(lb.port)
            lb.signal(signal.SIGTERM)
            assert await lb.wait() == 0
            assert not [line for line in lb.lines if "Traceback" in line], "\n".join(lb.lines)
    # Which call meets the shortage, accept() or the backend's socket() after it, depends on
    # whether the pipes left one descriptor number free under the limit or none: either pauses.
    assert ("cannot accept a client: [Errno 24] Too many open files; accepting again in 1 s"
            in lb.output()
            or f"cannot connect to {echo.label}: [Errno 24] Too many open files" in lb.output())


def _process_env(echo: EchoBackend, **settings: str) -> dict[str, str]:
    """The balancer as a process in front of ``echo``: a TCP check once a minute, a cap of
    1000, no admin listener; ``settings`` (by their LB_* names) on top."""
    return {"LB_HOST": "127.0.0.1", "LB_PORT": "0", "LB_BACKENDS": echo.label,
            "LB_ADMIN_PORT": "0", "LB_CHECK_MODE": "tcp", "LB_CHECK_INTERVAL": "60",
            "LB_MAX_CONNECTIONS": "1000", "LB_LOOP": loop_name(), **settings}


def _held(process: psutil.Process, port: int) -> int:
    """The clients the balancer holds: its established connections on its listening port."""
    return sum(1 for c in process.net_connections("tcp")
               if c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


async def test_health_checks_the_balancer_cannot_make_judge_no_backend() -> None:
    """Out of descriptors itself, the balancer cannot open a check's socket: that says
    nothing of the backend, which must not be taken down for it."""
    async with EchoBackend() as echo:
        env = _process_env(echo, LB_CHECK_INTERVAL="0.05", LB_CHECK_FALL="2")
        async with LbProcess(env) as lb:
            process = psutil.Process(lb.pid)
            limits = process.rlimit(psutil.RLIMIT_NOFILE)
            # A new descriptor takes the lowest free number and fails when that number reaches
            # the limit: a limit at the lowest free number leaves none, whatever the count is.
            # A check's socket lives for a moment only, so the least of a few looks is the
            # number the balancer has free between checks.
            lowest_free = _lowest_free_fd(lb.pid)
            for _ in range(6):
                await asyncio.sleep(0.013)
                lowest_free = min(lowest_free, _lowest_free_fd(lb.pid))
            process.rlimit(psutil.RLIMIT_NOFILE, (lowest_free, limits[1]))
            try:
                async with asyncio.timeout(10):
                    while lb.output().count("health checks not judged") < 3:
                        await asyncio.sleep(0.05)
            finally:
                process.rlimit(psutil.RLIMIT_NOFILE, limits)
            await served_again(lb.port)
            lb.signal(signal.SIGTERM)
            assert await lb.wait() == 0
        assert "is DOWN" not in lb.output()
        assert "this balancer is out of resources: 127.0.0.1:" in lb.output()


@pytest.mark.parametrize("spare", [0, 1], ids=["at-accept", "at-connect"])
async def test_out_of_descriptors_pauses_accepting_and_the_clients_behind_wait(
    spare: int,
) -> None:
    """Out of descriptors, accepting pauses for a second and the clients in the backlog wait
    there, to be served once descriptors are free. With none free, accept() itself fails; with
    one, a client is accepted but its backend's socket fails: that client is closed, and the
    accepting stops there, instead of taking each of the others only to close it in turn."""
    async with EchoBackend() as echo, LbProcess(_process_env(echo)) as lb:
        accept_line = ("cannot accept a client: [Errno 24] Too many open files; "
                       "accepting again in 1 s")
        connect_line = f"cannot connect to {echo.label}: [Errno 24] Too many open files"
        shortage_line, other_line = ((accept_line, connect_line) if spare == 0
                                     else (connect_line, accept_line))
        process = psutil.Process(lb.pid)
        limits = process.rlimit(psutil.RLIMIT_NOFILE)
        # The first health check made and its socket closed: only the listener is left.
        await eventually(
            lambda: echo.accepted >= 1 and len(process.net_connections("tcp")) == 1)
        # A new descriptor takes the lowest free number: ``spare`` numbers free under the limit.
        process.rlimit(psutil.RLIMIT_NOFILE, (_lowest_free_fd(lb.pid) + spare, limits[1]))
        try:
            async with _sent_while_stopped(lb, spare + 3) as clients:
                # Once the shortage is logged, the pause has begun, and the clients behind are
                # in the backlog still.
                await eventually(lambda: shortage_line in lb.output(), timeout=10)
                for reader, _ in clients[:spare]:  # it had sent bytes: a reset, or a FIN
                    assert (await asyncio.wait_for(how_it_ends(reader), 10))[0] == 0
                waiting = clients[spare:]
                assert _accept_queue(lb.port) == 3
                process.rlimit(psutil.RLIMIT_NOFILE, limits)
                # Restored within the pause: the next accept finds descriptors.
                for reader, _ in waiting:
                    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
                for _, writer in waiting:
                    await close(writer)
        finally:
            process.rlimit(psutil.RLIMIT_NOFILE, limits)
        lb.signal(signal.SIGTERM)
        assert await lb.wait() == 0
    assert other_line not in lb.output()


def _accept_queue(port: int) -> int:
    """How many clients wait in the accept queue of the IPv4 listener on ``port``: for a
    listening socket the kernel shows that count as its receive queue in /proc/net/tcp."""
    with open("/proc/net/tcp") as table:
        for line in itertools.islice(table, 1, None):
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if state == "0A" and int(local.partition(":")[2], 16) == port:
                return int(queues.partition(":")[2], 16)
    raise AssertionError(f"no IPv4 listener on port {port}")


def _lowest_free_fd(pid: int) -> int:
    with contextlib.suppress(FileNotFoundError):
        used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
        return next(number for number in itertools.count() if number not in used)
    raise AssertionError(f"process {pid} is gone")


async def test_a_descriptor_limit_lowers_the_cap_and_waiting_clients_are_served_later() -> None:
    """Under ``ulimit -n 64`` a cap of 1000 cannot hold: it is lowered to fit, so clients past
    it wait in the backlog and are served as others leave, instead of being accepted and then
    dropped for want of a descriptor to reach a backend with."""
    async with EchoBackend() as echo:
        env = _process_env(echo)
        async with LbProcess(env, nofile=64) as lb:
            assert "serving at most 16 connections at once" in lb.output()
            async with connections(lb.port, 40) as clients:
                for _, writer in clients:
                    writer.write(b"ping")
                # In waves of the cap: each wave is served while the rest wait, none is dropped.
                for wave in range(0, 40, 16):
                    for reader, _ in clients[wave:wave + 16]:
                        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
                    for _, writer in clients[wave:wave + 16]:
                        await close(writer)
            lb.signal(signal.SIGTERM)
            assert await lb.wait() == 0
        assert "no backend accepted" not in lb.output()


@contextlib.asynccontextmanager
async def _sent_while_stopped(
    lb: LbProcess, count: int
) -> AsyncIterator[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    """``count`` clients that each sent ``ping`` while the balancer was stopped: every connect
    completed in the kernel backlog, and its first accept step finds them all there at once."""
    lb.signal(signal.SIGSTOP)
    async with contextlib.AsyncExitStack() as stack:
        try:
            clients = await stack.enter_async_context(connections(lb.port, count))
            for _, writer in clients:
                writer.write(b"ping")
        finally:
            lb.signal(signal.SIGCONT)
        yield clients


async def _served_in_waves(env: dict[str, str], *, nofile: int | None, cap: int,
                           clients: int) -> LbProcess:
    """``clients`` clients that all wait in the backlog when the balancer wakes: it takes
    ``cap`` of them, the others stay in the backlog until a slot frees, and none is dropped."""
    async with LbProcess(env, nofile=nofile) as lb:
        process = psutil.Process(lb.pid)
        async with _sent_while_stopped(lb, clients) as conns:
            for wave in range(0, clients, cap):
                served = conns[wave:wave + cap]
                for reader, _ in served:
                    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
                # Exactly this wave holds the slots; the rest are not even accepted.
                if conns[wave + cap:]:
                    await asyncio.sleep(0.3)
                    assert _held(process, lb.port) == len(served)
                for _, writer in served:
                    await close(writer)
        lb.signal(signal.SIGTERM)
        assert await lb.wait() == 0
    return lb


async def test_a_burst_past_the_cap_waits_in_the_backlog_and_is_served_as_slots_free() -> None:
    """The default loop accepted up to a backlog's worth of clients in one step and only then
    learnt that the cap was reached: the clients past it were held open, accepted, instead of
    waiting in the backlog as under uvloop."""
    async with EchoBackend() as echo:
        env = _process_env(echo, LB_MAX_CONNECTIONS="4")
        lb = await _served_in_waves(env, nofile=None, cap=4, clients=12)
    assert "no backend accepted" not in lb.output()


async def test_a_burst_past_a_cap_lowered_to_the_descriptor_limit_drops_no_client() -> None:
    """Under ``ulimit -n 64`` (a cap of 16), 48 clients at once: accepted together, those past
    the cap took the descriptors the served ones needed to reach a backend, and were dropped
    (``no backend accepted``) or met EMFILE at accept."""
    async with EchoBackend() as echo:
        env = _process_env(echo)
        lb = await _served_in_waves(env, nofile=64, cap=16, clients=48)
    assert "serving at most 16 connections at once" in lb.output()
    assert "no backend accepted" not in lb.output()
    assert "accept() failed" not in lb.output()


async def test_connections_ended_in_the_accepting_wakeup_free_their_descriptors_first() -> None:
    """Under ``ulimit -n 64`` (a cap of 16), 15 connections reset and 20 new clients waiting,
    all seen in one wakeup: the ended connections' sockets are closed at the end of the batch
    that saw them end, and the accept of that same batch took their slots before, needing 30
    descriptors more than the limit held (EMFILE at accept or at the backend's connect)."""
    async with EchoBackend() as echo:
        env = _process_env(echo)
        async with LbProcess(env, nofile=64) as lb:
            assert "serving at most 16 connections at once" in lb.output()
            process = psutil.Process(lb.pid)

            async with connections(lb.port, 16) as first:
                for reader, writer in first:
                    writer.write(b"ping")
                    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
                # One ends: once both its sockets are closed (the listener and 15 connections'
                # two each are left), the balancer listens again, with nobody waiting yet.
                await close(first[0][1])
                await eventually(lambda: len(process.net_connections("tcp")) == 1 + 2 * 15)
                lb.signal(signal.SIGSTOP)
                try:
                    # Stopped before the resets, or it might take some of them on its own.
                    await eventually(lambda: process.status() == psutil.STATUS_STOPPED)
                    for _, writer in first[1:]:
                        reset(writer)
                    await eventually(lambda: _held(process, lb.port) == 0)
                    # Their resets are ahead of the listener in the ready list: one batch.
                    async with connections(lb.port, 20) as second:
                        for _, writer in second:
                            writer.write(b"ping")
                        lb.signal(signal.SIGCONT)
                        for wave in (second[:16], second[16:]):
                            for reader, _ in wave:
                                assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
                            for _, writer in wave:
                                await close(writer)
                finally:
                    lb.signal(signal.SIGCONT)
            lb.signal(signal.SIGTERM)
            assert await lb.wait() == 0
    assert "Too many open files" not in lb.output()
    assert "no backend accepted" not in lb.output()


def test_an_accept_retry_for_a_listener_closed_meanwhile_is_dropped() -> None:
    """Out of descriptors, the default loop retries accept() a second later; the listener may
    be closed by then (a service stopping): the retry must not raise on its fd -1."""
    from common.loops import SelectorEventLoop, _AcceptBatch

    loop = SelectorEventLoop()
    try:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.close()
        errors: list[dict[str, object]] = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        loop.call_soon(loop._start_serving, lambda: None, _AcceptBatch(listener))
        loop.call_soon(loop.stop)
        loop.run_forever()
        assert errors == []
    finally:
        loop.close()
