"""A real replica in this process over the session's PostgreSQL, for the chaos tools."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from services.db import schema_sql
from tests.services.conftest import RunningService, config_for, run_service


@pytest.fixture
async def db(postgres: Any) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the session's database, with the variables table present and empty."""
    conn = await asyncpg.connect(postgres.dsn)
    try:
        await conn.execute(schema_sql())
        await conn.execute("TRUNCATE public.variables")
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def replica(postgres: Any, db: asyncpg.Connection) -> AsyncIterator[RunningService]:
    async with run_service(config_for(postgres)) as running:
        yield running
