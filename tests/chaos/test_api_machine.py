"""The hypothesis state machine against a real replica (later: through the balancer)."""

from __future__ import annotations

import json

import pytest
from aiohttp import web
from hypothesis import HealthCheck, Phase, settings

from chaos.api_machine import check_api_against_model
from tests.services.conftest import RunningService


async def test_the_api_behaves_like_a_dict(replica: RunningService) -> None:
    await check_api_against_model(replica.url, machine_settings=settings(
        max_examples=12, stateful_step_count=25, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow],
    ))


async def test_the_machine_catches_an_api_that_is_not_a_dict() -> None:
    """A real server over a dict, right but for one thing: every delete answers 204, even
    of a missing key."""
    store: dict[str, str] = {}

    async def fields(request: web.Request) -> dict[str, str]:
        body = await request.read()
        found = dict(request.query)
        found.update(json.loads(body) if body else {})
        return found

    def answer(
        request: web.Request, status: int, message: str, data: dict[str, str] | None = None
    ) -> web.Response:
        headers = {"X-Served-By": "dict:1"}
        if "json" not in request.headers.get("Accept", "") or status == 204:
            return web.Response(status=status, text=message, headers=headers)
        payload = data if data is not None else {"error": message}
        return web.json_response(payload, status=status, headers=headers)

    async def set_var(request: web.Request) -> web.Response:
        f = await fields(request)
        if f["key"] in store:
            return answer(request, 409, "variable already exists")
        store[f["key"]] = f["value"]
        return answer(request, 201, "variable created", f)

    async def get_var(request: web.Request) -> web.Response:
        key = (await fields(request))["key"]
        if key not in store:
            return answer(request, 404, "variable not found")
        return answer(request, 200, store[key], {"key": key, "value": store[key]})

    async def edit_var(request: web.Request) -> web.Response:
        f = await fields(request)
        if f["key"] not in store:
            return answer(request, 404, "variable not found")
        store[f["key"]] = f["value"]
        return answer(request, 200, "variable edited", f)

    async def delete_var(request: web.Request) -> web.Response:
        store.pop((await fields(request))["key"], None)
        return answer(request, 204, "")

    app = web.Application()
    app.add_routes([web.post("/set_var", set_var), web.get("/get_var", get_var),
                    web.put("/edit_var", edit_var), web.delete("/delete_var", delete_var)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        with pytest.raises(AssertionError, match=r"expected 404, got \(204"):
            await check_api_against_model(f"http://127.0.0.1:{port}", machine_settings=settings(
                max_examples=50, stateful_step_count=10, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow], print_blob=False,
                phases=[Phase.generate, Phase.shrink],
            ))
    finally:
        await runner.cleanup()
