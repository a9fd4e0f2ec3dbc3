"""The daemon's file selection, speed and seed limits and queue, over its RPC.

One LocalNetwork (tracker, relays, one seeder of a three-file torrent and of a
few small ones) and real `anomos daemon` processes driven by the
transmission-rpc library, as tests/test_daemon.py does.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from test_daemon import client_for, new_daemon, wait_for

from anomos.localnet import LocalNetwork
from anomos.torrent.metainfo import make_metainfo

transmission_rpc = pytest.importorskip("transmission_rpc")

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PIECE = 256 * 1024
# a.bin ends half-way through piece 4; b.bin fills the rest of piece 4 to half of
# piece 12; c.bin starts there: pieces 4 and 12 are shared with b.bin.
SIZES = {"a.bin": 4 * PIECE + PIECE // 2, "b.bin": 8 * PIECE, "c.bin": 2 * PIECE + 999}
SMALL = 3


@attrs.frozen
class Swarm:
    net: LocalNetwork
    multi: Path
    content: dict[str, bytes]
    small: tuple[Path, ...]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    tmp = tmp_path_factory.mktemp("controlnet")
    share = tmp / "share"
    (share / "multi").mkdir(parents=True)
    content = {name: os.urandom(size) for name, size in SIZES.items()}
    for name, data in content.items():
        (share / "multi" / name).write_bytes(data)
    with LocalNetwork(tmp / "net", verbose=1) as net:
        net.start_tracker()

        def atorrent(path: Path) -> Path:
            meta = make_metainfo(
                path,
                trackers=[net.tracker_url],
                fingerprint=net.fingerprint,
                piece_length=PIECE,
                progress=False,
            )
            out = tmp / f"{path.name}.atorrent"
            meta.save(out)
            return out

        multi = atorrent(share / "multi")
        small = []
        for i in range(SMALL):
            path = share / f"small{i}.bin"
            path.write_bytes(os.urandom(300_000 + i))
            small.append(atorrent(path))
        for i in range(3):
            net.start_peer(f"relay{i}", "relay")
        net.start_peer("seeder", "seed", str(multi), *map(str, small), "--data", str(share))
        yield Swarm(net, multi, content, tuple(small))


def torrent_of(client: Any, tid: int, *fields: str) -> dict[str, Any]:
    reply = client._request("torrent-get", {"ids": [tid], "fields": ["id", *fields]})
    return dict(reply["torrents"][0])


def result_of(client: Any, method: str, args: dict[str, Any]) -> str:
    """The daemon's ``result`` for a request it refuses ("success" if it does not)."""
    try:
        client._request(method, args)
    except transmission_rpc.TransmissionError as exc:
        return str(exc)
    return "success"


def anomos_cli(url: str, env: dict[str, str], *args: str) -> str:
    """Run an anomos command against the daemon at ``url``; its output (it must succeed)."""
    done = subprocess.run(
        [sys.executable, "-m", "anomos", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "ANOMOS_RPC": url},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_unwanted_files_are_not_fetched_the_choice_survives_a_restart_and_can_change(
    swarm: Swarm, tmp_path: Path
) -> None:
    daemon = new_daemon(swarm.net, tmp_path / "home")
    url = daemon.start()
    got = tmp_path / "home" / "downloads" / "multi"
    try:
        client = client_for(url)
        metainfo = base64.b64encode(swarm.multi.read_bytes()).decode()
        bad_add = {"metainfo": metainfo, "files-unwanted": [3]}
        assert "out of range" in result_of(client, "torrent-add", bad_add)
        assert client.get_torrents() == []  # (and nothing half-added)
        assert list((daemon.state_dir / "torrents").iterdir()) == []
        tid = client.add_torrent(swarm.multi.read_bytes(), files_unwanted=[1]).id
        fields = ("status", "wanted", "priorities", "fileStats", "sizeWhenDone", "downloadedEver")
        done = wait_for(
            "seeding the chosen files",
            lambda: (t := torrent_of(client, tid, *fields))["status"] == 6 and t,
            60,
            daemon.log,
        )
        assert done["wanted"] == [1, 0, 1]
        assert [s["wanted"] for s in done["fileStats"]] == [True, False, True]
        shared = PIECE // 2  # b.bin's bytes in each piece it shares with a.bin and c.bin
        wanted_bytes = SIZES["a.bin"] + SIZES["c.bin"] + 2 * shared
        assert done["sizeWhenDone"] == wanted_bytes
        # (endgame may fetch a block twice over two circuits)
        assert wanted_bytes <= done["downloadedEver"] <= wanted_bytes + 2 * PIECE, done
        assert (got / "a.bin").read_bytes() == swarm.content["a.bin"]
        assert (got / "c.bin").read_bytes() == swarm.content["c.bin"]
        b = (got / "b.bin").read_bytes()  # only the shared pieces' bytes, sparse elsewhere
        assert b[shared:-shared] == bytes(len(b) - 2 * shared)
        # Bad values: Transmission-style result strings, nothing changed.
        assert "out of range" in result_of(
            client, "torrent-set", {"ids": [tid], "files-wanted": [7]}
        )
        assert "list of file indices" in result_of(
            client, "torrent-set", {"ids": [tid], "files-wanted": "1"}
        )
        assert "not supported" in result_of(client, "torrent-set", {"ids": [tid], "location": "/"})

        # A restart keeps the choice: the torrent seeds at once and fetches nothing.
        assert daemon.stop() == 0, daemon.log()
        url = daemon.start()
        client = client_for(url)
        back = wait_for(
            "seeding after the restart",
            lambda: (t := torrent_of(client, tid, *fields))["status"] == 6 and t,
            60,
            daemon.log,
        )
        assert back["wanted"] == [1, 0, 1] and back["sizeWhenDone"] == wanted_bytes

        # `anomos select` wants every file, b.bin at high priority: it downloads.
        select = anomos_cli(url, daemon.env, "select", str(tid), "--all", "--high", "1")
        row = next(line for line in select.splitlines() if "b.bin" in line)
        assert " yes " in row and " high " in row, select
        full = wait_for(
            "seeding every file",
            lambda: (
                (t := torrent_of(client, tid, *fields))["status"] == 6
                and t["sizeWhenDone"] == sum(SIZES.values())
                and t
            ),
            60,
            daemon.log,
        )
        assert full["priorities"] == [0, 1, 0]
        for name, data in swarm.content.items():
            assert (got / name).read_bytes() == data, name
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_speed_limits_the_queue_and_seed_limits(swarm: Swarm, tmp_path: Path) -> None:
    daemon = new_daemon(swarm.net, tmp_path / "home")
    url = daemon.start()
    try:
        client = client_for(url)

        def call(method: str, **args: Any) -> dict[str, Any]:
            return dict(client._request(method, args))

        def status(tid: int) -> int:
            return int(torrent_of(client, tid, "status")["status"])

        # Bad values are result errors and change nothing.
        for bad in (
            {"download-queue-size": -1},
            {"speed-limit-down": "fast"},
            {"seedRatioLimited": 1},
            {"seedRatioLimit": 1e300},
        ):
            assert result_of(client, "session-set", bad) != "success", bad
        shown = anomos_cli(url, daemon.env, "limits", "--down", "50", "--download-queue", "1")
        assert "download:        50 kB/s" in shown and "download queue:  1" in shown, shown
        session = client.get_session().fields
        assert session["download-queue-size"] == 1 and session["speed-limit-down-enabled"]

        ids = [client.add_torrent(t.read_bytes(), paused=True).id for t in swarm.small]
        positions = [torrent_of(client, i, "queuePosition")["queuePosition"] for i in ids]
        assert positions == [0, 1, 2]
        first, second, third = ids
        for bad_set in ({"seedRatioMode": 7}, {"downloadLimit": True}, {"uploadLimit": -5}):
            assert result_of(client, "torrent-set", {"ids": [first], **bad_set}) != "success"
        # The first also under a limit of its own (both pace it).
        shown = anomos_cli(url, daemon.env, "limits", str(first), "--down", "40")
        assert "download:        40 kB/s" in shown, shown
        assert torrent_of(client, first, "downloadLimit", "downloadLimited") == {
            "id": first,
            "downloadLimit": 40,
            "downloadLimited": True,
        }

        call("torrent-start", ids=ids)
        # One download at a time: the other two wait in the queue (DOWNLOAD_WAIT).
        assert status(second) == 3 and status(third) == 3
        listing = anomos_cli(url, daemon.env, "list").splitlines()
        assert sum(1 for line in listing if "Queued" in line) == 2, listing
        call("queue-move-top", ids=[third])
        positions = [torrent_of(client, i, "queuePosition")["queuePosition"] for i in ids]
        assert positions == [1, 2, 0]
        # start-now bypasses the queue.
        call("torrent-start-now", ids=[second])
        wait_for("the forced one running", lambda: status(second) in (2, 4, 6), 20, daemon.log)

        # The limited download: from its first byte to its last takes what 50 kB/s allows.
        first_byte = wait_for(
            "a first byte",
            lambda: (
                torrent_of(client, first, "downloadedEver")["downloadedEver"] > 0
                and time.monotonic()
            ),
            60,
            daemon.log,
        )
        done = wait_for("the first done", lambda: status(first) == 6 and time.monotonic(), 60)
        # 300 kB at 40 kB/s: 7 s; unlimited, loopback moves it in a fraction of a second.
        assert done - first_byte > 3.0, done - first_byte
        # Its slot goes to the next in the queue (the one moved to the top).
        wait_for("all seeding", lambda: all(status(i) == 6 for i in ids), 60, daemon.log)
        stats = client.session_stats().fields
        assert isinstance(stats["anomos-relay-speed"], int)

        # A seed ratio limit of 0, for the session: every torrent stops, finished.
        call("session-set", seedRatioLimit=0, seedRatioLimited=True)
        wait_for(
            "stopped at the ratio limit",
            lambda: all(
                (t := torrent_of(client, i, "status", "isFinished"))["status"] == 0
                and t["isFinished"]
                for i in ids
            ),
            20,
            daemon.log,
        )
        # Started by hand, a finished torrent seeds on (its ratio limit is lifted).
        call("torrent-start", ids=[first])
        wait_for("seeding again", lambda: status(first) == 6, 20, daemon.log)
        again = torrent_of(client, first, "isFinished", "seedRatioMode")
        assert again["isFinished"] is False and again["seedRatioMode"] == 2
        info = anomos_cli(url, daemon.env, "info", str(second))
        assert "Finished" in info and "seed ratio:      the daemon's" in info, info
        # One seeding slot, taken: the others wait (SEED_WAIT).
        call("session-set", **{"seed-queue-enabled": True, "seed-queue-size": 1})
        call("torrent-start", ids=[second, third])
        assert status(second) == 5 and status(third) == 5
        call("torrent-stop", ids=[first])  # its slot goes to the first in the queue
        wait_for("the top one seeding", lambda: status(third) == 6, 20, daemon.log)
        assert status(second) == 5

        # The torrent's limits and queue positions survive a restart.
        assert daemon.stop() == 0, daemon.log()
        client = client_for(daemon.start())
        kept = torrent_of(client, first, "downloadLimit", "downloadLimited", "queuePosition")
        assert kept == {
            "id": first,
            "downloadLimit": 40,
            "downloadLimited": True,
            "queuePosition": 1,
        }
    finally:
        assert daemon.stop() == 0, daemon.log()
