"""Every client mistake: a 4xx with a message that names it, never a 500, nothing stored."""

from __future__ import annotations

import io
import json
import logging

import aiohttp
import asyncpg
import pytest
import yarl
from multidict import CIMultiDict

from tests.services.conftest import RunningService, half_closed_exchange

JSON_CT = {"Content-Type": "application/json"}

# (method, path, raw body or None, expected status, words the message must contain)
CASES: list[tuple[str, str, bytes | None, int, str]] = [
    ("POST", "/set_var", b'{"key": "a", "value": ', 400, "not valid JSON"),
    ("POST", "/set_var", b"not json at all", 400, "not valid JSON"),
    ("POST", "/set_var", b'["key", "value"]', 400, "must be a JSON object"),
    ("POST", "/set_var", b'"key"', 400, "must be a JSON object"),
    ("POST", "/set_var", b"null", 400, "must be a JSON object"),
    ("POST", "/set_var", b"42", 400, "must be a JSON object"),
    ("POST", "/set_var", b'{"value": "v"}', 400, "missing key"),
    ("POST", "/set_var", b'{"key": "k"}', 400, "missing value"),
    ("POST", "/set_var", b"", 400, "missing key"),
    ("POST", "/set_var", b'{"key": 5, "value": "v"}', 400, "key must be a string, got a number"),
    ("POST", "/set_var", b'{"key": null, "value": "v"}', 400, "key must be a string, got null"),
    ("POST", "/set_var", b'{"key": ["k"], "value": "v"}', 400, "got an array"),
    ("POST", "/set_var", b'{"key": "k", "value": null}', 400, "value must be a string, got null"),
    ("POST", "/set_var", b'{"key": "k", "value": {"a": 1}}', 400, "got an object"),
    ("POST", "/set_var", b'{"key": "k", "value": ["a"]}', 400, "got an array"),
    ("POST", "/set_var", b'{"key": true, "value": "v"}', 400, "key must be a string, got a bool"),
    ("POST", "/set_var", b'{"key": 1.5, "value": "v"}', 400, "key must be a string, got a number"),
    ("POST", "/set_var", b'{"key": "k", "value": NaN}', 400, "not valid JSON (NaN is not JSON)"),
    ("POST", "/set_var", b'{"key": "k", "value": -Infinity}', 400, "-Infinity is not JSON"),
    ("POST", "/set_var", b'{"key": "", "value": "v"}', 400, "key must not be empty"),
    ("POST", "/set_var", b'{"key": "a\\u0000b", "value": "v"}', 400, "key must not contain NUL"),
    ("POST", "/set_var", b'{"key": "k", "value": "\\u0000"}', 400, "value must not contain NUL"),
    ("POST", "/set_var", b'{"key": "\\ud800", "value": "v"}', 400, "lone surrogate"),
    ("POST", "/set_var", b'{"key": "k", "value": "\\udfff"}', 400, "lone surrogate"),
    ("POST", "/set_var", b'{"key": "\xff\xfe", "value": "v"}', 400, "not valid UTF-8"),
    ("POST", "/set_var", b'{"key": "k", "value": "\xc3"}', 400, "not valid UTF-8"),
    ("POST", "/set_var", b'{"key": "' + b"a" * 1025 + b'", "value": "v"}', 400,
     "longer than 1024 bytes"),
    ("POST", "/set_var", b'{"key": "' + "€".encode() * 342 + b'", "value": "v"}', 400,
     "longer than 1024 bytes"),
    ("POST", "/set_var", b"[" * 100_000 + b"]" * 100_000, 400, "not valid JSON"),
    ("POST", "/set_var", b'{"key": NaN, "value": "v"}', 400, "not valid JSON (NaN is not JSON)"),
    ("POST", "/set_var", b'{"key": "a\tb", "value": "v"}', 400,
     "not valid JSON (Invalid control character at line 1 column 11)"),
    ("POST", "/set_var", b'{"key": "k",\n "value": }', 400, "at line 2 column 11"),
    ("POST", "/set_var", '{"key": "k", "value": "\u00e9"}'.encode("utf-16-le") + b"\x00\xd8", 400,
     "not valid UTF-16-LE"),
    ("POST", "/set_var?key=a&key=b", b'{"value": "v"}', 400, "more than once"),
    ("POST", "/set_var?key=other", b'{"key": "k", "value": "v"}', 400, "different values"),
    ("POST", "/set_var?key=%ff", b'{"value": "v"}', 400, "query string is not valid UTF-8"),
    ("POST", "/set_var?key=%00", b'{"value": "v"}', 400, "NUL"),
    ("POST", "/set_var?key=p%zz1", b'{"value": "v"}', 400,
     "query string has a bad percent-escape (%zz); send a literal % as %25"),
    ("POST", "/set_var?key=k&value=v%", None, 400, "bad percent-escape (%)"),
    ("GET", "/get_var?key=%4", None, 400, "bad percent-escape (%4)"),
    ("PUT", "/edit_var", b'{"key": "k"}', 400, "missing value"),
    ("PUT", "/edit_var", b"{", 400, "not valid JSON"),
    ("GET", "/get_var", None, 400, "missing key"),
    ("GET", "/get_var", b'{"key": 1}', 400, "key must be a string"),
    ("GET", "/get_var?key=", None, 400, "key must not be empty"),
    ("DELETE", "/delete_var", b"[]", 400, "must be a JSON object"),
    ("DELETE", "/delete_var?key=%c3%28", None, 400, "not valid UTF-8"),
    ("PATCH", "/edit_var", b'{"key": "k", "value": "v"}', 405, "not allowed"),
    ("GET", "/delete_var?key=k", None, 405, "not allowed"),
    ("POST", "/healthcheck", None, 405, "not allowed"),
    ("POST", "/set_var", b'{"key": "k", "value": "' + b"x" * (1024 * 1024) + b'"}', 413,
     "larger than 1048576 bytes"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "words"), CASES,
    ids=[f"{m} {p[:30]} {(b or b'')[:24]!r}" for m, p, b, _, _ in CASES],
)
async def test_bad_request_is_named_and_nothing_is_stored(
    service: RunningService,
    http: aiohttp.ClientSession,
    clean_db: asyncpg.Connection,
    method: str,
    path: str,
    body: bytes | None,
    status: int,
    words: str,
) -> None:
    data = io.BytesIO(body) if body is not None and len(body) > 65536 else body
    url = yarl.URL(f"{service.url}{path}", encoded=True)  # sent as written, bad escapes too
    async with http.request(
        method, url, data=data, headers=JSON_CT if body is not None else None
    ) as r:
        text = await r.text()
        assert r.status == status, text
        assert words in text
    assert await clean_db.fetchval("SELECT count(*) FROM public.variables") == 0
    async with http.get(f"{service.url}/healthcheck") as r:
        assert r.status == 200


async def test_chunked_body_over_the_limit_is_413(
    service: RunningService, http: aiohttp.ClientSession, clean_db: asyncpg.Connection
) -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        yield b'{"key": "k", "value": "'
        for _ in range(20):
            yield b"y" * 65536
        yield b'"}'

    async with http.post(f"{service.url}/set_var", data=chunks(), headers=JSON_CT) as r:
        assert r.status == 413
    assert await clean_db.fetchval("SELECT count(*) FROM public.variables") == 0


async def test_form_content_type_with_json_body_still_parses(
    service: RunningService, http: aiohttp.ClientSession
) -> None:
    # `curl -d '{"key": ...}'` sends application/x-www-form-urlencoded: be kind to it.
    async with http.post(
        f"{service.url}/set_var", data=b'{"key": "c", "value": "v"}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ) as r:
        assert r.status == 201


async def test_garbage_http_does_not_hurt_the_server(service: RunningService) -> None:
    import asyncio

    host, port = "127.0.0.1", service.server.port
    for garbage in [b"\x00\xff\x13\x37\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                    b"GET /healthcheck HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
                    b"POST /set_var HTTP/1.1\r\nContent-Length: 10\r\n\r\n{"]:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(garbage)
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await writer.wait_closed()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /healthcheck HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    reply = await asyncio.wait_for(reader.read(), 10)
    assert reply.startswith(b"HTTP/1.1 200")
    writer.close()
    await writer.wait_closed()


# Every coding is refused by the service itself (415), never inflated: not even br, which
# aiohttp's parser would refuse (400) were it decoding, nor a coding hidden behind a first
# header that says identity.
@pytest.mark.parametrize(
    ("encodings", "named"),
    [
        (["gzip"], "gzip"),
        (["deflate"], "deflate"),
        (["br"], "br"),
        (["x-unknown"], "x-unknown"),
        (["identity", "gzip"], "gzip"),
        (["identity, GZIP"], "gzip"),
        (["gzip, deflate"], "gzip, deflate"),
    ],
)
@pytest.mark.parametrize("body", ["bomb", "not gzip at all"])
async def test_compressed_bodies_are_refused_never_inflated_and_the_connection_closed(
    service: RunningService, clean_db: asyncpg.Connection, encodings: list[str], named: str,
    body: str,
) -> None:
    import asyncio
    import gzip

    # A gzip bomb: 1 MiB of zeros squeezes to about 1 kB. Bytes that are not gzip at all show
    # nothing is inflated: a server decoding them would answer 400 "Can not decode".
    payload = (gzip.compress(b'{"key": "k", "value": "' + b"0" * (1 << 20) + b'"}')
               if body == "bomb" else b"\x00not gzip\xff" * 100)
    headers = "".join(f"Content-Encoding: {value}\r\n" for value in encodings)
    reader, writer = await asyncio.open_connection("127.0.0.1", service.server.port)
    writer.write(
        f"POST /set_var HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"{headers}Content-Length: {len(payload)}\r\n\r\n".encode() + payload
    )
    reply = await asyncio.wait_for(reader.read(), 10)  # read() returns: the server closed
    writer.close()
    await writer.wait_closed()
    assert reply.split(b" ")[1] == b"415", reply
    assert f"Content-Encoding {named} is not accepted".encode() in reply
    assert await clean_db.fetchval("SELECT count(*) FROM public.variables") == 0


async def test_an_empty_content_encoding_is_no_coding(
    service: RunningService, http: aiohttp.ClientSession
) -> None:
    headers = {**JSON_CT, "Content-Encoding": ""}
    body = b'{"key": "plain", "value": "v"}'
    async with http.post(f"{service.url}/set_var", data=body, headers=headers) as r:
        assert r.status == 201


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        (b"8080", "8080"),
        (b"-0", "-0"),
        (b"1.50", "1.50"),
        (b"1e400", "1e400"),  # past a float: kept as written, not read as infinity
        (b"1" * 5000, "1" * 5000),  # past Python's int digit limit: never converted
        (b"true", "true"),
        (b"false", "false"),
    ],
)
async def test_a_number_or_boolean_value_is_stored_as_its_json_text(
    service: RunningService, http: aiohttp.ClientSession, value: bytes, stored: str
) -> None:
    # The original passed it to psycopg, and PostgreSQL cast it into the text column.
    body = b'{"key": "n", "value": ' + value + b"}"
    async with http.post(f"{service.url}/set_var", data=body, headers=JSON_CT) as r:
        assert r.status == 201, await r.text()
    async with http.get(f"{service.url}/get_var?key=n") as r:
        assert (r.status, await r.text()) == (200, stored)
    body = b'{"key": "n", "value": ' + value + b"}"
    async with http.put(f"{service.url}/edit_var", data=body,
                        headers={**JSON_CT, "Accept": "application/json"}) as r:
        assert (r.status, await r.json()) == (200, {"key": "n", "value": stored})


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"])
async def test_a_utf16_or_utf32_json_body_is_read_as_the_original_read_it(
    service: RunningService, http: aiohttp.ClientSession, encoding: str
) -> None:
    body = '{"key": "wide", "value": "été ✓"}'.encode(encoding)
    async with http.post(f"{service.url}/set_var", data=body, headers=JSON_CT) as r:
        assert r.status == 201, await r.text()
    async with http.get(f"{service.url}/get_var?key=wide") as r:
        assert await r.text() == "été ✓"


async def test_a_form_body_is_told_to_send_json(
    service: RunningService, http: aiohttp.ClientSession, clean_db: asyncpg.Connection
) -> None:
    async with http.post(f"{service.url}/set_var", data={"key": "f", "value": "v"}) as r:
        assert r.status == 400
        assert "form fields are not read: send JSON, or ?key=...&value=... in the URL" in (
            await r.text())
    assert await clean_db.fetchval("SELECT count(*) FROM public.variables") == 0


@pytest.mark.parametrize(
    "body", [b'{"key": "f", "value": ', b" \r\n\t[1, 2", b"\n{key=f&value=v}", b'{"a": 1}{'])
@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "multipart/form-data; boundary=b"])
async def test_broken_json_under_a_form_content_type_gets_no_form_hint(
    service: RunningService, http: aiohttp.ClientSession, clean_db: asyncpg.Connection,
    body: bytes, content_type: str,
) -> None:
    # `curl -d '{"key": ...'` says form: a body that starts as JSON is JSON gone wrong.
    headers = {"Content-Type": content_type}
    async with http.post(f"{service.url}/set_var", data=body, headers=headers) as r:
        text = await r.text()
        assert r.status == 400, text
        assert text.startswith("request body is not valid JSON (")
        assert "form" not in text
    assert await clean_db.fetchval("SELECT count(*) FROM public.variables") == 0


async def test_a_transfer_coding_other_than_chunked_is_501(
    service: RunningService, clean_db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import gzip

    payload = gzip.compress(b'{"key": "g", "value": "v"}')
    reader, writer = await asyncio.open_connection("127.0.0.1", service.server.port)
    writer.write(b"POST /set_var HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                 + f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n")
    reply = await asyncio.wait_for(reader.read(), 10)  # read() returns: the server closed
    writer.close()
    await writer.wait_closed()
    assert reply.split(b" ")[1] == b"501", reply
    assert b"Transfer-Encoding gzip is not supported" in reply
    assert await clean_db.fetchval("SELECT count(*) FROM public.variables") == 0


def answer_of(reply: bytes) -> tuple[int, str]:
    """The status and the message of a raw answer, plain text or ``{"error": ...}``."""
    head, _, body = reply.partition(b"\r\n\r\n")
    if b"\r\nContent-Type: application/json" in head:
        return int(head.split(b" ")[1]), json.loads(body)["error"]
    return int(head.split(b" ")[1]), body.decode("utf-8")


def assert_logged_whole(caplog: pytest.LogCaptureFixture) -> None:
    """No error logged, and every line the log got can be written out as UTF-8 (a lone
    surrogate in one is a "--- Logging error ---" on the service's stdout instead)."""
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    for record in caplog.records:
        caplog.handler.format(record).encode("utf-8")


# aiohttp reads header bytes that are not UTF-8 as lone surrogates (surrogateescape).
@pytest.mark.parametrize(
    ("headers", "body", "status", "words"),
    [
        (b"Content-Encoding: gz\xffip\r\nContent-Length: 2\r\n", b"{}", 415,
         'Content-Encoding "gz\\udcffip" is not accepted; send the body uncompressed'),
        (b"Content-Encoding: gzip, gz\xffip\r\nContent-Length: 2\r\n", b"{}", 415,
         'Content-Encoding gzip, "gz\\udcffip" is not accepted'),
        (b"Transfer-Encoding: gz\xffip, chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n", 501,
         'Transfer-Encoding "gz\\udcffip" is not supported; send the body uncompressed'),
    ],
    ids=["content-encoding", "content-encoding list", "transfer-encoding"],
)
@pytest.mark.parametrize("accept", [b"text/plain", b"application/json"])
async def test_a_coding_named_in_bytes_that_are_not_utf8_is_refused_and_quoted(
    service: RunningService, clean_db: asyncpg.Connection, caplog: pytest.LogCaptureFixture,
    headers: bytes, body: bytes, status: int, words: str, accept: bytes,
) -> None:
    caplog.set_level(logging.INFO)
    reply = await half_closed_exchange(
        service, b"POST /set_var HTTP/1.1\r\nHost: x\r\nAccept: " + accept + b"\r\n"
        + headers + b"\r\n" + body)
    got_status, message = answer_of(reply)
    assert got_status == status, reply
    assert words in message
    assert b"\r\nX-Served-By: test-replica:1\r\n" in reply
    assert await clean_db.fetchval("SELECT count(*) FROM public.variables") == 0
    assert_logged_whole(caplog)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /set_var HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /set_var HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        b"POST /set_var HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
    ],
    ids=["bad chunk size", "chunked twice", "length and chunked"],
)
async def test_a_request_the_parser_refuses_is_one_log_line_not_an_error(
    service: RunningService, caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    import asyncio
    import logging

    caplog.set_level(logging.INFO, logger="aiohttp.server")
    reader, writer = await asyncio.open_connection("127.0.0.1", service.server.port)
    writer.write(request_bytes)
    reply = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    assert reply.split(b" ")[1] == b"400", reply
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert [r.levelno for r in records] == [logging.INFO], records
    assert records[0].exc_info is None
    message = records[0].getMessage()
    assert message.startswith("Error handling request from 127.0.0.1: ")
    assert message == " ".join(message.split()), message  # one line, however aiohttp wraps it
    assert not message.endswith("^"), message


async def test_a_name_twice_in_the_body_is_400_like_twice_in_the_query(
    service: RunningService, http: aiohttp.ClientSession, clean_db: asyncpg.Connection
) -> None:
    body = b'{"key": "a", "key": "b", "value": "v"}'
    async with http.post(f"{service.url}/set_var", data=body, headers=JSON_CT) as r:
        assert (r.status, await r.text()) == (400, "key is given more than once in the body")
    assert await clean_db.fetchval("SELECT count(*) FROM public.variables") == 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # A name that is not a token is quoted as a JSON string: a lone surrogate in it
        # cannot be written as UTF-8 (in the answer or in a log line) as it is.
        (b'{"name":"a","value":"1","\\ud800":1,"\\ud800":2}',
         '"\\ud800" is given more than once in the body'),
        (b'{"key": "k", "value": "v", "": 1, "": 2}', '"" is given more than once in the body'),
        (b'{"key": "k", "value": {"x": 1, "x": 2}}',
         "x is given more than once in an object nested in the body"),
        (b'{"key": "k", "value": "v", "more": [{"\\udfff": 1, "\\udfff": 2}]}',
         '"\\udfff" is given more than once in an object nested in the body'),
        (b'[{"key": "k", "key": "k"}]',
         "key is given more than once in an object nested in the body"),
    ],
    ids=["surrogate", "empty", "nested", "nested surrogate", "in an array"],
)
@pytest.mark.parametrize("accept", ["text/plain", "application/json"])
async def test_a_name_twice_is_quoted_safely_and_where_it_is_said(
    service: RunningService, http: aiohttp.ClientSession, clean_db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture, body: bytes, message: str, accept: str,
) -> None:
    caplog.set_level(logging.INFO)
    headers = {**JSON_CT, "Accept": accept}
    async with http.post(f"{service.url}/set_var", data=body, headers=headers) as r:
        assert r.status == 400, await r.text()
        got = (await r.json())["error"] if accept == "application/json" else await r.text()
        assert got == message
    assert await clean_db.fetchval("SELECT count(*) FROM public.variables") == 0
    assert_logged_whole(caplog)


async def test_a_utf8_bom_before_the_json_is_accepted(
    service: RunningService, http: aiohttp.ClientSession
) -> None:
    body = b'\xef\xbb\xbf{"key": "bom", "value": "v"}'
    async with http.post(f"{service.url}/set_var", data=body, headers=JSON_CT) as r:
        assert r.status == 201


async def test_clients_leaving_mid_body_are_not_server_errors(
    service: RunningService, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    for _ in range(20):
        _reader, writer = await asyncio.open_connection("127.0.0.1", service.server.port)
        writer.write(b"POST /set_var HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"ke")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    async with http.get(f"{service.url}/healthcheck") as r:
        assert r.status == 200
    async with http.get(f"{service.url}/metrics") as r:
        metrics = await r.text()
    assert 'status="500"' not in metrics
    assert "failed" not in caplog.text


@pytest.mark.parametrize(
    ("accept", "json_answer"),
    [
        (None, False),
        ("*/*", False),
        ("text/plain", False),
        ("application/json", True),
        ("Application/JSON", True),
        ("application/*", True),
        ("application/problem+json", True),
        ("*/*;q=0.1, application/json", True),
        # A tie keeps the original's text: axios' and Angular's default Accept.
        ("application/json, text/plain, */*", False),
        ("application/json, */*", False),
        ("application/json, */*;q=0.5", True),  # HTTPie's: JSON preferred
        ("text/plain, application/json;q=0", False),
        ("text/plain;q=0.5, application/json;q=0.9", True),
        ("application/json;q=0.5, text/plain", False),
        ("application/json;q=bogus", False),
        # Out of RFC 9110's 0-1 range: not a q-value, so not a preference for JSON.
        ("application/json;q=2, text/plain", False),
        ("application/json;q=inf, text/plain", False),
        ("application/json;q=nan", False),
        ("application/json;q=1.000, text/plain;q=0.999", True),
        # Several Accept lines are one list (RFC 9110 5.3).
        (["text/plain;q=0.1", "application/json"], True),
        (["application/json", "text/plain"], False),
    ],
)
async def test_accept_negotiation_honours_q_values(
    service: RunningService, http: aiohttp.ClientSession, accept: str | list[str] | None,
    json_answer: bool
) -> None:
    lines = [] if accept is None else [accept] if isinstance(accept, str) else accept
    headers = CIMultiDict(("Accept", line) for line in lines)
    async with http.get(f"{service.url}/get_var?key=absent", headers=headers) as r:
        assert r.status == 404
        assert (r.content_type == "application/json") is json_answer


# -- Expect: 100-continue (curl sends it before a large body) ------------------------------


async def _expect_exchange(
    service: RunningService, headers: str, body: bytes | None = None
) -> tuple[bytes, bytes]:
    """Send a POST's head with ``headers``; return what came before the body was sent, and
    the rest (the body sent only after a 100 Continue)."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", service.server.port)
    try:
        writer.write(f"POST /set_var HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        rest = b""
        if first.startswith(b"HTTP/1.1 100 ") and body is not None:
            writer.write(body)
            rest = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return first, rest
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ("Content-Length: 2000000\r\n", b"413"),
        ("Content-Length: 20\r\nContent-Encoding: gzip\r\n", b"415"),
    ],
)
async def test_a_body_that_will_be_refused_gets_the_refusal_instead_of_100_continue(
    service: RunningService, clean_db: asyncpg.Connection, headers: str, status: bytes
) -> None:
    first, _ = await _expect_exchange(service, f"Expect: 100-continue\r\n{headers}")
    assert first.split(b" ")[1] == status  # no 100 Continue: the client uploads nothing
    assert b"\r\nX-Served-By: test-replica:1\r\n" in first


async def test_a_body_that_will_be_read_gets_100_continue_then_its_answer(
    service: RunningService, clean_db: asyncpg.Connection
) -> None:
    body = b'{"key": "e", "value": "v"}'
    first, rest = await _expect_exchange(
        service, f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n", body)
    assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert rest.startswith(b"HTTP/1.1 201 Created\r\n")
    assert await clean_db.fetchval("SELECT value FROM public.variables WHERE key = 'e'") == "v"


@pytest.mark.parametrize("path", ["/healthcheck", "/metrics", "/openapi.json"])
async def test_a_refused_body_on_an_endpoint_that_reads_none_closes_after_the_answer(
    service: RunningService, clean_db: asyncpg.Connection, path: str
) -> None:
    """No 100 Continue for a body over the limit, so the client sends none: the answer says
    the connection closes, or the client's next request on it would be read as that body."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", service.server.port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     "Content-Length: 2000000\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\nConnection: close\r\n" in head
        # The client that took the hint and sends nothing more is let go at once.
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 10)  # the rest of the answer, then the EOF
        assert reader.at_eof()
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("path", ["/healthcheck", "/nowhere"])
async def test_a_refused_body_the_client_sends_anyway_is_read_past_on_a_kept_connection(
    service: RunningService, clean_db: asyncpg.Connection, path: str
) -> None:
    """Without Expect (or after aiohttp's own 100 Continue on an unknown path) the body comes:
    it is read and dropped, and the connection serves the next request."""
    import asyncio

    body = b"x" * 2_000_000
    expect = "Expect: 100-continue\r\n" if path == "/nowhere" else ""
    reader, writer = await asyncio.open_connection("127.0.0.1", service.server.port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{expect}"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body
                     + b"GET /healthcheck HTTP/1.1\r\nHost: x\r\n\r\n")
        heads = []
        for _ in range(2):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            if head.startswith(b"HTTP/1.1 100 "):
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            heads.append(head)
        assert b"Connection: close" not in heads[0]
        assert heads[1].startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        writer.close()
        await writer.wait_closed()


async def test_an_unknown_expectation_is_ignored_not_a_bare_417(
    service: RunningService, clean_db: asyncpg.Connection
) -> None:
    import asyncio

    body = b'{"key": "u", "value": "v"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", service.server.port)
    writer.write(b"POST /set_var HTTP/1.1\r\nHost: x\r\nExpect: something-else\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 201 Created\r\n")
    assert b"\r\nX-Served-By: test-replica:1\r\n" in head
