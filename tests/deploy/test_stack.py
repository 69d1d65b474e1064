"""``make run`` for real: the supervisor as a subprocess, used through the balancer's port.

It starts ``python -m stack`` with two replicas on free ports and its own data directory,
talks to it through the balancer, SIGKILLs a replica and sees the restart policy bring it
back into the balancer, SIGTERMs the supervisor and checks that every process it started
is gone and every port is free; then starts it again on the same data directory and reads
what was written (the embedded database keeps its data).
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from stack.pg import free_port
from stack.supervisor import port_in_use

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


class Supervisor:
    """``python -m stack`` in the background, its output collected line by line."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stack"], cwd=ROOT, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float) -> str:
        """The first line (from now on) that contains ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"the supervisor exited before {text!r}:\n" + self.log())
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} within {timeout}s:\n" + self.log())

    def close(self) -> None:
        """Kill what is left (after a failed test) and release the pipe."""
        if self.proc.poll() is None:
            for child in self.processes():
                child.kill()
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def drain(self) -> None:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self.lines.append(line)

    def log(self) -> str:
        self.drain()
        return "\n".join(self.lines[-80:])

    def processes(self) -> list[psutil.Process]:
        """Everything the supervisor started: replicas, balancer, PostgreSQL and its workers."""
        return psutil.Process(self.proc.pid).children(recursive=True)

    def replica(self, port: int) -> psutil.Process:
        for proc in self.processes():
            try:
                if "services" in proc.cmdline() and proc.environ().get("SERVICE_PORT") == str(port):
                    return proc
            except psutil.NoSuchProcess:
                continue
        raise AssertionError(f"no replica on port {port}")


def request(port: int, method: str, path: str, body: dict[str, str] | None = None,
            ) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=payload,
                     headers={"Content-Type": "application/json"} if payload else {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(), resp.getheader("X-Served-By", "")
    finally:
        conn.close()


def served_by(port: int, n: int) -> set[str]:
    seen = set()
    for _ in range(n):
        try:
            status, _, who = request(port, "GET", "/healthcheck")
        except OSError:
            continue
        if status == 200:
            seen.add(who)
    return seen


def _consecutive_free_ports(n: int) -> int:
    # Below the ephemeral range: there, client connections' TIME_WAIT entries often hold a
    # port that a listener cannot take.
    for _ in range(200):
        base = random.randrange(20000, 32000)
        if not any(port_in_use("127.0.0.1", base + i) for i in range(n)):
            return base
    raise AssertionError("no run of free ports")


@pytest.fixture
def stack_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGSQL_", "LB_", "STACK_"))}
    env.update({
        "SERVER_COUNT": "2",
        "LB_HOST": "127.0.0.1",
        "LB_PORT": str(free_port()),
        "LB_ADMIN_PORT": str(free_port()),
        "STACK_BACKEND_PORT": str(_consecutive_free_ports(2)),
        "STACK_DATA_DIR": str(tmp_path / "varstack"),
        "STACK_RESTART_DELAY": "1",  # compose's 5 s, shortened to keep the test short
        "SERVICE_ACCESS_LOG": "off",
    })
    return env


@pytest.fixture
def supervisor(stack_env: dict[str, str]) -> Iterator[Supervisor]:
    sup = Supervisor(stack_env)
    try:
        yield sup
    finally:
        sup.close()


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

    # Connections spread over both replicas.
    names = served_by(lb_port, 8)
    assert len(names) == 2, names

    # A replica killed is restarted (on-failure) and taken back by the balancer.
    victim = supervisor.replica(replica_ports[0])
    victim.kill()
    supervisor.wait_for("backend-1    | exited with status -9; restarting in 1s", timeout=10)
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
    assert not Path(stack_env["STACK_DATA_DIR"]).exists()  # not even the database started


def test_a_bad_setting_is_a_clear_error(stack_env: dict[str, str]) -> None:
    env = stack_env | {"SERVER_COUNT": "many"}
    result = subprocess.run([sys.executable, "-m", "stack"], cwd=ROOT, env=env, text=True,
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "SERVER_COUNT must be a whole number" in result.stderr
