"""``python -m bench``: what a user can get wrong on its command line, and the report it rewrites.

The load runs themselves need wrk, HAProxy and minutes of both cores: ``make bench`` is their
test.  These cover what fails before any load starts, against real sockets and real files.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bench import run

#: The latest full run: its report was written by the report code as it is now.
RAW_RUN = Path(__file__).resolve().parents[2] / "bench" / "results" / "raw" / "2026-11-30.json"


def parse_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        run.parse_args(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--rounds", "0"), "--rounds must be at least 1"),
        (("--rounds", "-2"), "--rounds must be at least 1"),
        (("--seconds", "0"), "--seconds must be at least 1"),
        (("--seconds", "1.5"), "invalid int value: '1.5'"),
        (("--idle", "-1"), "--idle must be 0"),
        (("--sections", "balancer,stak"),
         "--sections: unknown 'stak' (choose from balancer, service, stack, target)"),
        (("--sections", "target"), "the target section needs --target URL"),
        (("--target", "ftp://host"), "--target must be an http:// URL"),
        (("--target", "127.0.0.1:3000"), "--target must be an http:// URL"),
        (("--target", "http://[::1"), "--target is not a URL like http://127.0.0.1:3000"),
        (("--target", "http://127.0.0.1:99999"), "--target is not a URL"),
        # Found before the run, not after it with everything measured lost.
        (("--out", "README.md"), "--out README.md: cannot make a directory there"),
        (("--out", "/dev/null/x"), "--out /dev/null/x: cannot make a directory there"),
        (("--target", "http://127.0.0.1:3000/api"), "--target must be the stack's address alone"),
        (("--replot", "no/such/run.json"), "--replot: no such file: no/such/run.json"),
        (("--replot", str(RAW_RUN)), "--replot needs --out DIR"),
        (("--sections", ","), "--sections names no section: ','"),
        (("--target", "http://127.0.0.1:3000", "--sections", "balancer"),
         "--sections can only be target with it"),
    ],
)
def test_bad_options_are_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    assert message in parse_error(capsys, *argv)


def test_defaults_and_quick_defaults() -> None:
    full = run.parse_args([])
    assert (full.rounds, full.seconds, full.idle) == (5, 2.0, 5000)
    assert full.sections == ("balancer", "service", "stack")
    quick = run.parse_args(["--quick"])
    assert (quick.rounds, quick.seconds, quick.idle) == (3, 1.0, 1000)
    target = run.parse_args(["--target", "http://127.0.0.1:3000"])
    assert target.sections == ("target",)


def test_explicit_values_win_over_quick_and_idle_zero_skips() -> None:
    opts = run.parse_args(["--quick", "--rounds", "7", "--seconds", "4", "--idle", "0"])
    assert (opts.rounds, opts.seconds, opts.idle) == (7, 4.0, 0)


def test_interleaving_puts_each_variant_first_and_last() -> None:
    orders = [run.rotate(["a", "b", "c"], rnd) for rnd in range(6)]
    assert len({tuple(order) for order in orders}) == 6  # every order once
    # Two variants: each goes first every other round (the rotation and a reversal of it
    # used to cancel out, and the first variant was measured first in every round).
    assert [run.rotate(["a", "b"], rnd) for rnd in range(4)] == [
        ["a", "b"], ["b", "a"], ["b", "a"], ["a", "b"]]


def test_any_two_of_many_variants_swap_places_from_one_round_to_the_next() -> None:
    # The stack compares eight variants, ours-N beside haproxy-N: each comparison has to see
    # both orders within the 5 rounds of a run, not only after a full turn of eight.
    variants = ["pgbench", "direct-1", "ours-1", "haproxy-1", "ours-2", "haproxy-2", "ours-4",
                "haproxy-4"]
    orders = [run.rotate(variants, rnd) for rnd in range(16)]
    for rnd in range(0, 16, 2):
        this, following = orders[rnd], orders[rnd + 1]
        for a, b in itertools.combinations(variants, 2):
            assert (this.index(a) < this.index(b)) != (following.index(a) < following.index(b))
    assert {order[0] for order in orders} == set(variants)  # each goes first in turn
    assert {order[-1] for order in orders} == set(variants)


@contextlib.asynccontextmanager
async def answering(status: int, text: str, *, stores: bool = True,
                    get_value: str | None = None) -> AsyncIterator[Any]:
    """A real HTTP server on an ephemeral port whose /healthcheck answers ``status``; with
    ``stores``, it keeps variables as the API does (in a dict: the probe's logic is tested
    here, the service itself in tests/services)."""
    variables: dict[str, str] = {}

    async def healthcheck(request: web.Request) -> web.Response:
        return web.Response(status=status, text=text)

    async def set_var(request: web.Request) -> web.Response:
        body = await request.json()
        variables[body["key"]] = body["value"]
        return web.Response(status=201, text="variable created")

    async def get_var(request: web.Request) -> web.Response:
        return web.Response(text=get_value or variables[request.query["key"]])

    async def delete_var(request: web.Request) -> web.Response:
        del variables[request.query["key"]]
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/healthcheck", healthcheck)
    if stores:
        app.router.add_post("/set_var", set_var)
        app.router.add_get("/get_var", get_var)
        app.router.add_delete("/delete_var", delete_var)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        url = f"http://127.0.0.1:{port}"
        yield (url, variables) if get_value is not None else url
    finally:
        await runner.cleanup()


async def test_a_healthy_target_can_be_measured() -> None:
    async with answering(200, "server is healthy") as url:
        assert await asyncio.to_thread(run.target_problem, url) is None


async def test_a_target_that_is_not_varstack_is_named() -> None:
    async with answering(200, "ok", stores=False) as url:
        problem = await asyncio.to_thread(run.target_problem, url)
    assert problem == ("it does not answer as varstack does: POST /set_var answered 404, "
                       "not 201")


def test_an_out_whose_raw_folder_is_a_file_is_refused_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "raw").write_text("")
    assert f"{tmp_path / 'raw'} is not a directory" in parse_error(
        capsys, "--out", str(tmp_path))


async def test_a_target_that_reads_back_another_value_is_named_and_its_probe_deleted() -> None:
    async with answering(200, "ok", get_value="other") as (url, variables):
        problem = await asyncio.to_thread(run.target_problem, url)
        assert variables == {}
    assert problem == ("it does not answer as varstack does: GET /get_var answered 200 with "
                       "'other', not 'v'")


async def test_a_target_whose_database_is_down_is_named() -> None:
    async with answering(503, "database unavailable: ConnectionRefusedError") as url:
        problem = await asyncio.to_thread(run.target_problem, url)
    assert problem == "its /healthcheck answers 503 (database unavailable: ConnectionRefusedError)"


async def test_a_target_answering_an_html_page_is_named_on_one_line() -> None:
    page = ("<!DOCTYPE HTML>\n<html lang=\"en\">\n    <head>\n        <title>Error</title>\n"
            "    </head>\n    <body>\n        <p>Error code: 404</p>\n" + "<p>x</p>\n" * 40
            + "    </body>\n</html>\n")
    async with answering(404, page) as url:
        problem = await asyncio.to_thread(run.target_problem, url)
    assert problem is not None
    assert "\n" not in problem
    assert problem.startswith("its /healthcheck answers 404 (<!DOCTYPE HTML> <html lang=\"en\"> "
                              "<head> <title>Error</title>")
    assert problem.endswith("...)")
    assert len(problem) < 120


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_target_nobody_listens_on_stops_the_run_with_no_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    out = tmp_path / "results"
    assert run.main(["--target", url, "--quick", "--no-install", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"cannot measure --target {url}: nothing answers at {url}" in err
    assert "Connection refused" in err
    assert not out.exists()


def without_plots(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if not line.startswith("![")]


def test_replot_rewrites_the_committed_report_from_its_raw_run(tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir"  # made on the way
    assert run.main(["--replot", str(RAW_RUN), "--out", str(out)]) == 0
    written = (out / f"{RAW_RUN.stem}.md").read_text()
    committed = RAW_RUN.parents[1].joinpath(f"{RAW_RUN.stem}.md").read_text()
    assert without_plots(written) == without_plots(committed)
    assert "| balancer bulk MiB/s" in written
    # The three plots are drawn beside it, and the report shows each.
    for name in ("balancer", "throughput", "latency"):
        png = out / f"{RAW_RUN.stem}-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 10_000  # axes, bars and labels, not an empty canvas
        assert f"]({png.name})" in written


@pytest.mark.parametrize(
    "content",
    ['{"values": {}}', "not json at all", "[1, 2]", b"\xff\xfe\x00"],
)
def test_replot_of_a_file_that_is_not_a_raw_run_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | bytes
) -> None:
    raw = tmp_path / "other.json"
    if isinstance(content, bytes):
        raw.write_bytes(content)
    else:
        raw.write_text(content)
    assert run.main(["--replot", str(raw), "--out", str(tmp_path / "out")]) == 2
    assert f"--replot: {raw} is not a raw results file of python -m bench" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()



def test_a_second_run_on_one_day_keeps_the_first_s_report(tmp_path: Path) -> None:
    assert run.free_stem(tmp_path, "2026-11-28") == "2026-11-28"
    (tmp_path / "2026-11-28.md").write_text("first run")
    assert run.free_stem(tmp_path, "2026-11-28") == "2026-11-28-2"
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "2026-11-28-2.json").write_text("{}")  # a raw run alone counts too
    assert run.free_stem(tmp_path, "2026-11-28") == "2026-11-28-3"
    assert run.free_stem(tmp_path, "2026-11-28-quick") == "2026-11-28-quick"
