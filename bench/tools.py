"""The external tools the benchmark drives: found, installed from Debian when possible, versioned.

``wrk`` is required (every measurement is a wrk run); ``hey``, ``haproxy`` and ``nginx`` are
optional: when one is missing and cannot be installed, the comparison that needs it is skipped with
a line that says so (nginx has a stand-in: the minimal uvloop responder in ``bench.backends``).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

#: tool -> Debian package that provides it.
DEBIAN_PACKAGES = {"wrk": "wrk", "hey": "hey", "haproxy": "haproxy", "nginx": "nginx-light"}


@dataclass
class Tools:
    """Paths of the tools found (None: missing), and why a missing one is missing."""

    paths: dict[str, str | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def has(self, name: str) -> bool:
        return self.paths.get(name) is not None

    def path(self, name: str) -> str:
        found = self.paths.get(name)
        if found is None:
            raise RuntimeError(f"{name} is not installed")
        return found


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found is None and name in ("nginx", "haproxy"):  # /usr/sbin is not on every PATH
        candidate = Path("/usr/sbin") / name
        found = str(candidate) if candidate.exists() else None
    return found


def ensure(names: list[str], *, install: bool, say: object = print) -> Tools:
    """Find each tool; as root on Debian, ``apt-get install`` the missing ones (one call)."""
    tools = Tools({name: _which(name) for name in names})
    missing = [n for n in names if not tools.has(n)]
    if missing and install:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            packages = sorted({DEBIAN_PACKAGES[n] for n in missing})
            assert callable(say)
            say(f"installing {' '.join(packages)} from Debian (apt-get)...")
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True,
                           timeout=300, check=False)
            done = subprocess.run(
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
                env=env, capture_output=True, text=True, timeout=600, check=False,
            )
            if done.returncode != 0:
                tools.notes.append("apt-get install failed: " + done.stderr.strip()[-300:])
            # Debian starts the daemons it installs when an init system runs: stop them, the
            # benchmark starts its own instances on its own ports.
            for service in ("nginx", "haproxy"):
                if service in missing and shutil.which("systemctl"):
                    subprocess.run(["systemctl", "disable", "--now", service],
                                   capture_output=True, timeout=60, check=False)
        else:
            tools.notes.append(
                "not root or no apt-get: install them by hand (Debian: apt-get install "
                + " ".join(sorted({DEBIAN_PACKAGES[n] for n in missing})) + ")"
            )
        tools.paths.update({name: _which(name) for name in missing})
    for name in names:
        if not tools.has(name):
            tools.notes.append(f"{name} is missing: {_consequence(name)}")
    return tools


def _consequence(name: str) -> str:
    return {
        "wrk": "no measurement can run",
        "hey": "the hey runs are skipped",
        "haproxy": "every comparison with HAProxy is skipped",
        "nginx": "the minimal uvloop responder stands in for nginx as the backend",
    }[name]


def _first_line(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "?"


def versions(tools: Tools) -> dict[str, str]:
    """Versions of everything that shapes the numbers: tools, Python and its libraries."""
    out: dict[str, str] = {"python": sys.version.split()[0]}
    for dist in ("uvloop", "aiohttp", "asyncpg", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    if tools.has("wrk"):
        line = _first_line([tools.path("wrk"), "-v"])
        match = re.search(r"wrk (\S+)", line)
        out["wrk"] = match.group(1) if match else line
    if tools.has("haproxy"):
        line = _first_line([tools.path("haproxy"), "-v"])
        match = re.search(r"version (\S+)", line)
        out["haproxy"] = match.group(1) if match else line
    if tools.has("nginx"):
        line = _first_line([tools.path("nginx"), "-v"])
        out["nginx"] = line.split("/")[-1]
    if tools.has("hey"):
        out["hey"] = _debian_version("hey")
    return out


def _debian_version(package: str) -> str:
    if not shutil.which("dpkg-query"):
        return "?"
    line = _first_line(["dpkg-query", "-W", "-f=${Version}", package])
    return line if line and "no packages" not in line else "?"


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
                break
    except OSError:
        pass
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "?"
    distro = "?"
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return {
        "cpus (nproc)": str(os.cpu_count()),
        "cpu model": model,
        "memory": mem,
        "kernel": platform.release(),
        "os": distro,
        "load average at start": load,
    }
