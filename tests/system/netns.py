"""Replicas in network namespaces of their own, so one can be blackholed with a DROP rule.

Each namespace gets a veth pair whose host end joins a bridge made for the test; the
bridge holds the host's address on a private /24 (PostgreSQL listens there too), each
namespace one address on it.  Nothing leaves the machine: the namespaces, the veths and
the bridge are created here and deleted after, even on failure.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


def usable() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@dataclass(frozen=True)
class Net:
    host_ip: str
    subnet: str
    namespaces: list[str]
    addresses: list[str]

    def exec_prefix(self, index: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[index]]

    def blackhole(self, index: int, port: int) -> None:
        """New connections to ``port`` in namespace ``index`` hang: their SYN is dropped."""
        run(*self.exec_prefix(index), "iptables", "-I", "INPUT", "-p", "tcp", "--syn",
            "--dport", str(port), "-j", "DROP")

    def restore(self, index: int, port: int) -> None:
        run(*self.exec_prefix(index), "iptables", "-D", "INPUT", "-p", "tcp", "--syn",
            "--dport", str(port), "-j", "DROP")


@contextlib.contextmanager
def namespaces(count: int) -> Iterator[Net]:
    tag = f"vs{os.getpid() % 100000}"
    used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True,
                          check=True).stdout
    octet = next(n for n in random.sample(range(16, 250), 200) if f"10.231.{n}." not in used)
    subnet = f"10.231.{octet}.0/24"
    host_ip = f"10.231.{octet}.1"
    bridge = f"{tag}br"
    names = [f"{tag}-r{i}" for i in range(count)]
    addresses = [f"10.231.{octet}.{10 + i}" for i in range(count)]
    created_bridge = False
    created: list[str] = []
    veths: list[str] = []
    try:
        run("ip", "link", "add", bridge, "type", "bridge")
        created_bridge = True
        run("ip", "addr", "add", f"{host_ip}/24", "dev", bridge)
        run("ip", "link", "set", bridge, "up")
        for i, (name, address) in enumerate(zip(names, addresses, strict=True)):
            run("ip", "netns", "add", name)
            created.append(name)
            host_end, ns_end = f"{tag}h{i}", f"{tag}n{i}"
            run("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            veths.append(host_end)
            run("ip", "link", "set", ns_end, "netns", name)
            run("ip", "link", "set", host_end, "master", bridge)
            run("ip", "link", "set", host_end, "up")
            run("ip", "netns", "exec", name, "ip", "addr", "add", f"{address}/24", "dev", ns_end)
            run("ip", "netns", "exec", name, "ip", "link", "set", ns_end, "up")
            run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield Net(host_ip, subnet, names, addresses)
    finally:
        for veth in veths:
            # Deleting one end deletes the pair (a namespace may outlive its name a while).
            with contextlib.suppress(subprocess.SubprocessError):
                run("ip", "link", "del", veth)
        for name in created:
            # Deleting a namespace deletes the veth end in it, and so its peer.
            with contextlib.suppress(subprocess.SubprocessError):
                run("ip", "netns", "del", name)
        if created_bridge:
            with contextlib.suppress(subprocess.SubprocessError):
                run("ip", "link", "del", bridge)
