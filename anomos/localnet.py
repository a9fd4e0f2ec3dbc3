"""A whole anomos network as separate processes on loopback.

Used by ``anomos demo``, the integration tests and the benchmarks: a tracker and
any number of peers, each a real ``python -m anomos`` process with its own
127.0.0.X address, state directory and log file. A process may also be given
an explicit address and a command prefix (``ip netns exec NS``), so the same
network can span network namespaces.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import attrs

from anomos.errors import AnomosError

#: Seconds to wait for a process to report itself ready.
READY_TIMEOUT = 60.0


@attrs.define(eq=False)
class Proc:
    """One anomos process of the network."""

    name: str
    host: str
    state_dir: Path
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.alive():
            self.popen.kill()
            self.popen.wait(5)


@attrs.define(eq=False)
class LocalNetwork:
    """Starts and stops a tracker and peers under ``workdir``."""

    workdir: Path = attrs.field(converter=Path)
    #: First octets of the loopback block; peers get BASE.1.2, BASE.1.3, ...
    base: str = "127.0"
    extra_env: dict[str, str] = attrs.field(factory=dict)
    procs: list[Proc] = attrs.field(factory=list)
    tracker_url: str = ""
    fingerprint: str = ""
    #: ``-v`` flags given to every process (1: INFO logs in each log file).
    verbose: int = 0
    #: The tracker process, once started.
    tracker: Proc | None = None
    _tracker_args: tuple[str, ...] = ()
    _tracker_prefix: tuple[str, ...] = ()
    _hosts: itertools.count[int] = attrs.field(factory=lambda: itertools.count(2))
    _block: int = attrs.field(factory=lambda: 100 + os.getpid() % 100)

    def next_host(self) -> str:
        n = next(self._hosts)
        return f"{self.base}.{self._block}.{n}"

    def _spawn(self, name: str, host: str, args: list[str], prefix: Sequence[str] = ()) -> Proc:
        state = self.workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / f"{name}.log"
        env = dict(os.environ, ANOMOS_PROGRESS="0", PYTHONUNBUFFERED="1", **self.extra_env)
        flags = ["-v"] * self.verbose
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                [*prefix, sys.executable, "-m", "anomos", *flags, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        proc = Proc(name, host, state, popen, log_path)
        self.procs.append(proc)
        return proc

    def _wait_file(self, proc: Proc, path: Path, timeout: float = READY_TIMEOUT) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                try:
                    return json.loads(path.read_text())  # type: ignore[no-any-return]
                except ValueError:
                    pass  # being written
            if not proc.alive():
                raise AnomosError(f"{proc.name} exited early: {proc.log_tail(5)}")
            time.sleep(0.05)
        raise AnomosError(f"{proc.name} not ready after {timeout:.0f} s: {proc.log_tail(5)}")

    def start_tracker(
        self, *extra: str, host: str | None = None, prefix: Sequence[str] = ()
    ) -> Proc:
        host = host or self.next_host()
        self._tracker_args, self._tracker_prefix = extra, tuple(prefix)
        return self._run_tracker(f"{host}:0")

    def restart_tracker(self) -> Proc:
        """Start the tracker again on the same state directory and address (it must be down)."""
        if self.tracker is None or self.tracker.alive():
            raise AnomosError("restart_tracker needs a tracker that was started and has exited")
        return self._run_tracker(urllib.parse.urlsplit(self.tracker_url).netloc)

    def _run_tracker(self, listen: str) -> Proc:
        host = listen.rpartition(":")[0]
        state = self.workdir / "tracker"
        (state / "tracker.json").unlink(missing_ok=True)
        # Every loopback address stands for a host of its own (not one /24 of them).
        args = ["tracker", "--state", str(state), "--listen", listen, "--ipv4-prefix", "32"]
        args += self._tracker_args
        proc = self._spawn("tracker", host, args, self._tracker_prefix)
        info = self._wait_file(proc, proc.state_dir / "tracker.json")
        self.tracker_url, self.fingerprint = info["url"], info["fingerprint"]
        self.tracker = proc
        return proc

    def start_peer(
        self,
        name: str,
        command: str,
        *args: str,
        wait: bool = True,
        host: str | None = None,
        prefix: Sequence[str] = (),
    ) -> Proc:
        """``command`` is ``seed``, ``get`` or ``relay``; args follow the command.

        Starting a name again reuses its state directory (keys, resume data) and
        appends to its log: a restart of the same peer.
        """
        host = host or self.next_host()
        state = self.workdir / name
        state.mkdir(parents=True, exist_ok=True)
        if command == "relay":
            argv = ["relay", self.tracker_url, "--fingerprint", self.fingerprint]
        else:
            argv = [command]
        argv += [*args, "--state", str(state), "--listen", f"{host}:0"]
        (state / "peer.json").unlink(missing_ok=True)
        proc = self._spawn(name, host, argv, prefix)
        if wait:
            self._wait_file(proc, state / "peer.json")
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def __enter__(self) -> LocalNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
