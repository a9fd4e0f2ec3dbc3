"""Piece picking (rarest first, partials first, endgame, failed pieces) and choking."""

from __future__ import annotations

import random

import pytest

from anomos.torrent.choker import Choker, RateMeter
from anomos.torrent.picker import SKIP, PiecePicker
from anomos.torrent.wire import BLOCK_SIZE

PIECE = 4 * BLOCK_SIZE


def make(num: int = 6, last: int = PIECE, seed: int = 0, have: bytes | None = None) -> PiecePicker:
    return PiecePicker(
        num,
        lambda i: last if i == num - 1 else PIECE,
        have=have,
        rng=random.Random(seed),
    )


def peer(p: PiecePicker, name: str, pieces: list[int] | None = None) -> str:
    """Add an unchoking peer that has ``pieces`` (all of them if None)."""
    p.add_peer(name)
    flags = bytearray(p.num_pieces)
    for i in range(p.num_pieces) if pieces is None else pieces:
        flags[i] = 1
    p.peer_bitfield(name, flags)
    p.peer_unchoked(name)
    return name


def deliver(p: PiecePicker, who: str, blocks: list[tuple[int, int, int]]) -> list[int]:
    """Receive blocks; return the pieces they completed."""
    done = []
    for b in blocks:
        r = p.block_received(who, b)
        assert r.accepted
        if r.piece_complete:
            done.append(b[0])
    return done


def test_blocks_are_16k_with_a_short_tail() -> None:
    p = make(num=1, last=40_000)
    peer(p, "a")
    assert p.next_requests("a", 10) == [
        (0, 0, BLOCK_SIZE),
        (0, BLOCK_SIZE, BLOCK_SIZE),
        (0, 2 * BLOCK_SIZE, 40_000 - 2 * BLOCK_SIZE),
    ]


def test_rarest_piece_is_picked_first() -> None:
    p = make(num=6)
    peer(p, "a")  # everything
    peer(p, "b", [0, 1, 2, 3, 5])
    peer(p, "c", [0, 1, 2, 3])
    # piece 4 is held by one peer, 5 by two, the rest by three
    first = p.next_requests("a", 1)
    assert first[0][0] == 4
    p.next_requests("a", 3)  # finish requesting piece 4
    assert p.next_requests("a", 1)[0][0] == 5


def test_ties_are_broken_at_random() -> None:
    firsts = set()
    for seed in range(30):
        p = make(num=6, seed=seed)
        peer(p, "a")
        firsts.add(p.next_requests("a", 1)[0][0])
    assert len(firsts) > 2


def test_partial_pieces_have_strict_priority() -> None:
    p = make(num=6)
    peer(p, "a")
    peer(p, "b")
    got_a = p.next_requests("a", 2)
    piece = got_a[0][0]
    got_b = p.next_requests("b", 3)
    # b finishes a's piece before starting a new one
    assert [b[0] for b in got_b[:2]] == [piece, piece]
    assert {b[1] for b in got_a + got_b[:2]} == {0, BLOCK_SIZE, 2 * BLOCK_SIZE, 3 * BLOCK_SIZE}
    assert got_b[2][0] != piece


def test_choked_or_uninteresting_peers_get_no_requests() -> None:
    p = make(num=2, have=b"\x01\x00")
    p.add_peer("a")
    p.peer_bitfield("a", b"\x01\x01")
    assert p.interesting("a")
    assert p.next_requests("a", 5) == []  # still choking us
    p.add_peer("b")
    assert p.peer_bitfield("b", b"\x01\x00") is False
    p.peer_unchoked("b")
    assert not p.interesting("b")
    assert p.next_requests("b", 5) == []
    assert p.peer_have("b", 1) is True  # now b is interesting


def test_choke_and_disconnect_release_blocks_to_others() -> None:
    p = make(num=1)
    peer(p, "a")
    peer(p, "b")
    blocks = p.next_requests("a", 4)
    assert len(blocks) == 4
    p.peer_choked("a")
    assert p.outstanding("a") == 0
    again = p.next_requests("b", 4)
    assert sorted(again) == sorted(blocks)
    p.remove_peer("b")
    assert p.availability(0) == 1
    p.peer_unchoked("a")
    assert sorted(p.next_requests("a", 4)) == sorted(blocks)


def test_unsolicited_and_duplicate_blocks_are_rejected() -> None:
    p = make(num=2)
    peer(p, "a")
    peer(p, "b")
    (block,) = p.next_requests("a", 1)
    assert not p.block_received("b", block).accepted  # never asked b
    assert p.block_received("a", block).accepted
    assert not p.block_received("a", block).accepted  # already in


def test_piece_completes_and_verifies() -> None:
    p = make(num=2)
    peer(p, "a")
    blocks = p.next_requests("a", 8)
    done = deliver(p, "a", blocks)
    assert sorted(done) == [0, 1]
    for i in done:
        p.piece_verified(i)
    assert p.complete and p.remaining == 0
    assert not p.interesting("a")


def test_endgame_requests_duplicates_and_cancels_them() -> None:
    p = make(num=2)
    peer(p, "a")
    peer(p, "b")
    blocks_a = p.next_requests("a", 8)  # a has every block
    assert len(blocks_a) == 8
    assert p.in_endgame
    dup = p.next_requests("b", 3)
    assert len(dup) == 3 and set(dup) <= set(blocks_a)
    # the first copy wins; the other peer is told to cancel
    r = p.block_received("b", dup[0])
    assert r.accepted and r.cancels == (("a", dup[0]),)
    assert not p.block_received("a", dup[0]).accepted
    r = p.block_received("a", dup[1])
    assert r.accepted and r.cancels == (("b", dup[1]),)
    assert p.outstanding("b") == 1


def test_endgame_asks_a_block_of_two_peers_at_most() -> None:
    """libtorrent's rule, with a copy gain: the holder and one copy; a third peer gets
    none of them (without one, the classic endgame: every peer gets every block)."""
    p = make(num=2)
    for name in "abcd":
        peer(p, name)
    blocks_a = p.next_requests("a", 8)
    always = lambda holder, block, ahead: 1.0  # noqa: E731
    assert len(p.next_requests("b", 8, always)) == 8
    assert p.next_requests("c", 8, always) == []
    assert len(p.next_requests("d", 8)) == 8
    r = p.block_received("b", blocks_a[0])
    assert set(r.cancels) == {("a", blocks_a[0]), ("d", blocks_a[0])}


def test_endgame_copies_only_blocks_worth_it_biggest_saving_first() -> None:
    p = make(num=2)
    peer(p, "a")
    peer(p, "b")
    blocks_a = p.next_requests("a", 8)
    # The holder will deliver its blocks in request order, 0.1 s apart; a copy
    # would take 0.35 s, plus 0.1 s per copy asked ahead of it.
    due = {b: 0.1 * (i + 1) for i, b in enumerate(blocks_a)}

    def gain(holder: object, block: tuple[int, int, int], ahead: int) -> float:
        assert holder == "a"
        return due[block] - (0.35 + 0.1 * ahead)

    copies = p.next_requests("b", 8, gain)
    # Only the last blocks (due after 0.4 s and later) are worth a copy, and each
    # copy asked makes the next one later: the last block, then the one before.
    assert copies == [blocks_a[7], blocks_a[6], blocks_a[5]]
    assert p.next_requests("b", 8, lambda h, b, n: -1.0) == []


def test_no_endgame_while_blocks_are_unrequested() -> None:
    p = make(num=3)
    peer(p, "a")
    peer(p, "b")
    first = p.next_requests("a", 4)
    assert not p.in_endgame
    got = p.next_requests("b", 4)
    # b gets a fresh piece, not duplicates of a's blocks
    assert not set(got) & set(first)
    assert len({b[0] for b in got}) == 1


def test_failed_piece_is_refetched_from_a_peer_with_fewer_failures() -> None:
    p = make(num=1)
    peer(p, "bad")
    peer(p, "good")
    blocks = p.next_requests("bad", 4)
    assert deliver(p, "bad", blocks) == [0]
    p.piece_failed(0, ["bad"])
    assert p.failures(0) == {"bad": 1}
    assert p.next_requests("bad", 4) == []  # good has had fewer failures
    again = p.next_requests("good", 4)
    assert sorted(again) == sorted(blocks)


def test_failed_piece_is_refetched_from_one_peer_only() -> None:
    p = make(num=1)
    peer(p, "a")
    peer(p, "b")
    deliver(p, "a", p.next_requests("a", 2))
    deliver(p, "b", p.next_requests("b", 2))
    p.piece_failed(0, ["a", "b"])
    first = p.next_requests("a", 1)
    assert len(first) == 1
    # exclusive: b may not join the piece a has started again
    assert p.next_requests("b", 4) == []
    assert len(p.next_requests("a", 4)) == 3


def test_failed_piece_falls_back_to_the_only_source() -> None:
    p = make(num=1)
    peer(p, "a")
    deliver(p, "a", p.next_requests("a", 4))
    p.piece_failed(0, ["a"])
    assert len(p.next_requests("a", 4)) == 4


def test_peer_have_updates_availability_once() -> None:
    p = make(num=3)
    p.add_peer("a")
    assert p.peer_have("a", 1) is True
    assert p.peer_have("a", 1) is False
    assert p.availability(1) == 1
    assert not p.is_seed("a")
    p.peer_bitfield("a", b"\x01\x01\x01")
    assert p.is_seed("a") and p.availability(1) == 1
    with pytest.raises(ValueError):
        p.add_peer("a")


# ----------------------------------------------------------------------------- choker


class FakePeer:
    def __init__(self, name: str, interested: bool, down: float = 0.0, up: float = 0.0) -> None:
        self.name = name
        self.peer_interested = interested
        self._down, self._up = down, up

    def download_rate(self, now: float) -> float:
        return self._down

    def upload_rate(self, now: float) -> float:
        return self._up

    def __repr__(self) -> str:
        return self.name


def test_choker_unchokes_the_four_best_plus_one_optimistic() -> None:
    peers = [FakePeer(f"p{i}", True, down=float(i), up=float(10 - i)) for i in range(8)]
    peers.append(FakePeer("idle", False, down=1000.0))
    choker = Choker(rng=random.Random(1))
    leeching = choker.rechoke(peers, seeding=False, now=0.0)
    best = {p.name for p in peers[4:8]}
    assert best <= {p.name for p in leeching}
    assert len(leeching) == 5
    assert "idle" not in {p.name for p in leeching}  # not interested: never unchoked
    seeding = Choker(rng=random.Random(1)).rechoke(peers, seeding=True, now=0.0)
    assert {p.name for p in peers[0:4]} <= {p.name for p in seeding}


def test_optimistic_unchoke_rotates_every_interval() -> None:
    peers = [FakePeer(f"p{i}", True, down=float(100 + i)) for i in range(4)]
    peers += [FakePeer(f"new{i}", True) for i in range(4)]
    choker = Choker(rng=random.Random(3), optimistic_interval=30.0)
    first = choker.rechoke(peers, seeding=False, now=0.0)
    opt = choker.optimistic
    assert opt in first and opt not in peers[:4]
    assert choker.rechoke(peers, seeding=False, now=10.0) == first  # kept within 30 s
    choker.rechoke(peers, seeding=False, now=31.0)
    assert choker.optimistic is not opt


def test_rate_meter_tracks_a_steady_rate() -> None:
    meter = RateMeter(window=5.0)
    for t in range(100):
        meter.add(1000, float(t))
    assert 900 < meter.rate(99.0) < 1300
    assert meter.rate(200.0) < 10  # decays when idle


def brute_force_pick(p: PiecePicker, who: str) -> int | None:
    """The definition of a new pick: the wanted piece ``who`` has with the least
    (availability, rank), skipping failed pieces it may not take."""
    st = p._peers[who]
    candidates = [
        i
        for i in range(p.num_pieces)
        if p.wanted(i)
        and not p.have(i)
        and i not in p._partials
        and st.has[i]
        and (i not in p._fails or p._may_take(who, i))
    ]
    return min(candidates, key=lambda i: (p._band[i], p.availability(i), p._rank[i]), default=None)


@pytest.mark.parametrize("seed", range(40))
def test_the_rarity_order_matches_a_full_scan_through_any_history(seed: int) -> None:
    """Peers come and go, announce pieces, serve, fail and verify, files are
    (un)wanted and change priority at random; after every step the kept order
    holds exactly the wanted pieces not started, a pick is the one a scan of every
    piece would choose, and each peer's interest matches a count from scratch."""
    rng = random.Random(seed)
    num = rng.choice([1, 7, 40, 130])
    p = make(num, seed=seed)
    names = [f"p{k}" for k in range(6)]
    live: set[str] = set()
    for _ in range(300):
        op = rng.random()
        who = rng.choice(names)
        if who not in live and op < 0.5:
            peer(p, who, [i for i in range(num) if rng.random() < rng.random()])
            live.add(who)
        elif who in live and op < 0.08:
            p.remove_peer(who)
            live.discard(who)
        elif who in live and op < 0.35:
            p.peer_have(who, rng.randrange(num))
        elif who in live and op < 0.85:
            expected = brute_force_pick(p, who)
            assert p._pick_new(who, p._peers[who]) == expected
            blocks = p.next_requests(who, rng.randint(1, 12))
            for b in blocks if rng.random() < 0.7 else []:
                result = p.block_received(who, b)
                if result.accepted and result.piece_complete:
                    if rng.random() < 0.8:
                        p.piece_verified(b[0])
                    else:
                        p.piece_failed(b[0], [who])
        elif who in live and op < 0.93:
            p.peer_choked(who)
            p.peer_unchoked(who)
        else:
            p.set_band(rng.randrange(num), rng.choice([0, 1, 2, SKIP, SKIP]))
        pool = [i for i in range(num) if p.wanted(i) and not p.have(i) and i not in p._partials]
        keys = sorted((p._band[i], p._avail[i] * num + p._rank[i]) for i in pool)
        assert list(p._rarity) == keys
        assert p.in_endgame == (
            not any(part.missing for part in p._partials.values())
            and not any(p.availability(i) for i in pool)
        )
        assert p.remaining == sum(1 for i in range(num) if p.wanted(i) and not p.have(i))
        for name in live:
            has = p._peers[name].has
            lacking = sum(1 for i in range(num) if has[i] and p.wanted(i) and not p.have(i))
            assert p.interesting(name) == (lacking > 0)
    assert all(p.availability(i) >= 0 for i in range(num))


def test_a_peer_that_sent_a_bad_copy_is_never_asked_for_that_piece_again() -> None:
    p = make(num=3)
    peer(p, "bad")
    per_piece = PIECE // BLOCK_SIZE
    blocks = p.next_requests("bad", per_piece)
    first = blocks[0][0]
    assert deliver(p, "bad", blocks) == [first]
    p.piece_failed(first, {"bad"})
    assert p.peer_lost("bad", first, refuse=True) is False  # it still has two others
    p.peer_have("bad", first)  # announcing it again changes nothing
    assert not p.peer_has("bad", first) and p.availability(first) == 0
    for _ in range(2):  # every other piece is still fetched from it
        again = p.next_requests("bad", per_piece)
        assert again and first not in {b[0] for b in again}
        (index,) = deliver(p, "bad", again)
        p.piece_verified(index)
    assert p.next_requests("bad", per_piece) == []
    assert not p.interesting("bad")  # nothing left it may give us
    peer(p, "honest")
    assert {b[0] for b in p.next_requests("honest", 1000)} == {first}


def test_a_withdrawn_piece_goes_to_another_peer_and_may_come_back() -> None:
    p = make(num=2)
    peer(p, "a", [0])
    peer(p, "b", [0, 1])
    asked = p.next_requests("a", 1000)
    assert {b[0] for b in asked} == {0}
    assert p.peer_lost("a", 0) is True  # a don't-have: "a" has nothing left for us
    assert p.outstanding("a") == 0 and p.availability(0) == 1
    assert 0 in {b[0] for b in p.next_requests("b", 1000)}
    assert p.peer_have("a", 0) is True  # not refused: it may have it again later


def test_a_piece_we_lost_is_wanted_again() -> None:
    p = make(num=2)
    for i in range(2):
        p.piece_verified(i)
    peer(p, "a")
    assert p.complete and not p.interesting("a")
    assert p.piece_lost(1) == ["a"]
    assert not p.complete and p.remaining == 1 and p.interesting("a")
    assert {b[0] for b in p.next_requests("a", 1000)} == {1}
