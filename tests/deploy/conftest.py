"""Fixtures for the tests that run ``python -m stack`` for real."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos.system import free_port_run
from tests.deploy.supervised import Supervisor


@pytest.fixture
def stack_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGSQL_", "LB_", "STACK_"))}
    first = free_port_run(4)  # below the ephemeral range: not handed out meanwhile
    env.update({
        "SERVER_COUNT": "2",
        "LB_HOST": "127.0.0.1",
        "LB_PORT": str(first),
        "LB_ADMIN_PORT": str(first + 1),
        "STACK_BACKEND_PORT": str(first + 2),
        "STACK_DATA_DIR": str(tmp_path / "varstack"),
        "STACK_RESTART_DELAY": "1",  # compose's 5 s, shortened to keep the test short
        "SERVICE_ACCESS_LOG": "off",
    })
    return env


@pytest.fixture
def supervisor(stack_env: dict[str, str]) -> Iterator[Supervisor]:
    sup = Supervisor(stack_env)
    try:
        yield sup
    finally:
        sup.close()
