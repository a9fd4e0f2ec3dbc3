"""End to end over a private, offline Tor network.

The tracker is a v3 onion service; the seeder, the downloader and two relays
listen on .onion addresses; two more relays are clearnet peers that dial
onions through Tor. The operating system's socket table shows that no peer
using Tor ever connected directly to another peer.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest_tor import needs_tor, tor_network  # noqa: F401  (a module-scoped fixture)

from anomos.localnet import LocalNetwork
from anomos.testing import free_port, run_anomos
from anomos.torrent.metainfo import make_metainfo

SS_LINE = re.compile(r"^\s*\d+\s+\d+\s+(\S+):(\d+)\s+(\S+):(\d+)")
FILE_SIZE = 384 * 1024 + 77


def connected_hosts() -> set[frozenset[str]]:
    out = subprocess.run(
        ["ss", "-tnH", "state", "established"], capture_output=True, text=True, check=True
    ).stdout
    return {frozenset((m[1], m[3])) for line in out.splitlines() if (m := SS_LINE.match(line))}


def _marked(test):  # type: ignore[no-untyped-def]
    for mark in [*needs_tor, pytest.mark.integration]:
        test = mark(test)
    return test


@_marked
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) for the socket table")
def test_transfer_with_an_onion_tracker_and_onion_peers(tor_network, tmp_path: Path) -> None:  # noqa: F811
    control = tor_network.client_control_address
    data = tmp_path / "share" / "secret.bin"
    data.parent.mkdir()
    data.write_bytes(os.urandom(FILE_SIZE))
    with LocalNetwork(tmp_path / "net") as net:
        net.start_tracker("--onion", "--tor-control", tor_network.service_control_address)
        assert re.match(r"https://[a-z2-7]{56}\.onion(:443)?/announce$", net.tracker_url)
        meta = make_metainfo(
            data, trackers=[net.tracker_url], fingerprint=net.fingerprint, progress=False
        )
        atorrent = tmp_path / "secret.atorrent"
        meta.save(atorrent)
        via_tor = ["--transport", "tor", "--tor-control", control]
        clearnet = ["--transport", "tcp", "--dial-transport", "tor", "--tor-control", control]
        onion_relays = [net.start_peer(f"onion-relay{i}", "relay", *via_tor) for i in range(2)]
        clear_relays = [net.start_peer(f"clear-relay{i}", "relay", *clearnet) for i in range(2)]
        seeder = net.start_peer("seeder", "seed", str(atorrent), "--data", str(data), *via_tor)
        time.sleep(3)
        dest = tmp_path / "dest"
        downloader = net.start_peer(
            "downloader",
            "get",
            str(atorrent),
            "--dest",
            str(dest),
            "--sources",
            "2",
            "--timeout",
            "150",
            *via_tor,
            wait=False,
        )
        tor_peers = {p.host for p in [*onion_relays, seeder, downloader]}
        all_peers = tor_peers | {p.host for p in clear_relays}
        seen: set[frozenset[str]] = set()
        deadline = time.monotonic() + 200
        while downloader.alive() and time.monotonic() < deadline:
            seen |= {pair for pair in connected_hosts() if pair <= all_peers}
            time.sleep(0.2)
        assert downloader.popen.wait(5) == 0, downloader.log_tail(30)

        got = (dest / data.name).read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data.read_bytes()).digest()
        # Peers on Tor never touched another peer directly: everything went through tor.
        direct = {pair for pair in seen if pair & tor_peers}
        assert not direct, direct


def test_a_tor_peer_refuses_to_start_when_tor_is_down(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here: tor is "down"
    result = run_anomos(
        "relay",
        "https://127.0.0.1:1/announce",
        "--fingerprint",
        "ab" * 32,
        "--state",
        str(tmp_path / "relay"),
        "--transport",
        "tor",
        "--tor-control",
        f"127.0.0.1:{port}",
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "tor is not reachable" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "relay" / "peer.json").exists()


def test_an_onion_tracker_is_never_reached_without_tor(tmp_path: Path) -> None:
    onion = "https://" + "a" * 56 + ".onion/announce"
    result = subprocess.run(
        [sys.executable, "-m", "anomos", "relay", onion, "--fingerprint", "ab" * 32,
         "--state", str(tmp_path / "r"), "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, ANOMOS_PROGRESS="0"),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert ".onion" in result.stderr and "transport" in result.stderr
    assert "Traceback" not in result.stderr
