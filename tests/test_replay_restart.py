"""Replay after a restart (issue 11, item 8): what a peer accepted before it restarted
is refused after, over real TLS links between in-process peers.

The relay and the source keep their identities and state directories across the
restart, as `anomos relay|seed --state DIR` does; their replay caches are files
there (anomos/protocol/replay.py).
"""

from __future__ import annotations

import attrs
import pytest
from test_circuit import Events, Node, connect, exchange, plan_for

from anomos.config import Settings
from anomos.errors import CryptoError, ProtocolError
from anomos.identity import PeerIdentity
from anomos.net.circuit import CircuitSwitch
from anomos.net.link import LinkManager
from anomos.pluginmanager import get_plugins
from anomos.protocol.onion import Hop, OnionReader, build_tracking_code, current_epoch
from anomos.protocol.replay import ReplayFile
from anomos.protocol.request import SourceRequest
from anomos.testing import loopback_host, tracker_trust


def start_node(identity: PeerIdentity, state_dir) -> Node:
    """A peer with its replay caches in ``state_dir`` that serves INFOHASH by `exchange`."""
    events = Events()
    plugins = get_plugins(load_entrypoints=False, extra=[events])
    links = LinkManager(
        identity,
        plugins,
        Settings(listen=f"{loopback_host()}:0", state_dir=state_dir),
        on_frame=None,
    )
    node = Node(identity, plugins, links, None, events)  # type: ignore[arg-type]
    node.serve = exchange

    def on_request(request: SourceRequest):
        def run(stream) -> None:
            node.served.append(stream)
            exchange(stream)

        return run

    node.switch = CircuitSwitch(
        links,
        identity,
        plugins,
        on_request=on_request,
        trackers=tracker_trust(),
        state_dir=state_dir,
    )
    links.start()
    return node


def stop_node(node: Node) -> None:
    node.switch.close()
    node.links.close()


def talk(downloader: Node, plan) -> None:
    stream = downloader.switch.open_circuit(plan, timeout=5)
    stream.sendall((3).to_bytes(4, "big") + b"abc")
    assert stream.recv(3) == b"cba"
    stream.close()


def test_a_code_and_a_request_accepted_before_a_restart_are_refused_after(tmp_path):
    ids = [PeerIdentity.generate() for _ in range(3)]
    dirs = [tmp_path / f"p{i}" for i in range(3)]
    for d in dirs:
        d.mkdir()
    nodes = [start_node(i, d) for i, d in zip(ids, dirs, strict=True)]
    try:
        connect(nodes[0], nodes[1], 1)
        connect(nodes[1], nodes[2], 2)
        plan = plan_for(nodes)
        talk(nodes[0], plan)
        # The relay and the source restart: same identities, same state directories.
        for node in nodes[1:]:
            stop_node(node)
        nodes[1:] = [start_node(ids[i], dirs[i]) for i in (1, 2)]
        connect(nodes[0], nodes[1], 1)
        connect(nodes[1], nodes[2], 2)
        # The captured CREATE, played again: the relay refuses its tracking code.
        with pytest.raises(ProtocolError, match="tracking code refused"):
            nodes[0].switch.open_circuit(plan, timeout=5)
        # The captured sealed request in a fresh tracking code: the source refuses it.
        again = attrs.evolve(
            plan_for(nodes, request_blob=plan.request_blob), material=plan.material
        )
        with pytest.raises(ProtocolError):
            talk(nodes[0], again)
        assert not nodes[2].served
        # A fresh plan still works after the restart.
        talk(nodes[0], plan_for(nodes))
        assert len(nodes[2].served) == 1
    finally:
        for node in nodes:
            stop_node(node)


def test_the_code_cache_on_disk_is_bounded_and_drops_old_epochs(tmp_path):
    """Past twice its live entries the file is rewritten with them only; on load,
    tags of epochs no longer accepted are dropped; a torn last record is ignored."""
    key = PeerIdentity.generate()
    now = [current_epoch() * 600.0 + 1]
    path = tmp_path / "codes"

    def reader() -> OnionReader:
        return OnionReader(
            key.onion_private, clock=lambda: now[0], replay_file=ReplayFile(path, 16)
        )

    def code() -> bytes:
        return build_tracking_code([Hop(key.onion_public, None)], current_epoch(now[0]))[0]

    first = reader()
    old = [code() for _ in range(3)]
    for c in old:
        first.peel(c)
    now[0] += 600  # next epoch: the old codes are still acceptable
    second = reader()
    with pytest.raises(CryptoError, match="replayed"):
        second.peel(old[0])
    with open(path, "ab") as f:
        f.write(b"\x00" * 5)  # a write torn by a crash
    now[0] += 1200  # two epochs on: their tags are dropped from memory and disk
    third = reader()
    assert third.cached_tags() == 0 and path.stat().st_size == 0
    assert path.stat().st_mode & 0o777 == 0o600
    import anomos.protocol.replay as replay

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(replay, "COMPACT_SLACK", 4)
        for _ in range(20):
            third.peel(code())
        assert path.stat().st_size <= (2 * 20 + 4 + 1) * 24


def test_a_file_of_live_entries_is_reopened_not_rewritten(tmp_path):
    """A restart whose cache holds only live entries appends to the same file: no
    rewrite (a temporary file, two fsyncs) on every launch; the entries stay."""
    path = tmp_path / "requests"
    first = ReplayFile(path, 32)
    assert first.load(lambda until: True, limit=100) == []
    first.close()
    empty = path.stat().st_ino
    assert first.load(lambda until: True, limit=100) == []  # a downloader's usual case
    assert path.stat().st_ino == empty
    first.append(10, b"a" * 32)
    first.append(20, b"b" * 32)
    first.close()
    inode = path.stat().st_ino
    second = ReplayFile(path, 32)
    assert second.load(lambda until: True, limit=100) == [(10, b"a" * 32), (20, b"b" * 32)]
    assert path.stat().st_ino == inode  # reopened in place
    second.append(30, b"c" * 32)
    second.close()
    third = ReplayFile(path, 32)
    assert [u for u, _ in third.load(lambda until: until > 10, limit=100)] == [20, 30]
    assert path.stat().st_ino != inode  # a dead entry: rewritten with the live ones
    assert path.stat().st_size == 2 * 40 and path.stat().st_mode & 0o777 == 0o600
    third.close()
