"""Load generators (wrk, hey), their output parsed, and /proc sampling of CPU and RSS."""

from __future__ import annotations

import os
import re
import resource
import shlex
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
WRK_DIR = BENCH_DIR / "wrk"
_CLK_TCK = os.sysconf("SC_CLK_TCK")

_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_SIZE_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


class Stopped(BaseException):
    """The bench is stopping (Ctrl-C, SIGTERM): no load is started, and a cut one has no result.

    A BaseException, like KeyboardInterrupt: a section's failure handler does not take it for a
    failed section and go on to the next one."""


_stopping = threading.Event()
_running: set[subprocess.Popen[str]] = set()
_running_lock = threading.Lock()


def stop_loads() -> None:
    """Kill the load generators running now and refuse to start more, from any thread.

    Measuring threads cannot be cancelled: without this, one would go on sending load to a
    stack already stopped, and print the refusals it counted as figures."""
    with _running_lock:
        _stopping.set()
        for proc in _running:
            proc.kill()


def allow_loads() -> None:
    """Undo :func:`stop_loads` (a new run in the same process)."""
    _stopping.clear()


def run_load(cmd: list[str], *, timeout: float, **popen: Any) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(cmd)`` with its output captured, cut short by :func:`stop_loads`."""
    with _running_lock:
        if _stopping.is_set():
            raise Stopped(f"not started: {display(cmd)}")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                **popen)
        _running.add(proc)
    try:
        with proc:
            try:
                out, err = proc.communicate(timeout=timeout)
            except BaseException:
                proc.kill()
                raise
    finally:
        with _running_lock:
            _running.discard(proc)
    if _stopping.is_set():
        raise Stopped(f"cut short: {display(cmd)}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@dataclass
class LoadResult:
    """One load run: throughput, latency percentiles (ms), errors, and how it was run."""

    tool: str
    command: str
    rps: float
    requests: int
    seconds: float
    bytes_read: float
    latency_ms: dict[str, float] = field(default_factory=dict)
    errors: int = 0
    non_2xx: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def mib_s(self) -> float:
        return self.bytes_read / (1 << 20) / self.seconds if self.seconds else 0.0


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _TIME_UNITS[match.group(2)]


def _bytes(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)([KMGT]?B)", text.strip())
    if not match:
        raise ValueError(f"not a wrk size: {text!r}")
    return float(match.group(1)) * _SIZE_UNITS[match.group(2)]


def parse_wrk(out: str, command: str = "") -> LoadResult:
    total = re.search(r"(\d+) requests in ([\d.]+\w+), ([\d.]+\w+) read", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not total or not rps:
        raise ValueError(f"unexpected wrk output:\n{out}")
    latency = {
        f"p{m.group(1)}": _ms(m.group(2))
        for m in re.finditer(r"^\s+(50|75|90|99)(?:\.0+)?%\s+(\S+)", out, re.M)
    }
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors = sum(int(g) for g in sock.groups())
    non = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return LoadResult(
        tool="wrk",
        command=command,
        rps=float(rps.group(1)),
        requests=int(total.group(1)),
        seconds=_ms(total.group(2)) / 1e3,
        bytes_read=_bytes(total.group(3)),
        latency_ms=latency,
        errors=errors,
        non_2xx=int(non.group(1)) if non else 0,
    )


def wrk_command(
    url: str,
    *,
    seconds: float,
    connections: int,
    threads: int = 1,
    script: str | None = None,
    headers: tuple[str, ...] = (),
    wrk: str = "wrk",
) -> list[str]:
    cmd = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
           "--timeout", "10s"]
    for header in headers:
        cmd += ["-H", header]
    if script:
        cmd += ["-s", str(WRK_DIR / script)]
    return [*cmd, url]


def run_wrk(
    url: str,
    *,
    seconds: float,
    connections: int,
    threads: int = 1,
    script: str | None = None,
    headers: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    wrk: str = "wrk",
) -> LoadResult:
    cmd = wrk_command(url, seconds=seconds, connections=connections, threads=threads,
                      script=script, headers=headers, wrk=wrk)
    done = run_load(cmd, timeout=seconds + 60, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    return parse_wrk(done.stdout, display(cmd))


def parse_hey(out: str, command: str = "") -> LoadResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"Total:\s+([\d.]+) secs", out)
    data = re.search(r"Total data:\s+(\d+) bytes", out)
    if not rps or not total:
        raise ValueError(f"unexpected hey output:\n{out}")
    latency = {
        f"p{m.group(1)}": float(m.group(2)) * 1e3
        for m in re.finditer(r"^\s+(50|75|90|99)% in ([\d.]+) secs", out, re.M)
    }
    statuses = {m.group(1): int(m.group(2))
                for m in re.finditer(r"^\s+\[(\d{3})\]\s+(\d+) responses", out, re.M)}
    errors = 0
    if "Error distribution:" in out:
        tail = out.split("Error distribution:", 1)[1]
        errors = sum(int(m.group(1)) for m in re.finditer(r"^\s+\[(\d+)\]", tail, re.M))
    seconds = float(total.group(1))
    requests = sum(statuses.values())
    return LoadResult(
        tool="hey",
        command=command,
        rps=float(rps.group(1)),
        requests=requests,
        seconds=seconds,
        bytes_read=float(data.group(1)) if data else 0.0,
        latency_ms=latency,
        errors=errors,
        non_2xx=sum(n for code, n in statuses.items() if not code.startswith(("2", "3"))),
        statuses=statuses,
    )


def hey_command(
    url: str,
    *,
    seconds: float,
    connections: int,
    method: str = "GET",
    body: str | None = None,
    hey: str = "hey",
) -> list[str]:
    cmd = [hey, "-z", f"{max(1, round(seconds))}s", "-c", str(connections), "-m", method]
    if body is not None:
        cmd += ["-T", "application/json", "-d", body]
    return [*cmd, url]


def run_hey(
    url: str,
    *,
    seconds: float,
    connections: int,
    method: str = "GET",
    body: str | None = None,
    hey: str = "hey",
) -> LoadResult:
    cmd = hey_command(url, seconds=seconds, connections=connections, method=method, body=body,
                      hey=hey)
    done = run_load(cmd, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    return parse_hey(done.stdout, display(cmd))


def display(cmd: list[str]) -> str:
    """A command line as a user would type it (scripts relative to the checkout)."""
    root = str(BENCH_DIR.parent) + "/"
    return shlex.join(part.replace(root, "") if part.startswith(root) else part
                      for part in (Path(cmd[0]).name, *cmd[1:]))


# --- /proc ------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    # After the last ")": a command name may hold spaces and parentheses.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system (kernel) CPU seconds of one process so far (from /proc/<pid>/stat)."""
    fields = _stat_fields(pid)
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def user_cpu_seconds(pid: int) -> float:
    """User CPU seconds of one process so far."""
    return cpu_times(pid)[0]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far."""
    return sum(cpu_times(pid))


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process, of its children that ended (cutime, cstime) and of its live
    children: a PostgreSQL postmaster with every backend, those of connections that come and
    go included."""
    fields = _stat_fields(pid)
    total = sum(int(f) for f in fields[11:15]) / _CLK_TCK
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            child = _stat_fields(int(entry.name))
        except OSError:  # ended since the listing
            continue
        if int(child[1]) == pid:
            total += (int(child[11]) + int(child[12])) / _CLK_TCK
    return total


def ended_children_cpu_seconds() -> float:
    """CPU seconds of this process's children that have ended and been waited for (the load
    generators, once each run is over)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent working so far (/proc/stat: user, nice, system, irq and
    softirq; not idle, iowait, or steal, the time the hypervisor gave to someone else)."""
    user, nice, system, _idle, _iowait, irq, softirq = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8])
    return (user + nice + system + irq + softirq) / _CLK_TCK


def rss_kib(pid: int) -> int:
    """Resident set size of one process, KiB (VmRSS from /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")
