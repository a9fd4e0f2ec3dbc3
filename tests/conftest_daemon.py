"""What the tests of `anomos daemon` share: a LocalNetwork with a seeder, and a daemon
process started with no arguments (its XDG folders and config under a temporary HOME).

Import what a module needs (``from conftest_daemon import new_daemon, ...``); the
module-scoped ``network`` fixture of tests/conftest.py runs :func:`seeded_network`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

from anomos.localnet import LocalNetwork
from anomos.torrent.metainfo import make_metainfo

SIZE = 3 * 1024 * 1024 + 777


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0, log: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    tail = log() if log is not None else ""
    raise AssertionError(f"not {what} after {timeout:.0f} s\n{tail}")


@attrs.define
class DaemonProc:
    """One `anomos daemon` process with its own HOME and XDG folders."""

    home: Path
    host: str
    config: dict[str, Any]
    popen: subprocess.Popen[bytes] | None = None
    url: str = ""  # its RPC URL, once started

    @property
    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            HOME=str(self.home),
            XDG_STATE_HOME=str(self.home / "state"),
            XDG_CONFIG_HOME=str(self.home / "config"),
            ANOMOS_PROGRESS="0",
            PYTHONUNBUFFERED="1",
        )

    @property
    def state_dir(self) -> Path:
        return self.home / "state" / "anomos" / "daemon"

    @property
    def log_path(self) -> Path:
        return self.home / "daemon.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> str:
        """Start it with no arguments; the RPC URL it printed."""
        config_dir = self.home / "config" / "anomos"
        config_dir.mkdir(parents=True, exist_ok=True)
        lines = [f"{k} = {json.dumps(v)}" for k, v in self.config.items()]
        (config_dir / "daemon.toml").write_text("\n".join(lines) + "\n")
        (self.state_dir / "rpc.json").unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "anomos", "-v", "daemon"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )

        def ready() -> str | None:
            assert self.popen is not None and self.popen.poll() is None, self.log()
            try:
                return str(json.loads((self.state_dir / "rpc.json").read_text())["url"])
            except (OSError, ValueError):
                return None

        try:
            url: str = wait_for("serving its RPC", ready, 60, self.log)
            assert f"RPC at {url}" in self.log()
        except BaseException:  # a daemon that did not come up is not left running
            self.popen.kill()
            self.popen.wait(10)
            raise
        self.url = url
        return url

    def transmission_remote(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run transmission-remote against this daemon, as a user would."""
        where = urllib.parse.urlsplit(self.url)
        return subprocess.run(
            ["transmission-remote", f"{where.hostname}:{where.port}", *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=self.env,
        )

    def remote(self, *args: str) -> str:
        """transmission-remote's output; it must succeed."""
        done = self.transmission_remote(*args)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        return self.popen.wait(30)


@contextlib.contextmanager
def seeded_network(tmp: Path, size: int = SIZE) -> Iterator[tuple[LocalNetwork, Path, Path]]:
    """A tracker, 3 relays and a seeder of one random file of ``size`` bytes, all in
    ``tmp``: (network, .atorrent, the file); every process stopped on exit."""
    data = tmp / "share" / "file.bin"
    data.parent.mkdir()
    data.write_bytes(os.urandom(size))
    with LocalNetwork(tmp / "net", verbose=1) as net:
        net.start_tracker()
        meta = make_metainfo(
            data, trackers=[net.tracker_url], fingerprint=net.fingerprint, progress=False
        )
        atorrent = tmp / "file.atorrent"
        meta.save(atorrent)
        for i in range(3):
            net.start_peer(f"relay{i}", "relay")
        net.start_peer("seeder", "seed", str(atorrent), "--data", str(data))
        yield net, atorrent, data


def new_daemon(net: LocalNetwork, home: Path, **config: Any) -> DaemonProc:
    config = {"rpc-port": 0, "listen": f"{net.next_host()}:0", **config}
    config.setdefault("download-dir", str(home / "downloads"))
    return DaemonProc(home, config["listen"].rpartition(":")[0], config)
