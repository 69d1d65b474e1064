"""aiohttp's connection handler, amended in three ways.

**A client that half-closes gets its answers.** A client may send its request and
``shutdown(SHUT_WR)`` (``nc -N``, some scripts, a proxy passing its client's half-close on).
aiohttp closes the connection on that EOF (aio-libs/aiohttp#3659): the handler still runs, so
a ``set_var`` is stored, but its answer is never sent, and the client cannot tell a stored
write from a lost one. Here the EOF keeps the connection open while requests the client has
sent whole are answered, then closes it. A request whose body the EOF cut short, or an idle
connection, is closed at once, as before.

**A request in flight at the stop gets the rest of its body.** aiohttp's shutdown drops every
byte that arrives after it began, so a request whose head came before the signal, with its body
still on the way, waited for the shutdown deadline and was cut. Bytes are read while such a
request is unfinished; nothing else is (no new request is started during the drain).

**A request the client malformed is one log line.** aiohttp's parser answers it 400 itself
and logs an ERROR with a traceback (a bad chunk size, a doubled ``Transfer-Encoding``): any
client could fill the log, or page whoever watches it for errors. It is logged at INFO.

It relies on aiohttp's ``RequestHandler`` internals; ``tests/services/test_api.py``,
``test_bad_input.py`` and ``test_lifecycle.py`` send such requests through a real socket, so an
aiohttp that changes them fails there.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import StreamReader, web, web_protocol
from aiohttp.http_exceptions import HttpProcessingError

from common.web import HandlerRunner

_CARET_LINE = re.compile(r"\n[ \t]*\^[ \t]*$")

#: Loop steps a connection may spend between aiohttp's states before the EOF closes it anyway
#: (a request moving from its parse to its handler takes one or two).
_MAX_LOOKS = 100


class RequestHandler(web_protocol.RequestHandler):
    __slots__ = ("_client_done", "_last_payload", "_looks")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client_done = False
        self._last_payload: StreamReader | None = None
        self._looks = 0

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if isinstance(exc, HttpProcessingError):  # the parser's 400: the client's mistake
            message, *params = args
            # aiohttp's C parser spreads its message over lines (the bytes, then a caret under
            # the one it refused): one request is one line of the log, without the caret.
            why = " ".join(_CARET_LINE.sub("", str(exc.message or exc)).split())
            self.logger.info(f"{message}: %s", *params, why)
            return
        super().log_exception(*args, **kw)

    def data_received(self, data: bytes) -> None:
        request = self._current_request
        closing = (self._close, self._force_close)  # set by the stop, and all aiohttp looks at
        if any(closing) and request is not None and not request.content.is_eof():
            self._close = self._force_close = False
            try:
                super().data_received(data)
            finally:
                self._close |= closing[0]
                self._force_close |= closing[1]
            return
        super().data_received(data)

    def eof_received(self) -> bool | None:  # type: ignore[override]
        if self._force_close or self._close or not self._request_count:
            return None  # nothing asked (an idle keep-alive connection): close now
        self._client_done = True
        # Nothing more will come: no lingering to read the rest of a body that was refused.
        self._lingering_time = 0.0
        self._after_eof()
        return None if self._force_close else True  # keep the sending side open for answers

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        # Kept only while unfinished (a refused body aiohttp goes on reading): nothing is held
        # for an idle keep-alive connection.
        self._last_payload = None if request.content.is_eof() else request.content
        self._looks = 0
        result = await super().finish_response(request, resp, start_time)
        if self._client_done:
            self._loop.call_soon(self._after_eof)  # once the server has moved on from it
        return result

    def _after_eof(self) -> None:
        """Close once every request the client sent whole is answered; at once for a body
        the EOF cut short (its reader then learns it ended early, as without this class)."""
        if self._force_close:
            return
        # A pipelined request whose body the EOF cut short can never be whole: it is dropped
        # before its handler runs (nothing of it is stored), and the ones before it answered.
        while self._messages and not self._messages[-1][1].is_eof():
            self._messages.pop()
        request = self._current_request
        last = self._last_payload
        if request is not None and not request.content.is_eof():
            self.force_close()
        elif self._waiter is not None and not self._waiter.done() and not self._messages:
            self.force_close()  # every answer is written (close() flushes them first)
        elif self._request_in_progress:
            pass  # a handler runs: its finish_response looks again
        elif request is None and last is not None and not last.is_eof():
            # Answered (413, 415) and reading the rest of the refused body for a while, as
            # aiohttp does so the client sees the answer: the client has sent all it will.
            last.feed_eof()
            self.force_close()
        elif self._looks < _MAX_LOOKS:
            # Between a request's parse and its handler, or an answer and the wait for the
            # next request (aiohttp parses pipelined requests one at a time): look again.
            self._looks += 1
            self._loop.call_soon(self._after_eof)
        else:
            self.force_close()


class AppRunner(HandlerRunner):
    """``web.AppRunner`` whose connections are served by this module's ``RequestHandler``."""

    handler_class = RequestHandler
