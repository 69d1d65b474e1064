"""``python -m services`` / ``varstack-service``: run one replica of the API."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence

from services.config import Config, ConfigError, load_config
from services.server import Server

log = logging.getLogger("services")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("SERVICE_LOOP=uvloop but uvloop is not installed") from None
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def configure_logging(config: Config) -> None:
    logging.basicConfig(
        level=config.log_level_number,
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(os.environ, sys.argv[1:] if argv is None else argv)
        factory = loop_factory(config.loop)
    except ConfigError as exc:
        print(f"varstack-service: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config)
    loop_name = "uvloop" if factory.__module__.startswith("uvloop") else "asyncio"
    log.info("starting with %s on the %s loop", config.redacted(), loop_name)
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            runner.run(Server(config).serve())
        except OSError as exc:
            log.error("cannot serve on %s:%d: %s", config.host, config.port, exc)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
