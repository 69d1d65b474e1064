"""``make run`` for real: the supervisor as a subprocess, used through the balancer's port.

It starts ``python -m stack`` with two replicas on free ports and its own data directory,
talks to it through the balancer, SIGKILLs a replica and sees the restart policy bring it
back into the balancer, SIGTERMs the supervisor and checks that every process it started
is gone and every port is free; then starts it again on the same data directory and reads
what was written (the embedded database keeps its data).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from stack.supervisor import port_in_use
from tests.deploy.supervised import ROOT, Supervisor, request, served_by

pytestmark = pytest.mark.slow


def test_make_run_serves_restarts_and_stops_cleanly(
    supervisor: Supervisor, stack_env: dict[str, str]
) -> None:
    lb_port = int(stack_env["LB_PORT"])
    first = int(stack_env["STACK_BACKEND_PORT"])
    replica_ports = [first, first + 1]
    supervisor.wait_for("Ctrl-C (or SIGTERM) stops everything", timeout=90)
    banner = "\n".join(supervisor.lines)
    for tool in ("curl", "wrk", "hey"):
        assert f"{tool} " in banner
        assert f"127.0.0.1:{lb_port}" in banner

    # The API through the balancer.
    assert request(lb_port, "POST", "/set_var", {"key": "k", "value": "v"})[0] == 201
    assert request(lb_port, "GET", "/get_var?key=k")[:2] == (200, "v")

    # Connections spread over both replicas, each named (X-Served-By) by the address the
    # banner, /stats and /metrics show for it.
    names = served_by(lb_port, 8)
    assert names == {f"127.0.0.1:{port}" for port in replica_ports}, names
    assert f"replicas: 127.0.0.1:{first}, 127.0.0.1:{first + 1}" in banner

    # A replica killed is restarted (on-failure) and taken back by the balancer.
    victim = supervisor.replica(replica_ports[0])
    victim.kill()
    supervisor.wait_for("backend-1    | was killed by SIGKILL; restarting in 1s", timeout=10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if served_by(lb_port, 4) == names:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the restarted replica is not back:\n" + supervisor.log())
    assert supervisor.replica(replica_ports[0]).pid != victim.pid

    # SIGTERM: everything stops, in order, and nothing is left.
    started = supervisor.processes()
    assert len(started) >= 4  # 2 replicas, the balancer, PostgreSQL (and its workers)
    supervisor.proc.send_signal(signal.SIGTERM)
    assert supervisor.proc.wait(60) == 0, supervisor.log()
    log = supervisor.log()
    order = [log.index(s) for s in ("stopping load_balancer", "stopping 2 replica(s)",
                                    "stopping the database", "stack        | stopped")]
    assert order == sorted(order), log
    _gone, alive = psutil.wait_procs(started, timeout=5)
    assert not alive, f"left running: {alive}"
    for port in (lb_port, int(stack_env["LB_ADMIN_PORT"]), *replica_ports):
        assert not port_in_use("127.0.0.1", port), port

    # The embedded database kept its data in STACK_DATA_DIR: a new start reads it.
    again = Supervisor(stack_env)
    try:
        again.wait_for("Ctrl-C (or SIGTERM) stops everything", timeout=90)
        assert request(lb_port, "GET", "/get_var?key=k")[:2] == (200, "v")
        again.proc.send_signal(signal.SIGINT)  # Ctrl-C stops it the same way
        assert again.proc.wait(60) == 0, again.log()
    finally:
        again.close()


def test_a_busy_port_is_reported_and_nothing_starts(stack_env: dict[str, str]) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        env = stack_env | {"LB_PORT": str(sock.getsockname()[1])}
        result = subprocess.run([sys.executable, "-m", "stack"], cwd=ROOT, env=env, text=True,
                                capture_output=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "already in use" in result.stdout
    assert "(LB_PORT)" in result.stdout
    # Not even the database started: its directory holds at most the stack's lock file.
    data = Path(stack_env["STACK_DATA_DIR"])
    assert not data.exists() or [p.name for p in data.iterdir()] == ["stack.lock"]


def test_a_bad_setting_is_a_clear_error(stack_env: dict[str, str]) -> None:
    env = stack_env | {"SERVER_COUNT": "many"}
    result = subprocess.run([sys.executable, "-m", "stack"], cwd=ROOT, env=env, text=True,
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "SERVER_COUNT must be a whole number" in result.stderr
