"""Section ``daemon``: the memory of one ``anomos daemon`` process as torrents pile up.

A real network on loopback (tracker, relays, one seeder) and a real daemon
driven over its RPC: its RSS when started (peer joined, no torrent), with
``idle`` small torrents added (their data already in place: each checked and
seeding, announced, no traffic), then while ``downloading`` more torrents
download from the seeder at once (the peak, sampled every 0.2 s), and when
they are done.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from anomos.daemon.client import RpcClient
from anomos.errors import AnomosError
from anomos.localnet import LocalNetwork
from anomos.torrent.metainfo import make_metainfo

Echo = Callable[[str], None]
#: Bytes of each idle torrent, and of each downloaded one.
IDLE_SIZE = 64 * 1024
DOWNLOAD_SIZE = 8 * 1024 * 1024
#: Seconds a stage may take before the benchmark gives up.
STAGE_TIMEOUT = 300.0


def _quiet(_message: str) -> None:
    pass


def daemon_memory(
    workdir: Path,
    *,
    idle: int = 100,
    downloading: int = 10,
    download_size: int = DOWNLOAD_SIZE,
    echo: Echo = _quiet,
    verbose: bool = False,
) -> dict[str, Any]:
    """RSS of a daemon: started, with ``idle`` seeding torrents, during and after
    ``downloading`` simultaneous downloads (bytes)."""
    downloads = workdir / "daemon-home" / "downloads"
    shared = workdir / "shared"
    for folder in (downloads, shared):
        folder.mkdir(parents=True, exist_ok=True)
    with LocalNetwork(workdir / "net", verbose=1 if verbose else 0) as net:
        echo(f"daemon: a tracker, 3 relays, a seeder of {downloading} torrents")
        net.start_tracker()

        def atorrent(path: Path) -> bytes:
            meta = make_metainfo(
                path, trackers=[net.tracker_url], fingerprint=net.fingerprint, progress=False
            )
            return meta.to_bytes()

        idle_torrents = []
        for i in range(idle):  # their data is where the daemon will look: they seed
            path = downloads / f"idle{i:04d}.bin"
            path.write_bytes(os.urandom(IDLE_SIZE))
            idle_torrents.append(atorrent(path))
        wanted = []
        for i in range(downloading):
            path = shared / f"file{i:02d}.bin"
            path.write_bytes(os.urandom(download_size))
            wanted.append(path.with_suffix(".atorrent"))
            wanted[-1].write_bytes(atorrent(path))
        for i in range(3):
            net.start_peer(f"relay{i}", "relay")
        net.start_peer("seeder", "seed", *map(str, wanted), "--data", str(shared))
        daemon = _Daemon.start(workdir / "daemon-home", net, downloads, verbose=verbose)
        try:
            client = daemon.client
            client.call("session-set", **{"download-queue-size": max(downloading, 1)})
            time.sleep(2.0)
            started = daemon.rss()
            echo(f"daemon: adding {idle} small torrents (their data on disk: they seed)")
            ids = [_add(client, data) for data in idle_torrents]
            _wait(daemon, lambda: _count(client, ids, 6) == len(ids), "idle torrents seeding")
            time.sleep(2.0)
            with_idle = daemon.rss()
            echo(f"daemon: {downloading} torrents downloading at once")
            new = [_add(client, p.read_bytes()) for p in wanted]
            peak, active_peak = with_idle, 0
            deadline = time.monotonic() + STAGE_TIMEOUT
            while _count(client, new, 6) < len(new):
                if time.monotonic() > deadline:
                    raise AnomosError(f"daemon benchmark: downloads not done: {daemon.tail()}")
                active_peak = max(active_peak, _count(client, new, 4))
                peak = max(peak, daemon.rss())
                time.sleep(0.2)
            time.sleep(2.0)
            after = daemon.rss()
        finally:
            daemon.stop()
    return {
        "idle_torrents": idle,
        "downloads": downloading,
        "download_size": download_size,
        "rss_started": started,
        "rss_idle": with_idle,
        "per_idle_torrent": (with_idle - started) / idle if idle else 0.0,
        "rss_downloading_peak": peak,
        "downloading_at_once": active_peak,
        "rss_after_downloads": after,
    }


def _add(client: RpcClient, data: bytes) -> int:
    reply = client.call("torrent-add", metainfo=base64.b64encode(data).decode())
    return int(reply["torrent-added"]["id"])


def _count(client: RpcClient, ids: list[int], status: int) -> int:
    torrents = client.call("torrent-get", ids=ids, fields=["status"])["torrents"]
    return sum(1 for t in torrents if t["status"] == status)


def _wait(daemon: _Daemon, done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + STAGE_TIMEOUT
    while not done():
        if time.monotonic() > deadline:
            raise AnomosError(f"daemon benchmark: not {what} after {STAGE_TIMEOUT:.0f} s")
        time.sleep(0.2)


class _Daemon:
    """One ``anomos daemon`` process with its own state and config under ``home``."""

    def __init__(self, popen: subprocess.Popen[bytes], log: Path, client: RpcClient) -> None:
        self.popen, self.log, self.client = popen, log, client

    @classmethod
    def start(cls, home: Path, net: LocalNetwork, downloads: Path, *, verbose: bool) -> _Daemon:
        config = home / "daemon.toml"
        config.write_text(
            f'rpc-port = 0\nlisten = "{net.next_host()}:0"\ndownload-dir = "{downloads}"\n'
        )
        state = home / "state"
        log = home / "daemon.log"
        flags = ["-v"] if verbose else []
        argv = ["daemon", "--config", str(config), "--state", str(state)]
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "anomos", *flags, *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(os.environ, ANOMOS_PROGRESS="0", PYTHONUNBUFFERED="1"),
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                url = json.loads((state / "rpc.json").read_text())["url"]
                break
            except (OSError, ValueError, KeyError):
                if popen.poll() is not None or time.monotonic() > deadline:
                    popen.kill()
                    raise AnomosError(
                        f"daemon benchmark: the daemon did not start: {log.read_text()[-500:]}"
                    ) from None
                time.sleep(0.1)
        return cls(popen, log, RpcClient(url))

    def rss(self) -> int:
        return int(psutil.Process(self.popen.pid).memory_info().rss)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-1000:]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
