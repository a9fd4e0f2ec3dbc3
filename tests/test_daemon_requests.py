"""Hostile RPC requests against a Daemon in this process (its trackers unreachable):
each is refused in one ``result`` line and changes nothing, on disk or in the peers
the daemon runs."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest

from anomos.daemon import web
from anomos.daemon.config import DaemonConfig
from anomos.daemon.core import RECENT_SECONDS, Daemon
from anomos.daemon.rpc import MAX_REQUEST_SIZE, RpcApp, RpcServer
from anomos.pluginmanager import Plugins
from anomos.testing import anomos_cmd, loopback_host
from anomos.torrent.magnet import Magnet
from anomos.torrent.metainfo import MAX_METAINFO_SIZE, make_metainfo

#: A tracker nobody runs: the daemon's peers for it never get an answer.
TRACKER = "https://127.0.0.1:9/announce"


@pytest.fixture
def app(tmp_path: Path, plugins: Plugins) -> Iterator[RpcApp]:
    config = DaemonConfig(listen=f"{loopback_host()}:0", download_dir=tmp_path / "downloads")
    daemon = Daemon(plugins, config, tmp_path / "state")
    daemon.start()
    try:
        yield RpcApp(daemon, config)
    finally:
        daemon.stop()


def call(app: RpcApp, method: str, **args: Any) -> dict[str, Any]:
    return app.dispatch(json.dumps({"method": method, "arguments": args}).encode())


def test_a_refused_add_joins_no_tracker_network(app: RpcApp) -> None:
    """A magnet of a new network with a download-dir that is refused: no peer starts
    for that network (it used to start one, announcing to the link's tracker, and keep it)."""
    magnet = Magnet(b"\x01" * 20, (TRACKER,), "ab" * 32, name="x")
    for bad, why in (
        ("relative/dir", "is not an absolute path"),
        ("/tmp/nul\0byte", "is not an absolute path"),
        ("/" + "a" * 5000, "download-dir longer than 4096 bytes"),
    ):
        reply = call(app, "torrent-add", filename=str(magnet), **{"download-dir": bad})
        assert why in reply["result"] and len(reply["result"]) < 300, reply
    assert app.daemon.peers == {} and app.daemon.torrents == {}
    assert not (app.daemon.state_dir / "networks").exists()


def test_a_download_dir_with_a_nul_byte_is_refused_in_session_set(app: RpcApp) -> None:
    before = app.daemon.config.download_dir
    reply = call(app, "session-set", **{"download-dir": "/tmp/a\0b"})
    assert "is not an absolute path" in reply["result"], reply
    assert app.daemon.config.download_dir == before
    reply = call(app, "free-space", path="/tmp/a\0b")
    assert "null" in reply["result"] and "internal error" not in reply["result"], reply


def test_flags_must_be_true_or_false(app: RpcApp, tmp_path: Path) -> None:
    """``"delete-local-data": "false"`` is refused: it used to be taken as true (a
    non-empty string) and the data was deleted."""
    data = tmp_path / "downloads" / "file.bin"
    data.parent.mkdir()
    data.write_bytes(os.urandom(40_000))
    meta = make_metainfo(data, trackers=[TRACKER], fingerprint="ab" * 32, progress=False)
    path = tmp_path / "file.atorrent"
    meta.save(path)
    reply = call(app, "torrent-add", filename=str(path), paused="no")
    assert reply["result"] == "paused must be true or false" and not app.daemon.torrents
    reply = call(app, "torrent-add", filename=str(path), paused=True)
    assert reply["result"] == "success", reply
    for value in ("false", 0, None):
        reply = call(app, "torrent-remove", ids=[1], **{"delete-local-data": value})
        assert reply["result"] == "delete-local-data must be true or false", reply
    assert list(app.daemon.torrents) == [1] and data.exists()
    assert call(app, "torrent-remove", ids=[1], **{"delete-local-data": False})["result"] == (
        "success"
    )
    assert app.daemon.torrents == {} and data.exists()


def test_a_network_left_while_its_peer_starts(app: RpcApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torrent of a new network added and removed at once: the network's peer is
    retired before its start ends; the start ends cleanly (it raised KeyError)."""
    ended: list[BaseException | None] = []
    real = Daemon._start_peer

    def start_peer(self: Daemon, *args: Any) -> None:
        try:
            real(self, *args)
        except BaseException as exc:
            ended.append(exc)
            raise
        ended.append(None)

    monkeypatch.setattr(Daemon, "_start_peer", start_peer)
    magnet = Magnet(b"\x02" * 20, (TRACKER,), "cd" * 32)
    assert call(app, "torrent-add", filename=str(magnet), paused=True)["result"] == "success"
    assert call(app, "torrent-remove", ids=[1])["result"] == "success"
    assert app.daemon.peers == {}
    with gevent.Timeout(30):
        while not ended:
            gevent.sleep(0.05)
    assert ended == [None]


def test_ids_by_number_and_hash_and_removals_remembered_only_while_recent(
    app: RpcApp, tmp_path: Path
) -> None:
    paths = []
    for i in range(3):
        data = tmp_path / f"f{i}.bin"
        data.write_bytes(os.urandom(1000 + i))
        meta = make_metainfo(data, trackers=[TRACKER], fingerprint="ab" * 32, progress=False)
        paths.append(tmp_path / f"f{i}.atorrent")
        meta.save(paths[-1])
        assert call(app, "torrent-add", filename=str(paths[-1]), paused=True)["result"] == "success"
    second = app.daemon.torrents[2].infohash

    def ids(selector: Any) -> list[int]:
        reply = call(app, "torrent-get", ids=selector, fields=["id"])
        return [row["id"] for row in reply["arguments"]["torrents"]]

    assert ids([3, second.upper(), 3, 99, second]) == [3, 2]
    assert ids(1) == [1] and ids(second) == [2] and ids([]) == []
    assert "invalid id" in call(app, "torrent-get", ids=[[1]], fields=["id"])["result"]
    # A removal long ago is forgotten at the next one (the record no longer grows forever).
    app.daemon.removed[77] = time.monotonic() - RECENT_SECONDS - 1
    assert call(app, "torrent-remove", ids=[1])["result"] == "success"
    assert list(app.daemon.removed) == [1]
    reply = call(app, "torrent-get", ids="recently-active", fields=["id"])
    assert reply["arguments"]["removed"] == [1]


def test_one_metainfo_bound_everywhere(app: RpcApp) -> None:
    """The daemon, its RPC and its web page bound an .atorrent by the metainfo limit
    (they said 16 MiB while any metainfo over 8 MiB was refused: the page read and
    sent files the daemon could only refuse)."""
    script = (Path(web.__file__).parent / "static" / "app.js").read_text()
    found = re.search(r"const MAX_ATORRENT = (\d+) \* 1024 \* 1024;", script)
    assert found is not None and int(found[1]) * 1024 * 1024 == MAX_METAINFO_SIZE
    largest = json.dumps({"method": "torrent-add", "arguments": {"metainfo": ""}})
    assert len(largest) + 4 * -(-MAX_METAINFO_SIZE // 3) <= MAX_REQUEST_SIZE
    reply = call(
        app, "torrent-add", metainfo=base64.b64encode(bytes(MAX_METAINFO_SIZE + 1)).decode()
    )
    assert reply["result"] == f"metainfo larger than {MAX_METAINFO_SIZE} bytes", reply


def test_info_id_finds_the_daemon_by_the_environment(tmp_path: Path, plugins: Plugins) -> None:
    """`anomos info ID` reads ANOMOS_RPC and ANOMOS_RPC_AUTH as every other daemon
    command does (it used to ignore both: a daemon with a password was out of reach)."""
    config = DaemonConfig(
        listen=f"{loopback_host()}:0",
        download_dir=tmp_path / "downloads",
        rpc_username="me",
        rpc_password="secret",
    )
    daemon = Daemon(plugins, config, tmp_path / "state")
    daemon.start()
    server = RpcServer((loopback_host(), 0), RpcApp(daemon, config))
    server.start()
    try:
        magnet = Magnet(b"\x03" * 20, (TRACKER,), "ab" * 32, name="wanted.iso")
        daemon.add(str(magnet).encode(), paused=True)
        url = f"http://{server.server_host}:{server.server_port}/transmission/rpc"
        env = dict(
            os.environ,
            ANOMOS_RPC=url,
            ANOMOS_RPC_AUTH="me:secret",
            HOME=str(tmp_path),  # (no rpc.json to find)
            XDG_STATE_HOME=str(tmp_path / "xdg"),
        )
        done = subprocess.run(
            anomos_cmd("info", "1"), capture_output=True, text=True, timeout=60, env=env
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "wanted.iso" in done.stdout
    finally:
        server.stop()
        daemon.stop()


def test_torrent_set_of_a_magnet_without_metadata(app: RpcApp) -> None:
    """Limits and the queue apply to a torrent still waiting for its metadata; only a
    choice of files needs it (torrent-set used to fail for every key on such a torrent,
    and with no ids for all torrents at once)."""
    magnet = Magnet(b"\x04" * 20, (TRACKER,), "ab" * 32, name="later.iso")
    assert call(app, "torrent-add", filename=str(magnet), paused=True)["result"] == "success"
    reply = call(app, "torrent-set", downloadLimit=50, downloadLimited=True, queuePosition=0)
    assert reply["result"] == "success", reply
    assert app.daemon.torrents[1].limits.download_limit == 50
    reply = call(app, "torrent-set", ids=[1], **{"files-unwanted": [0, 0, 0]})
    assert "no metadata yet" in reply["result"], reply


def test_a_filename_the_system_cannot_name_is_one_line(app: RpcApp) -> None:
    """A filename too long for the system: one short result, not an internal error with
    a traceback in the log for every such request."""
    for name in ("/tmp/" + "a" * 300, "/" + "b/" * 3000):
        reply = call(app, "torrent-add", filename=name)
        assert reply["result"].startswith("cannot read "), reply
        assert "too long" in reply["result"] and len(reply["result"]) < 300, reply
