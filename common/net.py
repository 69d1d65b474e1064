"""Listening sockets made by the program itself, handed to the loop; host names."""

from __future__ import annotations

import _socket
import asyncio
import errno
import ipaddress
import os
import re
import socket
import struct
from typing import Final
from urllib.parse import urlsplit

#: accept() or connect() errors that mean "this process is out of something", not "that peer
#: is bad".
OUT_OF_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

#: Fields of Linux's ``struct tcp_info`` (byte offset, layout), for :func:`tcp_info_field`.
#: ``tcpi_unacked``, a u32 after eight u8 and four u32 fields: for a listening socket, the
#: length of its accept queue.
TCPI_UNACKED: Final = (24, struct.Struct("=I"))
#: ``tcpi_bytes_acked``, a u64 (Linux 4.2 on): the bytes the peer acknowledged; a slow reader
#: taking what the kernel holds for it moves it.
TCPI_BYTES_ACKED: Final = (120, struct.Struct("=Q"))


def tcp_info_field(sock: _socket.socket, field: tuple[int, struct.Struct]) -> int:
    """One field of the kernel's ``struct tcp_info`` for ``sock``: 0 where the kernel does not
    give it (an error, or a kernel older than the field)."""
    offset, layout = field
    length = offset + layout.size
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, length)
    except OSError:
        return 0
    if len(info) < length:
        return 0
    return int(layout.unpack_from(info, offset)[0])


class ListenError(OSError):
    """A listener could not bind: ``address`` says which, and the settings that name it."""

    def __init__(self, address: str, exc: OSError) -> None:
        # The errno's own words ("Address already in use"), not the loop's longer sentence
        # that repeats the address; a resolver error (negative) keeps its own.
        code = exc.errno
        words = os.strerror(code) if code is not None and code > 0 else exc.strerror or str(exc)
        super().__init__(code, words)
        self.address = address


def listening_socket(host: str, port: int, *, backlog: int) -> socket.socket:
    """A non-blocking listening TCP socket on ``host:port`` (port 0: the kernel picks).

    proto is IPPROTO_TCP, not 0: accepted sockets inherit it, and asyncio's default loop only
    sets TCP_NODELAY on sockets whose proto says TCP. An IPv6 address also accepts IPv4.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


#: Letters, digits, hyphens and dots once IDNA-encoded, and underscores, which DNS and
#: /etc/hosts hold in practice (service names such as ``my_db``).
_HOST_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def is_local_address(host: str) -> bool:
    """Whether the IP address ``host`` is one of this machine's: a socket can bind to it."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, 0, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind(sockaddr)
    except OSError:
        return False
    return True


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_name_problem(host: str) -> str | None:
    """Why ``host`` can be neither an IP address nor looked up as a name; None if it can.

    The resolver encodes a name with IDNA first, and a name it cannot encode (an empty
    label as in ``a..b``, a label over 63 characters) would fail every lookup the same way;
    so would one with a character no host name holds (a space, a slash), once encoded.
    """
    if not host:
        return "must not be empty"
    if is_ip_address(host):
        return None
    try:
        encoded = host.encode("idna").decode("ascii")
    except UnicodeError:
        return f"{host!r} is not a valid host name"
    if not _HOST_NAME.fullmatch(encoded):
        return f"{host!r} is not a valid host name"
    return None


def host_port(host: str, port: int) -> str:
    """``host:port``, with IPv6 addresses in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def tcp_addresses(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to for TCP through the system resolver, in its order
    (the system's address preference), each once; a link-local IPv6 address keeps its
    scope, which the sockaddr carries apart. OSError when it does not resolve, also for a
    name that cannot even be encoded for the resolver."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except UnicodeError as exc:
        raise OSError(f"{host!r} is not a valid host name: {exc}") from None
    return list(dict.fromkeys(
        f"{info[4][0]}%{info[4][3]}" if len(info[4]) == 4 and info[4][3] else str(info[4][0])
        for info in infos
    ))


def http_url_problem(url: str) -> str | None:
    """What keeps ``url`` from being an http:// URL of a host and port; None if nothing."""
    example = "like http://127.0.0.1:3000"
    try:
        parts = urlsplit(url)
        port = parts.port  # out of range or not a number: ValueError
    except ValueError as exc:
        return f"is not a URL {example} ({exc}), got {url!r}"
    if parts.scheme != "http" or not parts.hostname:
        return f"must be an http:// URL {example}, got {url!r}"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return f"must be the stack's address alone, {example} (no path), got {url!r}"
    if port == 0:
        return f"must name a port from 1 to 65535, got {url!r}"
    return None
