"""PostgreSQL going away under the whole stack: restarted under load (fast and immediate
shutdown), hung (SIGSTOP), and absent when the replicas start.  PostgreSQL's promise: a commit
it acknowledged survives; the service's: 503 with Retry-After while the database is away (a
write whose COMMIT was cut off: 504), a 503 write never applied later, never a 500 or a hang,
and recovery by itself when it is back."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from chaos.load import reasons
from chaos.rawhttp import Connection
from chaos.system import (
    Lines,
    Target,
    baseline,
    check_leaks,
    child_env,
    counter_text,
    free_port_run,
    get_json,
    hang_database,
    judge,
    restart_database,
    stop_children,
    summarize_failures,
    wait_until,
)
from stack.pg import EmbeddedPostgres
from stack.process import Child, Output, RestartPolicy
from stack.supervisor import http_status
from tests.system.conftest import StackFactory, finish, load_for, loop_name


@pytest.mark.parametrize("mode", ["immediate", "fast"])
async def test_postgresql_restarted_under_load(system: StackFactory, mode: str) -> None:
    # A long restart delay: this test restarts the database, not the supervisor.
    async with system(restart_delay=120.0) as (stack, lines):
        base = await baseline(stack)
        load = load_for(stack, f"pg-{mode}", fresh_workers=4, keepalive_workers=4,
                        max_seconds=90)
        load.start()
        try:
            await load.wait_for(300)
            fault = await restart_database(stack, mode, down_for=2.0)
            await load.wait_for(300)
        finally:
            await load.stop()
        verdict = judge(fault, load, lines.of("load_balancer"), until=float("inf"))
        down = [a for a in load.attempts
                if fault.effective <= a.invoke and a.complete <= fault.effective
                + fault.details["down"]]
        print(f"{fault.name}: down {fault.details['down']:.1f}s, started in "
              f"{fault.details['start']:.2f}s, whole again {fault.recovery:.2f}s later "
              f"(recovery time); {len(load.attempts)} requests, {len(verdict.failures)} failed "
              f"({verdict.why()}); while down: {counter_text(reasons(down))}")
        assert not fault.notes, fault.notes
        internal = [line for line in lines.lines if "InternalClientError" in line]
        assert not verdict.unexplained, summarize_failures(verdict.unexplained) + \
            "\nreplica log:\n" + "\n".join(internal[:5])
        assert down, "no request was made while the database was down"
        assert all(a.status == 503 for a in down), summarize_failures(
            [a for a in down if a.status != 503])
        assert all(a.retry_after == "1" for a in down)
        after = [a for a in load.attempts if a.invoke >= fault.recovered]
        assert after
        assert not [a for a in after if a.failed]
        await finish(stack, load, base)


async def test_postgresql_hung_under_load(system: StackFactory) -> None:
    """The database SIGSTOPped past a write's whole budget: requests get the service's 503
    (or a write a 504), never a reset or a 500; and no write answered 503 is applied when it
    resumes and runs what waited in its sockets (the history check counts those writes as
    not applied, so one applied after all fails it)."""
    async with system(restart_delay=120.0) as (stack, lines):
        base = await baseline(stack)
        load = load_for(stack, "pg-hang", fresh_workers=4, keepalive_workers=4, max_seconds=90)
        load.start()
        try:
            await load.wait_for(300)
            fault = await hang_database(stack)
            await load.wait_for(300)
        finally:
            await load.stop()
        verdict = judge(fault, load, lines.of("load_balancer"), until=float("inf"))
        print(f"{fault.name}: hung {fault.details['hung']:.1f}s, whole again "
              f"{fault.recovery:.2f}s after SIGCONT; {len(load.attempts)} requests, "
              f"{len(verdict.failures)} failed ({verdict.why()})")
        assert not verdict.unexplained, summarize_failures(verdict.unexplained)
        hung = [a for a in load.attempts if a.failed and a.invoke < fault.recovered]
        assert hung, "no request met the hung database"
        assert all(a.status in (503, 504) for a in hung), summarize_failures(hung)
        after = [a for a in load.attempts if a.invoke >= fault.recovered]
        assert after
        assert not [a for a in after if a.failed]
        await finish(stack, load, base)


async def test_replicas_started_before_postgresql_are_excluded_until_it_starts(
    own_postgres: EmbeddedPostgres, tmp_path: Path,
) -> None:
    """Stack waits for healthy replicas before it starts the balancer, so this topology is
    put together by hand: the database initialised and stopped, then 3 replicas and the
    balancer, then the database."""
    await asyncio.to_thread(own_postgres.start)
    await asyncio.to_thread(own_postgres.stop, "fast")
    loop = loop_name()
    lines = Lines()
    output = Output(lines)
    # One run below the ephemeral range: no port of it can be handed out meanwhile.
    first = free_port_run(5)
    ports = [first, first + 1, first + 2]
    lb_port, admin_port = first + 3, first + 4
    replicas = [
        Child(f"backend-{i + 1}", [sys.executable, "-m", "services"],
              child_env({**own_postgres.env, "SERVICE_HOST": "127.0.0.1",
                         "SERVICE_PORT": str(port)}, loop=loop),
              output, RestartPolicy(0, 1, 1))
        for i, port in enumerate(ports)
    ]
    balancer = Child("load_balancer", [sys.executable, "-m", "lb"], child_env({
        "LB_HOST": "127.0.0.1", "LB_PORT": str(lb_port), "LB_ADMIN_HOST": "127.0.0.1",
        "LB_ADMIN_PORT": str(admin_port), "SERVER_COUNT": "3",
        "LB_BACKENDS": ",".join(f"127.0.0.1:{p}" for p in ports),
    }, loop=loop), output, RestartPolicy(0, 1, 1))
    target = Target("127.0.0.1", admin_port, balancer, replicas)

    async def states() -> list[str]:
        stats = await get_json("127.0.0.1", admin_port, "/stats")
        return [b["state"] for b in stats["backends"]]

    async def through_lb(method: str, target_path: str) -> tuple[int, str]:
        conn = await Connection("127.0.0.1", lb_port).open()
        try:
            reply = await conn.request(method, target_path, close=True)
        finally:
            await conn.close()
        return reply.status, reply.text

    try:
        for child in [*replicas, balancer]:
            await child.start()
        # The replicas come up unready: they listen, and their health check says why.
        for port in ports:
            await wait_until(lambda p=port: http_status("127.0.0.1", p, "/healthcheck"),
                             timeout=60, what=f"replica on {port} listening")
            assert await http_status("127.0.0.1", port, "/healthcheck") == 503
        await wait_until(lambda: _quiet(states, ["down"] * 3), timeout=60,
                         what="the balancer marks every replica down")
        # Every replica is down: the balancer still tries them (panic), so clients get the
        # service's own answer, a 503 with its reason, not a dropped connection.
        status, text = await through_lb("GET", "/get_var?key=early")
        assert status == 503, text
        assert text.startswith("database unavailable"), text
        assert (await states()) == ["down"] * 3
        base = await baseline(target)

        started = time.monotonic()
        await asyncio.to_thread(own_postgres.start)
        db_up = time.monotonic()
        ready = await wait_until(lambda: _quiet(states, ["up"] * 3), timeout=60,
                                 what="the balancer takes every replica in")
        print(f"PostgreSQL started in {db_up - started:.2f}s; every replica ready and taken "
              f"in by the balancer {ready - db_up:.2f}s later")
        assert await through_lb("POST", "/set_var?key=late&value=v") == (201,
                                                                         "variable created")
        served = set()
        for _ in range(6):
            conn = await Connection("127.0.0.1", lb_port).open()
            try:
                reply = await conn.request("GET", "/get_var?key=late", close=True)
            finally:
                await conn.close()
            assert (reply.status, reply.text) == (200, "v")
            served.add(reply.served_by)
        assert len(served) == 3, served
        leaks = await check_leaks(target, base)
        assert leaks.ok, leaks.problems
    finally:
        await stop_children([balancer, *replicas])
        print(lines.tail(60))
    assert all(c.proc is not None and c.proc.returncode == 0 for c in [balancer, *replicas]), \
        [c.exit_codes for c in [balancer, *replicas]]


async def _quiet(states: object, wanted: list[str]) -> bool:
    try:
        return bool(await states() == wanted)  # type: ignore[operator]
    except (OSError, ValueError, TimeoutError):
        return False
