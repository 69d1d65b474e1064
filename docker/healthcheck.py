"""Container health probe for the varstack images: stdlib only, exit 0 when healthy.

``varstack-healthcheck service`` asks the replica's own ``GET /healthcheck`` (200 only when
its database answers and it is not draining).  ``varstack-healthcheck lb`` checks that the
balancer accepts on its public port and that its admin endpoint answers.  The ports come
from the same variables the programs read, with the same defaults, so a changed port in
compose does not break the probe.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.request

TIMEOUT = 2.0


def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return bool(response.status == 200)
    except OSError:  # URLError, HTTPError (non-2xx), refused, timeout
        return False


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT):
            return True
    except OSError:
        return False


def main(argv: list[str]) -> int:
    role = argv[1] if len(argv) > 1 else ""
    if role == "service":
        port = os.environ.get("SERVICE_PORT", "5000")
        return 0 if _get_ok(f"http://127.0.0.1:{port}/healthcheck") else 1
    if role == "lb":
        port = int(os.environ.get("LB_PORT", "3000"))
        admin = os.environ.get("LB_ADMIN_PORT", "8404")
        if not _accepts(port):
            return 1
        # LB_ADMIN_PORT=0 turns the admin listener off: the public port is all there is.
        return 0 if admin == "0" or _get_ok(f"http://127.0.0.1:{admin}/stats") else 1
    print("usage: varstack-healthcheck service|lb", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
