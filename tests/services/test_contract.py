"""The OpenAPI document describes exactly the routes the router serves; metrics count them."""

from __future__ import annotations

import re

import aiohttp

from services.api import create_app
from services.config import Config
from services.openapi import openapi_document
from tests.services.conftest import RunningService


def test_openapi_paths_and_methods_match_the_router() -> None:
    app = create_app(Config())
    served = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {
        (path, method) for path, item in openapi_document()["paths"].items() for method in item
    }
    assert served == documented


def test_every_client_error_an_operation_can_answer_is_documented() -> None:
    """The answers of the README's mistakes table, for every endpoint taking a key."""
    for path, item in openapi_document()["paths"].items():
        if path in ("/healthcheck", "/metrics", "/openapi.json"):
            continue
        for operation in item.values():
            assert {"400", "413", "415", "501", "503"} <= set(operation["responses"]), path


def test_openapi_refs_resolve() -> None:
    doc = openapi_document()
    refs = set(re.findall(r"#/components/schemas/(\w+)", str(doc)))
    assert refs <= set(doc["components"]["schemas"])


async def test_openapi_is_served(service: RunningService, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{service.url}/openapi.json") as r:
        assert r.status == 200
        assert (await r.json())["openapi"].startswith("3.")


async def test_metrics_count_routes_statuses_pool(
    service: RunningService, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{service.url}/get_var?key=missing") as r:
        assert r.status == 404
    async with http.get(f"{service.url}/nowhere/{'x' * 10}") as r:
        assert r.status == 404
    async with http.post(f"{service.url}/get_var") as r:
        assert r.status == 405
    async with http.get(f"{service.url}/metrics") as r:
        assert r.status == 200
        assert r.content_type == "text/plain"
        text = await r.text()
    assert 'varstack_http_requests_total{method="GET",route="/get_var",status="404"} 1.0' in text
    assert 'route="unmatched",status="404"' in text
    # A wrong method on an endpoint is that endpoint's, not an unknown path's.
    assert 'varstack_http_requests_total{method="POST",route="/get_var",status="405"} 1.0' in text
    assert 'route="unmatched",status="405"' not in text
    assert "nowhere" not in text
    assert 'varstack_http_request_duration_seconds_bucket{le="0.005",route="/get_var"}' in text
    assert re.search(r"^varstack_db_pool_connections \d", text, re.M)
    assert re.search(r"^varstack_db_pool_in_use \d", text, re.M)
