"""Which blocks to request from which peer: pure logic, no I/O.

* Partially requested pieces come first (strictly), so pieces complete and
  can be verified, shared and freed from memory as soon as possible.
* Only wanted pieces are fetched: each piece has a :class:`Priority` (the
  highest of the wanted files it touches) or none (:data:`SKIP`: it touches
  no wanted file). A peer is interesting only for wanted pieces we lack, and
  the picker is :attr:`~PiecePicker.complete` once every wanted piece is in.
* New pieces are chosen by priority first, then rarest first over the
  availability among connected peers, with a random tie-break (a per-picker
  random rank of every piece). The pieces to start are kept sorted by
  (priority band, availability, rank), so a pick is the first of them the
  peer has, not a scan of every piece: a torrent of 25,000 pieces would
  otherwise cost 25,000 steps per piece started.
* Endgame: once every block still missing is requested, an outstanding block
  may be asked of one more peer (:data:`ENDGAME_COPIES`: two copies at most, as
  libtorrent), and only where that copy is worth it: the caller's
  ``copy_gain`` says how many seconds it would save (the session asks this of
  its flow controllers: a block due soon at its holder is not copied, one due
  late, overdue or held by a stalled peer is, one whose holder measured nothing
  yet only once that holder is quiet), the biggest savings first. When
  one copy arrives the other is returned as a cancel. A copy nearly always arrives in full
  (over a circuit the source has sent the block long before the cancel comes
  back), so copies are the endgame's whole cost in bytes. Without ``copy_gain``
  (``TorrentSession.limit_endgame_copies`` off) every
  outstanding block is asked of every peer that has it, as before.
* Pieces named by a circuit's first ask still in flight (:meth:`PiecePicker.reserve`)
  are not asked of another peer until that ask is overdue, and then only once
  nothing else is left: the source sends their blocks unasked, and a block asked
  of another peer meanwhile would come twice. A peer finding only such pieces
  gets nothing; its caller looks again when an ask is answered or at
  :meth:`PiecePicker.reserved_due`.
* A piece that failed its hash is fetched again preferably from a peer that
  was involved in fewer failures of it, and from a single peer at a time
  (*exclusive*), so a second failure points at exactly one source.
* A peer that alone sent a bad copy of a piece is never asked for that piece
  again (:meth:`PiecePicker.peer_lost` with ``refuse``), whatever it
  announces; every other piece it has is still fetched from it.

Peers are opaque hashable keys (the session uses its connection objects).
"""

from __future__ import annotations

import enum
import random
import sys
import time
from collections.abc import Callable, Container, Hashable, Iterable, Iterator

import attrs
from sortedcontainers import SortedList

from anomos.torrent.wire import BLOCK_SIZE

#: ``(piece index, offset in piece, length)`` of one request.
Block = tuple[int, int, int]

_MISSING, _REQUESTED, _RECEIVED = 0, 1, 2
#: Peers a block is requested from at once in endgame: its first holder and one copy.
ENDGAME_COPIES = 2

#: ``copy_gain(holder, block, ahead)``: seconds a copy of ``block`` (requested from
#: ``holder``) would arrive sooner than the holder's, asked now behind ``ahead``
#: copies asked in the same call; a copy is requested only where this is positive.
CopyGain = Callable[[Hashable, Block, int], float]


class Priority(enum.IntEnum):
    """A file's (and so its pieces') download priority; Transmission's values."""

    LOW = -1
    NORMAL = 0
    HIGH = 1


#: The band of a piece no wanted file touches: never requested.
SKIP = 3


def band(priority: Priority | None) -> int:
    """Sort band of a piece: 0 (high) to 2 (low) are fetched, :data:`SKIP` is not."""
    return SKIP if priority is None else Priority.HIGH - priority


@attrs.define(eq=False)
class _Partial:
    """A piece some of whose blocks are requested or received."""

    index: int
    size: int
    state: bytearray  # one _MISSING/_REQUESTED/_RECEIVED per block
    missing: int
    received: int = 0
    requesters: dict[int, set[Hashable]] = attrs.field(factory=dict)
    exclusive: bool = False
    owner: Hashable | None = None

    def block(self, bno: int) -> Block:
        begin = bno * BLOCK_SIZE
        return (self.index, begin, min(BLOCK_SIZE, self.size - begin))


@attrs.define(eq=False)
class _Peer:
    has: bytearray
    outstanding: set[Block] = attrs.field(factory=set)
    #: Pieces this peer has and we lack: the peer is interesting while > 0.
    lacking: int = 0
    #: Pieces this peer has.
    count: int = 0
    choked: bool = True
    #: Pieces this peer sent a bad copy of: treated as missing at the peer for good.
    refused: set[int] = attrs.field(factory=set)


@attrs.frozen
class Received:
    """What :meth:`PiecePicker.block_received` decided about one block."""

    #: False for a block we did not (or no longer) ask this peer for: drop it.
    accepted: bool
    #: Every block of the piece is in: hash it, then call piece_verified/failed.
    piece_complete: bool = False
    #: Endgame duplicates to cancel: ``(peer, block)``.
    cancels: tuple[tuple[Hashable, Block], ...] = ()


_REJECTED = Received(accepted=False)
_ACCEPTED = Received(accepted=True)
_COMPLETED = Received(accepted=True, piece_complete=True)


class PiecePicker:
    """Request scheduling for one torrent; see the module docstring."""

    def __init__(
        self,
        num_pieces: int,
        piece_size: Callable[[int], int],
        *,
        have: bytes | bytearray | None = None,
        bands: bytes | bytearray | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``bands``: one :func:`band` per piece (None: every piece wanted, normal);
        ``clock``: seconds, for when a first ask is overdue (tests pass a fake one)."""
        self._clock = clock
        self.num_pieces = num_pieces
        self.piece_size = piece_size
        self._have = bytearray(have) if have is not None else bytearray(num_pieces)
        if len(self._have) != num_pieces:
            raise ValueError("have flags do not match the piece count")
        self._band = bytearray(bands) if bands is not None else bytearray([1]) * num_pieces
        if len(self._band) != num_pieces or any(b > SKIP for b in self._band):
            raise ValueError("bands do not match the piece count")
        self._remaining = sum(1 for i in range(num_pieces) if self._lacks(i))
        self._avail = [0] * num_pieces
        rank = list(range(num_pieces))
        (rng or random.Random()).shuffle(rank)
        self._rank = rank
        self._piece_of_rank = [0] * num_pieces
        for index, r in enumerate(rank):
            self._piece_of_rank[r] = index
        #: Wanted pieces we lack that are not started (no partial): the pool of new picks.
        self._pool: set[int] = {i for i in range(num_pieces) if self._lacks(i)}
        #: ``_key(i)`` of every piece of the pool, highest priority then rarest first.
        self._rarity = SortedList(map(self._key, self._pool))
        self._partials: dict[int, _Partial] = {}
        self._peers: dict[Hashable, _Peer] = {}
        #: Failed pieces: peer -> failures of that piece it supplied blocks to.
        self._fails: dict[int, dict[Hashable, int]] = {}
        #: Pieces named by first asks not answered yet -> when that ask is overdue.
        self._reserved: dict[int, float] = {}

    # ------------------------------------------------------------------ state
    @property
    def complete(self) -> bool:
        """Every wanted piece is verified (pieces of unwanted files may be missing)."""
        return self._remaining == 0

    @property
    def remaining(self) -> int:
        """Wanted pieces not verified yet."""
        return self._remaining

    def wanted(self, index: int) -> bool:
        """Whether piece ``index`` touches a wanted file."""
        return self._band[index] < SKIP

    def _lacks(self, index: int) -> bool:
        """Piece ``index`` is wanted and not verified."""
        return not self._have[index] and self._band[index] < SKIP

    def have(self, index: int) -> bool:
        return bool(self._have[index])

    def have_flags(self) -> bytes:
        return bytes(self._have)

    def availability(self, index: int) -> int:
        return self._avail[index]

    def outstanding(self, peer: Hashable) -> int:
        """Blocks requested from ``peer`` and not received yet."""
        return len(self._peers[peer].outstanding)

    def outstanding_blocks(self, peer: Hashable) -> set[Block]:
        return set(self._peers[peer].outstanding)

    def interesting(self, peer: Hashable) -> bool:
        """Whether ``peer`` has a wanted piece we lack."""
        st = self._peers.get(peer)
        return st is not None and st.lacking > 0

    def is_seed(self, peer: Hashable) -> bool:
        """Whether ``peer`` has every piece."""
        st = self._peers.get(peer)
        return st is not None and st.count == self.num_pieces

    def peer_has(self, peer: Hashable, index: int) -> bool:
        st = self._peers.get(peer)
        return st is not None and bool(st.has[index])

    @property
    def in_endgame(self) -> bool:
        """Every missing block that any peer can give us is requested."""
        if any(p.missing for p in self._partials.values()):
            return False
        return next(self._available(), None) is None

    def _available(self) -> Iterator[tuple[int, int]]:
        """The keys of the pool, in order, skipping pieces no peer has."""
        n = self.num_pieces
        for b in range(SKIP):
            yield from self._rarity.irange(minimum=(b, n), maximum=(b, sys.maxsize))

    # ------------------------------------------------------------------ peers
    def add_peer(self, peer: Hashable) -> None:
        if peer in self._peers:
            raise ValueError("peer added twice")
        self._peers[peer] = _Peer(has=bytearray(self.num_pieces))

    def peer_bitfield(self, peer: Hashable, flags: bytes | bytearray) -> bool:
        """The peer's bitfield (0/1 per piece); True if it makes the peer interesting."""
        st = self._peers[peer]
        if len(flags) != self.num_pieces:
            raise ValueError("bitfield does not match the piece count")
        has = st.has
        new = [i for i, f in enumerate(flags) if f and not has[i]]
        for i in new:
            has[i] = 1
        st.count += len(new)
        lacking = sum(1 for i in new if self._lacks(i))
        self._shift(new, +1)
        was = st.lacking
        st.lacking += lacking
        return was == 0 and st.lacking > 0

    def peer_have(self, peer: Hashable, index: int) -> bool:
        """The peer announced a piece; True if it makes the peer interesting."""
        st = self._peers[peer]
        if st.has[index] or index in st.refused:
            return False
        st.has[index] = 1
        st.count += 1
        self._shift([index], +1)
        if self._lacks(index):
            st.lacking += 1
            return st.lacking == 1
        return False

    def peer_unchoked(self, peer: Hashable) -> None:
        self._peers[peer].choked = False

    def peer_choked(self, peer: Hashable) -> None:
        """The peer choked us (or stopped answering): its requests are void."""
        st = self._peers[peer]
        st.choked = True
        self.release(peer)

    def peer_lost(self, peer: Hashable, index: int, *, refuse: bool = False) -> bool:
        """``peer`` no longer offers piece ``index``: it said so (a don't-have), or with
        ``refuse`` it sent a bad copy and is never asked for it again. Its requests for
        that piece go back to the pool. True if the peer stopped being interesting."""
        st = self._peers.get(peer)
        if st is None:
            return False
        if refuse:
            st.refused.add(index)
        if not st.has[index]:
            return False
        st.has[index] = 0
        st.count -= 1
        self._shift([index], -1)
        self.release(peer, index)
        if not self._lacks(index):
            return False
        st.lacking -= 1
        return st.lacking == 0

    def piece_lost(self, index: int) -> list[Hashable]:
        """Our own copy of piece ``index`` went bad: it is wanted again. The peers it
        makes interesting (they have it and had nothing else for us)."""
        if not self._have[index]:
            return []
        self._have[index] = 0
        if not self._lacks(index):
            return []
        self._remaining += 1
        self._want(index)
        return self._lacking_changed(index, +1)

    def set_band(self, index: int, band: int) -> tuple[list[Hashable], list[Hashable]]:
        """Piece ``index`` moves to ``band`` (see :func:`band`; :data:`SKIP`: unwanted).
        ``(peers now interesting, peers no longer interesting)``. A piece that stops
        being wanted loses its requests: its blocks still in flight are dropped."""
        if not 0 <= band <= SKIP:
            raise ValueError(f"no such band {band}")
        old = self._band[index]
        if old == band:
            return [], []
        was_lacking = self._lacks(index)
        self._unwant(index)
        self._band[index] = band
        if self._have[index]:
            return [], []
        if band == SKIP:
            self._drop_partial(index)
            self._remaining -= 1
            return [], self._lacking_changed(index, -1)
        if index not in self._partials:
            self._want(index)
        if was_lacking:
            return [], []
        self._remaining += 1
        return self._lacking_changed(index, +1), []

    def _lacking_changed(self, index: int, delta: int) -> list[Hashable]:
        """Count (+1) or uncount (-1) piece ``index`` as lacking at every peer having it;
        the peers whose interest flipped."""
        flipped = []
        for peer, st in self._peers.items():
            if st.has[index]:
                st.lacking += delta
                if st.lacking == (1 if delta > 0 else 0):
                    flipped.append(peer)
        return flipped

    def release(self, peer: Hashable, only: int | None = None) -> None:
        """Forget the requests outstanding at ``peer`` (those of piece ``only`` if given);
        their blocks become missing again."""
        st = self._peers[peer]
        touched = set()
        blocks = [b for b in st.outstanding if only is None or b[0] == only]
        for block in blocks:
            index, begin, _ = block
            part = self._partials.get(index)
            if part is None:
                continue
            bno = begin // BLOCK_SIZE
            reqs = part.requesters.get(bno)
            if reqs is None:
                continue
            reqs.discard(peer)
            if not reqs:
                del part.requesters[bno]
                part.state[bno] = _MISSING
                part.missing += 1
            touched.add(part)
        st.outstanding.difference_update(blocks)
        for part in self._partials.values():
            if part.owner == peer and (only is None or part.index == only):
                part.owner = None
                touched.add(part)
        for part in touched:
            if part.received == 0 and not part.requesters:
                # Nothing in hand: back to the rarest-first pool.
                del self._partials[part.index]
                self._want(part.index)

    def remove_peer(self, peer: Hashable) -> None:
        st = self._peers.get(peer)
        if st is None:
            return
        self.release(peer)
        self._shift([i for i, f in enumerate(st.has) if f], -1)
        del self._peers[peer]

    # ------------------------------------------------------------------ requests
    def next_requests(
        self, peer: Hashable, count: int, copy_gain: CopyGain | None = None
    ) -> list[Block]:
        """Up to ``count`` new blocks to request from ``peer`` (which must have unchoked us);
        in endgame, copies of outstanding blocks where ``copy_gain`` finds them worth it."""
        st = self._peers[peer]
        out: list[Block] = []
        if count <= 0 or st.choked or st.lacking == 0:
            return out
        has = st.has
        fails = self._fails
        for part in self._partials.values():
            if not part.missing or not has[part.index]:
                continue
            if part.exclusive and part.owner is not None and part.owner != peer:
                continue
            if part.index in fails and not self._may_take(peer, part.index):
                continue
            self._take(part, peer, st, out, count)
            if len(out) >= count:
                return out
        while len(out) < count:
            index = self._pick_new(peer, st)
            if index is None:
                break
            self._take(self._start(index), peer, st, out, count)
        if len(out) < count and self.in_endgame:
            self._endgame(peer, st, out, count, copy_gain)
        return out

    def _start(self, index: int) -> _Partial:
        """Piece ``index`` leaves the pool: its first blocks are about to be asked for."""
        self._unwant(index)
        size = self.piece_size(index)
        nblocks = -(-size // BLOCK_SIZE)
        part = _Partial(
            index=index,
            size=size,
            state=bytearray(nblocks),
            missing=nblocks,
            exclusive=index in self._fails,
        )
        self._partials[index] = part
        return part

    def reserve(self, pieces: Iterable[int], patience: float) -> None:
        """A first ask in flight names ``pieces``: its source will send their blocks
        unasked, so they are asked of no other peer for ``patience`` seconds (the
        answer is expected by then), and after that only when nothing else is left:
        an ask that is never answered holds nothing up for longer."""
        due = self._clock() + patience
        for index in pieces:
            self._reserved[index] = due

    def unreserve(self, pieces: Iterable[int]) -> None:
        """The first ask naming ``pieces`` was answered (or its circuit failed)."""
        for index in pieces:
            self._reserved.pop(index, None)

    def reserved_due(self) -> float | None:
        """When the next first ask still in time becomes overdue (on ``clock``), so its
        pieces may be picked; None if none is. A caller whose peer got fewer blocks
        than it has room for looks again then."""
        now = self._clock()
        return min((due for due in self._reserved.values() if due > now), default=None)

    def unstarted(self, count: int, exclude: Container[int] = ()) -> list[int]:
        """Up to ``count`` wanted pieces not started, in the order new picks take them
        (priority, rarity, random rank), none of ``exclude``: what a first ask names
        before any bitfield of its source is known."""
        out: list[int] = []
        n, piece_of_rank = self.num_pieces, self._piece_of_rank
        for _, key in self._rarity:
            index = piece_of_rank[key % n]
            if index not in exclude and index not in self._reserved:
                out.append(index)
                if len(out) >= count:
                    break
        return out

    def adopt(self, peer: Hashable, blocks: Iterable[Block]) -> int:
        """``peer`` sends ``blocks`` unasked (our first ask named them): count those still
        missing as requested from it, so they are accepted and asked of nobody else.
        Returns how many were; a block already requested elsewhere or received, or
        of a piece we have or an exclusive piece of another peer, is not."""
        st = self._peers[peer]
        adopted = 0
        for block in blocks:
            index, begin, _ = block
            part = self._partials.get(index)
            if part is None:
                if index not in self._pool:
                    continue
                part = self._start(index)
            if part.exclusive and part.owner not in (None, peer):
                continue
            bno = begin // BLOCK_SIZE
            if bno >= len(part.state) or part.state[bno] != _MISSING or part.block(bno) != block:
                continue
            part.state[bno] = _REQUESTED
            part.missing -= 1
            part.requesters[bno] = {peer}
            st.outstanding.add(block)
            if part.exclusive:
                part.owner = peer
            adopted += 1
        return adopted

    def _take(
        self, part: _Partial, peer: Hashable, st: _Peer, out: list[Block], count: int
    ) -> None:
        state = part.state
        pos = 0
        while len(out) < count and part.missing:
            bno = state.find(_MISSING, pos)
            if bno < 0:
                break
            state[bno] = _REQUESTED
            part.missing -= 1
            part.requesters[bno] = {peer}
            block = part.block(bno)
            st.outstanding.add(block)
            out.append(block)
            pos = bno + 1
        if part.exclusive:
            part.owner = peer

    def _pick_new(self, peer: Hashable, st: _Peer) -> int | None:
        """The rarest wanted piece ``peer`` has (random tie-break), else the rarest one
        a first ask reserved and did not get in time, or None."""
        has, fails, piece_of_rank, n = st.has, self._fails, self._piece_of_rank, self.num_pieces
        reserved, fallback, now = self._reserved, None, None
        for _, key in self._available():  # pieces nobody has cannot match
            i = piece_of_rank[key % n]
            if has[i] and (i not in fails or self._may_take(peer, i)):
                due = reserved.get(i)
                if due is None:
                    return i
                if fallback is None:
                    now = self._clock() if now is None else now
                    if due <= now:
                        fallback = i
        return fallback

    def _key(self, index: int) -> tuple[int, int]:
        """Sort key of a piece of the pool: its band, then availability, then random rank."""
        return self._band[index], self._avail[index] * self.num_pieces + self._rank[index]

    def _want(self, index: int) -> None:
        if index not in self._pool and self._lacks(index):
            self._pool.add(index)
            self._rarity.add(self._key(index))

    def _unwant(self, index: int) -> None:
        if index in self._pool:
            self._pool.remove(index)
            self._rarity.remove(self._key(index))

    def _shift(self, indices: list[int], delta: int) -> None:
        """The availability of ``indices`` moves by ``delta``; the rarity order follows."""
        avail, wanted = self._avail, self._pool
        moved = [i for i in indices if i in wanted]
        if len(moved) > len(wanted) // 8 + 8:  # a bitfield or a departing peer: sort once
            for i in indices:
                avail[i] += delta
            self._rarity = SortedList(map(self._key, wanted))
            return
        for i in moved:
            self._rarity.remove(self._key(i))
        for i in indices:
            avail[i] += delta
        self._rarity.update(map(self._key, moved))

    def _may_take(self, peer: Hashable, index: int) -> bool:
        """A failed piece goes to the unchoked peers with the fewest failures of it."""
        fails = self._fails[index]
        mine = fails.get(peer, 0)
        if mine == 0:
            return True
        for other, st in self._peers.items():
            if other != peer and st.has[index] and not st.choked and fails.get(other, 0) < mine:
                return False
        return True

    def _endgame(
        self, peer: Hashable, st: _Peer, out: list[Block], count: int, gain: CopyGain | None
    ) -> None:
        """Copies for ``peer`` of outstanding blocks: every one without ``gain`` (the
        classic endgame), else of those outstanding at fewer than ENDGAME_COPIES peers,
        the ones ``gain`` finds worth it, best first."""
        candidates: list[tuple[float, int, _Partial, int, set[Hashable]]] = []
        for part in self._partials.values():
            if not st.has[part.index]:
                continue
            if part.exclusive and part.owner is not None and part.owner != peer:
                continue
            for bno, reqs in part.requesters.items():
                if peer in reqs or (gain is not None and len(reqs) >= ENDGAME_COPIES):
                    continue
                if gain is None:
                    self._copy(peer, st, part, bno, reqs, out)
                    if len(out) >= count:
                        return
                    continue
                best = min(gain(holder, part.block(bno), 0) for holder in reqs)
                if best > 0:
                    candidates.append((-best, len(candidates), part, bno, reqs))
        if gain is None:
            return
        candidates.sort()
        for _, _, part, bno, reqs in candidates:
            if min(gain(holder, part.block(bno), len(out)) for holder in reqs) > 0:
                self._copy(peer, st, part, bno, reqs, out)
                if len(out) >= count:
                    return

    @staticmethod
    def _copy(
        peer: Hashable, st: _Peer, part: _Partial, bno: int, reqs: set[Hashable], out: list[Block]
    ) -> None:
        reqs.add(peer)
        block = part.block(bno)
        st.outstanding.add(block)
        out.append(block)

    # ------------------------------------------------------------------ arrivals
    def block_received(self, peer: Hashable, block: Block) -> Received:
        """Account for a block from ``peer``; see :class:`Received`."""
        st = self._peers.get(peer)
        if st is None or block not in st.outstanding:
            return _REJECTED
        st.outstanding.discard(block)
        index, begin, _ = block
        part = self._partials.get(index)
        bno = begin // BLOCK_SIZE
        if part is None or part.state[bno] != _REQUESTED:
            return _REJECTED
        cancels = []
        for other in part.requesters.pop(bno, ()):
            if other != peer:
                self._peers[other].outstanding.discard(block)
                cancels.append((other, block))
        part.state[bno] = _RECEIVED
        part.received += 1
        complete = part.received == len(part.state)
        if not cancels:  # nearly every block: no new object per block
            return _COMPLETED if complete else _ACCEPTED
        return Received(accepted=True, piece_complete=complete, cancels=tuple(cancels))

    def piece_verified(self, index: int) -> None:
        """Piece ``index`` passed its hash and is on disk."""
        self._drop_partial(index)
        self._unwant(index)
        self._fails.pop(index, None)
        if self._have[index]:
            return
        lacked = self._lacks(index)
        self._have[index] = 1
        if lacked:
            self._remaining -= 1
            self._lacking_changed(index, -1)

    def piece_failed(self, index: int, suppliers: Iterable[Hashable]) -> None:
        """Piece ``index`` failed its hash: fetch it again, exclusively, from a better peer."""
        if self._have[index]:
            return
        self._drop_partial(index)
        self._want(index)
        fails = self._fails.setdefault(index, {})
        for peer in set(suppliers):
            fails[peer] = fails.get(peer, 0) + 1

    def failures(self, index: int) -> dict[Hashable, int]:
        """Per peer, the failures of piece ``index`` it supplied blocks to."""
        return dict(self._fails.get(index, {}))

    def _drop_partial(self, index: int) -> None:
        part = self._partials.pop(index, None)
        if part is None:
            return
        for bno, reqs in part.requesters.items():
            block = part.block(bno)
            for peer in reqs:
                self._peers[peer].outstanding.discard(block)
