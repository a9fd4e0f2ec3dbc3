"""The source network of a request: the packed IPv4 fast path agrees with ipaddress."""

from __future__ import annotations

import ipaddress
import random

import pytest

from anomos.tracker.limits import Limits, LimitSettings


@pytest.mark.parametrize("v4", [8, 16, 24, 31, 32])
def test_ipv4_networks_are_what_ipaddress_says(v4):
    limits = Limits(LimitSettings(ipv4_prefix=v4), 1.0, lambda: 0.0)
    rng = random.Random(v4)
    for _ in range(2000):
        ip = str(ipaddress.IPv4Address(rng.getrandbits(32)))
        expected = str(ipaddress.ip_network(f"{ip}/{v4}", strict=False))
        assert limits.network(ip) == expected == limits._network_slow(ip)


def test_other_addresses_take_the_general_path():
    limits = Limits(LimitSettings(), 1.0, lambda: 0.0)
    assert limits.network("::ffff:192.0.2.77") == "192.0.2.0/24"  # IPv4-mapped
    assert limits.network("2001:db8:1:2:3::4") == str(
        ipaddress.ip_network(f"2001:db8:1:2:3::4/{LimitSettings().ipv6_prefix}", strict=False)
    )
    assert limits.network("fe80::1%eth0").endswith(f"/{LimitSettings().ipv6_prefix}")
    assert limits.network("unix-socket") == "unix-socket"  # its own network
    assert limits.network("1.2.3") == "1.2.3"  # not a dotted quad: no network guessed
