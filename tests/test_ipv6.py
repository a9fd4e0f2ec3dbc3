"""End to end over IPv6: a tracker and peers as separate processes on ``[::1]``.

The original Anomos had no IPv6. Here the tracker's URL, every peer's contact
address and every neighbour link are IPv6; the operating system's socket table
shows that no IPv4 connection touched any of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from anomos.localnet import LocalNetwork
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
    pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)"),
    pytest.mark.skipif(_no_ipv6_loopback() is not None, reason=str(_no_ipv6_loopback())),
]

FILE_SIZE = 3 * 1024 * 1024 + 777
HOST = "[::1]"
PORT = re.compile(r":(\d+)$")


def ports_in_use(family: str) -> set[int]:
    """Local and remote ports of established TCP sockets of one family (``-4``/``-6``)."""
    out = subprocess.run(
        ["ss", "-tnH", family, "state", "established"], capture_output=True, text=True, check=True
    ).stdout
    ports: set[int] = set()
    for line in out.splitlines():
        for field in line.split()[2:4]:
            m = PORT.search(field)
            if m:
                ports.add(int(m[1]))
    return ports


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
        v4_seen: set[int] = set()
        v6_seen: set[int] = set()
        while getter.alive():
            v4_seen |= ports_in_use("-4") & listening
            v6_seen |= ports_in_use("-6") & listening
            time.sleep(0.2)
        assert getter.popen.wait() == 0, getter.log_tail()

    got = hashlib.sha256((dest / data.name).read_bytes()).digest()
    assert got == hashlib.sha256(data.read_bytes()).digest()
    report = json.loads(summary.read_text())
    assert report["circuits"] and all(c["relays"] >= 1 for c in report["circuits"]), report
    assert v6_seen, "no IPv6 neighbour link observed"
    assert not v4_seen, f"IPv4 connections to peer ports {sorted(v4_seen)}"
