"""Host network names for the test servers' namespaces (tests/egress, tests/secrets)."""

from __future__ import annotations

import os
import random
import socket


def free_octet(if_prefix: str, net16: str) -> int:
    """A random N in 16..250 for which the host has neither an interface named
    <if_prefix><N> nor an address in <net16>.N.0/24.

    Session fixtures that make such servers run more than once a session (imported by
    several test directories), and suites may run side by side: two that picked the same
    N collided (EEXIST moving the veth's end to the host)."""
    from pyroute2 import IPRoute

    names = set(os.listdir("/sys/class/net"))
    with IPRoute() as ipr:
        addresses = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)}
    taken = {int(a.split(".")[2]) for a in addresses if a and a.startswith(net16 + ".")}
    free = [n for n in range(16, 251) if n not in taken and f"{if_prefix}{n}" not in names]
    if not free:
        raise RuntimeError(f"no free {net16}.N.0/24 on this host for the test servers")
    return random.choice(free)
