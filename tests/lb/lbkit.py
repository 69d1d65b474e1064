"""Real servers and probes for the balancer's tests: backends, the balancer in and out of process.

Every server binds an ephemeral port on 127.0.0.1 and is an async context manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import re
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from chaos.system import close_wait
from lb.config import Config
from lb.server import Server

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"

# --- the loop under test ---------------------------------------------------------------------


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: which loop runs this test (the conftest runs both)."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


# --- counting what is open -------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def tcp_states(port: int) -> dict[str, int]:
    """Sockets of this machine with ``port`` at either end, counted by TCP state."""
    names = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN",
             "04": "FIN_WAIT1", "05": "FIN_WAIT2", "09": "LAST_ACK", "07": "CLOSE",
             "02": "SYN_SENT", "03": "SYN_RECV", "0B": "CLOSING"}
    counts: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if port in (local_port, remote_port):
                    state = names.get(fields[3], fields[3])
                    counts[state] = counts.get(state, 0) + 1
    return counts


close_wait_of_process = close_wait  # one reading of /proc, shared with the chaos tools


async def eventually(predicate: Callable[[], bool], *, timeout: float = 5.0,
                     step: float = 0.02) -> None:
    """Wait until ``predicate()`` holds (for state that has no event to await)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(step)


# --- backends --------------------------------------------------------------------------------


class _Listener:
    """Base for the test servers: start/stop on a fixed port, track and abort connections."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.accepted = 0
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.port

    @property
    def label(self) -> str:
        return f"{HOST}:{self.port}"

    async def start(self) -> Self:
        self.server = await asyncio.start_server(
            self._accept, HOST, self.port, reuse_address=True, backlog=1024
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Close the listener and reset every open connection (a killed process)."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.writers):
            reset(writer)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Registered at accept, not when the handler first runs: a connection accepted just as
        # stop() runs is then reset and its handler cancelled like the others, not left open.
        self.accepted += 1
        self.writers.add(writer)
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # stop() ends the handlers; finishing normally keeps start_server's callback quiet.
            pass
        finally:
            self.writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class EchoBackend(_Listener):
    """Echoes every byte; passes the client's EOF back as its own.

    ``ended`` gets how each connection that carried bytes ended (health checks carry none).
    """

    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self.eofs = 0
        self.ended: asyncio.Queue[str] = asyncio.Queue()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        how = "eof"
        carried = False
        try:
            while data := await reader.read(65536):
                carried = True
                writer.write(data)
                await writer.drain()
            if carried:
                self.eofs += 1
            writer.write_eof()
            await writer.drain()
            # Wait for the proxy to close its side once both directions ended.
            await reader.read()
        except ConnectionError as exc:
            how = type(exc).__name__
            raise
        finally:
            if carried:
                self.ended.put_nowait(how)


class HttpBackend(_Listener):
    """A tiny HTTP/1.1 replica: ``/healthcheck`` (200 or 503), and any other path answers its name.

    Every answer carries ``X-Served-By: host:port``; connections are kept alive.
    """

    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self.healthy = True
        self.checks = 0
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            _, path, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            length = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if length:
                await reader.readexactly(int(length.group(1)))
            if path == "/healthcheck":
                self.checks += 1
                status = "200 OK" if self.healthy else "503 Service Unavailable"
                body = b"ok" if self.healthy else b"draining"
            else:
                self.requests += 1
                status, body = "200 OK", self.label.encode()
            close = b"connection: close" in head.lower()
            writer.write(
                f"HTTP/1.1 {status}\r\nX-Served-By: {self.label}\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n".encode() + body
            )
            await writer.drain()
            if close:
                return


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class FuncBackend(_Listener):
    """Runs ``handler(reader, writer)`` for each connection (a scenario's own backend)."""

    def __init__(self, handler: Handler, port: int = 0) -> None:
        super().__init__(port)
        self._handler = handler

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._handler(reader, writer)


class BannerBackend(_Listener):
    """Speaks first (like SMTP or PostgreSQL's SSL answer): sends a banner, then echoes."""

    banner = b"220 hello from the backend\r\n"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(self.banner)
        while data := await reader.read(65536):
            writer.write(data)
        writer.write_eof()
        await reader.read()


class SinkBackend(_Listener):
    """Reads nothing until told to, then everything, hashed (a slow reader, a big upload)."""

    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self.go = asyncio.Event()
        self.received: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.go.wait()
        digest = hashlib.sha256()
        size = 0
        while data := await reader.read(262144):
            digest.update(data)
            size += len(data)
        self.received.put_nowait((size, digest.hexdigest()))
        writer.write(f"{size} {digest.hexdigest()}\n".encode())
        writer.write_eof()
        await reader.read()


class SourceBackend(_Listener):
    """Sends ``size`` pseudo-random bytes then EOF (a download), and reports their hash."""

    def __init__(self, size: int, port: int = 0) -> None:
        super().__init__(port)
        self.size = size
        self.digest = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest = hashlib.sha256()
        for chunk in pattern(self.size):
            digest.update(chunk)
            writer.write(chunk)
            await writer.drain()
        self.digest = digest.hexdigest()
        writer.write_eof()
        await reader.read()


def pattern(size: int, chunk: int = 65536) -> list[bytes]:
    """``size`` deterministic, incompressible-looking bytes in chunks."""
    seed = hashlib.sha256(b"varstack").digest()
    block = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(2048))
    out = []
    sent = 0
    i = 0
    while sent < size:
        n = min(chunk, size - sent)
        rotated = block[i % 997:] + block[: i % 997]
        out.append((rotated * (n // len(rotated) + 1))[:n])
        sent += n
        i += 1
    return out


class Blackhole:
    """A listener with a full backlog that never accepts: connects to it hang (SYN dropped)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.fillers: list[socket.socket] = []
        self.port = 0

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.port

    async def __aenter__(self) -> Self:
        self.sock.bind((HOST, 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        # Fill the accept queue until a connect no longer completes.
        for _ in range(8):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            self.fillers.append(filler)
            try:
                async with asyncio.timeout(0.3):
                    await loop.sock_connect(filler, self.address)
            except TimeoutError:
                return self
        raise RuntimeError("could not fill the blackhole's backlog")

    async def __aexit__(self, *exc: object) -> None:
        for filler in self.fillers:
            filler.close()
        self.sock.close()


# --- clients ---------------------------------------------------------------------------------


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), like a killed process with unread data."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(HOST, port, limit=1 << 20)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


@contextlib.asynccontextmanager
async def connections(
    port: int, count: int
) -> AsyncIterator[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    """``count`` clients, connected one after another; whatever the block left open is
    aborted on the way out, so a failed test leaves no transport for a later test's loop."""
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(count):
            opened.append(await connect(port))
        yield opened
    finally:
        for _, writer in opened:
            writer.transport.abort()


async def http_get(
    port: int, path: str = "/", *, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """One ``GET`` on a fresh connection (closed after): status, lower-cased headers, body."""
    async with asyncio.timeout(timeout):
        reader, writer = await connect(port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n".encode())
            raw = await reader.read()
        finally:
            await close(writer)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    """Everything until the peer closes, by FIN or by RST (a refused client may get either)."""
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await reader.read(1 << 20):
            got += chunk
    return got


async def how_it_ends(reader: asyncio.StreamReader) -> tuple[int, str]:
    """The bytes read until the end, and how it came: ``eof`` (FIN) or ``reset`` (RST)."""
    got = 0
    try:
        while chunk := await reader.read(1 << 20):
            got += len(chunk)
    except ConnectionResetError:
        return got, "reset"
    return got, "eof"


async def exchange(port: int, payload: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``payload`` and EOF, read until the proxy closes (FIN or RST)."""
    async with asyncio.timeout(timeout):
        reader, writer = await connect(port)
        try:
            writer.write(payload)
            # A connection the proxy ended already: reset, or not connected any more.
            with contextlib.suppress(ConnectionResetError, OSError):
                writer.write_eof()
            return await read_to_end(reader)
        finally:
            await close(writer)


# --- the balancer ----------------------------------------------------------------------------


def accept_from(listener: socket.socket, port: int) -> socket.socket:
    """The connection in ``listener``'s queue that comes from local ``port`` (health checks'
    connections wait there too): a backend that accepts and then reads nothing, or resets."""
    while True:
        conn, peer = listener.accept()
        if peer[1] == port:
            return conn
        conn.close()


@contextlib.contextmanager
def refusing_addresses(count: int) -> Iterator[list[tuple[str, int]]]:
    """``count`` addresses that refuse every connect for as long as the block runs.

    A port merely found free may be handed out again (to a test's own server) or picked as
    the source port of a connect to it, which then connects to itself. A socket bound there
    without SO_REUSEADDR, never listening, keeps the port from both: connects to it are
    refused, and the kernel gives it to no other bind and to no connect as a source port.
    """
    with contextlib.ExitStack() as holders:
        addresses = []
        for _ in range(count):
            sock = holders.enter_context(socket.socket())
            sock.bind((HOST, 0))
            addresses.append((HOST, int(sock.getsockname()[1])))
        yield addresses


def buffered(server: Server) -> int:
    """Bytes the balancer holds right now (read, not yet sent on), over every connection."""
    total = 0
    for pipe in server.pipes:
        for side in (pipe.client, pipe.upstream):
            if side is not None and side.open:
                total += len(side.pending)
    return total


def lb_config(*backends: tuple[str, int], **overrides: Any) -> Config:
    """A balancer config for tests: loopback, ephemeral port, no admin, fast checks."""
    base: dict[str, Any] = {
        "host": HOST,
        "port": 0,
        "backends": tuple(backends),
        "server_count": max(1, len(backends)),
        "admin_port": 0,
        "check_mode": "tcp",
        "check_interval": 0.1,
        "check_timeout": 2.0,
        "check_rise": 2,
        "check_fall": 2,
        "connect_timeout": 5.0,
        "drain_timeout": 2.0,
    }
    base.update(overrides)
    return Config(**base)


@contextlib.asynccontextmanager
async def running_lb(config: Config, **kwargs: Any) -> AsyncIterator[Server]:
    server = Server(config, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(drain_timeout=1.0)


@dataclasses.dataclass
class LbProcess:
    """``python -m lb`` as a child process, with its output collected.

    ``nofile`` runs it under that descriptor limit (soft and hard); ``prefix`` is a command that
    runs it (``nohup``, say).
    """

    env: Mapping[str, str]
    nofile: int | None = None
    prefix: Sequence[str] = ()
    proc: asyncio.subprocess.Process | None = None
    lines: list[str] = dataclasses.field(default_factory=list)
    port: int = 0
    _reader: asyncio.Task[None] | None = None
    _listening: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    async def __aenter__(self) -> Self:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **self.env}
        argv = [sys.executable, "-m", "lb"]
        if self.nofile is not None:
            argv = [sys.executable, "-c",
                    "import resource, runpy, sys; "
                    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({self.nofile}, {self.nofile})); "
                    "sys.argv = ['lb']; runpy.run_module('lb', run_name='__main__')"]
        self.proc = await asyncio.create_subprocess_exec(
            *self.prefix, *argv, cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.create_task(self._read())
        wait = asyncio.create_task(self._listening.wait())
        done, _ = await asyncio.wait({wait, self._reader}, timeout=15,
                                     return_when=asyncio.FIRST_COMPLETED)
        if wait not in done:
            wait.cancel()
            await self.kill()
            raise RuntimeError("the balancer did not start:\n" + "\n".join(self.lines))
        return self

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            match = re.search(r"listening on \S+:(\d+);", line)
            if match:
                self.port = int(match.group(1))
                self._listening.set()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        assert self._reader is not None
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self._reader
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await self.kill()
        finally:
            if exc is not None and self.lines:
                # A failure inside the block is read beside what the balancer logged meanwhile.
                exc.add_note("the balancer's output:\n" + self.output())

    def output(self) -> str:
        return "\n".join(self.lines)


async def first(*aws: Awaitable[Any]) -> None:
    """Await the first of several awaitables to finish; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
