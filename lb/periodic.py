"""A background loop with one owner: started once, stopped by cancelling and awaiting it."""

from __future__ import annotations

import asyncio
import contextlib


class Periodic:
    """Subclasses give ``task_name`` and ``_run()``; the server calls ``start`` and ``stop``."""

    task_name = "lb-periodic"

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        raise NotImplementedError
