"""varstack's variables API: aiohttp over a pool of asyncpg connections."""
