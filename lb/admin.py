"""The admin listener (HAProxy's stats page): ``/stats`` JSON, ``/metrics`` Prometheus, ``/`` HTML.

Bound to 127.0.0.1 by default: it tells anyone who can reach it which replicas exist.  Every
answer is computed from :meth:`lb.server.Server.stats` when asked; nothing here runs per connection.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web, web_protocol
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.web import HandlerRunner

if TYPE_CHECKING:
    from lb.server import Server

_PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
_REFRESH_SECONDS = 2
#: Seconds a connection to the admin listener may take to send a whole request head, and may
#: stay idle between requests. aiohttp waits for a first request for ever, so connections
#: that send nothing, or a header line now and then, piled up on the descriptors the
#: balancer shares with its clients.
REQUEST_TIMEOUT = 10.0


class _RequestHandler(web_protocol.RequestHandler):
    """aiohttp's, with a deadline for each request head and each idle spell."""

    __slots__ = ("_deadline",)

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._deadline = self._loop.call_later(REQUEST_TIMEOUT, self._deadline_passed)

    def _deadline_passed(self) -> None:
        if self._request_in_progress:  # an answer is being made: its end restarts the clock
            return
        self.force_close()

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        result = await super().finish_response(request, resp, start_time)
        self._deadline.cancel()
        self._deadline = self._loop.call_later(REQUEST_TIMEOUT, self._deadline_passed)
        return result

    def connection_lost(self, exc: BaseException | None) -> None:
        self._deadline.cancel()
        super().connection_lost(exc)


class _Runner(HandlerRunner):
    handler_class = _RequestHandler


class Admin:
    """An aiohttp app on its own listener, reading the numbers of one :class:`Server`."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StatsCollector(server))
        self.app = web.Application()
        self.app.router.add_get("/", self._page)
        self.app.router.add_get("/stats", self._stats)
        self.app.router.add_get("/metrics", self._metrics)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (port 0: any free port, see :attr:`port`)."""
        self._runner = _Runner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sockets = getattr(site._server, "sockets", None)
        assert sockets, "the admin listener has no socket"
        self.port = int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.server.stats(), dumps=_dumps)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": _PROMETHEUS_TEXT})

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=render_page(self.server.stats()), content_type="text/html")


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2)


def render_page(stats: dict[str, Any]) -> str:
    """The stats table as a small self-refreshing HTML page."""
    totals = stats["totals"]
    rows = []
    for b in stats["backends"]:
        state = html.escape(b["state"])
        rows.append(
            f"<tr class='{state}'><td>{html.escape(b['address'])}</td><td>{state}</td>"
            f"<td>{b['active_connections']}</td><td>{b['total_connections']}</td>"
            f"<td>{b['failed_connects']}</td><td>{b['bytes_to_backend']}</td>"
            f"<td>{b['bytes_to_client']}</td><td>{html.escape(b['last_check'])}</td>"
            f"<td>{html.escape(b['last_change'])}</td></tr>"
        )
    body = "\n".join(rows) or "<tr><td colspan='9'>no backends</td></tr>"
    return f"""<!doctype html>
<html><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{_REFRESH_SECONDS}">
<title>varstack-lb</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #999; padding: .3em .6em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
tr.up td:nth-child(2) {{ background: #b6e3b6; }}
tr.down td:nth-child(2) {{ background: #f1b0b0; }}
</style></head><body>
<h1>varstack-lb</h1>
<p>{totals['backends_up']} of {totals['backends']} backends up
(SERVER_COUNT {totals['backends_expected']});
{totals['active_connections']} connections open of {totals['max_connections']},
{totals['waiting_connections']} waiting; {totals['total_connections']} piped in all;
{totals['failed_connects']} failed connects;
{totals['bytes_to_backend']} bytes to backends, {totals['bytes_to_client']} to clients.
Refreshes every {_REFRESH_SECONDS} s. <a href="/stats">JSON</a> <a href="/metrics">metrics</a></p>
<table>
<tr><th>backend</th><th>state</th><th>active</th><th>total</th><th>failed connects</th>
<th>bytes to backend</th><th>bytes to client</th><th>last check</th><th>last change</th></tr>
{body}
</table></body></html>
"""


class _StatsCollector(Collector):
    """Prometheus families made from one stats snapshot per scrape."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self.server.stats()
        totals = stats["totals"]
        labels = ["backend"]
        up = GaugeMetricFamily("lb_backend_up", "1 when the backend takes new connections",
                               labels=labels)
        active = GaugeMetricFamily("lb_backend_active_connections",
                                   "connections piped to the backend now", labels=labels)
        total = CounterMetricFamily("lb_backend_connections",
                                    "connections piped to the backend", labels=labels)
        failed = CounterMetricFamily("lb_backend_failed_connects",
                                     "connects to the backend that were refused or timed out",
                                     labels=labels)
        sent = CounterMetricFamily("lb_backend_bytes",
                                   "bytes piped through the backend's connections",
                                   labels=["backend", "direction"])
        for b in stats["backends"]:
            address = [b["address"]]
            up.add_metric(address, 1.0 if b["state"] == "up" else 0.0)
            active.add_metric(address, b["active_connections"])
            total.add_metric(address, b["total_connections"])
            failed.add_metric(address, b["failed_connects"])
            sent.add_metric([b["address"], "to_backend"], b["bytes_to_backend"])
            sent.add_metric([b["address"], "to_client"], b["bytes_to_client"])
        yield from (up, active, total, failed, sent)
        yield GaugeMetricFamily("lb_backends", "backends known", value=totals["backends"])
        yield GaugeMetricFamily("lb_backends_up", "backends up", value=totals["backends_up"])
        yield GaugeMetricFamily("lb_backends_expected", "SERVER_COUNT",
                                value=totals["backends_expected"])
        yield GaugeMetricFamily("lb_connections_active", "client connections holding a slot",
                                value=totals["active_connections"])
        yield GaugeMetricFamily("lb_connections_waiting",
                                "clients connected but not accepted yet, in the listening "
                                "socket's backlog (the cap reached, accepting paused, or "
                                "the next wakeup to come)",
                                value=totals["waiting_connections"])
        yield GaugeMetricFamily("lb_connections_max", "LB_MAX_CONNECTIONS",
                                value=totals["max_connections"])
        yield CounterMetricFamily("lb_connections_accepted", "client connections accepted",
                                  value=totals["accepted_connections"])
        yield CounterMetricFamily("lb_failed_connects", "connects to backends that failed",
                                  value=totals["failed_connects"])
        bytes_total = CounterMetricFamily("lb_bytes", "bytes piped", labels=["direction"])
        bytes_total.add_metric(["to_backend"], totals["bytes_to_backend"])
        bytes_total.add_metric(["to_client"], totals["bytes_to_client"])
        yield bytes_total
