"""Multi-host: the tracker and every peer in a network namespace of its own.

Each host is a namespace with one veth interface (10.77.0.N/24) whose other
end sits on a bridge in a "switch" namespace, so every connection crosses a
real (virtual) link between hosts, and a link can be cut with ``ip link set
... down`` as a cable would be pulled: no reset, no FIN, the packets simply
stop. The addresses exist only inside these namespaces. Needs root and
iproute2; the namespaces are always removed, even when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, TypeVar

import pytest
from test_churn import sha256, throttled

from anomos.localnet import LocalNetwork, Proc
from anomos.torrent.metainfo import make_metainfo

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.netns]

SUBNET = "10.77.0"
FILE_SIZE = 32 * 1024 * 1024 + 4097


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def netns_unavailable() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    probe = f"anomos-probe-{os.getpid()}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    try:
        bridge = ip("-n", probe, "link", "add", "br0", "type", "bridge", check=False)
        if bridge.returncode != 0:
            return f"cannot make a bridge in a namespace: {bridge.stderr.strip()}"
    finally:
        ip("netns", "del", probe, check=False)
    return None


class Hosts:
    """Namespaces joined by veth pairs to a bridge in a switch namespace."""

    def __init__(self) -> None:
        self.tag = f"ax{os.getpid() % 100000}"
        self.switch = f"{self.tag}-sw"
        self.names: list[str] = []
        self.created: list[str] = []
        self.cables: dict[str, str] = {}  # namespace -> its own end of the veth

    def start(self) -> None:
        ip("netns", "add", self.switch)
        self.created.append(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")

    def add(self) -> tuple[str, str, list[str]]:
        """A new host: (namespace, address, command prefix)."""
        n = len(self.names) + 1
        ns, inner, address = f"{self.tag}-h{n}", f"{self.tag}i{n}", f"{SUBNET}.{n}"
        ip("netns", "add", ns)
        self.created.append(ns)
        cable(ns, inner, address, self.switch, "br0", self.veth(n))
        self.names.append(ns)
        self.cables[ns] = inner
        return ns, address, ["ip", "netns", "exec", ns]

    def veth(self, n: int) -> str:
        return f"{self.tag}o{n}"  # the switch side of host n's cable

    def cut(self, address: str) -> None:
        n = int(address.rsplit(".", 1)[1])
        ip("-n", self.switch, "link", "set", self.veth(n), "down")

    def received(self, ns: str) -> int:
        """Bytes that came in over ``ns``'s cable (its veth's counter).

        The interface counter, unlike a socket's, survives the sockets: after
        the cut the victim's links time out and close, but what the cable
        delivered stays counted.
        """
        out = ip("-n", ns, "-j", "-s", "link", "show", "dev", self.cables[ns])
        return int(json.loads(out.stdout)[0]["stats64"]["rx"]["bytes"])

    def close(self) -> None:
        for ns in reversed(self.created):
            ip("netns", "del", ns, check=False)
        self.created.clear()


class Namespaces(Protocol):
    tag: str  # in the name of every namespace it makes

    def start(self) -> None: ...
    def close(self) -> None: ...


N = TypeVar("N", bound=Namespaces)


@contextlib.contextmanager
def started(world: N) -> Iterator[N]:
    """``world`` started, then closed: none of its namespaces left, even on a failure."""
    try:
        world.start()
        yield world
    finally:
        world.close()
        leftover = ip("netns", "list", check=False).stdout
        assert world.tag not in leftover, leftover


def cable(ns: str, inner: str, address: str, switch: str, bridge: str, outer: str) -> None:
    """Plug namespace ``ns`` into ``bridge`` of namespace ``switch`` with a veth pair
    (``inner`` in ``ns``, up with ``address``/24 and its loopback; ``outer`` on the bridge)."""
    ip("link", "add", outer, "type", "veth", "peer", "name", inner)
    ip("link", "set", outer, "netns", switch)
    ip("link", "set", inner, "netns", ns)
    ip("-n", switch, "link", "set", outer, "master", bridge)
    ip("-n", switch, "link", "set", outer, "up")
    ip("-n", ns, "addr", "add", f"{address}/24", "dev", inner)
    ip("-n", ns, "link", "set", inner, "up")
    ip("-n", ns, "link", "set", "lo", "up")


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with started(Hosts()) as h:
        yield h


def test_transfer_completes_after_a_relaying_hosts_cable_is_cut(
    hosts: Hosts, tmp_path: Path
) -> None:
    data = tmp_path / "share" / "payload.bin"
    data.parent.mkdir()
    data.write_bytes(os.urandom(FILE_SIZE))
    net = LocalNetwork(tmp_path / "net", verbose=1)
    procs: dict[str, tuple[Proc, str]] = {}
    try:
        _ns, address, prefix = hosts.add()
        net.start_tracker("--relays", "1-2", host=address, prefix=prefix)
        assert net.tracker_url.startswith(f"https://{address}:")
        meta = make_metainfo(
            data, trackers=[net.tracker_url], fingerprint=net.fingerprint, progress=False
        )
        atorrent = tmp_path / "payload.atorrent"
        meta.save(atorrent)

        def start(name: str, command: str, *args: str, wait: bool = True) -> Proc:
            ns, address, prefix = hosts.add()
            proc = net.start_peer(name, command, *args, host=address, prefix=prefix, wait=wait)
            procs[name] = (proc, ns)
            return proc

        relays = [start(f"relay{i}", "relay") for i in range(4)]
        seeders = [
            start(f"seeder{i}", "seed", str(atorrent), "--data", str(data)) for i in range(2)
        ]
        time.sleep(2.5)
        # Peers only talk over their cables: every address is in 10.77.0.0/24.
        info = json.loads((procs["relay0"][0].state_dir / "peer.json").read_text())
        assert info["address"].startswith(f"{SUBNET}.")

        dest, summary = tmp_path / "dest", tmp_path / "summary.json"
        getter = start(
            "downloader", "get", str(atorrent), "--dest", str(dest), "--sources", "3",
            "--summary", str(summary), "--timeout", "75", wait=False,
        )  # fmt: skip
        # The victim is the busiest host between the ends. Paths are drawn from
        # all peers, so now and then a seeder relays the other seeder's circuit
        # and no dedicated relay carries much: that seeder is then the one cut.
        middle = relays + seeders
        victim, got = None, {}
        with throttled(*seeders):
            deadline = time.monotonic() + 30
            while victim is None and getter.alive() and time.monotonic() < deadline:
                got = {p.name: hosts.received(procs[p.name][1]) for p in middle}
                busiest = max(middle, key=lambda p: got[p.name])
                if got[busiest.name] > FILE_SIZE // 16:
                    victim = busiest
                time.sleep(0.05)
            assert victim is not None, f"no host between the ends carried the transfer: {got}"
            assert getter.alive(), "finished before the cut"
            hosts.cut(victim.host)  # pull the cable: no RST, no FIN
            cut_at = hosts.received(procs[victim.name][1])
            time.sleep(1.0)

        assert getter.popen.wait(80) == 0, getter.log_tail()
        assert sha256(dest / data.name) == sha256(data)
        # The cable really was cut: the victim received nothing more.
        assert hosts.received(procs[victim.name][1]) == cut_at
        report = json.loads(summary.read_text())
        assert report["circuits"], report
    finally:
        for proc, _ in procs.values():
            proc.kill()
        net.stop()
