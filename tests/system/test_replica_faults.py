"""Replicas failing under load: killed, hung, blackholed.  The balancer's promises
(HAProxy's and Envoy's): a failed connect is retried on another replica, bytes already
relayed are never replayed, a dead or hung replica is taken out by its health checks and
back in once they pass again, and no client waits longer than the configured timeouts."""

from __future__ import annotations

import asyncio

from chaos.load import backends_by_port
from chaos.rawhttp import Connection
from chaos.system import (
    baseline,
    hang_replica,
    judge,
    kill_replica,
    port_of,
    replica_of,
    setting,
    summarize_failures,
    wait_until,
)
from tests.system.conftest import StackFactory, finish, load_for


async def test_a_replica_killed_under_load_fails_only_its_own_connections(
    system: StackFactory,
) -> None:
    async with system() as (stack, lines):
        base = await baseline(stack)
        load = load_for(stack, "kill", fresh_workers=4, keepalive_workers=6, max_seconds=90)
        load.start()
        try:
            await load.wait_for(300)
            fault = await kill_replica(stack, 0)
            victim = fault.target
            # Taken back for real: new connections are served by it again.
            await wait_until(
                lambda: any(port_of(a.served_by) == victim and a.invoke > fault.recovered
                            for a in load.attempts),
                timeout=20, what="a request served by the restarted replica")
            await load.wait_for(200)
        finally:
            await load.stop()
        verdict = judge(fault, load, lines.of("load_balancer"), until=float("inf"))
        ports = backends_by_port(lines.of("load_balancer"))
        print(f"{fault.name}: dead {fault.effective - fault.started:.3f}s after SIGKILL, "
              f"taken back {fault.recovery:.2f}s after its restart; {len(load.attempts)} "
              f"requests, {len(verdict.failures)} failed ({verdict.why()})")
        print("failed requests (each on a connection to the killed replica):")
        print(summarize_failures(verdict.failures, limit=50))
        assert not verdict.unexplained, summarize_failures(verdict.unexplained)
        after = [a for a in verdict.failures if a.opened is None or a.opened >= fault.effective]
        assert not after, "failures on connections opened after the kill:\n" + \
            summarize_failures(after)
        assert all(victim in replica_of(a, ports) for a in verdict.failures)
        await finish(stack, load, base)


async def test_a_hung_replica_is_marked_down_its_idle_connections_time_out_and_it_comes_back(
    system: StackFactory,
) -> None:
    async with system() as (stack, lines):
        env = stack.config.environ
        interval, fall, rise = (setting(env, "LB_CHECK_INTERVAL"), setting(env, "LB_CHECK_FALL"),
                                setting(env, "LB_CHECK_RISE"))
        check_timeout, idle = setting(env, "LB_CHECK_TIMEOUT"), setting(env, "LB_IDLE_TIMEOUT")
        base = await baseline(stack)
        victim = stack.config.replica_ports[1]
        # Idle keep-alive connections pinned to the victim (round robin: every third).
        idle_conns: list[Connection] = []
        for _ in range(9):
            conn = await Connection(stack.config.client_host, stack.config.lb_port).open()
            reply = await conn.request("GET", "/healthcheck")
            assert reply.status == 200
            if port_of(reply.served_by) == victim:
                idle_conns.append(conn)
            else:
                await conn.close()
        assert idle_conns
        load = load_for(stack, "hang", fresh_workers=4, keepalive_workers=4, max_seconds=90)
        load.start()
        try:
            await load.wait_for(200)
            hang = asyncio.create_task(hang_replica(stack, 1, hold=idle + 1.0))

            async def closed(conn: Connection) -> float:
                async with asyncio.timeout(idle + 10):
                    await conn.until_closed_by_peer()
                return asyncio.get_running_loop().time()

            closed_at = await asyncio.gather(*(closed(c) for c in idle_conns))
            fault = await hang
            await load.wait_for(200)
        finally:
            await load.stop()
            for conn in idle_conns:
                await conn.close()
        verdict = judge(fault, load, lines.of("load_balancer"), until=float("inf"))
        down_after = fault.details["marked_down"]
        back_after = fault.details["back_after_sigcont"]
        print(f"{fault.name}: marked down after {down_after:.2f}s (fall {fall:g} x interval "
              f"{interval:g}s + check timeout {check_timeout:g}s), back {back_after:.2f}s after "
              f"SIGCONT (rise {rise:g} x {interval:g}s); {len(idle_conns)} idle connections to "
              f"it closed by the balancer; {len(load.attempts)} requests, "
              f"{len(verdict.failures)} failed ({verdict.why()})")
        print(summarize_failures(verdict.failures, limit=50))
        assert len(closed_at) == len(idle_conns)
        # Bounds from the settings, with room for a busy machine (never a speed test).
        assert down_after <= fall * (interval + check_timeout) + interval + 3.0
        assert back_after <= rise * interval + check_timeout + 3.0
        assert not verdict.unexplained, summarize_failures(verdict.unexplained)
        await finish(stack, load, base)
