"""The HTTP API: app factory, routes, request parsing and answers (plain text or JSON).

Wire-compatible with the original Flask service, whose clients send the key (and value)
as a JSON body on every method, GET and DELETE included.  Key and value may also come
from the query string.  Every client mistake gets a 4xx with a message that says what
was wrong, and nothing is stored.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import parse_qs

from aiohttp import HttpVersion11, hdrs, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_protocol import RequestPayloadError
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from common.logs import Throttled
from services.config import Config
from services.db import Database, DatabaseBusy, DatabaseUnavailable, WriteOutcomeUnknown
from services.metrics import Metrics
from services.openapi import openapi_document

log = logging.getLogger("services.api")
access_log = logging.getLogger("services.access")


@dataclass
class Lifecycle:
    """What the process is doing: set by the server, read by /healthcheck."""

    draining: bool = False


CONFIG = web.AppKey("config", Config)
DATABASE = web.AppKey("database", Database)
METRICS = web.AppKey("metrics", Metrics)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
SERVED_BY = web.AppKey("served_by", str)
#: Set on a request whose Expect: 100-continue got no 100 (its body will be refused).
CONTINUE_WITHHELD = web.RequestKey("continue_withheld", bool)
#: The WARNING lines of the database's failures, by kind: at most one a second each.
FAILURE_LOGS = web.AppKey("failure_logs", dict[str, Throttled])

TEXT = "text/plain"
RETRY_AFTER_SECONDS = "1"
WRITE_OUTCOME_UNKNOWN = (
    "database did not confirm the write in time: it may have been applied; "
    "read the variable before retrying"
)


class ClientError(Exception):
    """A request the client got wrong: answered with ``status`` and ``message``.

    ``close``: end the connection after the answer, because the rest of the body was not read
    and draining it would cost more than the client deserves (a huge or compressed body).
    """

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


def _bad(message: str) -> NoReturn:
    raise ClientError(400, message)


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110's token: ASCII only


def _shown(name: str) -> str:
    """A name the client gave (a coding, a JSON member name) as a message shows it: bare when
    it is an HTTP token (``gzip``, ``key``), else as a JSON string in ASCII (``"gz\\udcffip"``,
    ``""``). A lone surrogate (``"\\ud800"`` in JSON; a header byte that is not UTF-8, which
    aiohttp decodes with surrogateescape) cannot be encoded as UTF-8: in a message as it is,
    the answer fails (a 500), and so does the log line of that failure."""
    return name if _TOKEN.fullmatch(name) else json.dumps(name)


# -- answers -----------------------------------------------------------------


_QVALUE = re.compile(r"0(\.\d{0,3})?|1(\.0{0,3})?")


@functools.lru_cache(maxsize=256)
def _accept_prefers_json(accept: str) -> bool:
    """Whether an Accept header asks for JSON rather than text: JSON needs a q above every
    text type's, ``*/*`` included. A tie keeps the original's plain text: axios and Angular send
    ``application/json, text/plain, */*`` by default, and the original's clients read text."""
    json_q = text_q = 0.0
    for item in accept.split(","):
        media, *params = item.strip().lower().split(";")
        q = 1.0
        for param in params:
            name, _, value = param.strip().partition("=")
            if name == "q":  # RFC 9110's qvalue: 0 to 1, three decimals; anything else is 0
                q = float(value) if _QVALUE.fullmatch(value.strip()) else 0.0
        media = media.strip()
        if media in ("application/json", "application/*") or media.endswith("+json"):
            json_q = max(json_q, q)
        elif media in ("text/plain", "text/*", "*/*"):
            text_q = max(text_q, q)
    return json_q > text_q


def wants_json(request: web.Request) -> bool:
    # Several Accept lines are one comma-separated list (RFC 9110 5.3).
    accept = request.headers.getall(hdrs.ACCEPT, None)
    return accept is not None and _accept_prefers_json(
        accept[0] if len(accept) == 1 else ", ".join(accept))


def answer(
    request: web.Request,
    status: int,
    message: str,
    *,
    data: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """The response in the form the client asked for: ``data`` (or ``{"error": message}``
    for 4xx/5xx) as JSON, else ``message`` as plain text."""
    if wants_json(request):
        payload = data if data is not None else (
            {"error": message} if status >= 400 else {"message": message}
        )
        return web.Response(
            status=status,
            body=json.dumps(payload, ensure_ascii=False).encode("utf-8"),
            content_type="application/json",
            headers=headers,
        )
    return web.Response(status=status, text=message, content_type=TEXT, headers=headers)


# -- request parsing ---------------------------------------------------------


class _Number(str):
    """A JSON number, kept as the text the client wrote: never converted, so a 100,000-digit
    number costs nothing, and a value stored from it reads back as written."""

    __slots__ = ()


class _NotJson(ValueError):
    pass


def _no_constant(name: str) -> NoReturn:
    raise _NotJson(f"{name} is not JSON")  # Python's json reads NaN and Infinity; JSON has none


_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
_JSON_SPACE = " \t\r\n"
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


class _Objects:
    """``json.loads``' object_pairs_hook for one body: the objects, and the first member name
    given twice in one of them. The hook runs for the outer object last, so whether that one
    holds the name is known only once the whole body is read."""

    __slots__ = ("duplicate",)

    def __init__(self) -> None:
        self.duplicate: tuple[str, dict[str, Any]] | None = None

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for name, value in pairs:
            if self.duplicate is None and name in obj:
                self.duplicate = (name, obj)
            obj[name] = value
        return obj

    def check(self, body: Any) -> None:
        if self.duplicate is not None:
            name, obj = self.duplicate
            where = "the body" if obj is body else "an object nested in the body"
            _bad(f"{_shown(name)} is given more than once in {where}")


def _codings(request: web.Request, header: str, plain: tuple[str, ...]) -> str:
    """The codings every ``header`` of the request names, less the ``plain`` ones, as a
    message names them (``gzip, deflate``); empty if none."""
    codings = (coding.strip().lower() for value in request.headers.getall(header, ())
               for coding in value.split(","))
    return ", ".join(_shown(coding) for coding in codings if coding not in plain)


def _body_refusal(request: web.Request) -> ClientError | None:
    """Why the body will not be read, known from the headers alone; None if it will be."""
    max_bytes = request.app[CONFIG].max_body_bytes
    # Every Content-Encoding header and every coding in each: a body is compressed if any
    # says so (the server does not inflate it: a 1 MB gzip bomb is 1 GB of work).
    compressed = _codings(request, hdrs.CONTENT_ENCODING, ("", "identity"))
    if compressed:
        return ClientError(415, f"Content-Encoding {compressed} is not accepted; "
                           "send the body uncompressed", close=True)
    # aiohttp's parser reads the chunks of `Transfer-Encoding: gzip, chunked` and leaves the
    # gzip to the application: RFC 9112's answer to a coding a server does not do is 501.
    transfer = _codings(request, hdrs.TRANSFER_ENCODING, ("", "chunked"))
    if transfer:
        return ClientError(501, f"Transfer-Encoding {transfer} is not supported; "
                           "send the body uncompressed (chunked alone is fine)", close=True)
    if request.content_length is not None and request.content_length > max_bytes:
        return ClientError(413, f"request body is larger than {max_bytes} bytes", close=True)
    return None


async def expect_continue(request: web.Request) -> None:
    """``Expect: 100-continue``: the go-ahead only for a body that will be read. For one that
    will be refused the handler's final answer (413, 415) comes instead, as RFC 9110 allows,
    so a client such as curl does not upload a body for nothing. Other expectations are
    ignored (aiohttp's 417 would bypass the answer format and X-Served-By)."""
    if request.version != HttpVersion11:
        return
    if request.headers.get(hdrs.EXPECT, "").strip().lower() == "100-continue":
        if _body_refusal(request) is not None:
            request[CONTINUE_WITHHELD] = True  # see errors_and_metrics
            return
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer's own size starts after this line


async def _body_object(request: web.Request) -> dict[str, Any]:
    """The JSON object in the body; {} for an empty body."""
    max_bytes = request.app[CONFIG].max_body_bytes
    refusal = _body_refusal(request)
    if refusal is not None:
        raise refusal
    if not request.body_exists:
        return {}
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ClientError(
            413, f"request body is larger than {max_bytes} bytes", close=True
        ) from None
    except RequestPayloadError as exc:
        raise ClientError(400, f"request body is malformed ({exc})", close=True) from None
    except ConnectionResetError:
        # The client left mid-body: nobody reads this answer, but it is not our failure.
        raise ClientError(400, "request body ended early (the client went away)",
                          close=True) from None
    if not raw.strip():
        return {}
    # UTF-8, or UTF-16 or UTF-32 told by a byte-order mark or the zeros of its first bytes (as
    # the original's json.loads read them).
    encoding = json.detect_encoding(raw)
    try:
        text = raw.decode(encoding).removeprefix("\ufeff")
    except UnicodeDecodeError:
        _bad(f"request body is not valid {encoding.upper().removesuffix('-SIG')}")
    objects = _Objects()
    try:
        body = json.loads(text, object_pairs_hook=objects, parse_int=_Number,
                          parse_float=_Number, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, json.JSONDecodeError):
            # Python's own "Invalid control character at" expects the position after it.
            why = f"{exc.msg.removesuffix(' at')} at line {exc.lineno} column {exc.colno}"
        elif isinstance(exc, RecursionError):
            why = "nested too deeply"
        else:
            why = str(exc)
        # A body that starts as JSON is JSON gone wrong, not a form, whatever its Content-Type
        # says (`curl -d` says form).
        starts_as_json = text.lstrip(_JSON_SPACE).startswith(("{", "["))
        if request.content_type in _FORM_TYPES and not starts_as_json:
            why += "; form fields are not read: send JSON, or ?key=...&value=... in the URL"
        _bad(f"request body is not valid JSON ({why})")
    objects.check(body)
    if not isinstance(body, dict):
        _bad('request body must be a JSON object, like {"key": "name", "value": "text"}')
    return body


def _query(request: web.Request) -> dict[str, list[str]]:
    raw = request.rel_url.raw_query_string
    if not raw:
        return {}
    bad_escape = _BAD_ESCAPE.search(raw)
    if bad_escape is not None:
        at = raw[bad_escape.start():bad_escape.start() + 3]
        _bad(f"query string has a bad percent-escape ({at}); send a literal % as %25")
    try:
        return parse_qs(raw, keep_blank_values=True, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        _bad("query string is not valid UTF-8")


def _check_text(name: str, value: Any) -> str:
    if not isinstance(value, str) or isinstance(value, _Number):
        _bad(f"{name} must be a string, got {_json_type(value)}")
    if "\x00" in value:
        _bad(f"{name} must not contain NUL (\\u0000) characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        _bad(f"{name} is not valid Unicode (it contains a lone surrogate)")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", _Number: "a number", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def _field(name: str, body: dict[str, Any], query: dict[str, list[str]], *,
           scalars_as_text: bool = False) -> str:
    in_body = name in body
    in_query = name in query
    if in_query and len(query[name]) > 1:
        _bad(f"{name} is given more than once in the query string")
    if not in_body and not in_query:
        _bad(f'missing {name}: send it in a JSON body ({{"{name}": ...}}) or as ?{name}=...')
    if in_body:
        given = body[name]
        if scalars_as_text and isinstance(given, bool):
            given = "true" if given else "false"
        elif scalars_as_text and isinstance(given, _Number):
            given = str(given)
        value = _check_text(name, given)
    else:
        value = _check_text(name, query[name][0])
    if in_body and in_query and query[name][0] != value:
        _bad(f"{name} is given in both the query string and the body, with different values")
    return value


async def _parse(request: web.Request, *, with_value: bool) -> tuple[str, str]:
    body = await _body_object(request)
    query = _query(request)
    key = _field("key", body, query)
    if not key:
        _bad("key must not be empty")
    max_key = request.app[CONFIG].max_key_bytes
    if len(key) * 4 > max_key and len(key.encode("utf-8")) > max_key:
        _bad(f"key is longer than {max_key} bytes (UTF-8)")
    # The original stored a number or boolean value as its text (PostgreSQL casts it).
    value = _field("value", body, query, scalars_as_text=True) if with_value else ""
    return key, value


# -- handlers ----------------------------------------------------------------


async def set_var(request: web.Request) -> web.Response:
    key, value = await _parse(request, with_value=True)
    if await request.app[DATABASE].set_var(key, value):
        return answer(request, 201, "variable created", data={"key": key, "value": value})
    return answer(request, 409, "variable already exists")


async def get_var(request: web.Request) -> web.Response:
    key, _ = await _parse(request, with_value=False)
    value = await request.app[DATABASE].get_var(key)
    if value is None:
        return answer(request, 404, "variable not found")
    if wants_json(request):
        return answer(request, 200, value, data={"key": key, "value": value})
    return web.Response(text=value, content_type=TEXT)


async def edit_var(request: web.Request) -> web.Response:
    key, value = await _parse(request, with_value=True)
    if await request.app[DATABASE].edit_var(key, value):
        return answer(request, 200, "variable edited", data={"key": key, "value": value})
    return answer(request, 404, "variable not found")


async def delete_var(request: web.Request) -> web.Response:
    key, _ = await _parse(request, with_value=False)
    if await request.app[DATABASE].delete_var(key):
        return web.Response(status=204)
    return answer(request, 404, "variable not found")


async def healthcheck(request: web.Request) -> web.Response:
    if request.app[LIFECYCLE].draining:
        return answer(request, 503, "server is draining", headers={"Retry-After": "1"})
    try:
        await request.app[DATABASE].ping()
    except (DatabaseUnavailable, DatabaseBusy) as exc:
        return answer(request, 503, f"database unavailable: {exc}",
                      headers={"Retry-After": RETRY_AFTER_SECONDS})
    return answer(request, 200, "server is healthy", data={"status": "healthy"})


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].render()
    response = web.Response(body=body)
    response.headers[hdrs.CONTENT_TYPE] = content_type
    return response


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


# -- middleware and signals ---------------------------------------------------

Handler = Callable[[web.Request], Awaitable[StreamResponse]]


@web.middleware
async def errors_and_metrics(request: web.Request, handler: Handler) -> StreamResponse:
    """Turn every failure into a named answer in the client's format, and count it."""
    started = time.perf_counter()
    response: StreamResponse
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    try:
        response = await handler(request)
    except ClientError as exc:
        response = answer(request, exc.status, exc.message)
        if exc.close:
            response.force_close()
    except DatabaseBusy as exc:
        request.app[FAILURE_LOGS]["busy"].log(
            "%s %s: database busy: %s", request.method, request.path, exc)
        response = answer(request, 503, "database busy, retry later",
                          headers={"Retry-After": RETRY_AFTER_SECONDS})
    except DatabaseUnavailable as exc:
        request.app[FAILURE_LOGS]["unavailable"].log(
            "%s %s: database unavailable: %s", request.method, request.path, exc)
        response = answer(request, 503, "database unavailable",
                          headers={"Retry-After": RETRY_AFTER_SECONDS})
    except WriteOutcomeUnknown as exc:
        request.app[FAILURE_LOGS]["outcome_unknown"].log(
            "%s %s: write outcome unknown: %s", request.method, request.path, exc)
        # No Retry-After: a retry may meet the write's own effect (409 on a set_var).
        response = answer(request, 504, WRITE_OUTCOME_UNKNOWN)
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        route = request.path  # an endpoint's own path: only a known one answers 405
        response = answer(
            request, 405, f"method {request.method} is not allowed on {request.path}; "
            f"use {allowed}", headers={hdrs.ALLOW: allowed},
        )
    except web.HTTPNotFound:
        response = answer(request, 404, f"no such endpoint: {request.path}")
    except web.HTTPException as exc:
        response = answer(request, exc.status, exc.reason, headers=dict(exc.headers))
    except Exception:
        # A bug or a database state we do not know (say, the table dropped): the client
        # still gets an answer in its format, and the operator gets the traceback.
        log.exception("%s %s failed", request.method, request.path)
        response = answer(request, 500, "internal server error")
    # Here, not in on_response_prepare: every answer of the app passes this point, and a
    # signal costs a coroutine per response.
    response.headers["X-Served-By"] = request.app[SERVED_BY]
    if request.get(CONTINUE_WITHHELD) and not request.content.is_eof():
        # A body the client was told not to send (no 100 Continue) and an endpoint that
        # reads none: on a kept-alive connection the next request would be read as that
        # body, so the answer closes the connection.
        response.force_close()
    request.app[METRICS].observe(
        request.method,
        route,
        response.status,
        time.perf_counter() - started,
    )
    return response


class AccessLogger(AbstractAccessLogger):
    """One line per request, at the level SERVICE_ACCESS_LOG names."""

    level = logging.INFO

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        # A balancer checks every replica every few seconds: passing checks are debug noise.
        quiet = response.status == 200 and request.path == "/healthcheck"
        self.logger.log(
            logging.DEBUG if quiet else self.level, '%s "%s %s" %d %d %.1fms',
            request.remote, request.method, request.path_qs, response.status,
            response.body_length, time * 1000,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(self.level)


def access_logger_class(level: str) -> type[AccessLogger]:
    return type("AccessLogger", (AccessLogger,), {"level": getattr(logging, level.upper())})


# -- the app -----------------------------------------------------------------


def create_app(
    config: Config, *, served_by: str | None = None, lifecycle: Lifecycle | None = None
) -> web.Application:
    """The application; the database pool lives and dies with it (cleanup_ctx)."""
    app = web.Application(
        middlewares=[errors_and_metrics], client_max_size=config.max_body_bytes
    )
    app[CONFIG] = config
    app[SERVED_BY] = served_by or config.served_by_for(config.port)
    app[LIFECYCLE] = lifecycle or Lifecycle()
    app[METRICS] = Metrics()
    app[FAILURE_LOGS] = {kind: Throttled(log, logging.WARNING)
                         for kind in ("busy", "unavailable", "outcome_unknown")}

    async def say_held_failure_lines(app: web.Application) -> None:
        for throttled in app[FAILURE_LOGS].values():
            throttled.close()

    app.on_cleanup.append(say_held_failure_lines)

    async def database_ctx(app: web.Application) -> AsyncIterator[None]:
        database = Database(config, on_error=app[METRICS].database_error)
        app[METRICS].watch_pool(database.pool_stats)
        app[METRICS].watch_read_batches(database.read_batch_stats)
        app[DATABASE] = database
        database.start()
        yield
        await database.close()

    app.cleanup_ctx.append(database_ctx)
    routes = [
        ("GET", "/healthcheck", healthcheck),
        ("POST", "/set_var", set_var),
        ("GET", "/get_var", get_var),
        ("PUT", "/edit_var", edit_var),
        ("DELETE", "/delete_var", delete_var),
        ("GET", "/metrics", metrics),
        ("GET", "/openapi.json", openapi),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler, expect_handler=expect_continue)
        if method == "GET":  # add_get's HEAD twin
            app.router.add_route("HEAD", path, handler, expect_handler=expect_continue)
    return app
