"""Every endpoint, both body styles (JSON body on every method, or the query string),
and both answer formats (plain text, or JSON on Accept: application/json)."""

from __future__ import annotations

import json
import re

import aiohttp
import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.services.conftest import RunningService, half_closed_exchange

JSON = {"Accept": "application/json"}


async def stored(db: asyncpg.Connection) -> dict[str, str]:
    rows = await db.fetch("SELECT key, value FROM public.variables")
    return {r["key"]: r["value"] for r in rows}


async def test_healthcheck(service: RunningService, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{service.url}/healthcheck") as r:
        assert r.status == 200
        assert await r.text() == "server is healthy"
        assert r.headers["X-Served-By"] == "test-replica:1"
    async with http.get(f"{service.url}/healthcheck", headers=JSON) as r:
        assert r.status == 200
        assert await r.json() == {"status": "healthy"}


async def test_original_client_sends_json_body_on_every_method(
    service: RunningService, http: aiohttp.ClientSession, clean_db: asyncpg.Connection
) -> None:
    url = service.url
    async with http.post(f"{url}/set_var", json={"key": "k", "value": "v1"}) as r:
        assert (r.status, await r.text()) == (201, "variable created")
    async with http.post(f"{url}/set_var", json={"key": "k", "value": "other"}) as r:
        assert (r.status, await r.text()) == (409, "variable already exists")
    async with http.get(f"{url}/get_var", json={"key": "k"}) as r:
        assert (r.status, await r.text()) == (200, "v1")
        assert r.content_type == "text/plain"
    async with http.put(f"{url}/edit_var", json={"key": "k", "value": "v2"}) as r:
        assert (r.status, await r.text()) == (200, "variable edited")
    assert await stored(clean_db) == {"k": "v2"}
    async with http.delete(f"{url}/delete_var", json={"key": "k"}) as r:
        assert r.status == 204
        assert await r.read() == b""
    async with http.get(f"{url}/get_var", json={"key": "k"}) as r:
        assert (r.status, await r.text()) == (404, "variable not found")
    async with http.put(f"{url}/edit_var", json={"key": "k", "value": "v3"}) as r:
        assert (r.status, await r.text()) == (404, "variable not found")
    async with http.delete(f"{url}/delete_var", json={"key": "k"}) as r:
        assert (r.status, await r.text()) == (404, "variable not found")
    assert await stored(clean_db) == {}


async def test_query_string_style(
    service: RunningService, http: aiohttp.ClientSession, clean_db: asyncpg.Connection
) -> None:
    url = service.url
    async with http.post(f"{url}/set_var", params={"key": "q", "value": "1"}) as r:
        assert r.status == 201
    async with http.get(f"{url}/get_var", params={"key": "q"}) as r:
        assert (r.status, await r.text()) == (200, "1")
    async with http.put(f"{url}/edit_var", params={"key": "q", "value": "2"}) as r:
        assert r.status == 200
    async with http.delete(f"{url}/delete_var", params={"key": "q"}) as r:
        assert r.status == 204
    assert await stored(clean_db) == {}


async def test_same_key_in_query_and_body_is_accepted(
    service: RunningService, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        f"{service.url}/set_var", params={"key": "same"}, json={"key": "same", "value": "v"}
    ) as r:
        assert r.status == 201


async def test_json_answers(service: RunningService, http: aiohttp.ClientSession) -> None:
    url = service.url
    async with http.post(f"{url}/set_var", json={"key": "j", "value": "v"}, headers=JSON) as r:
        assert r.status == 201
        assert await r.json() == {"key": "j", "value": "v"}
    async with http.post(f"{url}/set_var", json={"key": "j", "value": "v"}, headers=JSON) as r:
        assert (r.status, await r.json()) == (409, {"error": "variable already exists"})
    async with http.get(f"{url}/get_var", params={"key": "j"}, headers=JSON) as r:
        assert (r.status, await r.json()) == (200, {"key": "j", "value": "v"})
    async with http.put(f"{url}/edit_var", json={"key": "j", "value": "w"}, headers=JSON) as r:
        assert (r.status, await r.json()) == (200, {"key": "j", "value": "w"})
    async with http.get(f"{url}/get_var", params={"key": "nope"}, headers=JSON) as r:
        assert (r.status, await r.json()) == (404, {"error": "variable not found"})
    async with http.get(f"{url}/get_var", headers=JSON) as r:
        assert r.status == 400
        assert "missing key" in (await r.json())["error"]
    async with http.get(f"{url}/no/such/path", headers=JSON) as r:
        assert r.status == 404
        assert (await r.json())["error"] == "no such endpoint: /no/such/path"


async def test_every_answer_names_the_replica(
    service: RunningService, http: aiohttp.ClientSession
) -> None:
    for method, path in [("GET", "/healthcheck"), ("GET", "/get_var?key=x"),
                         ("POST", "/get_var"), ("GET", "/nowhere"), ("GET", "/metrics")]:
        async with http.request(method, f"{service.url}{path}") as r:
            assert r.headers["X-Served-By"] == "test-replica:1", (method, path)


async def test_wrong_method_is_405_with_allow(
    service: RunningService, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{service.url}/get_var", json={"key": "k"}) as r:
        assert r.status == 405
        assert r.headers["Allow"] == "GET, HEAD"
        assert await r.text() == "method POST is not allowed on /get_var; use GET, HEAD"
    async with http.get(f"{service.url}/set_var", headers=JSON) as r:
        assert r.status == 405
        assert "use POST" in (await r.json())["error"]


@pytest.mark.parametrize(
    "key",
    ["'; DROP TABLE variables; --", "%_\\", "$1", "ключ 🔑 键", "tab\tnew\nline", " spaced ",
     "\u200b\ufeff", "a" * 1024, "€" * 341],
)
async def test_keys_round_trip_verbatim(
    service: RunningService, http: aiohttp.ClientSession, clean_db: asyncpg.Connection, key: str
) -> None:
    value = f"value of {key!r} with 'quotes' and \\backslash"
    async with http.post(f"{service.url}/set_var", json={"key": key, "value": value}) as r:
        assert r.status == 201, await r.text()
    async with http.get(f"{service.url}/get_var", params={"key": key}) as r:
        assert (r.status, await r.text()) == (200, value)
    assert await stored(clean_db) == {key: value}


async def test_empty_value_and_large_value(
    service: RunningService, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{service.url}/set_var", json={"key": "empty", "value": ""}) as r:
        assert r.status == 201
    async with http.get(f"{service.url}/get_var", params={"key": "empty"}) as r:
        assert (r.status, await r.text()) == (200, "")
    big = "x" * 900_000
    async with http.post(f"{service.url}/set_var", json={"key": "big", "value": big}) as r:
        assert r.status == 201
    async with http.get(f"{service.url}/get_var", params={"key": "big"}) as r:
        assert await r.text() == big


text_without_nul = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=200,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(key=text_without_nul.filter(bool), value=text_without_nul)
async def test_any_unicode_round_trips(
    service: RunningService, http: aiohttp.ClientSession, key: str, value: str
) -> None:
    body = json.dumps({"key": key, "value": value})
    headers = {"Content-Type": "application/json", **JSON}
    async with http.delete(f"{service.url}/delete_var", data=body, headers=headers) as r:
        assert r.status in (204, 404)
    async with http.post(f"{service.url}/set_var", data=body, headers=headers) as r:
        assert r.status == 201, await r.text()
    async with http.get(f"{service.url}/get_var", data=body, headers=headers) as r:
        assert await r.json() == {"key": key, "value": value}


async def test_head_healthcheck(service: RunningService, http: aiohttp.ClientSession) -> None:
    async with http.head(f"{service.url}/healthcheck") as r:
        assert r.status == 200


# -- a client that shuts down its sending side after its request (nc -N, a proxy passing it on)


def set_var_request(key: str, value: str) -> bytes:
    body = json.dumps({"key": key, "value": value}).encode()
    return (b"POST /set_var HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body)


async def test_a_request_then_a_half_close_gets_its_answer(
    service: RunningService, clean_db: asyncpg.Connection
) -> None:
    reply = await half_closed_exchange(service, set_var_request("hc", "v"))
    assert reply.startswith(b"HTTP/1.1 201 Created\r\n")
    assert reply.endswith(b"\r\n\r\nvariable created")
    assert await stored(clean_db) == {"hc": "v"}


async def test_pipelined_requests_then_a_half_close_are_all_answered_in_order(
    service: RunningService, clean_db: asyncpg.Connection
) -> None:
    get = b"GET /get_var?key=p1 HTTP/1.1\r\nHost: x\r\n\r\n"
    reply = await half_closed_exchange(service, set_var_request("p1", "one") + get + get)
    # Bodies carry no line end: a status line may follow the previous body on one line.
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)
    assert statuses == [b"201", b"200", b"200"]
    assert reply.endswith(b"one")


async def test_a_body_cut_short_by_the_half_close_is_not_stored(
    service: RunningService, clean_db: asyncpg.Connection
) -> None:
    whole = set_var_request("cut", "v")
    reply = await half_closed_exchange(service, whole[:-5])
    assert b"201" not in reply
    assert await stored(clean_db) == {}


async def test_a_half_close_on_an_idle_keep_alive_connection_closes_it(
    service: RunningService,
) -> None:
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", service.server.port)
    try:
        writer.write(b"GET /healthcheck HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"server is healthy"), 10)
        assert head.startswith(b"HTTP/1.1 200 OK")
        writer.write_eof()
        # The server closes at once, not after its keep-alive timeout (75 s).
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_refused_body_s_sender_that_stops_is_let_go_at_once(
    service: RunningService, clean_db: asyncpg.Connection
) -> None:
    """After a 413 the server reads and drops the rest of the body for a while (so the client
    sees the answer, not a reset); a client that half-closes has no rest to send."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", service.server.port)
    try:
        writer.write(b"POST /set_var HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n"
                     + b"x" * 1000)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 413 ")
        writer.write_eof()
        # Well before the 10 s the server would otherwise keep reading.
        await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    assert await stored(clean_db) == {}


async def test_pipelined_whole_request_then_one_cut_short_the_whole_one_is_answered(
    service: RunningService, clean_db: asyncpg.Connection
) -> None:
    whole = set_var_request("first", "v")
    cut = set_var_request("second", "w")[:-5]
    reply = await half_closed_exchange(service, whole + cut)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", reply) == [b"201"]
    assert await stored(clean_db) == {"first": "v"}
