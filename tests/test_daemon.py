"""`anomos daemon` as a real process, driven over its Transmission RPC.

A LocalNetwork (tracker, relays, a seeder) and a daemon started with no
arguments (its XDG folders and config under tmp_path): the transmission-rpc
library adds a torrent and watches it finish, stops, starts and removes it;
raw HTTP checks the session-id handshake, authentication and bad requests;
SIGKILL and a restart bring every torrent back in its state without re-hashing;
transmission-remote (Debian's transmission-cli), when installed, lists and adds.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from conftest_daemon import SIZE, new_daemon, wait_for

from anomos.localnet import LocalNetwork
from anomos.torrent.metainfo import make_metainfo

transmission_rpc = pytest.importorskip("transmission_rpc")

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def client_for(url: str, **kw: Any) -> Any:
    parts = urllib.parse.urlsplit(url)
    return transmission_rpc.Client(
        host=parts.hostname, port=parts.port, path=parts.path, timeout=20, **kw
    )


def status_of(client: Any, tid: int) -> dict[str, Any]:
    fields = [
        "status",
        "percentDone",
        "leftUntilDone",
        "anomos-rechecked",
        "error",
        "errorString",
        "downloadDir",
        "name",
        "hashString",
    ]
    reply = client._request("torrent-get", {"ids": [tid], "fields": fields})
    return reply["torrents"][0] if reply["torrents"] else {}


def test_a_torrent_added_over_rpc_finishes_stops_starts_and_is_removed(
    network: tuple[LocalNetwork, Path, Path], tmp_path: Path
) -> None:
    net, atorrent, data = network
    daemon = new_daemon(net, tmp_path / "home")
    url = daemon.start()
    try:
        client = client_for(url)
        added = client.add_torrent(atorrent.read_bytes())
        tid = added.id
        torrent = wait_for(
            "seeding",
            lambda: (t := client.get_torrent(tid)).status == "seeding" and t,
            60,
            daemon.log,
        )
        assert torrent.percent_done == 1.0 and torrent.left_until_done == 0
        assert torrent.hash_string == added.hash_string
        downloaded = tmp_path / "home" / "downloads" / data.name
        assert downloaded.read_bytes() == data.read_bytes()
        assert torrent.fields["downloadedEver"] >= SIZE
        assert torrent.fields["files"] == [
            {"name": data.name, "length": SIZE, "bytesCompleted": SIZE}
        ]
        ours = client._request("torrent-get", {"ids": tid, "fields": ["anomos-circuits"]})
        circuits = ours["torrents"][0]["anomos-circuits"]
        assert circuits["ended-by-relays"] or circuits["open"], circuits

        client.stop_torrent(tid)
        stopped = status_of(client, tid)
        assert stopped["status"] == 0 and stopped["percentDone"] == 1.0, stopped
        client.start_torrent(tid)
        back = wait_for(
            "seeding again",
            lambda: status_of(client, tid)["status"] == 6 and status_of(client, tid),
            30,
            daemon.log,
        )
        assert back["anomos-rechecked"] == 0, "a restart of a torrent hashed its data again"
        # Verify hashes every piece again, and the torrent goes back to seeding.
        client.verify_torrent(tid)
        pieces = client.get_torrent(tid, arguments=["pieceCount"]).fields["pieceCount"]
        checked = wait_for(
            "seeding after a verify",
            lambda: (st := status_of(client, tid))["status"] == 6 and st,
            30,
            daemon.log,
        )
        assert checked["anomos-rechecked"] == pieces > 1

        # The same torrent again is a duplicate, not a second copy.
        assert client.add_torrent(atorrent.read_bytes()).id == tid
        # ids: by hash string, and "recently-active".
        assert client.get_torrent(added.hash_string).id == tid
        recent = client._request("torrent-get", {"ids": "recently-active", "fields": ["id"]})
        assert recent["torrents"] == [{"id": tid}]

        client.remove_torrent(tid, delete_data=True)
        assert client.get_torrents() == []
        recent = client._request("torrent-get", {"ids": "recently-active", "fields": ["id"]})
        assert recent["removed"] == [tid]
        assert not downloaded.exists()
        assert (tmp_path / "home" / "downloads").is_dir()  # only the torrent's files go
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert "daemon stopped" in daemon.log()


def raw_post(
    url: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=20)
    try:
        conn.request("POST", parts.path, body=body, headers=headers or {})
        response = conn.getresponse()
        payload = response.read()
        try:
            doc = json.loads(payload)
        except ValueError:
            doc = payload
        return response.status, dict(response.getheaders()), doc
    finally:
        conn.close()


def test_the_rpc_handshake_auth_and_bad_requests(
    network: tuple[LocalNetwork, Path, Path], tmp_path: Path
) -> None:
    net, atorrent, _ = network
    daemon = new_daemon(
        net, tmp_path / "home", **{"rpc-username": "alice", "rpc-password": "s3cret"}
    )
    url = daemon.start()
    auth = {"Authorization": "Basic " + base64.b64encode(b"alice:s3cret").decode()}
    try:
        get = json.dumps({"method": "session-get", "arguments": {}, "tag": 7}).encode()
        # No credentials, then wrong ones: 401 before anything else.
        assert raw_post(url, get)[0] == 401
        wrong = {"Authorization": "Basic " + base64.b64encode(b"alice:guess").decode()}
        assert raw_post(url, get, wrong)[0] == 401
        # Right credentials, no session id: 409 with the id to use.
        code, headers, _ = raw_post(url, get, auth)
        assert code == 409
        sid = headers["X-Transmission-Session-Id"]
        assert raw_post(url, get, {**auth, "X-Transmission-Session-Id": "stale"})[0] == 409
        ok = {**auth, "X-Transmission-Session-Id": sid}
        code, _, reply = raw_post(url, get, ok)
        assert code == 200 and reply["result"] == "success" and reply["tag"] == 7
        assert reply["arguments"]["rpc-version"] >= 15

        def result_of(body: bytes) -> str:
            code, _, reply = raw_post(url, body, ok)
            assert code == 200, reply
            return str(reply["result"])

        bad = {
            b"{not json": "invalid JSON",
            b"[" * 200_000: "invalid JSON",  # nested too deep for the parser
            b"\xff\xfe\x00": "invalid JSON",
            b"[1, 2]": "not a JSON object",
            json.dumps({"method": "torrent-explode"}).encode(): "method name not recognized",
            json.dumps({"method": "torrent-get", "arguments": []}).encode(): "not an object",
            json.dumps({"method": "torrent-get", "arguments": {}}).encode(): "needs 'fields'",
            json.dumps(
                {"method": "torrent-get", "arguments": {"fields": ["id"], "ids": [{}]}}
            ).encode(): "invalid id",
            json.dumps(
                {"method": "torrent-add", "arguments": {"metainfo": "bm90IGJlbmNvZGU="}}
            ).encode(): "invalid or corrupt torrent",
            json.dumps(
                {"method": "torrent-add", "arguments": {"filename": "/nonexistent/x"}}
            ).encode(): "cannot read",
            json.dumps(
                {"method": "torrent-add", "arguments": {"filename": "/dev/zero"}}
            ).encode(): "not a regular file",
            json.dumps(
                {"method": "torrent-add", "arguments": {"filename": "magnet:?xt=1"}}
            ).encode(): "magnet",
            json.dumps(
                {"method": "session-set", "arguments": {"alt-speed-up": 5}}
            ).encode(): "not supported",
        }
        for body, expected in bad.items():
            assert expected in result_of(body), body
        # A torrent that does not pin its tracker's identity is refused, not half-added.
        plain = make_metainfo(atorrent, trackers=[net.tracker_url], progress=False).to_bytes()
        body = json.dumps(
            {"method": "torrent-add", "arguments": {"metainfo": base64.b64encode(plain).decode()}}
        ).encode()
        assert "atorrent" in result_of(body)
        # A body over the limit is refused from its Content-Length, unread.
        code, _, reply = raw_post(url, b"x", {**ok, "Content-Length": str(10**9)})
        assert code == 413
        # format "table": the field names, then one row per torrent (none here).
        table = json.dumps(
            {"method": "torrent-get", "arguments": {"fields": ["id", "name"], "format": "table"}}
        ).encode()
        assert raw_post(url, table, ok)[2]["arguments"]["torrents"] == [["id", "name"]]
        # Port test: answered honestly.
        port = json.loads(json.dumps({"method": "port-test"}))
        code, _, reply = raw_post(url, json.dumps(port).encode(), ok)
        assert reply["arguments"]["port-is-open"] is False
        assert "not tested" in reply["arguments"]["anomos-port-test"]
        # Still up and answering.
        assert daemon.popen is not None and daemon.popen.poll() is None
        assert raw_post(url, get, ok)[2]["result"] == "success"
        assert "Traceback" not in daemon.log()
        # The library with credentials works; without them it is refused.
        assert client_for(url, username="alice", password="s3cret").get_torrents() == []
        with pytest.raises(transmission_rpc.TransmissionError):
            client_for(url, username="alice", password="guess")
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_a_killed_daemon_restarts_every_torrent_in_its_state_without_rehashing(
    network: tuple[LocalNetwork, Path, Path], tmp_path: Path
) -> None:
    net, atorrent, data = network
    # A second torrent, added paused: it must stay paused across the restart.
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(100_000))
    paused_meta = make_metainfo(
        other, trackers=[net.tracker_url], fingerprint=net.fingerprint, progress=False
    )
    daemon = new_daemon(net, tmp_path / "home")
    url = daemon.start()
    client = client_for(url)
    tid = client.add_torrent(atorrent.read_bytes()).id
    pid = client.add_torrent(paused_meta.to_bytes(), paused=True).id
    wait_for("seeding", lambda: status_of(client, tid)["status"] == 6, 60, daemon.log)
    assert status_of(client, pid)["status"] == 0
    # A second daemon on the same state says so in one line and exits.
    second = subprocess.run(
        [sys.executable, "-m", "anomos", "daemon"],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode != 0 and "in use by another anomos process" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr

    daemon.stop(signal.SIGKILL)
    marker = len(daemon.log())
    url = daemon.start()
    client = client_for(url)
    back = wait_for(
        "seeding after the restart",
        lambda: (s := status_of(client, tid))["status"] == 6 and s,
        60,
        daemon.log,
    )
    assert back["percentDone"] == 1.0
    assert back["anomos-rechecked"] == 0, daemon.log()[marker:]
    assert "pieces on disk (0 re-hashed)" in daemon.log()[marker:]
    assert status_of(client, pid)["status"] == 0, "a paused torrent came back running"
    assert (tmp_path / "home" / "downloads" / data.name).read_bytes() == data.read_bytes()
    assert daemon.stop() == 0, daemon.log()


@pytest.mark.skipif(shutil.which("transmission-remote") is None, reason="transmission-cli missing")
def test_transmission_remote_lists_and_adds(
    network: tuple[LocalNetwork, Path, Path], tmp_path: Path
) -> None:
    net, atorrent, data = network
    # Configured to join the tracker before it has any torrent.
    daemon = new_daemon(
        net, tmp_path / "home", tracker=net.tracker_url, fingerprint=net.fingerprint
    )
    url = daemon.start()
    session = client_for(url).get_session()
    assert [n["tracker"] for n in session.fields["anomos-networks"]] == [net.tracker_url]
    wait_for(
        "announced",
        lambda: "peer " in daemon.log() and "listening on" in daemon.log(),
        30,
        daemon.log,
    )

    try:
        assert "success" in daemon.remote("-a", str(atorrent))
        client = client_for(url)
        wait_for("seeding", lambda: status_of(client, 1)["status"] == 6, 60, daemon.log)
        listing = daemon.remote("-l")
        row = next(line for line in listing.splitlines() if data.name in line)
        assert "100%" in row and ("Seeding" in row or "Idle" in row), listing
        assert listing.splitlines()[0].split()[:2] == ["ID", "Done"]
        # anomos' own `list` shows the same torrent.
        mine = subprocess.run(
            [sys.executable, "-m", "anomos", "list", "--rpc", url],
            capture_output=True,
            text=True,
            timeout=60,
            env=daemon.env,
        )
        assert mine.returncode == 0, mine.stderr
        assert any(
            data.name in line and "100%" in line and "Seeding" in line
            for line in mine.stdout.splitlines()
        ), mine.stdout
        assert "success" in daemon.remote("-t", "1", "-S")
        assert status_of(client, 1)["status"] == 0
    finally:
        assert daemon.stop() == 0, daemon.log()
