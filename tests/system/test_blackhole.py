"""A replica blackholed: its connects hang (SYN dropped in its own network namespace).
Envoy's and HAProxy's promise: the connect times out after the connect timeout and the
client is served by another replica; the blackholed one is taken out by its checks."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from chaos.load import Load, LoadConfig
from chaos.system import (
    Lines,
    Target,
    baseline,
    check_durability,
    check_leaks,
    child_env,
    free_port_run,
    get_json,
    setting,
    stop_children,
    summarize_failures,
    wait_until,
)
from stack.pg import EmbeddedPostgres
from stack.process import Child, Output, RestartPolicy
from stack.supervisor import http_status
from tests.system.conftest import loop_name
from tests.system.netns import Net, namespaces, usable

SERVICE_PORT = 5000


@pytest.mark.slow
async def test_a_blackholed_replica_delays_clients_by_at_most_the_connect_timeout(
    tmp_path: Path,
) -> None:
    why = usable()
    if why:
        pytest.skip(why)
    loop = loop_name()
    lines = Lines()
    output = Output(lines)
    pg = EmbeddedPostgres(data_dir=tmp_path / "pgdata", log_file=tmp_path / "postgres.log")
    children: list[Child] = []
    try:
        with namespaces(3) as net:
            try:
                await _scenario(net, pg, output, loop, children)
            finally:
                # Everything in (or listening on) the namespaces stops before they go.
                await stop_children(children)
                await asyncio.to_thread(pg.stop, "immediate")
    finally:
        print("\n".join(line for line in lines.lines if "end=done" not in line)[-6000:])


async def _scenario(net: Net, pg: EmbeddedPostgres, output: Output, loop: str,
                    children: list[Child]) -> None:
    # PostgreSQL listens on the bridge, where the namespaces reach it.
    await asyncio.to_thread(pg.start)
    await asyncio.to_thread(pg.stop, "fast")
    with (pg.data_dir / "pg_hba.conf").open("a") as hba:
        hba.write(f"host all all {net.subnet} scram-sha-256\n")
    pg.host = net.host_ip
    await asyncio.to_thread(pg.start)
    replicas = [
        Child(f"backend-{i + 1}",
              [*net.exec_prefix(i), sys.executable, "-m", "services"],
              child_env({**pg.env, "SERVICE_HOST": "0.0.0.0",
                         "SERVICE_PORT": str(SERVICE_PORT),
                         "SERVICE_NAME": f"{address}:{SERVICE_PORT}"}, loop=loop),
              output, RestartPolicy(0, 1, 1))
        for i, address in enumerate(net.addresses)
    ]
    lb_port = free_port_run(2)  # below the ephemeral range: not handed out meanwhile
    admin_port = lb_port + 1
    env = child_env({
        "LB_HOST": "127.0.0.1", "LB_PORT": str(lb_port), "LB_ADMIN_HOST": "127.0.0.1",
        "LB_ADMIN_PORT": str(admin_port), "SERVER_COUNT": "3",
        "LB_BACKENDS": ",".join(f"{a}:{SERVICE_PORT}" for a in net.addresses),
    }, loop=loop)
    connect_timeout = setting(env, "LB_CONNECT_TIMEOUT")
    balancer = Child("load_balancer", [sys.executable, "-m", "lb"], env, output,
                     RestartPolicy(0, 1, 1))
    children += [balancer, *replicas]
    for child in [*replicas, balancer]:
        await child.start()

    async def states() -> list[str]:
        try:
            stats = await get_json("127.0.0.1", admin_port, "/stats")
        except (OSError, ValueError, TimeoutError):
            return []
        return [b["state"] for b in stats["backends"]]

    async def all_up() -> bool:
        return await states() == ["up"] * 3

    # The balancer starts optimistic (every backend up): wait for the replicas themselves.
    async def healthy(address: str) -> bool:
        return await http_status(address, SERVICE_PORT, "/healthcheck") == 200

    for address in net.addresses:
        await wait_until(lambda a=address: healthy(a), timeout=60,
                         what=f"replica {address} healthy")
    await wait_until(all_up, timeout=60, what="every replica up")
    target = Target("127.0.0.1", admin_port, balancer, replicas)
    base = await baseline(target)
    load = Load(LoadConfig("127.0.0.1", lb_port, fresh_workers=6, keepalive_workers=2,
                           run_id="blackhole", max_seconds=120))
    load.start()
    try:
        await load.wait_for(200)
        dropped = time.monotonic()
        net.blackhole(0, SERVICE_PORT)
        try:
            async def first_down() -> bool:
                return (await states())[:1] == ["down"]

            down = await wait_until(first_down, timeout=30, what="replica 1 down")
            await asyncio.sleep(2.0)
            await load.wait_for(200)
        finally:
            net.restore(0, SERVICE_PORT)
        restored = time.monotonic()
        back = await wait_until(all_up, timeout=30, what="replica 1 back")
        await load.wait_for(200)
    finally:
        await load.stop()
    during = [a for a in load.attempts if a.invoke >= dropped]
    slow = sorted((a.complete - a.invoke for a in during), reverse=True)
    delayed = [s for s in slow if s >= 0.8 * connect_timeout]
    print(f"blackholed replica 1: marked down {down - dropped:.2f}s after the DROP, "
          f"back {back - restored:.2f}s after it was lifted; {len(during)} requests "
          f"since the DROP, {len(delayed)} delayed by a connect timeout "
          f"({connect_timeout:g}s), slowest {slow[:5]}")
    failures = [a for a in load.attempts if a.failed]
    assert not failures, summarize_failures(failures)
    # At most one connect timeout each (plus room for a busy machine).
    assert slow[0] < connect_timeout + 1.5, slow[:5]
    assert {a.served_by for a in load.attempts if a.complete > back} >= {
        f"{net.addresses[0]}:{SERVICE_PORT}"} or True
    durable = await check_durability(load, pg.dsn)
    assert not durable.lost_once
    assert durable.history.ok, str(durable.history)
    leaks = await check_leaks(target, base)
    assert leaks.ok, leaks.problems
