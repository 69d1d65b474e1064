"""The processes a benchmark starts: backends (nginx or the minimal responder), proxies (our
balancer, HAProxy), each owned by a :class:`Procs` registry that stops all of them, by pid.

Every process here is started by us, on 127.0.0.1 and a free port, with its configuration in a
temporary directory; ``Procs.stop_all`` terminates each (then kills it after a deadline) and
removes the directory.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The bulk body: 16 MiB.
BULK_BYTES = 16 << 20
#: The tiny answer of the cheap backends.
TINY_BODY = b"ok\n"
#: Connection limit given to every proxy under test (the idle-RSS run opens 5,000).
PROXY_MAXCONN = 8000  # HAProxy needs 2 descriptors each: fits a 20,000 limit
#: Timeouts shared by both proxies: ours' defaults, written into HAProxy's configuration.
CONNECT_TIMEOUT_S = 3
IDLE_TIMEOUT_S = 300
HALF_CLOSE_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports (for the stack's replicas), below the
    ephemeral range so that the benchmark's own connections never hold one of them."""
    rng = random.Random()
    for _ in range(500):
        first = rng.randrange(20000, 32000 - count)
        if all(_bindable(port) for port in range(first, first + count)):
            return first
    raise RuntimeError("no run of free consecutive ports")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the programs bind
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pid {proc.pid} exited with {proc.returncode} during start")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s")


def http_ok(port: int, path: str = "/", timeout: float = 2.0) -> bool:
    """One ``GET path`` on a new connection answers 200."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
                         .encode())
            head = sock.recv(64)
    except OSError:
        return False
    return head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200")


def wait_http(port: int, proc: subprocess.Popen[bytes], path: str = "/",
              timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pid {proc.pid} exited with {proc.returncode} during start")
        if http_ok(port, path):
            return
        time.sleep(0.1)
    raise RuntimeError(f"no 200 from 127.0.0.1:{port}{path} after {timeout:g}s")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


class Procs:
    """Owns every process it starts and the temporary directory their files live in."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="varstack-bench-"))
        self.procs: list[Proc] = []

    def spawn(self, name: str, cmd: list[str], port: int, *, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Proc:
        log = self.dir / f"{name}-{port}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=cwd)
        proc = Proc(name, popen, port, log)
        self.procs.append(proc)
        return proc

    def started(self, proc: Proc, path: str = "/") -> Proc:
        """Wait until ``proc`` answers 200 on ``path``; on failure, say why with its log."""
        try:
            wait_http(proc.port, proc.popen, path)
        except RuntimeError as exc:
            self.stop(proc)
            raise RuntimeError(f"{proc.name}: {exc}; its log:\n{self.tail(proc)}") from None
        return proc

    def stop(self, proc: Proc, timeout: float = 10.0) -> None:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.kill()
                proc.popen.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)
        shutil.rmtree(self.dir, ignore_errors=True)

    def tail(self, proc: Proc, lines: int = 20) -> str:
        try:
            return "\n".join(proc.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # --- backends -----------------------------------------------------------------------------

    def bulk_file(self) -> Path:
        path = self.dir / "bulk.bin"
        if not path.exists():
            path.write_bytes(os.urandom(1 << 20) * (BULK_BYTES >> 20))
        return path

    def nginx(self, nginx: str) -> Proc:
        """nginx, one worker, answering ``ok`` on every path and 16 MiB on ``/bulk``."""
        port = free_port()
        conf_dir = self.dir / f"nginx-{port}"
        conf_dir.mkdir()
        bulk = self.bulk_file()
        temp = "\n".join(f"  {kind}_temp_path {conf_dir}/{kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = conf_dir / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
master_process off;
daemon off;
pid {conf_dir}/nginx.pid;
error_log {conf_dir}/error.log warn;
worker_rlimit_nofile 40000;
events {{ worker_connections 16384; multi_accept on; }}
http {{
  access_log off;
{temp}
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_header_timeout 300s;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = /bulk {{ default_type application/octet-stream; alias {bulk}; }}
    location / {{ default_type text/plain; return 200 "ok\\n"; }}
  }}
}}
""")
        proc = self.spawn("nginx", [nginx, "-p", str(conf_dir), "-c", str(conf)], port)
        return self.started(proc)

    def responder(self) -> Proc:
        """The minimal uvloop responder (``python -m bench.backends``): nginx's stand-in."""
        port = free_port()
        proc = self.spawn("responder", [sys.executable, "-m", "bench.backends", str(port)], port,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        return self.started(proc)

    # --- proxies ------------------------------------------------------------------------------

    def ours(self, backends: list[int], *, extra_env: dict[str, str] | None = None,
             python: str = sys.executable, pythonpath: str | None = None) -> Proc:
        """Our balancer, ``python -m lb``, in front of ``backends`` (ports on 127.0.0.1)."""
        port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": pythonpath or str(ROOT),
            "LB_HOST": "127.0.0.1",
            "LB_PORT": str(port),
            "LB_BACKENDS": ",".join(f"127.0.0.1:{p}" for p in backends),
            "SERVER_COUNT": str(len(backends)),
            "LB_ADMIN_PORT": "0",
            "LB_LOG_LEVEL": "warning",
            "LB_MAX_CONNECTIONS": str(PROXY_MAXCONN),
            "LB_BACKLOG": "4096",
            **(extra_env or {}),
        }
        # ``python -m`` puts the working directory first on sys.path: run from the package's.
        cwd = Path(pythonpath.split(os.pathsep)[0]) if pythonpath else ROOT
        proc = self.spawn("lb", [python, "-m", "lb"], port, env=env, cwd=cwd)
        return self.started(proc, "/healthcheck")

    def haproxy(self, haproxy: str, backends: list[int], *, tuned: bool = False) -> Proc:
        """HAProxy in TCP mode, one thread, round robin over ``backends``; ``tuned`` adds
        ``option splice-auto`` and ``tune.bufsize 65536`` (tuned for throughput)."""
        port = free_port()
        # splice-auto reserves descriptors for pipes (maxpipes = maxconn / 4): a lower cap.
        maxconn = 4096 if tuned else PROXY_MAXCONN
        servers = "\n".join(f"  server s{i} 127.0.0.1:{p}" for i, p in enumerate(backends, 1))
        tuning = "  tune.bufsize 65536\n" if tuned else ""
        splice = "  option splice-auto\n" if tuned else ""
        cfg = self.dir / f"haproxy-{port}.cfg"
        cfg.write_text(f"""global
  nbthread 1
  maxconn {maxconn}
{tuning}
defaults
  mode tcp
  balance roundrobin
  timeout connect {CONNECT_TIMEOUT_S}s
  timeout client {IDLE_TIMEOUT_S}s
  timeout server {IDLE_TIMEOUT_S}s
  timeout client-fin {HALF_CLOSE_TIMEOUT_S}s
  timeout server-fin {HALF_CLOSE_TIMEOUT_S}s
{splice}
listen bench
  bind 127.0.0.1:{port}
  maxconn {maxconn}
  backlog 4096
{servers}
""")
        proc = self.spawn("haproxy-tuned" if tuned else "haproxy", [haproxy, "-db", "-f", str(cfg)],
                          port)
        return self.started(proc, "/healthcheck")
