"""Listening sockets made by the program itself, handed to the loop."""

from __future__ import annotations

import socket


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
