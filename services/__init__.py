"""varstack's variables API: aiohttp over an asyncpg pool."""
