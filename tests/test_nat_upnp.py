"""``--upnp``: a peer behind a real UPnP-IGD router (miniupnpd) maps a port and is reachable.

Three namespaces: a public host with the tracker, a router running miniupnpd
(Debian's miniupnpd-nftables) over an nftables NAT, and a LAN host with the
peer. The peer asks the router for a mapping (miniupnpc), advertises the
router's public address, and the tracker, dialling it back through the
mapping, finds it reachable: the peer says so in one line. miniupnpd refuses
to work with a private external address, so the "internet" here is 11.78.0.0/24,
which exists only inside these namespaces.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_nat_netns import LAN, UNREACHABLE_LINE, nft_unavailable
from test_netns import ip, netns_unavailable, started

from anomos.localnet import LocalNetwork

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.netns]

WAN = "11.78.0"

ROUTER_RULES = f"""
table inet filter {{
    chain forward {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "br1" accept
        jump miniupnpd
    }}
    chain miniupnpd {{
    }}
    chain prerouting {{
        type nat hook prerouting priority -100; policy accept;
        jump prerouting_miniupnpd
    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        jump postrouting_miniupnpd
        ip saddr {LAN}.0/24 oifname != "br1" masquerade
    }}
    chain prerouting_miniupnpd {{
    }}
    chain postrouting_miniupnpd {{
    }}
}}
"""


def miniupnpd() -> str | None:
    return shutil.which("miniupnpd") or (
        "/usr/sbin/miniupnpd" if os.path.exists("/usr/sbin/miniupnpd") else None
    )


def unavailable() -> str | None:
    reason = netns_unavailable() or nft_unavailable()
    if reason:
        return reason
    if miniupnpd() is None:
        return "needs miniupnpd (apt-get install miniupnpd-nftables)"
    try:
        import miniupnpc  # noqa: F401
    except ImportError:
        return "needs the miniupnpc package (the test extra)"
    return None


class Router:
    """wan host <-veth-> router (miniupnpd, NAT) <-veth-> lan host."""

    def __init__(self, tmp: Path) -> None:
        self.tag = f"au{os.getpid() % 100000}"
        self.wan, self.router, self.lan = (f"{self.tag}-{x}" for x in ("w", "r", "l"))
        self.created: list[str] = []
        self.daemon: subprocess.Popen[bytes] | None = None
        self.tmp = tmp

    def start(self) -> None:
        for ns in (self.wan, self.router, self.lan):
            ip("netns", "add", ns)
            self.created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ext, wan_if = f"{self.tag}e", f"{self.tag}w"
        ip("link", "add", ext, "type", "veth", "peer", "name", wan_if)
        ip("link", "set", ext, "netns", self.router)
        ip("link", "set", wan_if, "netns", self.wan)
        ip("-n", self.router, "addr", "add", f"{WAN}.1/24", "dev", ext)
        ip("-n", self.wan, "addr", "add", f"{WAN}.2/24", "dev", wan_if)
        ip("-n", self.router, "link", "set", ext, "up")
        ip("-n", self.wan, "link", "set", wan_if, "up")
        ip("-n", self.router, "link", "add", "br1", "type", "bridge")
        ip("-n", self.router, "addr", "add", f"{LAN}.1/24", "dev", "br1")
        ip("-n", self.router, "link", "set", "br1", "up")
        lan_out, lan_if = f"{self.tag}p", f"{self.tag}q"
        ip("link", "add", lan_out, "type", "veth", "peer", "name", lan_if)
        ip("link", "set", lan_out, "netns", self.router)
        ip("link", "set", lan_if, "netns", self.lan)
        ip("-n", self.router, "link", "set", lan_out, "master", "br1")
        ip("-n", self.router, "link", "set", lan_out, "up")
        ip("-n", self.lan, "addr", "add", f"{LAN}.2/24", "dev", lan_if)
        ip("-n", self.lan, "link", "set", lan_if, "up")
        ip("-n", self.lan, "route", "add", "default", "via", f"{LAN}.1")
        run = ["ip", "netns", "exec", self.router]
        subprocess.run([*run, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], check=True)
        subprocess.run([*run, "nft", "-f", "-"], input=ROUTER_RULES, text=True, check=True)
        conf = self.tmp / "miniupnpd.conf"
        conf.write_text(
            f"ext_ifname={ext}\nlistening_ip=br1\nport=0\nenable_upnp=yes\n"
            "enable_natpmp=no\nsecure_mode=yes\nsystem_uptime=no\n"
            "uuid=3a3f8b2c-7e1d-4b4f-9a51-6d0c1e2f3a4b\n"
            "upnp_table_name=filter\nupnp_nat_table_name=filter\n"
            "upnp_forward_chain=miniupnpd\nupnp_nat_chain=prerouting_miniupnpd\n"
            "upnp_nat_postrouting_chain=postrouting_miniupnpd\n"
            f"allow 1024-65535 {LAN}.0/24 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n"
        )
        self.log = self.tmp / "miniupnpd.log"
        with open(self.log, "wb") as out:
            self.daemon = subprocess.Popen(
                [*run, str(miniupnpd()), "-d", "-f", str(conf), "-P", str(self.tmp / "pid")],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.terminate()
            try:
                self.daemon.wait(5)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
            self.daemon = None
        for ns in reversed(self.created):
            ip("netns", "del", ns, check=False)
        self.created.clear()


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Router]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    with started(Router(tmp_path)) as r:
        yield r


def wait_for_line(path: Path, text: str, timeout: float, proc: object) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = path.read_text() if path.exists() else ""
        if text in log:
            return log
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} after {timeout:g} s:\n{log[-3000:]}")


def test_a_peer_behind_a_upnp_router_maps_a_port_and_is_reachable(
    router: Router, tmp_path: Path
) -> None:
    net = LocalNetwork(tmp_path / "net", verbose=1)
    try:
        net.start_tracker(host=f"{WAN}.2", prefix=router.prefix(router.wan))
        peer = net.start_peer(
            "upnp", "relay", "--upnp", host=f"{LAN}.2", prefix=router.prefix(router.lan)
        )
        log = wait_for_line(peer.log_path, "reachable at", 30, peer)
    finally:
        net.stop()
    assert f"UPnP: the router forwards {WAN}.1:" in log, log[-3000:]
    mapped = log.split("UPnP: the router forwards ", 1)[1].split()[0]
    assert f"reachable at {mapped}" in log and UNREACHABLE_LINE not in log, log[-3000:]
