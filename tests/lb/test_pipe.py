"""The proxy's TCP: round-robin, both ways, half-close, resets, backpressure, big transfers."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import socket
from collections.abc import Callable

import pytest

from lb.pipe import Pipe, Side
from tests.lb.lbkit import (
    HOST,
    BannerBackend,
    Blackhole,
    EchoBackend,
    FuncBackend,
    HttpBackend,
    SinkBackend,
    SourceBackend,
    accept_from,
    buffered,
    close,
    connect,
    eventually,
    exchange,
    how_it_ends,
    http_get,
    lb_config,
    pattern,
    reset,
    running_lb,
)

MiB = 1 << 20


async def test_round_robin_order_over_backends() -> None:
    async with HttpBackend() as a, HttpBackend() as b, HttpBackend() as c, running_lb(
        lb_config(a.address, b.address, c.address)
    ) as lb:
        served = []
        for _ in range(9):
            status, headers, _ = await http_get(lb.port, "/x")
            assert status == 200
            served.append(headers["x-served-by"])
    order = served[:3]
    assert sorted(order) == sorted([a.label, b.label, c.label])
    assert served == order * 3


async def test_echo_many_sizes() -> None:
    async with EchoBackend() as echo, running_lb(lb_config(echo.address)) as lb:
        for size in (0, 1, 1000, 65536, 300_000):
            payload = b"".join(pattern(size))
            assert await exchange(lb.port, payload) == payload


async def test_client_half_close_other_direction_keeps_flowing() -> None:
    """The client sends its request and EOF; the answer (sent after that EOF) still arrives."""
    answer = b"".join(pattern(2 * MiB))

    async def answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # up to the client's EOF
        writer.write(request.upper())
        writer.write(answer)
        await writer.drain()
        writer.write_eof()
        await reader.read()

    async with FuncBackend(answer_after_eof) as backend, running_lb(
        lb_config(backend.address)
    ) as lb:
        got = await exchange(lb.port, b"request")
        assert got == b"REQUEST" + answer
        await eventually(lambda: not lb.pipes)


async def test_backend_half_close_client_keeps_sending() -> None:
    """The backend says all it has and EOFs; the client still uploads, then ends."""
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def talk_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"greeting")
        writer.write_eof()
        received.put_nowait(await reader.read())

    async with FuncBackend(talk_then_listen) as backend, running_lb(
        lb_config(backend.address)
    ) as lb:
        reader, writer = await connect(lb.port)
        assert await reader.read() == b"greeting"  # the backend's EOF reached the client
        upload = b"".join(pattern(MiB))
        writer.write(upload)
        writer.write_eof()
        assert await asyncio.wait_for(received.get(), 5) == upload
        await close(writer)
        await eventually(lambda: not lb.pipes)


async def test_client_reset_reaches_backend() -> None:
    async with EchoBackend() as echo, running_lb(lb_config(echo.address)) as lb:
        reader, writer = await connect(lb.port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        reset(writer)
        how = await asyncio.wait_for(echo.ended.get(), 5)
        assert how == "ConnectionResetError"
        await eventually(lambda: not lb.pipes)
        assert echo.eofs == 0  # a reset is not passed on as a clean end


async def test_backend_reset_reaches_client() -> None:
    async def reset_after_request(reader: asyncio.StreamReader,
                                  writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4)
        writer.write(b"partial answer")
        await writer.drain()
        reset(writer)

    async with FuncBackend(reset_after_request) as backend, running_lb(
        lb_config(backend.address)
    ) as lb:
        reader, writer = await connect(lb.port)
        writer.write(b"ping")
        got = b""
        with pytest.raises(ConnectionResetError):  # noqa: PT012 - read until the reset
            async with asyncio.timeout(5):
                while chunk := await reader.read(65536):
                    got += chunk
        assert b"partial answer".startswith(got)
        await close(writer)
        await eventually(lambda: not lb.pipes)


@pytest.mark.parametrize("ending", ["eof", "reset"])
async def test_a_long_stream_is_counted_to_the_byte(ending: str) -> None:
    """The stats count each direction's bytes while it is open, and exactly once it ends,
    by an EOF or by a reset."""
    async with EchoBackend() as echo, running_lb(lb_config(echo.address, idle_timeout=2)) as lb:
        reader, writer = await connect(lb.port)
        sent = 0

        async def echoes(sizes: range) -> None:
            nonlocal sent
            for i in sizes:
                payload = bytes([i]) * (i * 997)
                writer.write(payload)
                assert await reader.readexactly(len(payload)) == payload
                sent += len(payload)

        await echoes(range(1, 40))

        def live() -> tuple[int, int]:
            counts = lb.stats()["backends"][0]
            return counts["bytes_to_backend"], counts["bytes_to_client"]

        await eventually(lambda: live() == (sent, sent))
        await echoes(range(40, 60))
        if ending == "eof":
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b""
        else:
            reset(writer)
            assert await asyncio.wait_for(echo.ended.get(), 5) == "ConnectionResetError"
        await close(writer)
        await eventually(lambda: not lb.pipes)
        done = lb.stats()
    assert (done["backends"][0]["bytes_to_backend"], done["backends"][0]["bytes_to_client"]) \
        == (sent, sent)
    assert (done["totals"]["bytes_to_backend"], done["totals"]["bytes_to_client"]) == (sent, sent)


async def test_a_backend_reset_in_the_middle_of_a_stream_reaches_the_client() -> None:
    chunks = pattern(8 * 65536)

    async def stream_then_reset(reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4)
        for chunk in chunks:  # one write and drain each: the answer comes in several chunks
            writer.write(chunk)
            await writer.drain()
        await reader.readexactly(4)  # the client has all of it
        reset(writer)

    async with FuncBackend(stream_then_reset) as backend, running_lb(
        lb_config(backend.address)
    ) as lb:
        reader, writer = await connect(lb.port)
        writer.write(b"ping")
        answer = await reader.readexactly(len(chunks) * 65536)
        writer.write(b"done")
        _, end = await asyncio.wait_for(how_it_ends(reader), 5)
        assert end == "reset"
        await close(writer)
        await eventually(lambda: not lb.pipes)
    assert answer == b"".join(chunks)


async def test_large_transfer_both_ways_is_byte_exact_with_bounded_buffers() -> None:
    size = 32 * MiB
    config = lb_config(buffer_size=256 * 1024)
    async with EchoBackend() as echo, running_lb(
        lb_config(echo.address, buffer_size=config.buffer_size)
    ) as lb:
        reader, writer = await connect(lb.port)
        sent = hashlib.sha256()
        got = hashlib.sha256()
        peak = 0
        done = asyncio.Event()

        async def upload() -> None:
            for chunk in pattern(size):
                sent.update(chunk)
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()

        async def download() -> int:
            n = 0
            while chunk := await reader.read(1 << 20):
                got.update(chunk)
                n += len(chunk)
            done.set()
            return n

        async def watch() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, buffered(lb))
                await asyncio.sleep(0.005)

        async with asyncio.timeout(60):
            _, received, _ = await asyncio.gather(upload(), download(), watch())
        await close(writer)
    assert received == size
    assert got.hexdigest() == sent.hexdigest()
    # Two directions, each holding at most its high-water mark plus one read.
    assert peak <= 2 * (config.buffer_size + 256 * 1024)


async def stalled(value: Callable[[], int], *, window: float = 0.2) -> int:
    """Wait until ``value()`` stops changing for ``window`` seconds; return it."""
    last = value()
    async with asyncio.timeout(10):
        while True:
            await asyncio.sleep(window)
            now = value()
            if now == last:
                return now
            last = now


async def test_slow_reader_client_pauses_the_backend() -> None:
    size = 48 * MiB
    buffer_size = 64 * 1024
    async with SourceBackend(size) as source, running_lb(
        lb_config(source.address, buffer_size=buffer_size)
    ) as lb:
        reader, writer = await connect(lb.port)
        await eventually(lambda: any(p.bytes_to_client for p in lb.pipes))
        # The client reads nothing: what the proxy relays stops growing, its buffer stays small.
        (pipe,) = lb.pipes
        relayed = await stalled(lambda: pipe.bytes_to_client)
        assert relayed < size
        assert buffered(lb) <= buffer_size + 256 * 1024
        got = hashlib.sha256()
        n = 0
        async with asyncio.timeout(60):
            while chunk := await reader.read(32 * 1024):
                got.update(chunk)
                n += len(chunk)
        await close(writer)
    assert n == size
    assert got.hexdigest() == source.digest


async def test_slow_reader_backend_pauses_the_client() -> None:
    size = 48 * MiB
    buffer_size = 64 * 1024
    async with SinkBackend() as sink, running_lb(
        lb_config(sink.address, buffer_size=buffer_size)
    ) as lb:
        reader, writer = await connect(lb.port)
        sent = hashlib.sha256()
        chunks = pattern(size)
        pushed = 0

        async def push() -> None:
            nonlocal pushed
            for chunk in chunks:
                sent.update(chunk)
                writer.write(chunk)
                pushed += len(chunk)
                await writer.drain()
            writer.write_eof()

        pusher = asyncio.create_task(push())
        await eventually(lambda: any(p.bytes_to_backend for p in lb.pipes))
        (pipe,) = lb.pipes
        relayed = await stalled(lambda: pipe.bytes_to_backend)
        assert relayed < size
        assert pushed < size  # the client's drain() waits: backpressure reached it
        assert buffered(lb) <= buffer_size + 256 * 1024
        sink.go.set()
        async with asyncio.timeout(60):
            await pusher
            answer = await reader.read()
        await close(writer)
    assert answer.decode().split() == [str(size), sent.hexdigest()]


async def test_a_client_pushing_while_the_connect_hangs_is_held_by_the_kernel() -> None:
    """Until a backend exists the client's bytes stay in the kernel's buffers, not ours: a
    connect that hangs (a backend that drops SYNs) must not let one client fill our memory."""
    async with Blackhole() as hole, running_lb(
        lb_config(hole.address, connect_timeout=30.0, check_interval=60.0)
    ) as lb:
        _reader, writer = await connect(lb.port)
        pushed = 0

        async def push() -> None:
            nonlocal pushed
            for chunk in pattern(256 * MiB, chunk=MiB):
                writer.write(chunk)
                pushed += len(chunk)
                await writer.drain()

        pusher = asyncio.create_task(push())
        try:
            await eventually(lambda: bool(lb.pipes))
            await stalled(lambda: pushed)
            (pipe,) = lb.pipes
            assert pipe.upstream is not None
            assert pipe.upstream.connecting
            assert pipe.client.received == 0  # not read at all
            assert pushed < 64 * MiB  # the client is held back: what it pushed is in sockets
        finally:
            pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pusher
            reset(writer)


async def test_backend_that_speaks_first() -> None:
    async with BannerBackend() as backend, running_lb(lb_config(backend.address)) as lb:
        reader, writer = await connect(lb.port)
        banner = await asyncio.wait_for(reader.readexactly(len(BannerBackend.banner)), 5)
        assert banner == BannerBackend.banner
        writer.write(b"hi")
        writer.write_eof()
        assert await reader.read() == b"hi"
        await close(writer)


async def test_bytes_sent_before_the_backend_is_connected_arrive_once() -> None:
    """The client writes and closes at once, before the proxy has a backend (uvloop pitfall)."""
    async with EchoBackend() as echo, running_lb(lb_config(echo.address)) as lb:
        results = await asyncio.gather(*(exchange(lb.port, b"x%05d" % i) for i in range(100)))
        assert results == [b"x%05d" % i for i in range(100)]


async def test_both_sockets_have_nodelay() -> None:
    async with EchoBackend() as echo, running_lb(lb_config(echo.address)) as lb:
        reader, writer = await connect(lb.port)
        writer.write(b"x")
        await reader.readexactly(1)
        (pipe,) = lb.pipes
        for side in (pipe.client, pipe.upstream):
            assert side is not None
            assert side.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        await close(writer)


async def test_client_leaving_while_backend_is_slow_to_answer() -> None:
    """A client that closes right after connecting leaves nothing behind."""
    async with EchoBackend() as echo, running_lb(lb_config(echo.address)) as lb:
        for _ in range(50):
            _, writer = await connect(lb.port)
            with contextlib.suppress(ConnectionError):
                await close(writer)
        await eventually(lambda: not lb.pipes)
        assert lb.stats()["totals"]["finished_connections"] == 50


async def test_an_internal_error_ends_that_connection_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug met while handling one connection's events is logged and ends that connection
    with a reset; the other connections, and the balancer, go on."""
    async with EchoBackend() as echo, running_lb(lb_config(echo.address)) as lb:
        other_reader, other_writer = await connect(lb.port)
        other_writer.write(b"a")
        assert await other_reader.readexactly(1) == b"a"

        def broken(self: Pipe, side: Side) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(Pipe, "eof_read", broken)
        reader, writer = await connect(lb.port)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        writer.write_eof()
        _, end = await asyncio.wait_for(how_it_ends(reader), 5)
        assert end == "reset"
        monkeypatch.undo()
        await eventually(lambda: len(lb.pipes) == 1)
        other_writer.write(b"b")
        assert await other_reader.readexactly(1) == b"b"
        await close(writer)
        await close(other_writer)
    assert "internal error on descriptor" in caplog.text
    assert "RuntimeError: a bug" in caplog.text


async def test_a_client_reset_while_its_backend_reads_nothing_is_seen_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The client pushes to a backend that reads nothing, so the balancer holds a chunk for it
    and stops reading the client; then the client resets. Its side, waiting for nothing, was off
    the epoll set, so the reset went unseen until the backend read again or the idle timeout
    (300 s by default) ended the connection. It is seen at once, and the backend gets a reset."""
    caplog.set_level(logging.DEBUG, logger="lb.pipe")
    with socket.socket() as stuck:
        stuck.bind((HOST, 0))
        stuck.listen(16)
        async with running_lb(lb_config((HOST, stuck.getsockname()[1]), check_interval=60)) as lb:
            _reader, writer = await connect(lb.port)
            await eventually(lambda: bool(lb.pipes) and all(
                p.upstream is not None and not p.upstream.connecting for p in lb.pipes))
            (pipe,) = lb.pipes
            assert pipe.upstream is not None
            with accept_from(stuck, pipe.upstream.sock.getsockname()[1]) as conn:

                async def push() -> None:
                    for chunk in pattern(256 * MiB, chunk=MiB):
                        writer.write(chunk)
                        await writer.drain()

                pusher = asyncio.create_task(push())
                try:
                    await eventually(lambda: buffered(lb) > 0, timeout=10)
                finally:
                    pusher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await pusher
                reset(writer)
                await eventually(lambda: not lb.pipes)
                conn.setblocking(False)
                with pytest.raises(ConnectionResetError):  # noqa: PT012 - read until the reset
                    while conn.recv(1 << 20):
                        pass
    assert "end=client reset\n" in caplog.text


async def test_an_error_in_the_connect_step_ends_that_connection_and_frees_its_slot(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """epoll_ctl can fail (ENOMEM; ENOSPC past fs.epoll.max_user_watches). The connect step runs
    from the accept path and from timers, where no one else would end the pipe: it would hold
    its slot for good, its client never read and never closed."""
    async with EchoBackend() as echo, running_lb(
        lb_config(echo.address, max_connections=1)
    ) as lb:
        real_want = Side.want

        def failing_want(self: Side, mask: int) -> None:
            if self.connecting:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_want(self, mask)

        monkeypatch.setattr(Side, "want", failing_want)
        # A plain socket: the reset may come before an asyncio connect has looked at it.
        with socket.create_connection((HOST, lb.port)) as client:
            client.setblocking(False)
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(5):
                    await asyncio.get_running_loop().sock_recv(client, 1)
        await eventually(lambda: not lb.pipes)
        monkeypatch.undo()
        assert await exchange(lb.port, b"served") == b"served"  # the one slot is free again
    assert "connect step failed for client" in caplog.text
