"""A private, fully offline Tor network on loopback, for tests and ``anomos testnet tor``.

Chutney is not packaged, so this is a small launcher with the stdlib: directory
authorities and relays come up first; once an authority's consensus lists every
router, a client tor (SocksPort + ControlPort) and an onion-service tor
(ControlPort) join. The torrc lines follow /work/shared/reference/tor-private-network.md.

Every tor gets ``__OwningControllerProcess`` set to our pid, so a launcher that
dies without calling :meth:`TorTestNetwork.stop` still takes its tors with it.
Ports are picked at random below Linux's ephemeral range and bind-tested, so
several networks can run on one machine and outgoing connections never take
a port a tor is about to bind.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs
import gevent

from anomos.errors import ConfigError, TransportError
from anomos.tor import TESTNET_START_TIMEOUT
from anomos.tor.control import connect_control

log = logging.getLogger(__name__)

#: Seconds for the whole network (all attempts) to be ready.
START_TIMEOUT = TESTNET_START_TIMEOUT
#: Seconds a tor gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 5.0
#: Seconds between readiness checks.
POLL_INTERVAL = 0.25
#: Seconds for one tor-gencert / --list-fingerprint run.
KEYGEN_TIMEOUT = 60.0
#: Whole-network restarts when a port was taken between our check and tor's bind.
START_ATTEMPTS = 3
#: Ports are drawn from here: below Linux's default ephemeral range (32768-60999).
PORT_RANGE = (10000, 32000)
LOG_TAIL_LINES = 25
#: Largest consensus document we read from an authority.
MAX_CONSENSUS_SIZE = 1 << 20

#: Ports handed out by this process and not yet released.
_reserved_ports: set[int] = set()

_NO_AUTHORITY = "x 127.0.0.1:1 ffffffffffffffffffffffffffffffffffffffff"


def pick_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports that are free on ``host`` right now."""
    ports: list[int] = []
    for _ in range(count * 200):
        if len(ports) == count:
            break
        port = random.randint(*PORT_RANGE)
        if port in _reserved_ports or port in ports:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        ports.append(port)
    if len(ports) < count:
        raise TransportError(f"cannot find {count} free ports on {host}")
    _reserved_ports.update(ports)
    return ports


class _NodeFailed(Exception):
    def __init__(self, node: TorNode, reason: str) -> None:
        super().__init__(reason)
        self.node = node
        self.reason = reason


@attrs.define(eq=False)
class TorNode:
    """One tor process of the network and where it keeps its files."""

    name: str
    #: ``authority``, ``relay``, ``client`` or ``service``.
    role: str
    data_dir: Path
    or_port: int = 0
    dir_port: int = 0
    socks_port: int = 0
    control_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "notice.log"

    @property
    def torrc_path(self) -> Path:
        return self.data_dir / "torrc"

    def ports(self) -> list[int]:
        return [p for p in (self.or_port, self.dir_port, self.socks_port, self.control_port) if p]

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        text = ""
        for path in (self.log_path, self.data_dir / "stdout.log"):
            try:
                with open(path, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - 16384))
                    text += f.read().decode("utf-8", "replace")
            except OSError:
                continue
        return "\n".join(text.splitlines()[-lines:])

    def log_contains(self, needle: str) -> bool:
        try:
            return needle in self.log_path.read_text("utf-8", "replace")
        except OSError:
            return False

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@attrs.define(eq=False)
class TorTestNetwork:
    """Authorities, relays, one client tor and one onion-service tor on loopback.

    Use as a context manager or call :meth:`start` and :meth:`stop`. After
    :meth:`start`, ``socks_host:socks_port`` is the client's SOCKS port and the
    two control ports accept cookie authentication (stem finds the cookie).
    """

    workdir: Path = attrs.field(converter=Path)
    authorities: int = attrs.field(default=3, kw_only=True)
    relays: int = attrs.field(default=2, kw_only=True)
    tor_cmd: str = attrs.field(default="tor", kw_only=True)
    gencert_cmd: str = attrs.field(default="tor-gencert", kw_only=True)
    socks_host: str = attrs.field(default="127.0.0.1", init=False)
    socks_port: int = attrs.field(default=0, init=False)
    client_control_port: int = attrs.field(default=0, init=False)
    service_control_port: int = attrs.field(default=0, init=False)
    nodes: list[TorNode] = attrs.field(factory=list, init=False)
    _dir_authority_lines: list[str] = attrs.field(factory=list, init=False)
    #: One control connection per client/service tor that owns it (see :meth:`_take_ownership`).
    _owners: list[Any] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        if self.authorities < 1 or self.relays < 0 or self.authorities + self.relays < 3:
            raise ConfigError(
                "a private Tor network needs at least 1 authority and 3 routers in all "
                "(circuits have three hops)"
            )

    # ------------------------------------------------------------------ addresses
    @property
    def socks_address(self) -> str:
        return f"{self.socks_host}:{self.socks_port}"

    @property
    def client_control_address(self) -> str:
        return f"{self.socks_host}:{self.client_control_port}"

    @property
    def service_control_address(self) -> str:
        return f"{self.socks_host}:{self.service_control_port}"

    def join_config(self) -> dict[str, str | list[str]]:
        """torrc options a further tor needs to use this network (for ``launch_tor``)."""
        return {
            "TestingTorNetwork": "1",
            "PathsNeededToBuildCircuits": "0.25",
            "DirAuthority": list(self._dir_authority_lines),
        }

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Bring the whole network up; raise :class:`TransportError` in one line if it cannot."""
        for exe in (self.tor_cmd, self.gencert_cmd):
            if shutil.which(exe) is None:
                raise TransportError(f"{exe} is not installed (on Debian: apt-get install tor)")
        deadline = time.monotonic() + timeout
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._start_once(deadline)
                return
            except _NodeFailed as exc:
                log.debug(
                    "tor %s %s; its log ends:\n%s", exc.node.name, exc.reason, exc.node.log_tail()
                )
                self.stop()
                port_taken = exc.node.log_contains("Address already in use")
                if port_taken and attempt < START_ATTEMPTS and time.monotonic() < deadline:
                    log.info("a port was taken under us; restarting the Tor test network")
                    continue
                raise TransportError(
                    f"private Tor network did not start: {exc.node.name} {exc.reason} "
                    f"(log: {exc.node.log_path})"
                ) from None
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """SIGTERM every tor, wait, kill the stragglers; safe to call twice."""
        running = [n for n in self.nodes if n.process is not None]
        for node in running:
            assert node.process is not None
            if node.process.poll() is None:
                try:
                    node.process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for controller in self._owners:
            try:
                controller.close()
            except Exception:  # pragma: no cover - closing a dead connection
                log.debug("closing an owner control connection", exc_info=True)
        self._owners = []
        deadline = time.monotonic() + STOP_TIMEOUT
        for node in running:
            assert node.process is not None
            try:
                node.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("tor %s ignored SIGTERM; killing it", node.name)
                node.process.kill()
                node.process.wait()
            node.process = None
        for node in self.nodes:
            _reserved_ports.difference_update(node.ports())
        self.nodes = []
        self.socks_port = self.client_control_port = self.service_control_port = 0

    def __enter__(self) -> TorTestNetwork:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ steps
    def _start_once(self, deadline: float) -> None:
        self.nodes = []
        auths = [self._node(f"auth{i}", "authority", 2) for i in range(self.authorities)]
        relays = [self._node(f"relay{i}", "relay", 2) for i in range(self.relays)]
        client = self._node("client", "client", 2)
        service = self._node("service", "service", 1)
        began = time.monotonic()
        keygen = [gevent.spawn(self._make_authority_keys, n) for n in auths]  # RSA: slow
        try:
            gevent.joinall(keygen, raise_error=True)
        finally:
            gevent.killall(keygen)
        self._dir_authority_lines = [job.value for job in keygen]
        log.info("authority keys made in %.1f s", time.monotonic() - began)
        for node in auths + relays:
            self._launch(node)
        began = time.monotonic()
        self._wait_for_directories(auths + relays, len(auths) + len(relays), deadline)
        log.info("every directory serves the full consensus after %.1f s", time.monotonic() - began)
        for node in (client, service):
            self._launch(node)
        for node in (client, service):
            self._wait_for_log(node, "Bootstrapped 100%", deadline)
            log.info("%s tor bootstrapped after %.1f s", node.name, time.monotonic() - began)
            self._take_ownership(node)
        self.socks_port = client.socks_port
        self.client_control_port = client.control_port
        self.service_control_port = service.control_port

    def _node(self, name: str, role: str, nports: int) -> TorNode:
        data_dir = self.workdir / name
        if data_dir.exists():
            shutil.rmtree(data_dir)
        data_dir.mkdir(mode=0o700, parents=True)
        ports = pick_ports(nports, self.socks_host)
        node = TorNode(name, role, data_dir)
        if role in ("authority", "relay"):
            node.or_port, node.dir_port = ports
        elif role == "client":
            node.socks_port, node.control_port = ports
        else:
            node.control_port = ports[0]
        self.nodes.append(node)
        return node

    def _run_tool(self, node: TorNode, argv: list[str], stdin: str = "") -> None:
        try:
            done = subprocess.run(
                argv, input=stdin.encode(), capture_output=True, timeout=KEYGEN_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            raise _NodeFailed(node, f"{argv[0]} took more than {KEYGEN_TIMEOUT:.0f} s") from None
        if done.returncode != 0:
            with open(node.data_dir / "stdout.log", "ab") as f:
                f.write(done.stdout + done.stderr)
            raise _NodeFailed(node, f"{argv[0]} failed with status {done.returncode}")

    def _make_authority_keys(self, node: TorNode) -> str:
        """Create the authority's keys; return its ``DirAuthority`` line."""
        host = self.socks_host
        keys = node.data_dir / "keys"
        keys.mkdir(mode=0o700)
        self._run_tool(
            node,
            [
                self.gencert_cmd,
                "--create-identity-key",
                "-m",
                "12",
                "-a",
                f"{host}:{node.dir_port}",
                "-i",
                str(keys / "authority_identity_key"),
                "-s",
                str(keys / "authority_signing_key"),
                "-c",
                str(keys / "authority_certificate"),
                "--passphrase-fd",
                "0",
            ],
            stdin="\n",
        )
        v3ident = ""
        for line in (keys / "authority_certificate").read_text().splitlines():
            if line.startswith("fingerprint "):
                v3ident = line.split()[1]
        self._run_tool(
            node,
            [
                self.tor_cmd,
                "--ignore-missing-torrc",
                "-f",
                "/dev/null",
                "--defaults-torrc",
                "/dev/null",
                "--list-fingerprint",
                "--DataDirectory",
                str(node.data_dir),
                "--ORPort",
                str(node.or_port),
                "--Nickname",
                node.name,
                "--Address",
                host,
                "--DirAuthority",
                _NO_AUTHORITY,
            ],
        )
        fingerprint = (node.data_dir / "fingerprint").read_text().split()[1]
        if not v3ident or len(fingerprint) != 40:
            raise _NodeFailed(node, "produced no usable authority fingerprints")
        return (
            f"{node.name} orport={node.or_port} no-v2 v3ident={v3ident} "
            f"{host}:{node.dir_port} {fingerprint}"
        )

    def _torrc(self, node: TorNode) -> str:
        host = self.socks_host
        lines = [
            "TestingTorNetwork 1",
            "AssumeReachable 1",
            "PathsNeededToBuildCircuits 0.25",
            "TestingDirAuthVoteExit *",
            "TestingDirAuthVoteGuard *",
            "TestingDirAuthVoteHSDir *",
            "TestingMinExitFlagThreshold 0",
            "V3AuthNIntervalsValid 2",
            f"DataDirectory {node.data_dir}",
            f"Nickname {node.name}",
            "RunAsDaemon 0",
            "ShutdownWaitLength 0",
            f"__OwningControllerProcess {os.getpid()}",
            f"Log notice file {node.log_path}",
            *(f"DirAuthority {line}" for line in self._dir_authority_lines),
        ]
        if node.role in ("authority", "relay"):
            lines += [
                "SocksPort 0",
                f"ORPort {host}:{node.or_port}",
                f"DirPort {host}:{node.dir_port}",
                f"Address {host}",
                "ExitRelay 0",
                "ExitPolicy reject *:*",
            ]
        if node.role == "authority":
            lines += [
                "AuthoritativeDirectory 1",
                "V3AuthoritativeDirectory 1",
                "TestingV3AuthInitialVotingInterval 5",
                "V3AuthVotingInterval 10",
                "TestingV3AuthInitialVoteDelay 2",
                "V3AuthVoteDelay 2",
                "TestingV3AuthInitialDistDelay 2",
                "V3AuthDistDelay 2",
            ]
        if node.role == "client":
            lines += [
                f"SocksPort {host}:{node.socks_port} ExtendedErrors",
                f"ControlPort {host}:{node.control_port}",
                "CookieAuthentication 1",
            ]
        if node.role == "service":
            lines += [
                "SocksPort 0",
                f"ControlPort {host}:{node.control_port}",
                "CookieAuthentication 1",
            ]
        return "\n".join(lines) + "\n"

    def _launch(self, node: TorNode) -> None:
        node.torrc_path.write_text(self._torrc(node))
        with open(node.data_dir / "stdout.log", "ab") as out:
            node.process = subprocess.Popen(
                [self.tor_cmd, "-f", str(node.torrc_path), "--defaults-torrc", "/dev/null"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _take_ownership(self, node: TorNode) -> None:
        """Hold a control connection that owns ``node``'s tor.

        stem sends TAKEOWNERSHIP whenever a tor names our pid as its owner, after
        which that tor exits as soon as *that* control connection closes. Were the
        first stem connection a test's, closing it would kill the tor; so the
        network makes the first one itself and keeps it open until :meth:`stop`.
        The tor still dies with us: our connection closes when we do.
        """
        try:
            self._owners.append(connect_control(f"{self.socks_host}:{node.control_port}"))
        except TransportError as exc:
            raise _NodeFailed(node, f"control port did not answer: {exc}") from None

    def _check_alive(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is not None:
                raise _NodeFailed(node, f"exited with status {node.process.returncode}")

    def _wait_for_directories(self, dirs: list[TorNode], routers: int, deadline: float) -> None:
        """Wait until every directory serves a consensus listing all routers, and their
        microdescriptors.

        A client asks any of them; one still serving an older consensus (or lacking a
        microdescriptor) costs it a whole voting interval or a 10 s retry.
        """
        for node in dirs:
            status = "answered nothing"
            while True:
                self._check_alive()
                status = self._directory_status(node, routers)
                if not status:
                    break
                if time.monotonic() >= deadline:
                    raise _NodeFailed(node, f"{status} when time ran out")
                time.sleep(POLL_INTERVAL)

    def _directory_status(self, node: TorNode, routers: int) -> str:
        """Empty when ``node`` is ready, else what it still lacks."""
        base = f"http://{self.socks_host}:{node.dir_port}/tor/"
        consensus = _http_get(base + "status-vote/current/consensus-microdesc")
        if consensus is None:
            return "served no consensus"
        lines = consensus.splitlines()
        listed = sum(1 for line in lines if line.startswith(b"r "))
        if listed < routers:
            return f"served a consensus listing {listed} of {routers} routers"
        digests = [line.split()[1].decode().rstrip("=") for line in lines if line.startswith(b"m ")]
        micro = _http_get(base + "micro/d/" + "-".join(digests))
        have = micro.count(b"onion-key") if micro is not None else 0
        if have < len(digests):
            return f"served {have} of {len(digests)} microdescriptors"
        return ""

    def _wait_for_log(self, node: TorNode, needle: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._check_alive()
            if node.log_contains(needle):
                return
            time.sleep(POLL_INTERVAL)
        raise _NodeFailed(node, f"did not log {needle!r} in time")


def _http_get(url: str) -> bytes | None:
    """The body at ``url`` on a loopback directory, or None on any error."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bytes(response.read(MAX_CONSENSUS_SIZE))
    except (OSError, urllib.error.URLError):
        return None


def tor_available(tor_cmd: str = "tor", gencert_cmd: str = "tor-gencert") -> bool:
    """Whether both tools a private network needs are installed."""
    return shutil.which(tor_cmd) is not None and shutil.which(gencert_cmd) is not None
