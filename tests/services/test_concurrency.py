"""Each operation is one atomic statement: no check-then-write race."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import asyncpg

from tests.services.conftest import RunningService


async def test_100_concurrent_creates_of_one_key_give_exactly_one_201(
    service: RunningService, clean_db: asyncpg.Connection
) -> None:
    connector = aiohttp.TCPConnector(limit=100, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def create(i: int) -> int:
            async with http.post(
                f"{service.url}/set_var", json={"key": "race", "value": f"writer-{i}"}
            ) as r:
                return r.status

        statuses = Counter(await asyncio.gather(*(create(i) for i in range(100))))
    assert statuses == {201: 1, 409: 99}
    rows = await clean_db.fetch("SELECT value FROM public.variables WHERE key = 'race'")
    assert len(rows) == 1


async def test_concurrent_deletes_of_one_key_give_exactly_one_204(
    service: RunningService, clean_db: asyncpg.Connection
) -> None:
    await clean_db.execute("INSERT INTO public.variables VALUES ('gone', 'v')")
    async with aiohttp.ClientSession() as http:

        async def delete() -> int:
            async with http.delete(f"{service.url}/delete_var", params={"key": "gone"}) as r:
                return r.status

        statuses = Counter(await asyncio.gather(*(delete() for _ in range(50))))
    assert statuses == {204: 1, 404: 49}
