"""``python -m stack`` / ``varstack-stack`` / ``make run``: the whole topology in the foreground.

Uvicorn's shape: the configuration is read once; the signal handlers only set a flag (a
second signal sets the force flag, which turns every drain into a kill); one ordered
shutdown runs whatever stopped the stack (a signal, or a process past its restart policy).
SIGHUP (the terminal closed, the SSH session dropped) stops it like SIGTERM: the children
run in sessions of their own, so nothing else would stop them.
Exit status: 0 after a signal, 1 when the stack could not start or failed, 2 for a bad
configuration (the supervisor's own, or a replica's or the balancer's, checked up front).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence

from common.signals import stop_signals
from stack.config import ConfigError, StackConfig
from stack.supervisor import Stack, StackError


async def serve(config: StackConfig) -> int:
    stack = Stack(config)
    try:
        stack.check_config()
    except ConfigError as exc:
        print(f"varstack-stack: configuration error: {exc}", file=sys.stderr)
        return 2
    should_exit = asyncio.Event()
    loop = asyncio.get_running_loop()

    def handle(sig: signal.Signals) -> None:
        if should_exit.is_set():
            stack.log(f"{sig.name} again: killing what is still running")
            stack.force_stop.set()
        else:
            stack.log(f"{sig.name}: stopping (again to kill at once)")
            should_exit.set()

    signals = stop_signals()
    for sig in signals:
        loop.add_signal_handler(sig, handle, sig)
    stack.log(f"starting with {config.redacted()}")
    starting = asyncio.create_task(stack.start(), name="start")
    exiting = asyncio.create_task(should_exit.wait(), name="signal")
    failing = asyncio.create_task(stack.failed.wait(), name="failed")
    status = 0
    try:
        await asyncio.wait({starting, exiting}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # a signal during start: start() stops what it started
            starting.cancel()
        try:
            await starting
        except asyncio.CancelledError:
            return 0
        except StackError:  # start() said why, then stopped what it had started
            return 1
        for line in stack.banner():
            stack.log(line)
        await asyncio.wait({exiting, failing}, return_when=asyncio.FIRST_COMPLETED)
        status = 1 if failing.done() and not exiting.done() else 0
    finally:
        exiting.cancel()
        failing.cancel()
        await stack.stop()
        for sig in signals:
            loop.remove_signal_handler(sig)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args:
        print(
            "usage: python -m stack  (no arguments: every setting is an environment variable; "
            "see the README's configuration table)",
            file=sys.stderr,
        )
        return 0 if args[0] in ("-h", "--help") else 2
    try:
        config = StackConfig.from_env(os.environ)
    except ConfigError as exc:
        print(f"varstack-stack: configuration error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
