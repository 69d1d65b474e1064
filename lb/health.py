"""Active health checks: every ``interval``, each backend is probed; ``rise``/``fall`` do the rest.

A round starts every ``interval``: it starts a check of each backend whose last check has ended. A
check that takes longer than the interval (up to ``timeout``) delays only that backend's next one.

An HTTP check sends ``GET <path>`` and passes on status 200 only (the service answers 503 while it
drains or its database is down); a TCP check passes when the connect succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Literal

from common.logs import Throttled
from common.net import OUT_OF_RESOURCES
from lb.backends import Backend, BackendPool, describe_error
from lb.periodic import Periodic

log = logging.getLogger("lb.health")

#: The most of a check's answer that is read (the status line is all that matters).
_MAX_ANSWER = 65536


class HealthChecker(Periodic):
    """Owns one task that starts a check of every backend of ``pool`` each ``interval`` seconds
    (one check at a time per backend)."""

    task_name = "lb-health"

    def __init__(
        self,
        pool: BackendPool,
        *,
        mode: Literal["http", "tcp"] = "http",
        path: str = "/healthcheck",
        interval: float = 2.0,
        timeout: float = 1.0,
    ) -> None:
        super().__init__()
        self.pool = pool
        self.mode = mode
        self.path = path
        self.interval = interval
        self.timeout = timeout
        self._unjudged = Throttled(log, logging.WARNING, interval=max(interval, 1.0))

    async def judge(self, backend: Backend) -> None:
        """Check ``backend`` once and apply the result."""
        try:
            passed, detail = await self.check(backend)
        except Exception as exc:  # not foreseen: that check fails, the checks go on
            passed, detail = False, f"check error: {type(exc).__name__}: {exc}"
        if passed is None:
            self._unjudged.log("health checks not judged, this balancer is out of resources: "
                               "%s (%s)", backend.address, detail)
        elif passed:
            self.pool.check_passed(backend, detail)
        else:
            self.pool.check_failed(backend, detail)

    async def check(self, backend: Backend) -> tuple[bool | None, str]:
        """Probe one backend: (passed, what was seen); passed is None when the check could
        not be made here (no descriptor or memory for its socket): no verdict on the backend."""
        try:
            async with asyncio.timeout(self.timeout):
                if self.mode == "tcp":
                    return await self._check_tcp(backend)
                return await self._check_http(backend)
        except TimeoutError:
            return False, "timeout"
        except OSError as exc:
            return None if exc.errno in OUT_OF_RESOURCES else False, describe_error(exc)

    async def _run(self) -> None:
        # Each backend on its own clock: a check that hangs until its timeout delays that
        # backend's next check only, never another backend's (one check at a time each).
        checking: dict[Backend, asyncio.Task[None]] = {}
        try:
            while True:
                checking = {b: task for b, task in checking.items() if not task.done()}
                for backend in self.pool.backends:
                    if backend not in checking:
                        checking[backend] = asyncio.ensure_future(self.judge(backend))
                await asyncio.sleep(self.interval)
        finally:
            tasks = list(checking.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._unjudged.close()

    async def _check_tcp(self, backend: Backend) -> tuple[bool, str]:
        _, writer = await asyncio.open_connection(backend.host, backend.port)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True, "connect ok"

    async def _check_http(self, backend: Backend) -> tuple[bool, str]:
        reader, writer = await asyncio.open_connection(backend.host, backend.port)
        try:
            writer.write(
                f"GET {self.path} HTTP/1.1\r\nHost: {backend.address}\r\n"
                "User-Agent: varstack-lb-check\r\nConnection: close\r\n\r\n".encode("ascii")
            )
            try:
                status_line = await reader.readline()
            except ValueError:  # no line end within the reader's 64 KiB limit
                return False, "not HTTP (no status line)"
            # Read the rest so the backend closes first (its side keeps the TIME_WAIT).
            with contextlib.suppress(OSError, asyncio.LimitOverrunError):
                await reader.read(_MAX_ANSWER)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        parts = status_line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            return False, "not HTTP" if status_line else "closed without an answer"
        status = parts[1]
        return status == "200", f"HTTP {status}"
