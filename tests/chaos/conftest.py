"""The chaos tools run against a real replica in this process, over the session's PostgreSQL:
the service tests' own fixtures, under the names these tests use."""

from __future__ import annotations

import asyncpg
import pytest

from tests.services.conftest import RunningService, clean_db, service

__all__ = ["clean_db", "db", "replica", "service"]


@pytest.fixture
def db(clean_db: asyncpg.Connection) -> asyncpg.Connection:
    return clean_db


@pytest.fixture
def replica(service: RunningService) -> RunningService:
    return service
