"""A minimal uvloop HTTP responder: the cheap backend when nginx is not installed.

Copied from ``tests/lb/bench_accept.py`` (a colleague's accept-path benchmark) and extended with
``GET /bulk`` (16 MiB).  Every other request gets ``200 ok``; ``Connection: close`` is honoured.
Run: ``python -m bench.backends PORT``.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

BULK_BYTES = 16 << 20
_CHUNK = b"\0" * (1 << 18)


def _response(body: bytes, *, close: bool) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
        + str(len(body)).encode()
        + (b"\r\nConnection: close" if close else b"")
        + b"\r\n\r\n" + body
    )


RESPONSE = _response(b"ok\n", close=False)
CLOSE_RESPONSE = _response(b"ok\n", close=True)
BULK_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: "
             + str(BULK_BYTES).encode() + b"\r\n\r\n")


class Http(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.buf = b""
        self.left = 0
        self.paused = False
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.left == 0 and b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            close = b"connection: close" in head.lower()
            if head.startswith(b"GET /bulk"):
                self.transport.write(BULK_HEAD)
                self.left = BULK_BYTES
                self.close_after = close
                self._fill()
                return
            if close:
                self.transport.write(CLOSE_RESPONSE)
                self.transport.close()
                return
            self.transport.write(RESPONSE)

    def _fill(self) -> None:
        while self.left > 0 and not self.paused:
            n = min(self.left, len(_CHUNK))
            self.left -= n
            self.transport.write(_CHUNK if n == len(_CHUNK) else _CHUNK[:n])
        if self.left == 0 and not self.paused:
            if self.close_after:
                self.transport.close()
            elif self.buf:
                self.data_received(b"")

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._fill()


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(Http, "127.0.0.1", port, backlog=4096)
    await asyncio.Event().wait()


def main() -> None:
    port = int(sys.argv[1])
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(port))
    else:
        uvloop.run(serve(port))


if __name__ == "__main__":
    main()
