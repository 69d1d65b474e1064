"""Shared fixtures: a real PostgreSQL for the session, and every async test under two loops."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from stack.pg import EmbeddedPostgres, PostgresAddress

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a normal dependency on Linux
    uvloop = None


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run every async test under the default loop and under uvloop."""
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    if uvloop is not None:
        factories["uvloop"] = uvloop.new_event_loop
    return factories


class ExternalPostgres(PostgresAddress):
    """The PostgreSQL that ``PGSQL_*`` names, when the user points the tests at one."""

    def __init__(self) -> None:
        self.host = os.environ["PGSQL_HOST"]
        self.port = int(os.environ.get("PGSQL_PORT", "5432"))
        self.user = os.environ.get("PGSQL_USER", "postgres")
        self.password = os.environ.get("PGSQL_PASSWORD", "")
        self.dbname = os.environ.get("PGSQL_DBNAME", "se_lab6")


@contextlib.contextmanager
def _postgres_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: another pytest session of the same user resets
    # /tmp/pytest-of-<user> to 0700, which locks the pgserver user out mid-run.
    base = Path(tempfile.mkdtemp(prefix="varstack-pg-"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[EmbeddedPostgres | ExternalPostgres]:
    """The session's PostgreSQL: the one ``PGSQL_HOST`` names, else a throwaway embedded one."""
    if os.environ.get("PGSQL_HOST"):
        yield ExternalPostgres()
        return
    with _postgres_dir() as base:
        server = EmbeddedPostgres(
            data_dir=base / "data", log_file=base / "postgres.log",
            password=f"pw-{secrets.token_hex(8)}",  # distinctive, so tests can look for leaks
        )
        server.start()
        try:
            yield server
        finally:
            server.stop("fast")


@pytest.fixture
def own_postgres() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of this test's own, to stop, kill and restart (always embedded)."""
    with _postgres_dir() as base:
        server = EmbeddedPostgres(data_dir=base / "pgdata", log_file=base / "postgres.log")
        try:
            yield server
        finally:
            server.stop("immediate")
