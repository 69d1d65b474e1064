"""A TCP relay in front of PostgreSQL that reads the client's protocol messages and holds what a
test chooses: a database that stopped answering at one exact message, which SIGSTOP cannot pick.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Literal, Self

#: (message type, body) of the client's messages on one connection so far, and of this one.
#: The startup packets have no type byte: their type is b"".
Seen = list[tuple[bytes, bytes]]
Rule = Callable[[bytes, bytes, Seen], bool]

_UNTYPED_FOLLOWS = (80877103, 80877104)  # SSLRequest, GSSENCRequest: a startup packet follows


def after_begin(kind: bytes, body: bytes, seen: Seen) -> bool:
    """The first message after a simple-query BEGIN: the statement of a transaction."""
    return bool(seen) and seen[-1] == (b"Q", b"BEGIN\0")


def is_commit(kind: bytes, body: bytes, seen: Seen) -> bool:
    return (kind, body) == (b"Q", b"COMMIT\0")


class PgRelay:
    """Relays connections to ``target`` unchanged, except, once :meth:`arm` was called, on the
    first connection where ``rule`` matches a client message:

    - ``hold="requests"``: that message and all the client sends after it stay in the relay, as
      in the socket of a database that stopped reading. When the client drops the connection,
      they are delivered, then an EOF: what such a database finds when it resumes.
    - ``hold="answers"``: that message goes through, and nothing the server answers from then
      on reaches the client: a database whose answers are lost.
    - ``hold="cut"``: that message and all after it are dropped, and the server never learns
      that the client left (no EOF until the relay closes): a network cut.

    ``answered`` is set once the server answered that connection after the hold began (it ran
    what it was given); ``ended``, once the server closed it (its backend is gone, so what it
    did is final).
    """

    def __init__(
        self, target: tuple[str, int], rule: Rule, *,
        hold: Literal["requests", "answers", "cut"],
    ) -> None:
        self._target = target
        self._rule = rule
        self._hold = hold
        self._armed = False
        self._claimed = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.holding = asyncio.Event()
        self.answered = asyncio.Event()
        self.ended = asyncio.Event()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def arm(self) -> None:
        self._armed = True

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._relay(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        try:
            server_in, server_out = await asyncio.open_connection(*self._target)
        except BaseException:
            client_out.close()
            raise
        holding = asyncio.Event()
        to_client = asyncio.create_task(self._answers(server_in, client_out, holding))
        try:
            await self._requests(client_in, server_out, holding)
            await to_client
        finally:
            to_client.cancel()
            server_out.close()
            client_out.close()

    async def _requests(
        self, client_in: asyncio.StreamReader, server_out: asyncio.StreamWriter,
        holding: asyncio.Event,
    ) -> None:
        """Pass the client's messages on until it leaves (``holding`` set: this connection
        holds)."""
        seen: Seen = []
        held = bytearray()
        try:
            untyped = True
            while True:
                if untyped:
                    head = await client_in.readexactly(4)
                    kind = b""
                    body = await client_in.readexactly(int.from_bytes(head, "big") - 4)
                    untyped = int.from_bytes(body[:4], "big") in _UNTYPED_FOLLOWS
                else:
                    head = await client_in.readexactly(5)
                    kind = head[:1]
                    body = await client_in.readexactly(int.from_bytes(head[1:], "big") - 4)
                if self._armed and not self._claimed and self._rule(kind, body, seen):
                    self._claimed = True
                    self.holding.set()
                    holding.set()
                seen.append((kind, body))
                if holding.is_set() and self._hold != "answers":
                    held += head + body
                else:
                    server_out.write(head + body)
                    await server_out.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client is gone
        if holding.is_set() and self._hold == "cut":
            await asyncio.Event().wait()  # until the relay closes
        with contextlib.suppress(ConnectionError):
            server_out.write(bytes(held))
            server_out.write_eof()
            await server_out.drain()

    async def _answers(
        self, server_in: asyncio.StreamReader, client_out: asyncio.StreamWriter,
        holding: asyncio.Event,
    ) -> None:
        """Copy the server's answers to the client until the server closes (the client may be
        gone already: the server's end is still what tells that the backend finished)."""
        with contextlib.suppress(ConnectionError):
            while data := await server_in.read(65536):
                if holding.is_set():
                    self.answered.set()
                    if self._hold == "answers":
                        continue
                with contextlib.suppress(ConnectionError, RuntimeError):
                    client_out.write(data)
        if holding.is_set():
            self.ended.set()
