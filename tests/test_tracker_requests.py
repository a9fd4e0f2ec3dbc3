"""The tracker's cheaper request path (docs/performance.md, "Third pass"): the shortcuts
must decide exactly what the long way decides."""

from __future__ import annotations

import os
import random

import pytest

from anomos.identity import PeerIdentity
from anomos.tracker.graph import MAX_NID, PeerGraph
from anomos.tracker.http import Refused
from anomos.tracker.randomness import BufferedSystemRandom
from anomos.tracker.requests import parse_announce


def _inner(ident: PeerIdentity, address: bytes) -> dict[bytes, object]:
    return {
        b"time": 1,
        b"session": b"s",
        b"onion": ident.onion_public,
        b"box": ident.box_public,
        b"address": address,
        b"relayed": 0,
        b"stopped": 0,
        b"torrents": [],
    }


def test_a_known_address_is_reused_and_a_changed_one_checked_again() -> None:
    ident = PeerIdentity.generate()
    known = (ident.onion_public, ident.box_public, "192.0.2.1:7000")
    same = parse_announce(_inner(ident, b"192.0.2.1:7000"), known)
    assert same.address == "192.0.2.1:7000"
    moved = parse_announce(_inner(ident, b"192.0.2.9:7001"), known)
    assert moved.address == "192.0.2.9:7001"
    # A peer already known may not slip a bad address past the check.
    for bad in (b"192.0.2.1:0", b"192.0.2.1", b"no port:1", b"192.0.2.1:7000 "):
        with pytest.raises(Refused, match="address"):
            parse_announce(_inner(ident, bad), known)
    with pytest.raises(Refused, match="address"):
        parse_announce(_inner(ident, 7000), known)  # type: ignore[arg-type]


@pytest.mark.parametrize("closed", [frozenset(), frozenset(range(0, 60, 3))])
def test_links_agree_with_nid_and_dialer(closed: frozenset[int]) -> None:
    """What an announce reply lists (one pass) is what nid() and dialer() say per edge,
    before and after each end is told, with peers nobody can dial among them."""
    g = PeerGraph(rng=random.Random(3), edge_settle=0.0)
    g.closed = closed
    for p in range(60):
        g.add_peer(p)
    told = random.Random(4).sample(range(60), 30)
    for step in (None, *told):
        if step is not None:
            g.mark_told(step)
        for p in g:
            expected = [(n, g.nid(p, n), g.dialer(p, n) == p) for n in g.neighbours(p)]
            assert g.links(p) == expected


def test_buffered_system_random_draws_are_in_range_and_fresh() -> None:
    rng = BufferedSystemRandom()
    floats = [rng.random() for _ in range(5000)]  # 35,000 bytes: several blocks
    assert all(0.0 <= f < 1.0 for f in floats)
    assert len(set(floats)) == len(floats)
    nids = [rng.getrandbits(31) for _ in range(2000)]
    assert all(0 <= n <= MAX_NID for n in nids) and max(nids) > MAX_NID // 2
    assert rng.getrandbits(0) == 0 and len(rng.randbytes(10_000)) == 10_000
    assert 1 <= rng.randint(1, 6) <= 6
    with pytest.raises(ValueError):
        rng.getrandbits(-1)


def test_buffered_system_random_forgets_its_block_in_a_forked_child() -> None:
    rng = BufferedSystemRandom()
    rng.random()  # a block is read
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next bytes must not be the parent's
        os.write(write, rng.randbytes(32))
        os._exit(0)
    os.close(write)
    child = os.read(read, 64)
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 32 and child != rng.randbytes(32)


def test_announce_replies_are_encoded_as_bencode_would(tmp_path, plugins, monkeypatch) -> None:
    """The template encoder gives exactly ``bencode.encode``'s bytes, for real replies
    (joins, announces, a goodbye; neighbours with and without an edge ticket) without
    falling back to it, and for dicts that are not quite one (left to bencode)."""
    from anomos import bencode
    from anomos.tracker import http
    from anomos.tracker.http import encode_announce_reply
    from anomos.tracker.server import Tracker
    from anomos.tracker.settings import TrackerSettings

    t = Tracker(tmp_path / "t", "127.0.0.1:0", plugins, TrackerSettings(edge_settle=0))
    try:
        idents = [PeerIdentity.generate() for _ in range(12)]
        replies = []
        for rnd in range(2):
            for i, ident in enumerate(idents):
                inner = _inner(ident, f"192.0.2.{i + 1}:{7000 + rnd}".encode())
                inner[b"relayed"] = rnd * 12345
                inner[b"stopped"] = int(rnd == 1 and i == 0)
                replies.append(t.announce(ident.identity_public, inner))
    finally:
        t.stop()
    assert any(len(r[b"neighbours"]) >= 4 for r in replies)
    assert any(not r[b"neighbours"] for r in replies)  # the goodbye
    neighbours = [n for r in replies for n in r[b"neighbours"]]
    assert any(b"ticket" in n for n in neighbours) and any(b"ticket" not in n for n in neighbours)
    expected = [bencode.encode(reply) for reply in replies]

    def no_fallback(value: object) -> bytes:
        raise AssertionError(f"the template fell back to bencode.encode for {value!r:.200}")

    with monkeypatch.context() as patched:
        patched.setattr(http, "bencode", type("NoBencode", (), {"encode": no_fallback}))
        assert [encode_announce_reply(reply) for reply in replies] == expected
    odd = [
        {**replies[-1], b"extra": 1},
        {k: v for k, v in replies[-1].items() if k != b"epoch"},
        {**replies[-1], b"ratio": "1.5"},
        {**replies[-1], b"uploaded": True},
        {**replies[-1], b"relayed": -3},
        {**replies[-1], b"neighbours": [{**replies[-1][b"neighbours"][0], b"x": b""}]},
        {**replies[-1], b"neighbours": [{**replies[-1][b"neighbours"][0], b"nid": 2**70}]},
        {**replies[-1], b"neighbours": [{**replies[-1][b"neighbours"][0], b"ticket": "t"}]},
        {**replies[-1], b"neighbours": [{**replies[-1][b"neighbours"][0], b"ticket": 7}]},
    ]
    for reply in odd:
        assert encode_announce_reply(reply) == bencode.encode(reply)


def test_a_known_peers_announce_reads_its_keys_and_address_in_one_lookup(
    tmp_path, plugins, monkeypatch
) -> None:
    """The announce of a live peer checks it against the row it reads once
    (``PeerTable.known``), not its keys and then its address, each a slot lookup."""
    from anomos.tracker.server import Tracker
    from anomos.tracker.settings import TrackerSettings
    from anomos.tracker.tables import PeerTable

    ident, stranger = PeerIdentity.generate(), PeerIdentity.generate()
    t = Tracker(tmp_path / "t", "127.0.0.1:0", plugins, TrackerSettings(edge_settle=0))
    try:
        peer = ident.identity_public
        t.announce(peer, _inner(ident, b"192.0.2.1:7000"))
        assert t.peers.known(peer) == (ident.onion_public, ident.box_public, "192.0.2.1:7000")
        assert t.peers.known(stranger.identity_public) is None

        def second_lookup(*_args: object) -> object:
            raise AssertionError("the announce looked the peer's row up a second time")

        with monkeypatch.context() as patched:
            patched.setattr(PeerTable, "public_keys", second_lookup)
            patched.setattr(PeerTable, "address", second_lookup)
            t.announce(peer, _inner(ident, b"192.0.2.1:7000"))
            t.announce(peer, _inner(ident, b"192.0.2.2:7001"))  # moved: stored anew
        assert t.peers.known(peer) == (ident.onion_public, ident.box_public, "192.0.2.2:7001")
    finally:
        t.stop()


def test_request_cpu_bench_times_every_part() -> None:
    """``python -m anomos.bench.requestcpu`` (docs/performance.md) still finds every part
    it times: all requests served, each part measured."""
    from anomos.bench.requestcpu import request_cpu

    result = request_cpu(peers=60, requests=20)
    for phase in ("joins", "announces"):
        r = result[phase]
        assert r["per_second"] > 0 and r["ed25519_check_us"] > 0
        parts = set(r["parts_us"])
        assert {"envelope", "fields", "accounting", "swarms", "reply built"} <= parts
        assert "reply encoded" in parts
    assert "graph join" in result["joins"]["parts_us"]
