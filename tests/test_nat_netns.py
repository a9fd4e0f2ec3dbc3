"""Peers behind a NAT router exchange a file with peers on the public side.

The hosts of test_netns.py (a namespace each, on a bridge: the "internet",
10.77.0.0/24) plus a router: one more such host whose second interface is a
home LAN (10.78.0.0/24, a bridge inside the router's namespace) that it
masquerades with nftables and firewalls as a home router does (replies come
in, new connections from outside do not). NATed hosts have a default route
through it; public hosts have no route into the LAN at all.

The tracker and three relays are public; a seeder, a relay and the downloader
sit behind the router and join first, so a tracker that let public peers dial
them would strand every edge to them. The file arrives intact, the NATed peers
say they are not reachable and the public ones that they are, and the tracker
never links two NATed peers (they could reach each other on their LAN, but a
tracker cannot know that: the rule is never to pair two unreachable peers).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_churn import sha256
from test_netns import Hosts, cable, ip, netns_unavailable, started

from anomos.localnet import LocalNetwork, Proc
from anomos.torrent.metainfo import make_metainfo

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.netns]

LAN = "10.78.0"
FILE_SIZE = 8 * 1024 * 1024 + 333
UNREACHABLE_LINE = "not reachable from outside: behind NAT or a firewall"

ROUTER_RULES = f"""
table ip anomos_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {LAN}.0/24 oifname != "br1" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "br1" accept
    }}
}}
"""


def nft_unavailable() -> str | None:
    return None if shutil.which("nft") else "needs nftables (nft) for the NAT router"


class Nat:
    """A router on ``hosts``' internet and the LAN behind it."""

    def __init__(self, hosts: Hosts) -> None:
        self.hosts = hosts
        self.router, self.public_address, self._exec = hosts.add()
        self.count = 0
        ip("-n", self.router, "link", "add", "br1", "type", "bridge")
        ip("-n", self.router, "addr", "add", f"{LAN}.1/24", "dev", "br1")
        ip("-n", self.router, "link", "set", "br1", "up")
        self._sh("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        subprocess.run([*self._exec, "nft", "-f", "-"], input=ROUTER_RULES, text=True, check=True)

    def _sh(self, *cmd: str) -> None:
        subprocess.run([*self._exec, *cmd], check=True, capture_output=True)

    def add(self) -> tuple[str, str, list[str]]:
        """A new host on the LAN: (namespace, address, command prefix)."""
        self.count += 1
        n = self.count
        tag = self.hosts.tag
        ns, outer, inner, address = f"{tag}-l{n}", f"{tag}p{n}", f"{tag}q{n}", f"{LAN}.{n + 1}"
        ip("netns", "add", ns)
        self.hosts.created.append(ns)  # removed with the others
        cable(ns, inner, address, self.router, "br1", outer)
        ip("-n", ns, "route", "add", "default", "via", f"{LAN}.1")
        return ns, address, ["ip", "netns", "exec", ns]


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    reason = netns_unavailable() or nft_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with started(Hosts()) as h:
        yield h


def identity(proc: Proc) -> bytes:
    return bytes.fromhex(json.loads((proc.state_dir / "peer.json").read_text())["identity"])


def edges(db: Path) -> set[frozenset[bytes]]:
    """The edges the tracker has planned now (as its store has them, ~1 s behind)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return {frozenset((a, b)) for a, b in conn.execute("SELECT a, b FROM edges")}
    except sqlite3.OperationalError:
        return set()  # not created yet, or busy: the next sample will do


def test_natted_downloader_seeder_and_relay_exchange_a_file_with_public_peers(
    hosts: Hosts, tmp_path: Path
) -> None:
    data = tmp_path / "share" / "payload.bin"
    data.parent.mkdir()
    data.write_bytes(os.urandom(FILE_SIZE))
    nat = Nat(hosts)
    net = LocalNetwork(tmp_path / "net", verbose=1)
    public: list[Proc] = []
    natted: list[Proc] = []

    def start(name: str, command: str, *args: str, behind_nat: bool, wait: bool = True) -> Proc:
        _ns, address, prefix = nat.add() if behind_nat else hosts.add()
        proc = net.start_peer(name, command, *args, host=address, prefix=prefix, wait=wait)
        (natted if behind_nat else public).append(proc)
        return proc

    try:
        _ns, address, prefix = hosts.add()
        # A short interval: peers behind NAT short of neighbours are asked back every
        # quarter of it (they get neighbours only as they announce).
        net.start_tracker(
            "--relays", "1-2", "--neighbours", "2-4", "--interval", "20",
            host=address, prefix=prefix,
        )  # fmt: skip
        meta = make_metainfo(
            data, trackers=[net.tracker_url], fingerprint=net.fingerprint, progress=False
        )
        atorrent = tmp_path / "payload.atorrent"
        meta.save(atorrent)
        start("seeder", "seed", str(atorrent), "--data", str(data), behind_nat=True)
        start("natrelay", "relay", behind_nat=True)
        for i in range(3):
            start(f"relay{i}", "relay", behind_nat=False)
        dest = tmp_path / "dest"
        getter = start(
            "getter", "get", str(atorrent), "--dest", str(dest), "--timeout", "60",
            behind_nat=True, wait=False,
        )  # fmt: skip
        db = net.workdir / "tracker" / "tracker.sqlite3"
        seen: set[frozenset[bytes]] = set()
        while getter.popen.poll() is None:
            seen |= edges(db)
            time.sleep(0.5)
        assert getter.popen.returncode == 0, getter.log_tail(30)
        # The NATed peers still running must each be linked (to public peers only): a
        # peer nobody can dial gets edges only as it announces, so give it a few.
        staying = {identity(p) for p in natted if p is not getter}
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            time.sleep(0.5)  # the store writes once a second
            seen |= edges(db)
            if all(any(who in e for e in seen) for who in staying):
                break
    finally:
        net.stop()
    assert sha256(dest / data.name) == sha256(data)
    for proc in natted:
        assert UNREACHABLE_LINE in proc.log_path.read_text(), proc.log_tail(30)
    for proc in public:
        text = proc.log_path.read_text()
        assert "reachable at 10.77.0." in text and UNREACHABLE_LINE not in text, proc.log_tail(30)
    shut = {identity(p) for p in natted}
    assert len(shut) == 3
    assert seen, "no edges sampled from the tracker's store"
    linked = [e for e in seen if len(e & shut) == 2]
    assert not linked, f"{len(linked)} edge(s) between NATed peers were planned"
    # Every NATed peer that stayed was linked (to public peers only): the rule did not
    # strand them. (The getter was linked too, as its download needed neighbours, but it
    # may have come and gone between two samples of the store.)
    for who in staying:
        assert any(who in e for e in seen)
