"""One call to the variables API, in either request style and either answer format.

The query string is encoded here rather than by aiohttp/yarl, so that every character of
a key or value (``+``, ``&``, ``%``, spaces, non-ASCII) reaches the server exactly as the
server's ``parse_qs`` will decode it.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias
from urllib.parse import quote, urlencode

import aiohttp
from yarl import URL

from chaos.model import Kind

Style: TypeAlias = Literal["json", "query"]
Accept: TypeAlias = Literal["text", "json"]

ROUTES: dict[Kind, tuple[str, str]] = {
    "set": ("POST", "/set_var"),
    "get": ("GET", "/get_var"),
    "edit": ("PUT", "/edit_var"),
    "delete": ("DELETE", "/delete_var"),
}


@dataclass(frozen=True)
class Reply:
    status: int
    text: str
    payload: Any
    """The JSON answer, when JSON was asked for and the body parsed; else None."""
    served_by: str | None
    retry_after: float | None = None
    json: bool = False
    """Whether JSON was asked for (then ``payload`` is None if the body was not JSON)."""

    @property
    def message(self) -> str:
        """The answer's words, whichever format carried them."""
        if isinstance(self.payload, dict):
            for field in ("error", "message"):
                if isinstance(self.payload.get(field), str):
                    return str(self.payload[field])
        return self.text


def request_parts(
    kind: Kind, key: str, value: str | None, *, style: Style, accept: Accept,
    ascii_json: bool = False,
) -> tuple[str, str, bytes | None, dict[str, str]]:
    """(method, path with query, body, headers) for one call."""
    method, path = ROUTES[kind]
    fields = {"key": key} if value is None else {"key": key, "value": value}
    headers = {"Accept": "application/json"} if accept == "json" else {"Accept": "text/plain"}
    if style == "query":
        return method, f"{path}?{urlencode(fields, quote_via=quote, safe='')}", None, headers
    body = json.dumps(fields, ensure_ascii=ascii_json).encode("utf-8")
    headers["Content-Type"] = "application/json"
    return method, path, body, headers


async def call(
    session: aiohttp.ClientSession, base_url: str, kind: Kind, key: str,
    value: str | None = None, *, style: Style = "json", accept: Accept = "text",
    ascii_json: bool = False,
) -> Reply:
    """Make the call; network errors and timeouts propagate to the caller, which alone
    knows what they mean for its history."""
    method, target, body, headers = request_parts(
        kind, key, value, style=style, accept=accept, ascii_json=ascii_json
    )
    url = URL(base_url.rstrip("/") + target, encoded=True)
    async with session.request(method, url, data=body, headers=headers) as response:
        raw = await response.read()
        text = raw.decode("utf-8")
        payload: Any = None
        if accept == "json" and raw:
            try:
                payload = json.loads(text)
            except json.JSONDecodeError:
                payload = None
        retry_after: float | None = None
        with contextlib.suppress(ValueError):  # absent, or an HTTP date: no hint
            retry_after = float(response.headers.get("Retry-After", ""))
        return Reply(response.status, text, payload, response.headers.get("X-Served-By"),
                     retry_after, accept == "json")
