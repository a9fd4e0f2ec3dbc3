"""Magnets in `anomos daemon` (a real process, on test_daemon's LocalNetwork):
transmission-remote adds a magnet and the torrent finishes; a magnet whose
metadata no source has shows its name and a metadata state, and both survive a
restart (the magnet saved until the metadata came, then the .atorrent)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest_daemon import new_daemon, wait_for
from test_daemon import client_for, status_of

from anomos.localnet import LocalNetwork
from anomos.torrent.magnet import Magnet
from anomos.torrent.metainfo import Metainfo

pytestmark = [pytest.mark.slow, pytest.mark.integration]


FIELDS = ["id", "name", "status", "percentDone", "metadataPercentComplete", "totalSize", "files"]


@pytest.mark.skipif(shutil.which("transmission-remote") is None, reason="needs transmission-cli")
def test_transmission_remote_adds_a_magnet_and_it_finishes_and_survives_a_restart(
    network: tuple[LocalNetwork, Path, Path], tmp_path: Path
) -> None:
    net, atorrent, data = network
    magnet = Magnet.from_metainfo(Metainfo.load(atorrent))
    # A torrent no source has: its metadata never comes.
    nowhere = Magnet(
        hashlib.sha1(b"nobody has this").digest(),
        (net.tracker_url,),
        net.fingerprint,
        name="lost & found.iso",
    )
    daemon = new_daemon(
        net, tmp_path / "home", tracker=net.tracker_url, fingerprint=net.fingerprint
    )
    url = daemon.start()

    def row(tid: int) -> dict[str, object]:
        (torrent,) = client_for(url).get_torrents(ids=[tid], arguments=FIELDS)
        return dict(torrent.fields)

    torrents = daemon.state_dir / "torrents"
    try:
        assert "success" in daemon.remote("-a", str(magnet))
        wait_for("finished", lambda: status_of(client_for(url), 1)["status"] == 6, 90, daemon.log)
        assert (tmp_path / "home" / "downloads" / data.name).read_bytes() == data.read_bytes()
        finished = row(1)
        assert finished["name"] == data.name and finished["metadataPercentComplete"] == 1.0
        assert finished["totalSize"] == data.stat().st_size
        assert "metadata of file.bin received" in daemon.log()
        # Its metadata replaced the saved magnet.
        assert (torrents / f"{magnet.infohash_hex}.atorrent").exists()
        assert not (torrents / f"{magnet.infohash_hex}.magnet").exists()

        # anomos' own add takes a magnet too; without metadata, the name comes from dn.
        added = subprocess.run(
            [sys.executable, "-m", "anomos", "add", str(nowhere), "--rpc", url],
            capture_output=True,
            text=True,
            timeout=60,
            env=daemon.env,
        )
        assert added.returncode == 0, added.stderr
        assert f"added: 2 lost & found.iso ({nowhere.infohash_hex})" in added.stdout
        waiting = row(2)
        assert waiting["name"] == "lost & found.iso"
        assert waiting["status"] == 4 and waiting["metadataPercentComplete"] == 0.0
        assert waiting["totalSize"] == 0 and waiting["files"] == []
        assert "lost & found.iso" in daemon.remote("-l")
        # A BitTorrent magnet is refused in one line, through the RPC too.
        refused = daemon.transmission_remote("-a", f"magnet:?xt=urn:btih:{'ab' * 20}")
        assert "a BitTorrent magnet" in refused.stdout + refused.stderr
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert (torrents / f"{nowhere.infohash_hex}.magnet").read_text() == str(nowhere)
    state = json.loads((daemon.state_dir / "daemon.json").read_text())
    assert [t["infohash"] for t in state["torrents"]] == [magnet.infohash_hex, nowhere.infohash_hex]

    # A restart brings both back: the first from its .atorrent, seeding; the second
    # still waiting for its metadata, under its display name.
    url = daemon.start()
    try:
        wait_for("seeding again", lambda: row(1)["status"] == 6, 60, daemon.log)
        assert row(1)["name"] == data.name
        again = row(2)
        assert again["name"] == "lost & found.iso" and again["status"] == 4
        assert again["metadataPercentComplete"] == 0.0
    finally:
        assert daemon.stop() == 0, daemon.log()
