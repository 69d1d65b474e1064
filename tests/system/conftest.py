"""The whole topology as real processes (embedded PostgreSQL, 3 replicas, the balancer),
tuned to show faults within seconds, and the checks every scenario ends with."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from chaos.load import Load, LoadConfig
from chaos.system import (
    Baseline,
    Lines,
    check_durability,
    check_leaks,
    stack_config,
)
from stack.process import Output
from stack.supervisor import Stack


def loop_name() -> str:
    """The loop this test runs under; the stack's programs run under the same one."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


StackFactory = Callable[..., contextlib.AbstractAsyncContextManager[tuple[Stack, Lines]]]


@pytest.fixture
def system(tmp_path: Path) -> StackFactory:
    """``async with system(**overrides) as (stack, lines)``: the topology, stopped after;
    its output is printed when the test fails (pytest shows captured stdout)."""
    count = 0

    @contextlib.asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[tuple[Stack, Lines]]:
        nonlocal count
        count += 1
        lines = Lines()
        config = stack_config(tmp_path / f"stack{count}", loop=loop_name(), **overrides)
        stack = Stack(config, output=Output(lines))
        try:
            await stack.start()
            yield stack, lines
        finally:
            await stack.stop()
            print(f"--- the stack's last output ({len(lines.lines)} lines) ---")
            print(lines.tail(80))

    return start


def load_for(stack: Stack, run_id: str, **overrides: Any) -> Load:
    config = LoadConfig(stack.config.client_host, stack.config.lb_port, run_id=run_id,
                        **overrides)
    return Load(config)


async def finish(stack: Stack, load: Load, base: Baseline) -> None:
    """What every scenario ends with: nothing acknowledged lost, the history linearizable,
    nothing leaked."""
    assert stack.database is not None
    durable = await check_durability(load, stack.database.dsn)
    print(f"durability: {durable.acknowledged_once} write-once keys acknowledged, "
          f"lost: {durable.lost_once[:10]}; {durable.acknowledged_writes} acknowledged "
          f"writes on contended keys; history: {durable.history}")
    assert not durable.lost_once, f"acknowledged writes lost: {durable.lost_once[:20]}"
    assert durable.history.ok, str(durable.history)
    leaks = await check_leaks(stack, base)
    print(f"leak check: {leaks.numbers}")
    assert leaks.ok, leaks.problems
