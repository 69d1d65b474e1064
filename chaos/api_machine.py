"""The API against a dict, as a hypothesis state machine, for any base URL.

Hypothesis drives set/get/edit/delete with both request styles (JSON body, query string)
and both answer formats (text, JSON) over a small key alphabet chosen to be awkward
(non-ASCII, query metacharacters, whitespace), and checks every answer against what a
``dict`` says it must be.  Each run of the machine works under a fresh key prefix, so it
needs no access to the database and can share a deployment with other traffic on other
keys; it deletes its keys when it ends.

State machines are synchronous, the client is not: the machine runs in a worker thread
and hands each call to the event loop that owns the aiohttp session.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, TypeVar

import aiohttp
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from chaos.client import Accept, Reply, Style, call
from chaos.model import Kind

T = TypeVar("T")

KEY_SUFFIXES = (
    "a", "b", "ключ", "键", "🔑", "with space", "plus+sign", "a&b=c", "%41", "#frag",
    "quote'\"", "tab\tnew\nline", "ü" * 40,
)
VALUES = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=16
)
STYLES: st.SearchStrategy[Style] = st.sampled_from(("json", "query"))
ACCEPTS: st.SearchStrategy[Accept] = st.sampled_from(("text", "json"))
CALL_TIMEOUT = 30.0


class ApiMachine(RuleBasedStateMachine):
    """Subclassed by :func:`api_machine` with a base URL and a way to run a call."""

    base_url: ClassVar[str]
    session: ClassVar[aiohttp.ClientSession]
    run: ClassVar[Callable[[Coroutine[Any, Any, Reply]], Reply]]

    def __init__(self) -> None:
        super().__init__()
        self.prefix = f"sm-{uuid.uuid4().hex[:12]}-"
        self.model: dict[str, str] = {}

    def call(
        self, kind: Kind, suffix: str, value: str | None, style: Style, accept: Accept,
        ascii_json: bool = False,
    ) -> Reply:
        reply = type(self).run(call(
            self.session, self.base_url, kind, self.prefix + suffix, value,
            style=style, accept=accept, ascii_json=ascii_json,
        ))
        assert reply.served_by, "every answer names the replica that served it"
        return reply

    def expect(self, reply: Reply, status: int, text: str, payload: object) -> None:
        shown = (reply.status, reply.payload if reply.json else reply.text)
        assert reply.status == status, f"expected {status}, got {shown}"
        if reply.json:
            assert reply.payload == payload, f"expected {payload!r}, got {shown}"
        else:
            assert reply.text == text, f"expected {text!r}, got {shown}"

    @rule(suffix=st.sampled_from(KEY_SUFFIXES), value=VALUES, style=STYLES, accept=ACCEPTS,
          ascii_json=st.booleans())
    def set(self, suffix: str, value: str, style: Style, accept: Accept,
            ascii_json: bool) -> None:
        reply = self.call("set", suffix, value, style, accept, ascii_json)
        key = self.prefix + suffix
        if suffix in self.model:
            self.expect(reply, 409, "variable already exists", {"error": "variable already exists"})
        else:
            self.expect(reply, 201, "variable created", {"key": key, "value": value})
            self.model[suffix] = value

    @rule(suffix=st.sampled_from(KEY_SUFFIXES), style=STYLES, accept=ACCEPTS)
    def get(self, suffix: str, style: Style, accept: Accept) -> None:
        reply = self.call("get", suffix, None, style, accept)
        key = self.prefix + suffix
        if suffix in self.model:
            value = self.model[suffix]
            self.expect(reply, 200, value, {"key": key, "value": value})
        else:
            self.expect(reply, 404, "variable not found", {"error": "variable not found"})

    @rule(suffix=st.sampled_from(KEY_SUFFIXES), value=VALUES, style=STYLES, accept=ACCEPTS,
          ascii_json=st.booleans())
    def edit(self, suffix: str, value: str, style: Style, accept: Accept,
             ascii_json: bool) -> None:
        reply = self.call("edit", suffix, value, style, accept, ascii_json)
        key = self.prefix + suffix
        if suffix in self.model:
            self.expect(reply, 200, "variable edited", {"key": key, "value": value})
            self.model[suffix] = value
        else:
            self.expect(reply, 404, "variable not found", {"error": "variable not found"})

    @rule(suffix=st.sampled_from(KEY_SUFFIXES), style=STYLES, accept=ACCEPTS)
    def delete(self, suffix: str, style: Style, accept: Accept) -> None:
        reply = self.call("delete", suffix, None, style, accept)
        if suffix in self.model:
            assert (reply.status, reply.text) == (204, ""), (reply.status, reply.text)
            del self.model[suffix]
        else:
            self.expect(reply, 404, "variable not found", {"error": "variable not found"})

    def teardown(self) -> None:
        for suffix in list(self.model):
            self.call("delete", suffix, None, "query", "text")


def api_machine(
    base_url: str,
    session: aiohttp.ClientSession,
    run: Callable[[Coroutine[Any, Any, Reply]], Reply],
) -> type[ApiMachine]:
    """The machine bound to one API and one way to run its calls."""
    return type("ApiMachineFor", (ApiMachine,), {
        "base_url": base_url, "session": session, "run": staticmethod(run),
    })


DEFAULT_SETTINGS = settings(
    max_examples=25, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


async def check_api_against_model(
    base_url: str, *, machine_settings: settings | None = None
) -> None:
    """Run the state machine against ``base_url`` from inside a running event loop (the
    loop stays free to serve, should the API live in this very process)."""
    loop = asyncio.get_running_loop()

    def run(coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(CALL_TIMEOUT)

    async with aiohttp.ClientSession() as session:
        machine = api_machine(base_url, session, run)
        await asyncio.to_thread(
            run_state_machine_as_test, machine, settings=machine_settings or DEFAULT_SETTINGS
        )
