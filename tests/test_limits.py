"""Limits and timeouts on everything that comes from outside.

Where each limit is enforced, and a test that it refuses (many live next to
the code they guard: tests/test_frames.py, test_link.py, test_circuit.py,
test_wire.py, test_tracker_server.py; docs/operations.md lists them all with
their values). Here: the catalogue itself, the tracker's connection limits, and
a neighbour breaking the link protocol while a circuit through the same peer
keeps flowing.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
from conftest_daemon import seeded_network
from test_churn import Client, sha256, wait_until
from test_hostile_peers import RawLink

from anomos import bencode
from anomos.config import HANDSHAKE_TIMEOUT, split_address
from anomos.identity import PeerIdentity
from anomos.net import circuit as circuitmod
from anomos.net import frames, link
from anomos.net.circuit import CircuitStream
from anomos.peer import node as node_mod
from anomos.peer.node import Peer
from anomos.pluginmanager import Plugins
from anomos.protocol import onion, request
from anomos.protocol.e2e import CELL_BODY
from anomos.protocol.onion import Hop, build_tracking_code, current_epoch
from anomos.protocol.request import SourceRequest, seal_request
from anomos.testing import loopback_host, start_peers
from anomos.torrent import session as sessionmod
from anomos.torrent import wire
from anomos.tracker import client as clientmod
from anomos.tracker import graph as graph_mod
from anomos.tracker import limits as tracker_limits
from anomos.tracker import server as server_mod
from anomos.tracker.client import CircuitPlan, TrackerClient
from anomos.tracker.identity import pinned_context
from anomos.tracker.limits import LimitSettings
from anomos.tracker.server import Tracker
from anomos.tracker.settings import TrackerSettings


def test_every_limit_exists_and_is_coherent() -> None:
    """The limits docs/operations.md promises, and how they relate to each other."""
    # Frames: sizes are checked per command before a payload is read.
    assert max(high for _, high in frames.PAYLOAD_SIZES.values()) == CELL_BODY
    assert frames.READ_BUFFER >= 2 * frames.DATA_FRAME_SIZE
    # Links: handshakes, idle links, circuits, queues.
    assert 0 < HANDSHAKE_TIMEOUT <= 30
    assert link.KEEPALIVE_INTERVAL < link.IDLE_TIMEOUT
    assert link.MAX_PENDING_HANDSHAKES > 0 and link.MAX_CIRCUITS_PER_LINK > 0
    assert link.MAX_NEIGHBOURS >= clientmod.MAX_NEIGHBOURS
    # A circuit's queue on a link holds its whole end-to-end window and then
    # some: only an end that ignores flow control overflows it.
    assert link.CIRCUIT_QUEUE_FRAMES > circuitmod.MAX_CIRCUIT_WINDOW + circuitmod.SENDME_EVERY
    # A link's whole queue holds a few circuits' full windows, far less than every
    # circuit's (which is what it bounds).
    assert link.CIRCUIT_QUEUE_FRAMES < link.LINK_QUEUE_FRAMES
    assert link.LINK_QUEUE_FRAMES < link.MAX_CIRCUITS_PER_LINK * link.CIRCUIT_QUEUE_FRAMES // 16
    # A live link sends PADDING several times per idle timeout, so one late
    # keepalive does not cut it; the CREATE bucket refills.
    assert link.IDLE_TIMEOUT >= 3 * link.KEEPALIVE_INTERVAL
    assert link.CREATE_BURST >= link.CREATE_RATE > 0
    # A hostile neighbour (docs/threat-model.md, "Attacks"): refusals, junk and
    # reconnects are bounded per neighbour; late frames of a closed circuit fit in
    # what the neighbour may have queued for it, junk is far less than that.
    assert link.STRIKE_BURST >= link.STRIKE_RATE > 0 and link.CONTROL_QUEUE_FRAMES > 0
    assert link.LATE_FRAMES > circuitmod.CIRCUIT_WINDOW + circuitmod.SENDME_EVERY
    assert 0 < link.JUNK_BURST < link.LATE_FRAMES and link.JUNK_RATE > 0
    # An honest dialler reconnects at most once per stable link (its backoff resets
    # only after STABLE_LINK), which the reconnect bucket always allows.
    assert link.RELINK_RATE * link.STABLE_LINK >= 1 and link.RELINK_BURST >= 2
    assert link.MAX_BUDGETS >= link.MAX_NEIGHBOURS
    # Handshake slots: one address cannot take them all; ClientHello comes fast.
    assert link.MAX_HANDSHAKES_PER_ADDRESS < link.MAX_PENDING_HANDSHAKES
    assert 0 < link.FIRST_BYTES_TIMEOUT < HANDSHAKE_TIMEOUT
    assert circuitmod.HELLO_TIMEOUT > 0
    # Replay caches are bounded.
    assert onion.REPLAY_CACHE_LIMIT > 0 and request.REQUEST_REPLAY_LIMIT > 0
    # BitTorrent over circuits: messages and queued requests are bounded.
    assert wire.MAX_PIECE_MESSAGE == 9 + wire.BLOCK_SIZE
    assert sessionmod.MAX_PEER_REQUESTS > 0 and sessionmod.HANDSHAKE_TIMEOUT > 0
    # The tracker: body, connections, rate, lists.
    assert server_mod.MAX_BODY == 64 * 1024
    assert server_mod.MAX_CONNECTIONS_PER_IP < server_mod.MAX_CONNECTIONS
    assert server_mod.RATE_BURST >= server_mod.RATE_PER_SECOND > 0
    assert server_mod.MAX_LOST >= clientmod.MAX_NEIGHBOURS
    # Unreachable neighbours: reported well after a dial's backoff could have
    # linked, replaced a few per announce, kept apart for a while, in bounded memory.
    assert node_mod.UNREACHABLE_AFTER > link.DIAL_BACKOFF_MAX
    assert 1 <= server_mod.UNREACHABLE_PER_ANNOUNCE <= server_mod.MAX_LOST
    assert graph_mod.AVOID_PAIR_SECONDS > 0 and graph_mod.MAX_AVOIDED > 0
    assert clientmod.MAX_REPLY >= server_mod.MAX_BODY
    # What one identity or network may take from the tracker: a reference peer's
    # early announces fit the burst, one announce's replacements fit the allowance.
    allowance = LimitSettings()
    assert allowance.announce_burst >= 4
    assert allowance.replace_burst >= server_mod.UNREACHABLE_PER_ANNOUNCE
    assert allowance.join_burst >= 1 and tracker_limits.MAX_RECENT_REQUESTS > 0


# ----------------------------------------------------------------------------- tracker


@pytest.fixture
def tracker(tmp_path: Path, plugins: Plugins) -> Iterator[Tracker]:
    settings = TrackerSettings(rate=1000, burst=1000, request_timeout=1.5, max_connections_per_ip=4)
    t = Tracker(tmp_path / "tracker", f"{loopback_host()}:0", plugins, settings)
    t.start()
    yield t
    t.stop()


def connect(tracker: Tracker, source: str) -> socket.socket:
    host, port = split_address(tracker.address)
    return socket.create_connection((host, port), timeout=5, source_address=(source, 0))


def closed(sock: Any, within: float) -> bool:
    """Whether the other end closes ``sock`` within ``within`` seconds."""
    with gevent.Timeout(within, False):
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass
        return True
    return False


def test_idle_connections_per_ip_are_capped(tracker: Tracker) -> None:
    host = loopback_host()
    held = [connect(tracker, host) for _ in range(tracker.settings.max_connections_per_ip)]
    gevent.sleep(0.2)
    extra = connect(tracker, host)
    assert closed(extra, 1.0)  # refused at once, not after the deadline
    Client(tracker).announce()  # another address is served meanwhile
    for s in held:
        s.close()
    gevent.sleep(0.2)
    again = connect(tracker, host)  # the slots are free again
    assert not closed(again, 0.5)
    again.close()


def test_a_trickling_client_is_cut_at_the_deadline(tracker: Tracker) -> None:
    """One byte every 0.2 s never looks idle to a socket timeout; the deadline cuts it."""
    raw = connect(tracker, loopback_host())
    sock = pinned_context().wrap_socket(raw)
    started = time.monotonic()
    request_head = b"POST /announce HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n"
    sock.sendall(request_head)
    with pytest.raises((OSError, ssl.SSLError)):
        for _ in range(200):
            sock.sendall(b"d")
            gevent.sleep(0.2)
            sock.settimeout(0.01)
            try:
                if sock.recv(1) == b"":
                    raise ConnectionResetError("closed by the tracker")
            except (TimeoutError, ssl.SSLWantReadError):
                pass
            finally:
                sock.settimeout(5)
    took = time.monotonic() - started
    assert took < tracker.settings.request_timeout + 2.0, took
    sock.close()


def test_oversized_and_too_frequent_requests_are_refused(tmp_path: Path, plugins: Plugins) -> None:
    t = Tracker(
        tmp_path / "t", f"{loopback_host()}:0", plugins, TrackerSettings(rate=0.01, burst=3)
    )
    t.start()
    try:
        host, port = split_address(t.address)
        conn = http.client.HTTPSConnection(host, port, context=pinned_context(), timeout=10)
        conn.request("POST", "/announce", body=b"x" * (server_mod.MAX_BODY + 1))
        resp = conn.getresponse()
        assert resp.status == 413
        assert b"over 65536 bytes" in bencode.decode(resp.read())[b"failure reason"]
        conn.close()
        p = Client(t)
        for _ in range(3):  # the burst
            p.announce()
        with pytest.raises(Exception, match="too many requests"):
            p.announce()
        Client(t).announce()  # another address has its own bucket
    finally:
        t.stop()


# ----------------------------------------------------------------------------- a neighbour


@pytest.fixture
def net(tmp_path: Path, plugins: Plugins) -> Iterator[tuple[Tracker, list[Peer]]]:
    t = Tracker(
        tmp_path / "tracker",
        "127.0.0.1:0",
        plugins,
        TrackerSettings(min_neighbours=2, edge_settle=0),
    )
    t.start()
    peers: list[Peer] = start_peers(plugins, t, tmp_path, 4)
    wait_until(
        lambda: all(set(p.links.neighbours()) <= set(p.links.links) for p in peers), 10, "links"
    )
    yield t, peers
    for p in peers:
        p.stop()
    t.stop()


def plan(tracker: Tracker, path: list[Peer]) -> CircuitPlan:
    """A circuit over ``path`` as the tracker would plan it."""
    ids = [p.identity.identity_public for p in path]
    g = tracker.graph
    hops = [
        Hop(path[i].identity.onion_public, g.nid(ids[i], ids[i + 1]))
        for i in range(1, len(path) - 1)
    ]
    hops.append(Hop(path[-1].identity.onion_public, None))
    code, layers = build_tracking_code(hops, current_epoch())
    suite = path[0].plugins.cipher_suite("x25519")
    material = suite.tracker_material()
    req = SourceRequest(b"\x42" * 20, "x25519", material, int(time.time()) + 300)
    return CircuitPlan(
        first_nid=g.nid(ids[0], ids[1]),
        tracking_code=code,
        layers=layers,
        request_blob=seal_request(req, path[-1].identity.box_public, tracker.planner.tracker_key),
        suite="x25519",
        material=material,
    )


def test_a_neighbour_breaking_the_protocol_is_cut_and_reported_others_unaffected(
    net: tuple[Tracker, list[Peer]],
) -> None:
    tracker, peers = net
    g = tracker.graph
    ids = {p.identity.identity_public: p for p in peers}
    # The attacker joins; the victim is one of its neighbours that relays for two others.
    evil = Client(tracker)
    nbs = {n.identity: n for n in evil.announce().neighbours}
    relay = next(ids[i] for i in nbs if sum(n in ids for n in g.neighbours(i)) >= 2)
    rid = relay.identity.identity_public
    a, b = [ids[n] for n in g.neighbours(rid) if n in ids][:2]
    # A circuit a -> relay -> b, streaming meanwhile.
    received: list[int] = []

    def sink(stream: CircuitStream) -> None:
        while chunk := stream.recv(65536):
            received.append(len(chunk))
        stream.close()

    b.switch.on_request = lambda req: sink
    for p in (a, relay, b):
        p.announce()  # they hear of any edge the attacker's arrival split
    wait_until(
        lambda: a.links.get(g.nid(a.identity.identity_public, rid)) is not None, 5, "a-relay"
    )
    wait_until(
        lambda: relay.links.get(g.nid(rid, b.identity.identity_public)) is not None, 5, "relay-b"
    )
    stream = a.switch.open_circuit(plan(tracker, [a, relay, b]), timeout=10)
    stop = False

    def pump() -> None:
        while not stop:
            stream.sendall(b"x" * 100_000)
            gevent.sleep(0.01)

    pumper = gevent.spawn(pump)
    wait_until(lambda: sum(received) > 1_000_000, 10, "data through the relay")

    # The attacker links to the relay with its genuine NID, then sends a DATA
    # frame header announcing 65535 bytes (a cell is 32760).
    nb = nbs[rid]
    for _ in range(8):
        raw = RawLink(nb.address, evil.host)
        if raw.auth(evil.identity, nb):
            break
        raw.close()
        gevent.sleep(1.0)
    else:
        pytest.fail("the relay never accepted the attacker's genuine NID")
    before = sum(received)
    raw.sock.sendall(frames.HEADER.pack(0x80000001, frames.Cmd.DATA, 0, 0xFFFF) + b"\x00" * 100)
    assert raw.closed_by_peer()  # cut (a PADDING sent just before may come first)

    # Reported to the tracker as a protocol violation, and only that edge is affected.
    wait_until(lambda: rid in tracker._lost_reports.get(evil.pub, {}), 5, "report")
    assert not g.settled(rid, evil.pub)
    # The circuit through the same relay never noticed.
    wait_until(lambda: sum(received) > before + 1_000_000, 10, "data still flowing")
    assert not stream.closed and stream.closed_reason is None
    stop = True
    pumper.join(5)
    stream.close()
    raw.close()


def test_peer_side_tracker_client_limits(tracker: Tracker) -> None:
    """A peer refuses to ask for more circuits than the tracker may plan at once."""
    client = TrackerClient(tracker.url, tracker.fingerprint, PeerIdentity.generate())
    with pytest.raises(Exception, match="outside 1-8"):
        client.request_circuits(b"\x00" * 20, clientmod.MAX_CIRCUITS + 1)


def test_a_lost_report_older_than_the_tracker_accepts_is_dropped_not_sent(
    net: tuple[Tracker, list[Peer]],
) -> None:
    """A report held back past the tracker's look-back (tracker down) must not make
    every later announce a 400: it is dropped, and the announce goes through."""
    _tracker, peers = net
    peer = peers[0]
    nid = next(n for n in range(1, 100) if n not in peer.links.neighbours())  # no link
    stale = time.monotonic() - clientmod.MAX_LOST_AGE_MS / 1000 - 5
    peer._lost[nid] = (stale, "lost")
    reply = peer.announce()  # would raise (400: 'ago' out of range) if it were sent
    assert reply.interval > 0
    assert nid not in peer._lost


# ----------------------------------------------------------------------------- the disk


@pytest.mark.slow
@pytest.mark.integration
def test_a_full_disk_pauses_the_download_until_space_is_freed(tmp_path: Path) -> None:
    """A 6 MiB download into an 8 MiB tmpfs that fills up once it started: one line says
    the disk is full and since when, the download waits (no source dropped), then gives up
    after --stall-limit with that reason; once the tmpfs is made larger, a second run
    completes. (With too little room at the start, get refuses at once: test_local_faults.py.)"""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) for a small tmpfs")
    dest = tmp_path / "dest"
    dest.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(dest)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        with seeded_network(tmp_path, size=6 * 1024 * 1024 + 5) as (net, atorrent, data):
            time.sleep(2.5)
            args = ["get", str(atorrent), "--dest", str(dest)]
            getter = net.start_peer("downloader", *args, "--stall-limit", "15", wait=False)
            # Past its free-space check, someone else fills the disk: 2 MiB are left.
            while not (net.workdir / "downloader" / "peer.json").exists():
                assert getter.alive(), getter.log_tail()
                time.sleep(0.05)
            (dest / "filler").write_bytes(bytes(6 * 1024 * 1024))
            assert getter.popen.wait(90) == 1, getter.log_tail()
            log = getter.log_path.read_text()
            full = [x for x in log.splitlines() if "disk full since" in x]
            assert len(full) == 2, full  # the state, once; then the line giving up
            assert re.search(r"disk full since \d\d:\d\d:\d\d \(.*No space left", full[0])
            assert re.search(r"anomos: error: gave up: no piece for 15 s: disk full since", full[1])
            subprocess.run(
                ["mount", "-o", "remount,size=64m", str(dest)], check=True, capture_output=True
            )
            getter = net.start_peer("downloader", *args, wait=False)
            assert getter.popen.wait(70) == 0, getter.log_tail()
            assert sha256(dest / data.name) == sha256(data)
    finally:
        subprocess.run(["umount", "-l", str(dest)], capture_output=True)
