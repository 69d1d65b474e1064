"""Fixtures for the service: the real server on an ephemeral port, a clean table per test."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from chaos.system import stopped_postgres
from services.api import DATABASE
from services.config import Config
from services.db import Database, schema_sql
from services.server import Server
from stack.pg import EmbeddedPostgres

ROOT = Path(__file__).resolve().parents[2]


def config_for(pg: Any, **overrides: Any) -> Config:
    """A service config on 127.0.0.1, an ephemeral port, and the given PostgreSQL."""
    base = Config(
        host="127.0.0.1",
        port=0,
        served_by="test-replica:1",
        pg_host=pg.host,
        pg_port=int(pg.port),
        pg_user=pg.user,
        pg_password=pg.password,
        pg_dbname=pg.dbname,
        access_log="off",
        db_retry_max_delay=0.2,
        # Tests of the acquire timeout set their own; elsewhere a stall of a loaded machine
        # must not turn a queued request into "database busy".
        pool_acquire_timeout=30.0,
    )
    return dataclasses.replace(base, **overrides)


def stopped(pg: EmbeddedPostgres) -> contextlib.AbstractContextManager[None]:
    """The whole server SIGSTOPped (a frozen machine, a stalled VM) for the block, then SIGCONT."""
    assert pg.pid is not None
    return stopped_postgres(pg.pid)


@dataclass
class RunningService:
    server: Server
    url: str

    @property
    def database(self) -> Database:
        return self.server.app[DATABASE]


@contextlib.asynccontextmanager
async def run_service(config: Config, *, wait_ready: bool = True) -> AsyncIterator[RunningService]:
    """The service in this process, like uvicorn's run_server(): started, then shut down."""
    server = Server(config)
    await server.startup()
    try:
        running = RunningService(server, f"http://127.0.0.1:{server.port}")
        if wait_ready:
            async with asyncio.timeout(30):
                await running.database.ready.wait()
        yield running
    finally:
        await server.shutdown()


async def half_closed_exchange(service: RunningService, request: bytes) -> bytes:
    """Send ``request`` as raw bytes, shut down the sending side, and read until the server
    closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", service.server.port)
    try:
        writer.write(request)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10)  # returns once the server closed
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.fixture
async def clean_db(postgres: Any) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the session's database, with the variables table present and empty."""
    conn = await asyncpg.connect(postgres.dsn)
    try:
        await conn.execute(schema_sql())
        await conn.execute("TRUNCATE public.variables")
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def service(postgres: Any, clean_db: asyncpg.Connection) -> AsyncIterator[RunningService]:
    async with run_service(config_for(postgres)) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def running_loop_name() -> str:
    return "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"


@dataclass
class ServiceProcess:
    """``python -m services`` as a real child process."""

    proc: asyncio.subprocess.Process
    port: int
    output: list[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 20.0) -> int:
        async with asyncio.timeout(timeout):
            return await self.proc.wait()


@contextlib.asynccontextmanager
async def service_process(
    env: dict[str, str], port: int, *, prefix: Sequence[str] = (), until: str = "ready after"
) -> AsyncIterator[ServiceProcess]:
    """Start the service as a subprocess on ``port`` (under this test's loop), its command
    line after ``prefix``, and wait until it logs ``until`` (by default: its database is
    ready); kill it on the way out if it still runs."""
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PGSQL_", "SERVICE_"))},
        "PYTHONPATH": str(ROOT),
        "SERVICE_HOST": "127.0.0.1",
        "SERVICE_PORT": str(port),
        "SERVICE_LOOP": running_loop_name(),
        **env,
    }
    proc = await asyncio.create_subprocess_exec(
        *prefix, sys.executable, "-m", "services",
        env=full_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output: list[str] = []
    serving = asyncio.Event()

    async def pump() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            text = line.decode(errors="replace").rstrip()
            output.append(text)
            if until in text:
                serving.set()

    reader = asyncio.create_task(pump())
    try:
        waiters = [asyncio.ensure_future(serving.wait()), asyncio.ensure_future(proc.wait())]
        try:
            async with asyncio.timeout(20):
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        if not serving.is_set():
            raise AssertionError(
                f"service exited before it logged {until!r}:\n" + "\n".join(output)
            )
        yield ServiceProcess(proc, port, output)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(reader, 5)
