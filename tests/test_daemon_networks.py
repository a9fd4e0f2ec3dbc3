"""One `anomos daemon` process on two tracker networks at once, and its restarts.

Two LocalNetworks (each a tracker process, relays and a seeder of its own file)
and one daemon given a torrent of each: it joins both networks with one peer
each (its own port, its own identity under the one state folder), downloads
both, survives SIGTERM and a restart with both networks and torrents back, and
stops a network's peer once that network's last torrent is removed. Then the
restart guarantees over a download in progress: SIGTERM keeps every piece it
had, SIGKILL loses at most the last few seconds' pieces, neither re-hashes.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from conftest_daemon import DaemonProc, wait_for
from test_daemon import client_for, status_of

from anomos.daemon.config import DaemonConfig
from anomos.daemon.core import Daemon, DaemonError, ErrorKind, Network, Status
from anomos.identity import PeerIdentity
from anomos.localnet import LocalNetwork
from anomos.pluginmanager import Plugins
from anomos.testing import free_port
from anomos.torrent.metainfo import make_metainfo

SIZE = 1024 * 1024 + 333
#: A file the slow seeder serves at SLOW_RATE bytes/s (~10 s to download), in
#: small pieces, so that a daemon can be stopped or killed in the middle.
SLOW_SIZE = 3 * 1024 * 1024
SLOW_PIECE = 64 * 1024
SLOW_RATE = "300k"
CHECKED = re.compile(r"(\d+) of (\d+) pieces on disk \((\d+) re-hashed\)")


@attrs.frozen
class Net:
    net: LocalNetwork
    atorrent: Path
    data: Path


def _torrent(net: LocalNetwork, data: Path, size: int, piece_length: int | None = None) -> Path:
    data.write_bytes(os.urandom(size))
    meta = make_metainfo(
        data,
        trackers=[net.tracker_url],
        fingerprint=net.fingerprint,
        piece_length=piece_length,
        progress=False,
    )
    atorrent = data.with_suffix(".atorrent")
    meta.save(atorrent)
    return atorrent


@pytest.fixture(scope="module")
def networks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Net, Net, Net]]:
    """Two tracker networks on loopback blocks of their own (127.0.x.y and 127.1.x.y),
    each with 3 relays and a seeder; the first also has a seeder capped at SLOW_RATE
    of a file of its own: (alpha, beta, slow)."""
    tmp = tmp_path_factory.mktemp("twonets")
    alpha = LocalNetwork(tmp / "alpha", base="127.0", verbose=1)
    beta = LocalNetwork(tmp / "beta", base="127.1", verbose=1)
    try:
        nets = []
        for net in (alpha, beta):
            net.start_tracker()
            data = tmp / f"{net.workdir.name}.bin"
            nets.append(Net(net, _torrent(net, data, SIZE), data))
        slow_data = tmp / "slow.bin"
        slow = Net(alpha, _torrent(alpha, slow_data, SLOW_SIZE, SLOW_PIECE), slow_data)
        # Every peer process starts at once; then wait for each to be up.
        procs = []
        for n in nets:
            procs += [n.net.start_peer(f"relay{i}", "relay", wait=False) for i in range(3)]
            seed = ["seed", str(n.atorrent), "--data", str(n.data)]
            procs.append(n.net.start_peer("seeder", *seed, wait=False))
        seed = ["seed", str(slow.atorrent), "--data", str(slow.data), "--max-send-rate", SLOW_RATE]
        procs.append(alpha.start_peer("slowseeder", *seed, wait=False))
        for proc in procs:
            wait_for(f"{proc.name} up", (proc.state_dir / "peer.json").exists, 60, proc.log_tail)
        yield nets[0], nets[1], slow
    finally:
        beta.stop()
        alpha.stop()


@pytest.fixture
def new_daemon() -> Iterator[Callable[[str, Path], DaemonProc]]:
    """Makes daemons (not started); any still running when the test ends is killed."""
    made: list[DaemonProc] = []

    def make(listen_host: str, home: Path) -> DaemonProc:
        config = {
            "rpc-port": 0,
            "listen": f"{listen_host}:0",
            "download-dir": str(home / "downloads"),
        }
        made.append(DaemonProc(home, listen_host, config))
        return made[-1]

    yield make
    for daemon in made:
        if daemon.popen is not None and daemon.popen.poll() is None:
            daemon.stop(signal.SIGKILL)


def session_networks(client: Any) -> list[dict[str, Any]]:
    return list(client.get_session().fields["anomos-networks"])


def identities(daemon: DaemonProc) -> dict[str, str]:
    """Network folder -> the identity key its peer announced in this run of the daemon."""
    assert daemon.popen is not None
    out = {}
    for folder in (daemon.state_dir / "networks").iterdir():
        try:
            peer = json.loads((folder / "peer.json").read_text())
        except (OSError, ValueError):
            continue
        if peer["pid"] == daemon.popen.pid:
            out[folder.name] = peer["identity"]
    return out


@pytest.mark.slow
@pytest.mark.integration
def test_one_daemon_downloads_from_two_tracker_networks_and_restarts_both(
    networks: tuple[Net, Net, Net],
    tmp_path: Path,
    new_daemon: Callable[[str, Path], DaemonProc],
) -> None:
    a, b, _ = networks
    home = tmp_path / "home"
    daemon = new_daemon(a.net.next_host(), home)
    url = daemon.start()
    try:
        client = client_for(url)
        ta = client.add_torrent(a.atorrent.read_bytes()).id
        tb = client.add_torrent(b.atorrent.read_bytes()).id
        for tid in (ta, tb):
            wait_for("seeding", lambda t=tid: status_of(client, t)["status"] == 6, 90, daemon.log)
        for n in (a, b):
            assert (home / "downloads" / n.data.name).read_bytes() == n.data.read_bytes()
        nets = session_networks(client)
        assert {n["tracker"] for n in nets} == {a.net.tracker_url, b.net.tracker_url}
        assert len({n["address"] for n in nets}) == 2, nets  # a port (a peer) per network
        # One identity per network: the two trackers cannot link them by key.
        keys = wait_for(
            "both peers started", lambda: len(identities(daemon)) == 2 and identities(daemon)
        )
        assert len(keys) == 2 and len(set(keys.values())) == 2, keys
        # Session-wide figures are the sums over the networks.
        stats = client._request("session-stats", {})
        per = stats["anomos-networks"]
        assert len(per) == 2 and all(n["neighbours"] > 0 for n in per), per
        assert stats["anomos-neighbours"] == sum(n["neighbours"] for n in per)
        assert stats["anomos-relayed"] == sum(n["relayed"] for n in per)
        assert stats["activeTorrentCount"] == 2
    finally:
        assert daemon.stop(signal.SIGTERM) == 0, daemon.log()
    assert "daemon stopped: 2 torrent(s) saved" in daemon.log()

    # A restart brings both networks back, with the same identities, and both
    # torrents seeding without hashing their data again.
    marker = len(daemon.log())
    url = daemon.start()
    try:
        client = client_for(url)
        for tid in (ta, tb):
            back = wait_for(
                "seeding after the restart",
                lambda t=tid: (s := status_of(client, t))["status"] == 6 and s,
                60,
                daemon.log,
            )
            assert back["anomos-rechecked"] == 0, daemon.log()[marker:]
        assert len(session_networks(client)) == 2
        wait_for("both peers announced", lambda: identities(daemon) == keys, 30, daemon.log)

        # Removing a network's last torrent stops that network's peer.
        client.remove_torrent(tb)
        wait_for(
            "beta's peer stopped",
            lambda: [n["tracker"] for n in session_networks(client)] == [a.net.tracker_url],
            30,
            daemon.log,
        )
        assert f"no torrent of {b.net.tracker_url} left" in daemon.log()
        assert status_of(client, ta)["status"] == 6
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert "Traceback" not in daemon.log()


@pytest.mark.slow
@pytest.mark.integration
def test_a_download_in_progress_survives_ctrl_c_and_sigkill(
    networks: tuple[Net, Net, Net],
    tmp_path: Path,
    new_daemon: Callable[[str, Path], DaemonProc],
) -> None:
    slow = networks[2]
    home = tmp_path / "home"
    daemon = new_daemon(slow.net.next_host(), home)
    client = client_for(daemon.start())
    tid = client.add_torrent(slow.atorrent.read_bytes()).id

    def have() -> int:
        reply = client._request("torrent-get", {"ids": [tid], "fields": ["haveValid"]})
        return int(reply["torrents"][0]["haveValid"])

    def checked_since(marker: int) -> re.Match[str] | None:
        return CHECKED.search(daemon.log()[marker:])

    # Ctrl-C in the middle: every piece verified so far is kept, and the resume
    # data written at the stop vouches for all of them (nothing hashed again;
    # resume data from the last periodic save would not match the file's mtime).
    wait_for("a quarter downloaded", lambda: have() >= SLOW_SIZE // 4, 60, daemon.log)
    before = have()
    assert before < SLOW_SIZE, "downloaded too fast to stop in the middle"
    assert daemon.stop(signal.SIGINT) == 0, daemon.log()
    assert "daemon stopped: 1 torrent(s) saved" in daemon.log()
    marker = len(daemon.log())
    client = client_for(daemon.start())
    checked = wait_for("checked", lambda: checked_since(marker), 30, daemon.log)
    on_disk, pieces, rehashed = map(int, checked.groups())
    assert rehashed == 0, daemon.log()[marker:]
    assert before <= on_disk * SLOW_PIECE < pieces * SLOW_PIECE

    # SIGKILL in the middle: the restart finds at least what was verified before.
    wait_for("more downloaded", lambda: have() >= before + SLOW_SIZE // 4, 60, daemon.log)
    before = have()
    assert before < SLOW_SIZE, "downloaded too fast to kill in the middle"
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    marker = len(daemon.log())
    client = client_for(daemon.start())
    checked = wait_for("checked", lambda: checked_since(marker), 30, daemon.log)
    assert int(checked.group(1)) * SLOW_PIECE >= before, daemon.log()[marker:]
    try:
        wait_for("finished", lambda: status_of(client, tid)["status"] == 6, 60, daemon.log)
        assert (home / "downloads" / slow.data.name).read_bytes() == slow.data.read_bytes()
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert "Traceback" not in daemon.log()


def test_networks_get_their_own_identity_and_port_and_adopt_a_one_network_state(
    tmp_path: Path, plugins: Plugins
) -> None:
    """In one process, trackers unreachable: a state folder of the one-network daemon
    (identity and resume data at its top) becomes the first network's; the second
    network gets a new identity, and a free port since the configured one is taken."""
    state = tmp_path / "state"
    old = PeerIdentity.load_or_create(state)
    (state / "resume").mkdir()
    (state / "resume" / "ab.json").write_text("{}")
    port = free_port()
    config = DaemonConfig(listen=f"127.0.0.1:{port}", download_dir=tmp_path / "downloads")
    daemon = Daemon(plugins, config, state)
    first_net = Network("https://127.0.0.1:9/announce", "ab" * 32)
    first = daemon._ensure_peer(first_net)
    second = daemon._ensure_peer(Network("https://127.0.0.1:9/other/announce", "cd" * 32))
    try:
        assert first.identity.identity_public == old.identity_public
        assert second.identity.identity_public != old.identity_public
        assert not (state / "identity.json").exists()
        assert (daemon.network_dir(first_net) / "resume" / "ab.json").exists()
        wait_for("both listening", lambda: first.address and second.address, 30)
        assert first.address == f"127.0.0.1:{port}"
        assert second.address != first.address
        # A tracker URL the peer cannot use is refused in one line and leaves no folder.
        with pytest.raises(DaemonError, match=re.escape("is not https://HOST:PORT/.../announce")):
            daemon._ensure_peer(Network("http://127.0.0.1:9/announce", "ef" * 32))
        assert len(list((state / "networks").iterdir())) == 2
    finally:
        daemon.stop()
    # ...even when it would have adopted a one-network state: that stays where it was.
    other = tmp_path / "other"
    kept = PeerIdentity.load_or_create(other)
    daemon = Daemon(plugins, config, other)
    with pytest.raises(DaemonError):
        daemon._ensure_peer(Network("http://127.0.0.1:9/announce", "ef" * 32))
    assert PeerIdentity.load_or_create(other).identity_public == kept.identity_public
    assert not list((other / "networks").iterdir())
    daemon.stop()


def test_a_network_whose_peer_cannot_start_fails_its_torrents_and_is_retried(
    tmp_path: Path, plugins: Plugins
) -> None:
    """A tracker no transport can reach (an onion address, no tor): its torrents show a
    tracker error, the other networks are untouched, and starting one tries again."""
    data = tmp_path / "file.bin"
    data.write_bytes(os.urandom(50_000))
    onion = "https://" + "a" * 56 + ".onion:443/announce"
    meta = make_metainfo(data, trackers=[onion], fingerprint="ab" * 32, progress=False)
    config = DaemonConfig(download_dir=tmp_path / "downloads")
    daemon = Daemon(plugins, config, tmp_path / "state")
    daemon.start()
    try:
        other = daemon._ensure_peer(Network("https://127.0.0.1:9/announce", "cd" * 32))
        torrent, added = daemon.add(meta.to_bytes())
        assert added
        wait_for("a tracker error", lambda: torrent.error == ErrorKind.TRACKER_ERROR, 30)
        assert "no configured transport" in torrent.error_string
        assert torrent.status == Status.STOPPED and torrent.task is None
        assert list(daemon.peers.values()) == [other]
        daemon.start_torrent(torrent)  # a new peer for that network, which fails again
        assert len(daemon.peers) == 2
        wait_for("failed again", lambda: len(daemon.peers) == 1 and torrent.error, 30)
    finally:
        daemon.stop()
