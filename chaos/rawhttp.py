"""A minimal HTTP/1.1 client over one TCP connection, for fault scenarios.

The fault suite must know, for every failed request, *which connection* it was on: when
that connection was opened, its local port (the balancer logs it, with the replica it was
piped to) and which replica answered on it before.  A pooled client hides all of that, so
this one is a connection you hold: open it, send requests on it (keep-alive) or one only
(``Connection: close``), see it fail.

It understands what the service sends: a status line, headers, and a body framed by
``Content-Length`` (or none for 204/304/HEAD, or chunked, or until close).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass, field

MAX_HEADER_BYTES = 64 * 1024
_ids = itertools.count(1)


class HttpError(Exception):
    """The peer sent something that is not an HTTP/1.1 answer, or closed mid-answer."""


@dataclass(frozen=True)
class RawReply:
    status: int
    headers: dict[str, str]
    """Lower-cased names; the last value of a repeated header."""
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    @property
    def served_by(self) -> str | None:
        return self.headers.get("x-served-by")

    @property
    def keep_alive(self) -> bool:
        return self.headers.get("connection", "").lower() != "close"


@dataclass
class Connection:
    """One client connection: opened once, used for one or many requests, closed once."""

    host: str
    port: int
    id: int = field(default_factory=lambda: next(_ids))
    opened: float = 0.0
    """``time.monotonic()`` once the TCP connect completed."""
    local_port: int | None = None
    served_by: str | None = None
    """The replica that answered the last request on this connection."""
    requests: int = 0
    _reader: asyncio.StreamReader | None = None
    _writer: asyncio.StreamWriter | None = None

    async def open(self) -> Connection:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self.opened = time.monotonic()
        sockname = self._writer.get_extra_info("sockname")
        self.local_port = int(sockname[1]) if sockname else None
        return self

    @property
    def is_open(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def request(
        self, method: str, target: str, body: bytes | None = None,
        headers: dict[str, str] | None = None, *, close: bool = False,
    ) -> RawReply:
        """Send one request and read its answer; raise on any transport or framing error."""
        reader, writer = self._reader, self._writer
        if reader is None or writer is None:
            raise HttpError("the connection is not open")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        if close:
            lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + (body or b""))
        self.requests += 1
        await writer.drain()
        reply = await read_reply(reader, head=method == "HEAD")
        if reply.served_by:
            self.served_by = reply.served_by
        return reply

    async def until_closed_by_peer(self) -> None:
        """Wait until the peer closes (FIN or RST), discarding anything it sends."""
        reader = self._reader
        if reader is None:
            return
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    def abort(self) -> None:
        """Close at once, without waiting (a task being cancelled)."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.transport.abort()


async def read_reply(reader: asyncio.StreamReader, *, head: bool = False) -> RawReply:
    try:
        raw_head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise HttpError(f"connection closed after {len(exc.partial)} bytes of headers") from None
    except asyncio.LimitOverrunError:
        raise HttpError("headers too long") from None
    if len(raw_head) > MAX_HEADER_BYTES:
        raise HttpError("headers too long")
    status_line, *header_lines = raw_head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HttpError(f"not an HTTP status line: {status_line[:80]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    try:
        if head or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = await _read_chunked(reader)
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        else:
            body = await reader.read()
    except asyncio.IncompleteReadError as exc:
        raise HttpError(f"connection closed after {len(exc.partial)} bytes of the body") from None
    except ValueError as exc:
        raise HttpError(f"bad framing: {exc}") from None
    return RawReply(status, headers, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return body
        body += await reader.readexactly(size)
        await reader.readexactly(2)
