"""Helpers for the tests that run ``python -m stack`` for real: the supervisor as a
subprocess with its output collected, HTTP through the balancer, free ports."""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]


class Supervisor:
    """``python -m stack`` in the background, its output collected line by line."""

    def __init__(self, env: dict[str, str], *, new_session: bool = False) -> None:
        self.env = env
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._seen: dict[int, psutil.Process] = {}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stack"], cwd=ROOT, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=new_session,
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
        # What it had started and outlived it (a test of a supervisor killed, failed).
        for child in self._seen.values():
            with contextlib.suppress(psutil.Error):
                if child.is_running():
                    child.kill()
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
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self._seen.update((child.pid, child) for child in children)
        return children

    def commands(self) -> list[tuple[psutil.Process, list[str]]]:
        """:meth:`processes` with their command lines, leaving out those gone meanwhile (a
        PostgreSQL worker may exit between the listing and the look)."""
        found = []
        for proc in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                found.append((proc, proc.cmdline()))
        return found

    def replica(self, port: int) -> psutil.Process:
        for proc, command in self.commands():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                if "services" in command and proc.environ().get("SERVICE_PORT") == str(port):
                    return proc
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
