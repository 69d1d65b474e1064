"""One replica's server: bind, serve, and one ordered shutdown.

Shutdown order (uvicorn's): the signal handler only sets a flag; then /healthcheck turns
503 (draining), the listening socket closes, idle keep-alive connections close, in-flight
requests get SERVICE_SHUTDOWN_TIMEOUT to finish (then are cancelled), and last the pool
closes.  A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from aiohttp import web

from common.net import ListenError, host_port, listening_socket
from common.signals import stop_signals
from services import connection
from services.api import Lifecycle, access_logger_class, create_app
from services.config import Config

log = logging.getLogger("services.server")

#: Ctrl-C, a container's stop, and the terminal closing: each starts the drain.


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.lifecycle = Lifecycle()
        self.should_exit = asyncio.Event()
        self.started = asyncio.Event()
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._signals_seen = 0

    @property
    def app(self) -> web.Application:
        assert self._runner is not None, "the server is not started"
        return self._runner.app

    async def serve(self, *, handle_signals: bool = True) -> None:
        if handle_signals:
            self._install_signal_handlers()
        try:
            await self.startup()
            await self.should_exit.wait()
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        cfg = self.config
        try:
            sock = listening_socket(cfg.host, cfg.port, backlog=1024)
        except OSError as exc:
            raise ListenError(
                f"{host_port(cfg.host, cfg.port)} (SERVICE_HOST, SERVICE_PORT)", exc
            ) from exc
        self.port = int(sock.getsockname()[1])
        served_by = cfg.served_by_for(self.port)
        app = create_app(cfg, served_by=served_by, lifecycle=self.lifecycle)
        self._runner = connection.AppRunner(
            app,
            handle_signals=False,
            shutdown_timeout=cfg.shutdown_timeout,
            # A compressed body is refused (415), never inflated: not even the bytes the
            # server reads and drops after the answer, which aiohttp would inflate for 10 s.
            auto_decompress=False,
            access_log_class=access_logger_class(
                "info" if cfg.access_log == "off" else cfg.access_log
            ),
            access_log=None if cfg.access_log == "off" else logging.getLogger("services.access"),
        )
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        log.info("serving on http://%s:%d as %s", cfg.host, self.port, served_by)
        self.started.set()

    async def shutdown(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self.lifecycle.draining = True
        log.info(
            "shutting down: no new connections; in-flight requests get %.1fs",
            self.config.shutdown_timeout,
        )
        await runner.cleanup()
        log.info("stopped")

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in stop_signals():
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals_seen += 1
        if self._signals_seen > 1:
            log.warning("%s again: exiting now", sig.name)
            os._exit(1)
        log.info("%s received", sig.name)
        self.should_exit.set()
