"""A malicious peer against REAL peer processes, at every stage of the protocol.

The test process joins a real network as a hostile peer: it announces to the
tracker like anyone (so it is assigned real neighbours), then against those
peers' processes it sends raw garbage before TLS, garbage instead of AUTH,
AUTH for an NID it was not given, AUTH impersonating another neighbour's NID,
garbage frames after a valid AUTH, replayed and tampered tracking codes, and
garbage DATA into a circuit. Every attack must be refused the way the protocol
says (connection closed, BREAK with the right reason), the abuser reported to
the tracker, and afterwards every process must still be up and an ordinary
download through them must complete intact.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.lock
import gevent.queue
import pytest
from test_churn import sha256

from anomos.config import HANDSHAKE_TIMEOUT, split_address
from anomos.identity import PeerIdentity
from anomos.localnet import LocalNetwork
from anomos.net.frames import (
    HEADER,
    HEADER_SIZE,
    JOINED_BREAK,
    LINK_CIRC_ID,
    BreakReason,
    Cmd,
    auth_message,
    encode_auth,
)
from anomos.net.link import client_context
from anomos.protocol.e2e import CELL_BODY
from anomos.testing import loopback_host, run_anomos
from anomos.torrent.metainfo import make_metainfo
from anomos.tracker.client import CircuitPlan, Neighbour, TrackerClient

pytestmark = [pytest.mark.slow, pytest.mark.integration]

#: Seconds within which a refused connection must be closed: a refusal is
#: immediate, but garbage that reads as the start of a longer TLS record (about 1
#: in 600 random 4 KiB) is cut only by the peer's handshake timeout.
CLOSE_WITHIN = HANDSHAKE_TIMEOUT + 2.0
#: Seconds between the PADDING frames a reading RawLink sends, as a real peer does
#: when idle: a peer closes a link silent for link.IDLE_TIMEOUT (20 s).
RAW_KEEPALIVE = 2.0
#: Seconds of silence after which a reading RawLink takes the link for closed.
READING_TIMEOUT = 30.0


class RawLink:
    """A hand-driven connection to a peer: raw TCP, then TLS, then frames."""

    def __init__(self, address: str, source: str, *, rcvbuf: int = 0) -> None:
        """``rcvbuf``: a small receive buffer makes a slow reader (set before connecting)."""
        host, port = split_address(address)
        self.sock: Any = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(CLOSE_WITHIN + 2.0)
        self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.buf = b""
        self.frames: gevent.queue.Queue[tuple[int, int, bytes] | None] = gevent.queue.Queue()
        self.reader: gevent.Greenlet | None = None
        self.keepalive: gevent.Greenlet | None = None
        self.send_lock = gevent.lock.Semaphore()

    def tls(self) -> bytes:
        """TLS 1.3 (the listener's certificate is not checked here); the AUTH challenge."""
        self.sock = client_context().wrap_socket(self.sock)
        circ, cmd, payload = self.read_frame()
        assert (circ, cmd, len(payload)) == (LINK_CIRC_ID, Cmd.AUTH_CHALLENGE, 32)
        return payload

    def auth(self, me: PeerIdentity, nb: Neighbour, nid: int | None = None) -> bool:
        """Claim ``nid`` (ours by default) to neighbour ``nb``; True if it said AUTH_OK."""
        challenge = self.tls()
        claim = nb.nid if nid is None else nid
        signature = me.signing.sign(auth_message(challenge, nb.identity, claim)).signature
        self.send(LINK_CIRC_ID, Cmd.AUTH, encode_auth(claim, me.identity_public, signature))
        frame = self.read_frame()
        return frame is not None and frame[1] == Cmd.AUTH_OK

    def send(self, circ: int, cmd: int, payload: bytes = b"") -> None:
        with self.send_lock:  # whole frames, between the test and the keepalive greenlet
            self.sock.sendall(HEADER.pack(circ, cmd, 0, len(payload)) + payload)

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except (ConnectionError, ssl.SSLError, OSError):
            return b""

    def read_frame(self) -> tuple[int, int, bytes] | None:
        """The next frame, or None once the peer closed the connection."""
        while True:
            if len(self.buf) >= HEADER_SIZE:
                circ, cmd, _, length = HEADER.unpack_from(self.buf)
                if len(self.buf) >= HEADER_SIZE + length:
                    payload = self.buf[HEADER_SIZE : HEADER_SIZE + length]
                    self.buf = self.buf[HEADER_SIZE + length :]
                    return circ, cmd, payload
            data = self._recv()
            if not data:
                return None
            self.buf += data

    def closed_by_peer(self) -> bool:
        """Whether the peer closes the connection (rather than answering) in time."""
        with gevent.Timeout(CLOSE_WITHIN, False):
            while True:
                frame = self.read_frame()
                if frame is None:
                    return True
                if frame[1] != Cmd.PADDING:
                    return False
        return False

    def start_reading(self) -> None:
        def loop() -> None:
            while (frame := self.read_frame()) is not None:
                self.frames.put(frame)
            self.frames.put(None)

        def keepalive() -> None:
            try:
                while True:
                    gevent.sleep(RAW_KEEPALIVE)
                    self.send(LINK_CIRC_ID, Cmd.PADDING)
            except (ConnectionError, ssl.SSLError, OSError):
                pass  # closed: the reader reports it

        # A reading link waits on the peer's own PADDING (every 5 s when idle):
        # give a busy machine more than twice that before calling it closed.
        self.sock.settimeout(READING_TIMEOUT)
        self.reader = gevent.spawn(loop)
        self.keepalive = gevent.spawn(keepalive)

    def wait_circuit(self, circ: int, timeout: float = 15.0) -> tuple[int, bytes] | None:
        """(cmd, payload) of the next CREATED or BREAK on ``circ``; None if the link closed."""
        with gevent.Timeout(timeout, AssertionError(f"nothing on circuit {circ:#x}")):
            while True:
                frame = self.frames.get()
                if frame is None:
                    return None
                if frame[0] == circ and frame[1] in (Cmd.CREATED, Cmd.BREAK):
                    return frame[1], frame[2]

    def close(self) -> None:
        for greenlet in (self.keepalive, self.reader):
            if greenlet is not None:
                greenlet.kill()
        self.sock.close()


class Hostile:
    """The attacker: a peer identity the tracker knows, on its own loopback address."""

    def __init__(self, net: LocalNetwork) -> None:
        self.identity = PeerIdentity.generate()
        self.host = loopback_host()
        self.listener = socket.socket()
        self.listener.bind((self.host, 0))
        self.listener.listen()
        self.address = f"{self.host}:{self.listener.getsockname()[1]}"
        self.client = TrackerClient(
            net.tracker_url, net.fingerprint, self.identity, source_host=self.host
        )

    def announce(self, stopped: bool = False) -> list[Neighbour]:
        return list(self.client.announce(self.address, [], 0, stopped=stopped).neighbours)

    def link(self, nb: Neighbour) -> RawLink:
        return RawLink(nb.address, self.host)

    def authenticated(self, nb: Neighbour) -> RawLink | None:
        """A link with our real NID, retried as a real peer's dialler does (the
        neighbour may not have heard of our edge yet, and refreshes at most every 2 s)."""
        for _ in range(8):
            link = self.link(nb)
            if link.auth(self.identity, nb):
                return link
            link.close()
            time.sleep(1.0)
        return None


def tracker_edges(db: Path) -> list[tuple[bytes, bytes, int]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [tuple(r) for r in con.execute("SELECT a, b, nid FROM edges")]  # type: ignore[misc]
    finally:
        con.close()


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


@pytest.fixture
def network(tmp_path: Path) -> Iterator[tuple[LocalNetwork, Path, Any]]:
    data = tmp_path / "share" / "file.bin"
    data.parent.mkdir()
    data.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    with LocalNetwork(tmp_path / "net", verbose=1) as net:
        net.start_tracker("--relays", "1-2")
        meta = make_metainfo(
            data, trackers=[net.tracker_url], fingerprint=net.fingerprint, progress=False
        )
        atorrent = tmp_path / "file.atorrent"
        meta.save(atorrent)
        for i in range(4):
            net.start_peer(f"relay{i}", "relay")
        net.start_peer("seeder", "seed", str(atorrent), "--data", str(data))
        time.sleep(1.0)
        yield net, atorrent, meta


def test_garbage_at_every_stage_is_refused_and_the_peers_keep_serving(
    network: tuple[LocalNetwork, Path, Any], tmp_path: Path
) -> None:
    net, atorrent, meta = network
    evil = Hostile(net)
    neighbours = evil.announce()
    assert len(neighbours) >= 3
    by_host = {p.host: p for p in net.procs if p is not net.tracker}
    victim_nb = neighbours[0]
    victim = by_host[split_address(victim_nb.address)[0]]

    # 1. Raw garbage before TLS.
    raw = evil.link(victim_nb)
    raw.sock.sendall(os.urandom(4096))
    assert raw.closed_by_peer()
    raw.close()

    # 2. A TLS handshake, then garbage instead of AUTH.
    raw = evil.link(victim_nb)
    raw.tls()
    raw.sock.sendall(os.urandom(2000))
    assert raw.closed_by_peer()
    raw.close()

    # 3. A valid AUTH (our key, our signature) for an NID we were not given.
    unassigned = max(nb.nid for nb in neighbours) % (2**31 - 2) + 1
    raw = evil.link(victim_nb)
    assert not raw.auth(evil.identity, victim_nb, nid=unassigned)
    raw.close()

    # 4. Impersonation: the NID of another neighbour of the victim, with our key.
    vid = victim_nb.identity
    others = [
        (a if b == vid else b, nid)
        for a, b, nid in tracker_edges(net.tracker.state_dir / "tracker.sqlite3")  # type: ignore[union-attr]
        if vid in (a, b) and evil.identity.identity_public not in (a, b)
    ]
    assert others, "the victim has no other neighbour"
    raw = evil.link(victim_nb)
    assert not raw.auth(evil.identity, victim_nb, nid=others[0][1])
    raw.close()
    # ... and our own NID signed for another listener (a relayed AUTH) is refused too.
    raw = evil.link(victim_nb)
    challenge = raw.tls()
    wrong = evil.identity.signing.sign(auth_message(challenge, others[0][0], victim_nb.nid))
    raw.send(
        LINK_CIRC_ID,
        Cmd.AUTH,
        encode_auth(victim_nb.nid, evil.identity.identity_public, wrong.signature),
    )
    assert raw.closed_by_peer()
    raw.close()

    # 5. A valid AUTH, then garbage frames: the link is cut and we are reported.
    raw = evil.authenticated(victim_nb)
    assert raw is not None, "the victim never accepted our genuine NID"
    raw.send(0x80000001, 200, b"\x00" * 10)  # an unknown command
    assert raw.closed_by_peer()
    raw.close()
    tracker_log = net.tracker.log_path  # type: ignore[union-attr]
    evil_id = evil.identity.identity_public.hex()[:16]
    with gevent.Timeout(10, AssertionError("the victim did not report us")):
        while f"neighbour {evil_id}: protocol" not in tracker_log.read_text():
            gevent.sleep(0.1)
    assert "broke the protocol" in victim.log_path.read_text()

    # 6. Tracking codes: link to every neighbour properly, get real plans.
    links: dict[int, RawLink] = {}
    for nb in evil.announce():
        got = evil.authenticated(nb)
        if got is not None:
            got.start_reading()
            links[nb.nid] = got
    assert links
    time.sleep(2.5)  # the edges settle before circuits use them
    plans: list[CircuitPlan] = []
    for _ in range(10):
        plans += [p for p in evil.client.request_circuits(meta.infohash, 4) if p.first_nid in links]
        if len(plans) >= 3:
            break
        time.sleep(1.0)
    assert len(plans) >= 3, "no circuits planned for the hostile peer"

    circ = 0x80000100
    created = None
    for plan in plans[:-1]:
        circ += 1
        links[plan.first_nid].send(circ, Cmd.CREATE, plan.tracking_code)
        answer = links[plan.first_nid].wait_circuit(circ)
        if answer is not None and answer[0] == Cmd.CREATED:
            created = (plan, circ)
            break
    assert created is not None, "no genuine circuit could be built"
    plan, good_circ = created
    link = links[plan.first_nid]

    # A replayed code: refused by the first hop, which has seen it.
    link.send(circ + 1, Cmd.CREATE, plan.tracking_code)
    assert link.wait_circuit(circ + 1) == (Cmd.BREAK, bytes([BreakReason.CRYPTO]))
    # A tampered code (one flipped bit): refused as well.
    other = plans[-1]
    links[other.first_nid].send(circ + 2, Cmd.CREATE, flip(other.tracking_code, 100))
    assert links[other.first_nid].wait_circuit(circ + 2) == (Cmd.BREAK, bytes([BreakReason.CRYPTO]))

    # 7. Garbage DATA into the genuine circuit: the source cannot read the HELLO
    # and breaks the circuit; the BREAK comes back through the relays, with no reason
    # (the source's reason travels inside the layers, in a refusal cell).
    link.send(good_circ, Cmd.DATA, os.urandom(CELL_BODY))
    assert link.wait_circuit(good_circ) == (Cmd.BREAK, JOINED_BREAK)
    # The link itself is untouched by all this: PADDING still passes both ways.
    link.send(LINK_CIRC_ID, Cmd.PADDING)
    assert link.reader is not None and not link.reader.dead

    for link in links.values():
        link.close()
    evil.announce(stopped=True)

    # Every process is still up, and serves an ordinary download.
    assert all(p.alive() for p in net.procs), [p.name for p in net.procs if not p.alive()]
    dest = tmp_path / "dest"
    getter = net.start_peer(
        "downloader", "get", str(atorrent), "--dest", str(dest), "--timeout", "60", wait=False
    )
    assert getter.popen.wait(70) == 0, getter.log_tail()
    assert sha256(dest / meta.name) == sha256(Path(tmp_path / "share" / meta.name))
    assert all(p.alive() for p in net.procs if p is not getter)


def test_a_tracker_with_the_wrong_identity_is_refused(
    network: tuple[LocalNetwork, Path, Any], tmp_path: Path
) -> None:
    net, _, _ = network
    share = tmp_path / "share" / "file.bin"
    forged = make_metainfo(share, trackers=[net.tracker_url], fingerprint="ab" * 32, progress=False)
    path = tmp_path / "forged.atorrent"
    forged.save(path)
    host = loopback_host()
    result = run_anomos(
        "get", str(path), "--dest", str(tmp_path / "d"), "--state", str(tmp_path / "s"),
        "--listen", f"{host}:0", timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "tracker identity mismatch" in result.stderr
    assert "Traceback" not in result.stderr
    assert (
        not (tmp_path / "d" / "file.bin").exists()
        or (tmp_path / "d" / "file.bin").stat().st_size == 0
    )
