"""``python -m lb`` / ``varstack-lb``: run the balancer until SIGTERM, SIGINT or SIGHUP.

The first signal starts the drain (stop listening, let connections finish until
``LB_DRAIN_TIMEOUT``); a second one closes what is left at once.  The handlers only set flags; the
shutdown itself is :meth:`lb.server.Server.shutdown`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import resource
import signal
import sys
from collections.abc import Sequence
from typing import Any

from common.loops import apply_io_uring, loop_factory, loop_name, run
from common.net import host_port
from common.signals import stop_signals
from lb.config import Config, ConfigError
from lb.server import Server

log = logging.getLogger("lb")

#: A container's stop, Ctrl-C, and the terminal closing: each starts the drain.
#: Descriptors kept for everything that is not a proxied connection (listeners, checks, logs).
_FD_RESERVE = 64
_FD_RESERVE_MIN = 32
#: At most one log line per this many seconds about accept() running out of descriptors.
_ACCEPT_ERROR_LOG_INTERVAL = 10.0


def fit_fd_limit(config: Config) -> Config:
    """Like HAProxy: take the hard descriptor limit; and like HAProxy's maxconn derived from it,
    lower the connection cap to what the limit holds (two descriptors per proxied connection,
    and some for the listeners, checks and logs). Past the cap clients wait in the backlog and
    are served as connections end; past the limit they were accepted, then dropped for want of
    a descriptor to reach a backend with."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return config
    # Under a small limit, still room for what is open before any client (about 16 under
    # uvloop: the loop's own, listeners, logs) and a check per backend.
    reserve = min(_FD_RESERVE, max(_FD_RESERVE_MIN, soft // 4))
    fits = max(1, (soft - reserve) // 2)
    if config.max_connections <= fits:
        return config
    log.warning(
        "LB_MAX_CONNECTIONS=%d needs about %d descriptors but the limit (ulimit -n) is %d: "
        "serving at most %d connections at once; raise the limit for more",
        config.max_connections, 2 * config.max_connections + reserve, soft, fits,
    )
    return dataclasses.replace(config, max_connections=fits)


class _AcceptErrorFilter:
    """The default loop reports every failed accept(); say it once per interval instead."""

    def __init__(self) -> None:
        self.last = -_ACCEPT_ERROR_LOG_INTERVAL
        self.suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == "socket.accept() out of system resource":
            now = loop.time()
            if now - self.last < _ACCEPT_ERROR_LOG_INTERVAL:
                self.suppressed += 1
                return
            log.error("accept() failed: %s (%d more since the last report); retrying",
                      context.get("exception"), self.suppressed)
            self.last = now
            self.suppressed = 0
            return
        loop.default_exception_handler(context)


async def serve(config: Config) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_AcceptErrorFilter())
    server = Server(config)
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("%s again: closing every connection now", signal.Signals(signum).name)
            server.force_stop()
        else:
            log.info("%s: draining", signal.Signals(signum).name)
            stop.set()

    signals = stop_signals()
    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await server.serve(stop)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = Config.from_env(argv=sys.argv[1:] if argv is None else argv)
        factory = loop_factory(config.loop, variable="LB_LOOP")
    except ConfigError as exc:
        print(f"varstack-lb: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level_number,
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = fit_fd_limit(config)
    log.info("varstack-lb starting on the %s loop: %s", loop_name(factory), config)
    factory = apply_io_uring(factory, config.io_uring, variable="LB_IO_URING", log=log)
    return run(serve(config), factory=factory, address=host_port(config.host, config.port), log=log)


if __name__ == "__main__":
    sys.exit(main())
