"""aiohttp's ``AppRunner`` with a connection handler of one's own.

aiohttp makes its ``RequestHandler`` in ``web.Server.__call__`` and offers no hook for another
class; the server object made by the runner is given a subclass that only changes that call.
"""

from __future__ import annotations

from aiohttp import web, web_protocol


class HandlerRunner(web.AppRunner):
    """``web.AppRunner`` whose connections are served by :attr:`handler_class`."""

    handler_class: type[web_protocol.RequestHandler] = web_protocol.RequestHandler

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        handler_class = self.handler_class

        class Server(web.Server):
            def __call__(self) -> web_protocol.RequestHandler:
                return handler_class(self, loop=self._loop, **self._kwargs)

        server.__class__ = Server  # same object, same state: only __call__ differs
        return server
