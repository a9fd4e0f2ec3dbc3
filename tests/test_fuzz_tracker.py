"""Fuzzing both ends of the tracker API.

Client: the reply parsers behind ``TrackerClient.announce`` and
``request_circuits`` get hostile decoded replies (a TrackerError line or a
well-formed result, nothing else), and ``_post`` faces a hostile TLS server on
loopback (bad statuses, bodies, sizes, stalls).

Server: ``Tracker.wsgi`` gets raw bodies and messages signed by a hostile
peer; every answer is a bencoded dict, every refusal a 4xx with a one-line
reason, never a 500 (an internal error caused by input).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent.server import StreamServer
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
import fuzzlib
from fuzzprops import fuzz_settings, hostile, mutated_tree

import anomos.tracker.client as client_mod
import anomos.tracker.identity as identity_mod
import anomos.tracker.server as server
from anomos import bencode
from anomos.errors import TrackerError
from anomos.identity import PeerIdentity

CLIENT = fuzzlib.TARGETS["tracker_client"]
SERVER = fuzzlib.TARGETS["tracker_server"]
CLIENT_SEEDS = CLIENT.seeds()
REPLIES = [bencode.decode(seed[1:]) for seed in CLIENT_SEEDS]
ME = fuzzlib.fixed_identity("fuzzer")


def fuzzer_receipts() -> list[dict[bytes, int]]:
    """Receipts for the fuzzer's own edges in the shared harness (they credit its
    neighbours) and for NIDs that are not its edges (they credit nobody)."""
    inner = fuzzlib.announce_inner(ME, 6999, left=5)
    status, reply = fuzzlib.tracker_harness().signed(server.ANNOUNCE_PATH, inner, ME)
    assert status == 200
    own = [n[b"nid"] for n in reply[b"neighbours"]]
    assert own
    return [{b"nid": nid, b"received": 4096 * (i + 1)} for i, nid in enumerate([*own, 1, 2])]


REQUESTS = [
    fuzzlib.announce_inner(ME, 6999, left=5),
    {**fuzzlib.announce_inner(ME, 6999, left=5), b"receipts": fuzzer_receipts()},
    fuzzlib.circuits_inner(),
]


def check_announce(reply: Any) -> None:
    assert len(reply.neighbours) <= client_mod.MAX_NEIGHBOURS
    for n in reply.neighbours:
        assert 1 <= n.nid < 2**32 and len(n.identity) == 32
    assert 0 <= reply.epoch < 2**32 and 1 <= reply.interval <= 86400


def check_circuits(plans: list[Any]) -> None:
    assert len(plans) <= client_mod.MAX_CIRCUITS
    for plan in plans:
        assert 1 <= len(plan.layers) <= 8 and len(plan.request_blob) == 512


# ----------------------------------------------------------------------------- client: parsing


@fuzz_settings(2)
@given(hostile(CLIENT_SEEDS, max_size=2048))
def test_client_hostile_reply_bytes(data: bytes) -> None:
    with fuzzlib.no_hang():
        fuzzlib.check(CLIENT, data)


@fuzz_settings(4)
@given(mutated_tree(REPLIES), st.booleans())
def test_client_hostile_reply_fields(reply: Any, circuits: bool) -> None:
    if not isinstance(reply, dict):
        return  # refused by _post before the parsers (tested below over TLS)
    client = fuzzlib.tracker_client_for(reply)
    try:
        if circuits:
            check_circuits(client.request_circuits(b"h" * 20, client_mod.MAX_CIRCUITS))
        else:
            check_announce(client.announce("127.0.0.1:7000", [], 0))
    except TrackerError as exc:
        fuzzlib.check_message(exc)


def test_client_reads_what_the_server_writes() -> None:
    """Round trip: the real tracker's replies parse into full results."""
    harness = fuzzlib.tracker_harness()
    me = fuzzlib.fixed_identity("honest 0")
    status, reply = harness.signed(server.ANNOUNCE_PATH, fuzzlib.announce_inner(me, 7000), me)
    assert status == 200
    announced = fuzzlib.tracker_client_for(reply).announce("127.0.0.1:7000", [], 0)
    assert announced.neighbours and all(len(n.identity) == 32 for n in announced.neighbours)
    status, reply = harness.signed(server.CIRCUITS_PATH, fuzzlib.circuits_inner(3), me)
    assert status == 200
    plans = fuzzlib.tracker_client_for(reply).request_circuits(fuzzlib.SWARM, 3)
    assert plans and all(p.suite == "x25519" for p in plans)


# ----------------------------------------------------------------------------- client: over TLS


def read_request(sock: Any) -> None:
    """Read one whole request, so closing afterwards never resets the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _sep, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _colon, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return
        body += chunk


@pytest.fixture(scope="module")
def hostile_tracker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A TLS server on loopback answering whatever ``server.answer`` says."""
    ident = identity_mod.TrackerIdentity.load_or_create(tmp_path_factory.mktemp("tracker"))

    def handle(sock: Any, _address: Any) -> None:
        try:
            read_request(sock)
            srv.answer(sock)
        except OSError:
            pass
        finally:
            sock.close()

    srv = StreamServer(("127.0.0.1", 0), handle, ssl_context=ident.server_context())
    srv.answer = lambda sock: None
    srv.start()
    srv.fingerprint = ident.fingerprint
    yield srv
    srv.stop(timeout=1)


def http(status: str, body: bytes, extra: bytes = b"") -> Callable[[Any], None]:
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n".encode()
    return lambda sock: sock.sendall(head + extra + b"\r\n" + body)


def stall(sock: Any) -> None:
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nd")
    while True:
        gevent.sleep(0.05)
        sock.sendall(b"1:")


HOSTILE_ANSWERS: dict[str, tuple[Callable[[Any], None], str]] = {
    "not bencode": (http("200 OK", b"<html>"), "not a bencoded dict"),
    "a list": (http("200 OK", b"le"), "not a bencoded dict"),
    "multi-line reason": (
        http("400 Bad", bencode.encode({b"failure reason": b"no\nway\r\nreally"})),
        "refused",
    ),
    "non-text reason": (http("200 OK", bencode.encode({b"failure reason": 7})), "refused"),
    "5xx without body": (http("503 Busy", b""), "HTTP 503"),
    "oversized": (http("200 OK", b"x" * (client_mod.MAX_REPLY + 10)), "over"),
    "not HTTP": (lambda sock: sock.sendall(b"SSH-2.0-OpenSSH\r\n\r\n"), "cannot reach"),
    "header flood": (http("200 OK", b"de", b"X-A: b\r\n" * 200), "cannot reach"),
    "silence": (lambda sock: gevent.sleep(10), "timed out"),
    "trickle": (stall, "timed out"),
    "missing fields": (http("200 OK", b"de"), "malformed"),
}


#: The answers that must end in the client's timeout: a short one, to keep them quick.
TIMED_OUT_ANSWERS = {"silence", "trickle"}
#: The client's timeout for every other answer: long enough for a TLS set-up on a busy
#: machine, so that the error is the answer's, not "timed out".
ANSWER_TIMEOUT = 5.0


@pytest.mark.parametrize("case", sorted(HOSTILE_ANSWERS))
def test_client_against_a_hostile_server(hostile_tracker: Any, case: str) -> None:
    answer, expected = HOSTILE_ANSWERS[case]
    hostile_tracker.answer = answer
    host, port = hostile_tracker.address
    client = client_mod.TrackerClient(
        f"https://{host}:{port}/announce",
        hostile_tracker.fingerprint,
        PeerIdentity.generate(),
        timeout=0.5 if case in TIMED_OUT_ANSWERS else ANSWER_TIMEOUT,
    )
    with gevent.Timeout(20), pytest.raises(TrackerError, match=expected) as err:
        client.announce("127.0.0.1:7000", [], 0)
    fuzzlib.check_message(err.value)


# ----------------------------------------------------------------------------- server


@fuzz_settings(2)
@given(hostile(SERVER.seeds(), max_size=1024))
def test_server_hostile_bodies(data: bytes) -> None:
    with fuzzlib.no_hang():
        fuzzlib.check(SERVER, data)


@fuzz_settings(4)
@given(mutated_tree(REQUESTS), st.booleans())
def test_server_hostile_signed_fields(inner: Any, circuits: bool) -> None:
    path = server.CIRCUITS_PATH if circuits else server.ANNOUNCE_PATH
    with fuzzlib.no_hang():
        status, _reply = fuzzlib.tracker_harness().signed(path, inner)
    assert status in (200, 400, 403, 409)


@fuzz_settings(1)
@given(
    st.sampled_from(["GET", "PUT", "POST", "HEAD"]),
    st.sampled_from(["/announce", "/circuits", "/stats", "/", "/announce/../stats", "\n"]),
    st.sampled_from([None, "", "-1", "abc", "99999999", "5"]),
    st.binary(max_size=64),
)
def test_server_hostile_http_shapes(
    method: str, path: str, length: str | None, body: bytes
) -> None:
    status, _reply = fuzzlib.tracker_harness().post(path, body, method=method, length=length)
    assert status in (200, 400, 403, 404, 405, 413)


@pytest.mark.parametrize("key", ["onion", "box"])
def test_a_peer_with_a_low_order_key_cannot_break_circuits(tmp_path: Path, key: str) -> None:
    """Found by fuzzing (fixed in c811fb5): such a key made every circuit through it a 500."""
    harness = fuzzlib.TrackerHarness(str(tmp_path))
    bad = fuzzlib.fixed_identity("bad")
    inner = fuzzlib.announce_inner(bad, 6500)
    inner[key.encode()] = bytes(32)
    status, _reply = harness.signed(server.ANNOUNCE_PATH, inner, bad)
    if status == 200:  # refusing the announce would be one fix
        harness.members[bad.identity_public] = (bad, inner)
    down = fuzzlib.fixed_identity("down")
    harness.join(down, fuzzlib.announce_inner(down, 6501, left=5))
    harness.settle()
    for _ in range(10):
        status, _reply = harness.signed(server.CIRCUITS_PATH, fuzzlib.circuits_inner(8), down)
        assert status == 200


class Unreadable:
    """A request body that fails the test if the tracker reads it."""

    def read(self, *_args: Any) -> bytes:
        raise AssertionError("the tracker read a body it should have refused by its length")


@pytest.mark.parametrize("length", [str(server.MAX_BODY + 1), str(10**12)])
def test_server_refuses_an_oversized_body_by_its_length(length: str) -> None:
    got: list[str] = []
    environ = {
        "PATH_INFO": server.ANNOUNCE_PATH,
        "REQUEST_METHOD": "POST",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_LENGTH": length,
        "wsgi.input": Unreadable(),
    }
    body = fuzzlib.tracker_harness().tracker.wsgi(environ, lambda s, _h: got.append(s))
    assert got[0].startswith("413")
    fuzzlib.check_message(Exception(bencode.decode(b"".join(body))[b"failure reason"].decode()))
