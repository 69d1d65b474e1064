"""``python -m services`` / ``varstack-service``: run one replica of the API."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from common.loops import loop_factory, loop_name, run
from services.config import Config, ConfigError, load_config
from services.server import Server

log = logging.getLogger("services")


def configure_logging(config: Config) -> None:
    logging.basicConfig(
        level=config.log_level_number,
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(os.environ, sys.argv[1:] if argv is None else argv)
        factory = loop_factory(config.loop, variable="SERVICE_LOOP")
    except ConfigError as exc:
        print(f"varstack-service: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config)
    log.info("starting with %s on the %s loop", config.redacted(), loop_name(factory))
    return run(
        Server(config).serve(), factory=factory, address=f"{config.host}:{config.port}", log=log
    )


if __name__ == "__main__":
    sys.exit(main())
