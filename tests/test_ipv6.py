"""End to end over IPv6: a tracker and peers as separate processes on ``[::1]``.

The original Anomos had no IPv6. Here the tracker's URL, every peer's contact
address and every neighbour link are IPv6; the operating system's socket table
shows IPv6 links on the peers' ports and no IPv4 connection in any of the processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from anomos.localnet import LocalNetwork, Proc
from anomos.torrent.metainfo import make_metainfo


def _no_ipv6_loopback() -> str | None:
    if not socket.has_ipv6:
        return "Python was built without IPv6"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        return f"no IPv6 loopback here: {exc.strerror or exc}"
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(_no_ipv6_loopback() is not None, reason=str(_no_ipv6_loopback())),
]

FILE_SIZE = 3 * 1024 * 1024 + 777
HOST = "[::1]"
PORT = re.compile(r":(\d+)$")


def connections_of(procs: list[Proc], kind: str) -> set[tuple[str, Any, Any]]:
    """(process name, local, remote address) of the connected TCP sockets that the
    processes ``procs`` hold, of one ``kind`` (psutil's ``tcp4``/``tcp6``).

    By process, not by port: other sockets on the machine (another test run's peers
    on 127.0.x.y, ssh) may use the same port numbers as ours.
    """
    seen: set[tuple[str, Any, Any]] = set()
    for proc in procs:
        try:
            conns = psutil.Process(proc.pid).net_connections(kind=kind)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # exited between the listing and the look
        seen |= {(proc.name, tuple(c.laddr), tuple(c.raddr)) for c in conns if c.raddr}
    return seen


def test_anonymous_transfer_over_ipv6(tmp_path: Path) -> None:
    data = tmp_path / "share" / "payload.bin"
    data.parent.mkdir()
    data.write_bytes(os.urandom(FILE_SIZE))
    with LocalNetwork(tmp_path / "net") as net:
        net.start_tracker(host=HOST)
        assert net.tracker_url.startswith("https://[::1]:"), net.tracker_url
        meta = make_metainfo(
            data, trackers=[net.tracker_url], fingerprint=net.fingerprint, progress=False
        )
        atorrent = tmp_path / "payload.atorrent"
        meta.save(atorrent)
        peers = [net.start_peer(f"relay{i}", "relay", host=HOST) for i in range(3)]
        peers += [
            net.start_peer(f"seeder{i}", "seed", str(atorrent), "--data", str(data), host=HOST)
            for i in range(2)
        ]
        addresses = [json.loads((p.state_dir / "peer.json").read_text())["address"] for p in peers]
        assert all(a.startswith("[::1]:") for a in addresses), addresses
        time.sleep(4.0)  # let the edges settle (see test_network)

        dest, summary = tmp_path / "dest", tmp_path / "summary.json"
        getter = net.start_peer(
            "downloader", "get", str(atorrent), "--dest", str(dest),
            "--summary", str(summary), "--timeout", "90", host=HOST, wait=False,
        )  # fmt: skip
        listening = {int(PORT.search(a)[1]) for a in addresses}  # type: ignore[index]
        v4_seen: set[tuple[str, Any, Any]] = set()
        v6_seen: set[int] = set()
        while getter.alive():
            v4_seen |= connections_of(net.procs, "tcp4")
            v6_seen |= {
                port
                for _, local, remote in connections_of(net.procs, "tcp6")
                for port in (local[1], remote[1])
                if port in listening
            }
            time.sleep(0.2)
        assert getter.popen.wait() == 0, getter.log_tail()

    got = hashlib.sha256((dest / data.name).read_bytes()).digest()
    assert got == hashlib.sha256(data.read_bytes()).digest()
    report = json.loads(summary.read_text())
    assert report["circuits"] and all(c["relays"] >= 1 for c in report["circuits"]), report
    assert v6_seen, "no IPv6 neighbour link observed"
    assert not v4_seen, f"IPv4 connections: {sorted(v4_seen)}"
