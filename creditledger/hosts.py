"""Where a process listens: development conveniences (public dev secrets, the simulated
payment provider, the plaza's default secret) are refused on any address but loopback."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False
