"""pytest fixtures for anomos and its plugin authors.

Enable in a ``conftest.py`` with ``pytest_plugins = ["anomos.testing"]`` after
``gevent.monkey.patch_all()``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from anomos.pluginmanager import Plugins, get_plugins
from anomos.protocol.request import tracker_fingerprint

_next_host = itertools.count(2)


def loopback_host() -> str:
    """A fresh 127.0.0.X address, so each peer of a test has its own identity.

    Spreads across 127.0.X.Y using the pytest-xdist worker or process id so
    concurrent runs rarely collide; ports are always chosen by the kernel.
    """
    n = next(_next_host)
    block = (os.getpid() % 200) + 20
    return f"127.{block}.{n // 250}.{n % 250 + 2}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def anomos_cmd(*args: str) -> list[str]:
    """argv running the ``anomos`` CLI of this interpreter in a subprocess."""
    return [sys.executable, "-m", "anomos", *args]


def run_anomos(*args: str, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a real subprocess; output captured as text."""
    env = dict(os.environ, ANOMOS_PROGRESS="0")
    return subprocess.run(  # type: ignore[call-overload,no-any-return]
        anomos_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env, **kw
    )


@pytest.fixture
def plugins() -> Plugins:
    """A fresh plugin facade (no third-party entry points)."""
    return get_plugins(load_entrypoints=False)


@pytest.fixture
def loopback() -> Iterator[str]:
    """A fresh loopback host for one peer."""
    yield loopback_host()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


# ----------------------------------------------------------------------------- memory transport
# Appended by the data-plane helper: a transport with no network, for fast unit
# tests of links and circuits (TLS still runs over it, on a socketpair).

from typing import Any  # noqa: E402

import gevent  # noqa: E402

from anomos import hookimpl  # noqa: E402
from anomos.errors import TransportError  # noqa: E402
from anomos.interfaces import ConnectionHandler  # noqa: E402

#: Listening memory addresses of this process -> their connection handlers.
_memory_listeners: dict[str, ConnectionHandler] = {}
_memory_ports = itertools.count(1)


class MemoryListener:
    def __init__(self, address: str) -> None:
        self.address = address

    def close(self) -> None:
        _memory_listeners.pop(self.address, None)


class MemoryTransport:
    """Reaches only ``memory:N`` addresses of this process; each dial is a socketpair."""

    name = "memory"
    #: Every caller is "memory:0": no per-address cap on handshakes.
    callers_share_an_address = True

    def __init__(self, settings: object) -> None:
        pass

    def can_dial(self, address: str) -> bool:
        return address.startswith("memory:")

    def dial(self, address: str, *, timeout: float) -> socket.socket:
        handler = _memory_listeners.get(address)
        if handler is None:
            raise TransportError(f"cannot connect to {address}: nobody listens there")
        ours, theirs = socket.socketpair()
        gevent.spawn(handler, theirs, "memory:0")
        return ours

    def listen(self, address: str, handler: ConnectionHandler) -> MemoryListener:
        address = f"memory:{next(_memory_ports)}"
        _memory_listeners[address] = handler
        return MemoryListener(address)


class MemoryTransportPlugin:
    """Registers :class:`MemoryTransport` as ``memory``; pass it as ``extra=[...]``."""

    @hookimpl
    def anomos_register_transports(self, registry: Any) -> None:
        registry.add(MemoryTransport.name, MemoryTransport, owner="anomos.testing")


@pytest.fixture
def memory_plugins() -> Plugins:
    """A plugin facade that also offers the ``memory`` transport."""
    return get_plugins(load_entrypoints=False, extra=[MemoryTransportPlugin()])


# ----------------------------------------------------------------------------- entry-point plugins
# Appended by the plugin-kit helper: load a plugin through the real ``anomos``
# entry-point group without pip installing it, exactly as an installed
# distribution would be loaded (``importlib.metadata`` finds the dist-info).

from collections.abc import Callable, Mapping  # noqa: E402

from anomos.pluginmanager import ENTRY_POINT_GROUP  # noqa: E402


def write_dist_info(
    site: Path, dist: str, entry_points: Mapping[str, str], *, version: str = "0.0.0"
) -> Path:
    """Write ``site/<dist>-<version>.dist-info`` declaring ``entry_points``.

    :param entry_points: plugin name -> ``module`` or ``module:attribute``, in
        the ``anomos`` group; the name is what ``ANOMOS_BLOCK_PLUGINS`` matches.
    Once ``site`` is on ``sys.path`` (or ``PYTHONPATH`` of a subprocess),
    ``get_plugins()`` loads them.
    """
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}")
    return site


@pytest.fixture
def install_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Path]]:
    """``install_plugin(dist, {name: module}, source=DIR)``: for this test only,
    make a plugin package loadable through the ``anomos`` entry points.

    ``source`` (the directory holding the package, e.g. ``src/``) is put on
    ``sys.path``; modules imported from it are forgotten afterwards, so the
    next test imports them afresh.
    """
    sources: list[Path] = []

    def install(
        dist: str,
        entry_points: Mapping[str, str],
        *,
        source: Path | None = None,
        version: str = "0.0.0",
    ) -> Path:
        site = write_dist_info(tmp_path / f"site-{dist}", dist, entry_points, version=version)
        if source is not None:
            sources.append(Path(source).resolve())
            monkeypatch.syspath_prepend(str(source))
        monkeypatch.syspath_prepend(str(site))
        return site

    yield install
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and any(Path(file).resolve().is_relative_to(s) for s in sources):
            del sys.modules[name]


# ----------------------------------------------------------------------------- a tracker key


@functools.cache
def tracker_key() -> ec.EllipticCurvePrivateKey:
    """A tracker signing key for tests that seal requests without a tracker process."""
    return ec.generate_private_key(ec.SECP256R1())


def tracker_trust() -> frozenset[str]:
    """The fingerprint of :func:`tracker_key`, as a source's set of trusted trackers."""
    return frozenset({tracker_fingerprint(tracker_key().public_key())})


# ----------------------------------------------------------------------------- in-process peers


def start_peers(
    plugins: Plugins, tracker: Any, state_root: Path, count: int, *, announce: bool = True
) -> list[Any]:
    """``count`` started peers in this process, each on its own loopback address and
    state directory (``state_root/p0``, ...), announced to ``tracker`` (an
    :class:`anomos.tracker.server.Tracker`); with ``announce`` each announces once
    more after all joined, so every one has heard of every edge. If one cannot be
    made, started or announced, those already started are stopped before it raises."""
    from anomos.config import Settings
    from anomos.peer.node import Peer

    peers: list[Any] = []
    try:
        for i in range(count):
            settings = Settings(listen=f"{loopback_host()}:0", state_dir=state_root / f"p{i}")
            peer = Peer(plugins, settings, tracker_url=tracker.url, fingerprint=tracker.fingerprint)
            peers.append(peer)  # stopped below even if its own start fails half-way
            peer.start()
        if announce:
            for peer in peers:
                peer.announce()
    except BaseException:
        stop_all(peers)
        raise
    return peers


def stop_all(peers: list[Any]) -> None:
    """Stop every one of ``peers``, the last started first; one that fails to stop
    does not keep the others running (its error is raised after)."""
    with contextlib.ExitStack() as stack:
        for peer in peers:
            stack.callback(peer.stop)


@contextlib.contextmanager
def tracker_and_peers(
    plugins: Plugins, state_root: Path, count: int, *, announce: bool = True, **tracker: Any
) -> Iterator[tuple[Any, list[Any]]]:
    """A started tracker on loopback (state in ``state_root/tracker``, its
    :class:`~anomos.tracker.settings.TrackerSettings` from ``tracker``, ``edge_settle``
    0 unless given) and ``count`` peers from :func:`start_peers`; all stopped on exit,
    and when one of them fails to start."""
    from anomos.tracker.server import Tracker
    from anomos.tracker.settings import TrackerSettings

    tracker.setdefault("edge_settle", 0)
    server = Tracker(
        state_root / "tracker", f"{loopback_host()}:0", plugins, TrackerSettings(**tracker)
    )
    with contextlib.ExitStack() as stack:
        stack.callback(server.stop)  # also closes the store of a tracker that did not start
        server.start()
        peers = start_peers(plugins, server, state_root, count, announce=announce)
        stack.callback(stop_all, peers)
        yield server, peers
