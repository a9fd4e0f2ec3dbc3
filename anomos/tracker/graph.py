"""The tracker's weighted undirected graph of *all* peers, and path search on it.

Every peer gets a few neighbours drawn from the whole network, not from its
swarm, so a neighbour learns nothing about what a peer shares. Each edge has a
neighbour id (NID) that is the same at both ends and unique among either
endpoint's edges; the links layer refuses a caller claiming an NID it was not
given.

Joining must stay O(max degree) even with 100,000 peers: peers are kept in
buckets by degree (random choice from a bucket is O(1)), and no operation
scans all peers. Because a new peer needs ``min`` neighbours while the
average degree cannot exceed ``max``, a join sometimes *splits* an existing
edge ``u - v`` into ``u - new - v``; that is done only when no peer below the
maximum degree is available, since it breaks the circuits using ``u - v``.
A pair whose edge was replaced because one end could not reach the other
(:meth:`PeerGraph.replace_edge`) is kept apart for a while (soft state).

The module also holds the bounded search that the path-policy plugins share
(:func:`search_region`, :func:`random_path`): a meet-in-the-middle pair of
breadth-first searches that looks at a few hundred nodes, however big the graph.
"""

from __future__ import annotations

import collections
import itertools
import math
import operator
import random
import time
from array import array
from collections.abc import Callable, Container, Hashable, Iterable, Iterator, Sequence
from typing import Any

import attrs
import numpy as np

from anomos.errors import ConfigError

#: NIDs are drawn from 1 .. MAX_NID (31 bits, so they fit any signed 32-bit field).
MAX_NID = 2**31 - 1
#: Seconds, after both ends of a new edge were told of it, before circuits may use it:
#: the time for the dialler to connect. A circuit over an edge whose ends have not
#: linked up yet fails at that hop ("next hop is not a neighbour").
EDGE_SETTLE = 2.0
#: Seconds for a peer's circuit load to halve.
LOAD_HALF_LIFE = 300.0
#: Random draws before an edge split gives up.
PICK_ATTEMPTS = 24
#: Random draws among many open peers before giving up: a draw misses only on the
#: peer itself, its neighbours and the peers it avoids, which are few among them.
OPEN_PICK_ATTEMPTS = 256
#: Up to this many peers below the maximum degree, candidates are listed, not sampled.
SMALL_OPEN_SET = 64
#: Nodes a randomized path search may expand before giving up.
MAX_EXPANSIONS = 2000
#: Relays a circuit may have: ``anomos.protocol.onion.MAX_HOPS`` minus the source.
MAX_RELAYS = 7
#: Seconds a pair separated by :meth:`PeerGraph.replace_edge` is not made neighbours
#: again: one end could not reach the other, and would not for a while.
AVOID_PAIR_SECONDS = 600.0
#: Avoided pairs remembered at most (the oldest are forgotten first).
MAX_AVOIDED = 65536

Peer = Hashable
#: A stored link: the two ends' ids, its NID, and the id of the end that dials (0: not fixed).
Link = tuple[int, int, int, int]


class IndexedSet:
    """A set with O(1) add, remove and uniform random choice."""

    __slots__ = ("_index", "_items")

    def __init__(self) -> None:
        self._items: list[Peer] = []
        self._index: dict[Peer, int] = {}

    def add(self, item: Peer) -> None:
        if item not in self._index:
            self._index[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: Peer) -> None:
        i = self._index.pop(item, None)
        if i is None:
            return
        last = self._items.pop()
        if i < len(self._items):
            self._items[i] = last
            self._index[last] = i

    def __getitem__(self, index: int) -> Peer:
        return self._items[index]

    def choice(self, rng: random.Random) -> Peer:
        return self._items[int(rng.random() * len(self._items))]

    def __contains__(self, item: object) -> bool:
        return item in self._index

    def members(self) -> Container[Peer]:
        """A live read-only view to test membership with at C speed (no method call)."""
        return self._index.keys()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Peer]:
        return iter(self._items)


@attrs.frozen
class Edge:
    """One neighbour link as the tracker planned it; ``dialer`` opens the connection."""

    a: Peer
    b: Peer
    nid: int
    dialer: Peer


@attrs.frozen
class GraphImage:
    """The packed graph as stored (:meth:`PeerGraph.image`): each slot's peer id (0: a
    free slot), neighbour slots, NIDs, flags and degrees, the arrays' bytes as they are.
    Restoring it costs a copy, not a Python step per link (a million peers' 3 million
    links). ``gen`` is the store batch it was taken with: links written after it are
    applied on top."""

    gen: int
    width: int
    ids: bytes
    nbr: bytes
    nid: bytes
    flags: bytes
    deg: bytes


@attrs.define
class Changes:
    """Edges a graph operation added and removed, for the store and for logging."""

    added: list[Edge] = attrs.field(factory=list)
    removed: list[tuple[Peer, Peer]] = attrs.field(factory=list)

    def extend(self, other: Changes) -> None:
        self.added.extend(other.added)
        self.removed.extend(other.removed)


#: Flags of one end of an edge (one byte per neighbour slot).
#: The end has been told of the edge (an announce reply listed it).
_TOLD = 1
#: The edge is settled: both ends were told, long enough ago to have linked up.
_READY = 2
#: This end was told first and so dials (fixed; otherwise the newer peer dials).
_DIALS = 4


class PeerGraph:
    """Neighbour graph of every live peer; implements :class:`anomos.interfaces.PeerGraphView`.

    Compact: each peer has an integer slot, and everything per peer lives in flat
    arrays indexed by it (no container objects per peer, so nothing for the
    garbage collector to walk): ``width`` neighbour slots per peer, each with
    the neighbour's slot, the edge's NID and a flags byte (told, settled, dials),
    filled from the front; the degree, the join sequence number, the circuit
    load, and the peer's position in its degree bucket. Slots of departed peers
    are reused. ``width`` is the maximum degree (widened only if a restore
    brings a peer with more neighbours than that).
    """

    def __init__(
        self,
        *,
        min_neighbours: int = 4,
        max_neighbours: int = 6,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        edge_settle: float | None = None,
    ) -> None:
        if not 1 <= min_neighbours <= max_neighbours:
            raise ConfigError(f"neighbours {min_neighbours}-{max_neighbours}: need 1 <= MIN <= MAX")
        self.min_neighbours = min_neighbours
        self.max_neighbours = max_neighbours
        self._rng = rng or random.SystemRandom()
        #: a fast generator, seeded from ``rng``, for orders that need no secrecy of their own
        self._order = random.Random(self._rng.getrandbits(64))
        self._clock = clock
        self.edge_settle = EDGE_SETTLE if edge_settle is None else edge_settle
        #: peer -> slot, and slot -> peer (None: a free slot)
        self._slot: dict[Peer, int] = {}
        self._peers: list[Peer | None] = []
        self._free: list[int] = []
        self._width = max_neighbours
        #: slot * width + i -> the i-th neighbour's slot, the edge's NID, its flags here
        self._nbr = array("i")
        self._nid = array("i")
        self._flags = bytearray()
        self._deg = array("i")
        #: join sequence number; the newer peer of an edge dials, unless _DIALS says otherwise
        self._seq = array("q")
        #: the highest sequence number given so far (a new peer gets the next)
        self._top_seq = 0
        #: circuit load, and the time it was last updated
        self._load = array("d")
        self._load_at = array("d")
        #: degree -> slots of that degree (degrees above max share the top bucket), and
        #: slot -> its index in its bucket: O(1) add, remove and uniform choice
        self._buckets: list[array[int]] = [array("i") for _ in range(max_neighbours + 1)]
        self._bucket_pos = array("i")
        #: (time it settles, a, b, nid) of edges both ends know, in time order
        self._settling: collections.deque[tuple[float, Peer, Peer, int]] = collections.deque()
        self._decay = math.log(2) / LOAD_HALF_LIFE
        #: pair -> when it may be linked again, soonest first (soft state, never stored)
        self._avoided: collections.OrderedDict[frozenset[Peer], float] = collections.OrderedDict()
        #: bumped on every structural change, so callers can cache searches.
        self.version = 0
        #: Peers that cannot be dialled from outside (behind NAT, or not known yet to be
        #: dialable): they dial every edge themselves, so two of them are never made
        #: neighbours, and they get new edges only when they are the peer being given
        #: neighbours (as they announce, so they hear of them and dial at once), never
        #: as the chosen end. Kept by the tracker (:mod:`anomos.tracker.reachability`).
        self.closed: Container[Peer] = frozenset()

    # ------------------------------------------------------------------ view
    def __contains__(self, peer: object) -> bool:
        return peer in self._slot

    def __len__(self) -> int:
        return len(self._slot)

    def __iter__(self) -> Iterator[Peer]:
        return iter(self._slot)

    def neighbours(self, peer: Peer) -> list[Peer]:
        s = self._slot[peer]
        base = s * self._width
        peers = self._peers
        return [peers[n] for n in self._nbr[base : base + self._deg[s]]]

    def degree(self, peer: Peer) -> int:
        return self._deg[self._slot[peer]]

    def _pos(self, s: int, other: int) -> int:
        """Index (into the flat arrays) of ``other`` among ``s``'s neighbours, or -1."""
        base = s * self._width
        try:
            return self._nbr.index(other, base, base + self._deg[s])
        except ValueError:
            return -1

    def nid(self, a: Peer, b: Peer) -> int:
        """The NID of edge ``a - b``; KeyError when they are not neighbours."""
        i = self._pos(self._slot[a], self._slot[b])
        if i < 0:
            raise KeyError((a, b))
        return self._nid[i]

    def peer_by_nid(self, peer: Peer, nid: int) -> Peer | None:
        s = self._slot.get(peer)
        if s is None or not 1 <= nid <= MAX_NID:
            return None
        base = s * self._width
        try:
            i = self._nid.index(nid, base, base + self._deg[s])
        except ValueError:
            return None
        return self._peers[self._nbr[i]]

    def dialer(self, a: Peer, b: Peer) -> Peer:
        """Which end of edge ``a - b`` opens the connection.

        The end that was told of the edge first (so it can dial at once, and the
        other end learns of the edge when dialled); before either was told, or for
        an edge restored without one, the peer that joined later. Whatever that
        says, a peer in :attr:`closed` dials a peer that is not: only it can.
        """
        closed = self.closed
        if (a in closed) != (b in closed):
            return a if a in closed else b
        sa, sb = self._slot[a], self._slot[b]
        i = self._pos(sa, sb)
        if i >= 0:
            if self._flags[i] & _DIALS:
                return a
            if self._flags[self._pos(sb, sa)] & _DIALS:
                return b
        return a if self._seq[sa] > self._seq[sb] else b

    def links(self, peer: Peer) -> list[tuple[Peer, int, bool]]:
        """``peer``'s neighbours, each with the edge's NID and whether ``peer`` dials it
        (:meth:`dialer`): what an announce reply lists, in one pass over the arrays."""
        s = self._slot[peer]
        base = s * self._width
        nbr, nids, flags, seq, peers = self._nbr, self._nid, self._flags, self._seq, self._peers
        closed = self.closed
        mine = peer in closed
        out = []
        for i in range(base, base + self._deg[s]):
            n = nbr[i]
            other = peers[n]
            if mine != (other in closed):
                dials = mine
            elif flags[i] & _DIALS:
                dials = True
            elif flags[self._pos(n, s)] & _DIALS:
                dials = False
            else:
                dials = seq[s] > seq[n]
            out.append((other, nids[i], dials))
        return out

    def seq(self, peer: Peer) -> int:
        return self._seq[self._slot[peer]]

    def slot(self, peer: Peer) -> int | None:
        """The peer's slot (None: not here): the tracker's other per-peer tables are
        columns indexed by it, so the identities are mapped to integers once."""
        return self._slot.get(peer)

    def own(self, peer: Peer) -> Peer | None:
        """The graph's own object for ``peer`` (None: not here): tables keyed by identity
        share it rather than keep one of their own (a restore's copies, see restore)."""
        s = self._slot.get(peer)
        return None if s is None else self._peers[s]

    def own_all(self, peers: Iterable[Peer]) -> list[Peer]:
        """:meth:`own` of each of ``peers``, all in the graph (KeyError otherwise), in
        one C-level pass (a restore keys its tables with 10^6 of them)."""
        return list(map(self._peers.__getitem__, map(self._slot.__getitem__, peers)))

    def at(self, slot: int) -> Peer | None:
        """The peer in ``slot`` (None: a free slot)."""
        return self._peers[slot]

    def slots(self) -> Iterable[tuple[Peer, int]]:
        """Every (peer, slot), as a live view."""
        return self._slot.items()

    def edges(self) -> Iterator[Edge]:
        seq = self._seq
        for a, s in self._slot.items():
            for b in self.neighbours(a):
                if seq[s] < seq[self._slot[b]]:
                    yield Edge(a, b, self.nid(a, b), self.dialer(a, b))

    def within(self, peer: Peer, depth: int, budget: int) -> dict[Peer, int]:
        """Peers at most ``depth`` hops from ``peer`` (with their distance), at most ``budget``."""
        start = self._slot[peer]
        dist = {start: 0}
        frontier = [start]
        nbr, deg, width = self._nbr, self._deg, self._width
        peers = self._peers
        for d in range(1, depth + 1):
            nxt = []
            for node in frontier:
                base = node * width
                for n in nbr[base : base + deg[node]]:
                    if n not in dist:
                        dist[n] = d
                        nxt.append(n)
                        if len(dist) >= budget:
                            return {peers[s]: d for s, d in dist.items()}
            frontier = nxt
        return {peers[s]: d for s, d in dist.items()}

    def nearest(
        self, peer: Peer, depth: int, budget: int, among: Container[Peer], enough: int
    ) -> list[Peer]:
        """Up to ``enough`` peers of ``among`` within ``depth`` hops of ``peer``, nearest
        first: a breadth-first search that expands each distance in random order and
        stops as soon as it has found enough, or has looked at ``budget`` peers."""
        start = self._slot[peer]
        seen = {start}
        frontier = [start]
        found: list[Peer] = []
        nbr, deg, width, peers = self._nbr, self._deg, self._width, self._peers
        for _ in range(depth):
            self._order.shuffle(frontier)
            nxt = []
            for node in frontier:
                base = node * width
                for n in nbr[base : base + deg[node]]:
                    if n in seen:
                        continue
                    seen.add(n)
                    nxt.append(n)
                    if peers[n] in among:
                        found.append(peers[n])
                        if len(found) >= enough:
                            return found
                if len(seen) >= budget:
                    return found
            frontier = nxt
        return found

    def edge_count(self) -> int:
        return sum(self._deg) // 2

    # ------------------------------------------------------------------ settled edges
    def mark_told(self, peer: Peer) -> list[Edge]:
        """``peer`` is being sent its full neighbour list; the edges whose dialer this fixed.

        Call it before reading :meth:`dialer` for the reply: on an edge neither
        end has heard of yet, ``peer`` becomes the dialer.
        """
        s = self._slot[peer]
        base = s * self._width
        flags, nbr = self._flags, self._nbr
        now = self._clock()
        fixed: list[Edge] = []
        for i in range(base, base + self._deg[s]):
            if flags[i] & _TOLD:
                continue
            flags[i] |= _TOLD
            n = nbr[i]
            other = self._peers[n]
            j = self._pos(n, s)
            if flags[j] & _TOLD:
                self._settling.append((now + self.edge_settle, peer, other, self._nid[i]))
            elif not flags[j] & _DIALS:
                flags[i] |= _DIALS
                fixed.append(Edge(peer, other, self._nid[i], peer))
        self._promote()
        return fixed

    def unsettle(self, a: Peer, b: Peer) -> bool:
        """Stop planning over edge ``a - b`` until ``b`` has been told of it again.

        For an edge ``a`` reports it cannot use (the link dropped): if ``b`` is
        alive it announces again, and the edge settles as a new one would.
        False when there is no such edge.
        """
        sa, sb = self._slot.get(a), self._slot.get(b)
        if sa is None or sb is None or (i := self._pos(sa, sb)) < 0:
            return False
        j = self._pos(sb, sa)
        self._flags[i] &= ~_READY
        self._flags[j] &= ~(_READY | _TOLD)
        self.version += 1
        return True

    def _promote(self) -> None:
        """Move edges whose settling time has come into the settled adjacency."""
        now = self._clock()
        queue = self._settling
        while queue and queue[0][0] <= now:
            _, a, b, nid = queue.popleft()
            sa, sb = self._slot.get(a), self._slot.get(b)
            if sa is None or sb is None or (i := self._pos(sa, sb)) < 0:
                continue
            if self._nid[i] == nid:  # not removed (or re-made) meanwhile
                self._flags[i] |= _READY
                self._flags[self._pos(sb, sa)] |= _READY

    def settled(self, a: Peer, b: Peer) -> bool:
        """Whether both ends of edge ``a - b`` know it, long enough ago to have linked up."""
        self._promote()
        sa, sb = self._slot.get(a), self._slot.get(b)
        if sa is None or sb is None:
            return False
        i = self._pos(sa, sb)
        return i >= 0 and bool(self._flags[i] & _READY)

    def _flagged(self, peer: Peer, flag: int) -> set[Peer]:
        s = self._slot.get(peer)
        if s is None:
            return set()
        base = s * self._width
        end = base + self._deg[s]
        peers = self._peers
        nbr, flags = self._nbr[base:end], self._flags[base:end]
        return {peers[n] for n, f in zip(nbr, flags, strict=True) if f & flag}

    def settled_neighbours(self, peer: Peer) -> set[Peer]:
        """Neighbours over settled edges (:meth:`settled_view` brings them up to date)."""
        if peer not in self._slot:
            raise KeyError(peer)
        return self._flagged(peer, _READY)

    def told_neighbours(self, peer: Peer) -> set[Peer]:
        """Neighbours ``peer`` has been told of (it dials or waits for them itself)."""
        return self._flagged(peer, _TOLD)

    def settled_view(self, origin: Peer | None = None) -> SettledView:
        """The graph as path policies should see it: only edges that are settled
        (and, with ``origin``, the edges that peer has been told of)."""
        self._promote()
        return SettledView(self, origin)

    # ------------------------------------------------------------------ load
    def load(self, peer: Peer) -> float:
        """Circuits planned through ``peer``, decaying with a half-life of LOAD_HALF_LIFE."""
        s = self._slot.get(peer)
        if s is None or not self._load[s]:
            return 0.0
        return self._load[s] * math.exp(-self._decay * (self._clock() - self._load_at[s]))

    def add_load(self, peer: Peer, amount: float = 1.0) -> None:
        s = self._slot.get(peer)
        if s is not None:
            self._load[s] = self.load(peer) + amount
            self._load_at[s] = self._clock()

    # ------------------------------------------------------------------ membership
    def add_peer(self, peer: Peer) -> Changes:
        """Add ``peer`` (no-op when present) and give it neighbours up to the minimum."""
        changes = Changes()
        if peer in self._slot:
            return changes
        self._insert(peer, self._top_seq + 1)
        changes.extend(self._fill(peer))
        return changes

    def remove_peer(self, peer: Peer) -> Changes:
        """Remove ``peer`` and give its former neighbours new ones if they fell below minimum."""
        changes = Changes()
        s = self._slot.get(peer)
        if s is None:
            return changes
        former = self.neighbours(peer)
        for other in former:
            self._unlink(peer, other)
            changes.removed.append((peer, other))
        self._bucket_remove(s)
        del self._slot[peer]
        self._peers[s] = None
        self._free.append(s)
        self.version += 1
        for other in former:
            if other in self._slot and self.degree(other) < self.min_neighbours:
                changes.extend(self._fill(other))
        return changes

    def top_up(self, peer: Peer) -> Changes:
        """Give ``peer`` more neighbours if it is below the minimum (a young, small network)."""
        if peer not in self._slot or self.degree(peer) >= self.min_neighbours:
            return Changes()
        return self._fill(peer)

    def replace_edge(self, a: Peer, b: Peer) -> Changes:
        """Remove edge ``a - b`` (``a`` cannot reach ``b``) and top up both ends.

        The pair is not linked again for AVOID_PAIR_SECONDS, by any operation.
        Empty changes when there is no such edge.
        """
        changes = Changes()
        sa, sb = self._slot.get(a), self._slot.get(b)
        if sa is None or sb is None or self._pos(sa, sb) < 0:
            return changes
        self._unlink(a, b)
        changes.removed.append((a, b))
        self._avoid(a, b)
        for end in (a, b):
            if self.degree(end) < self.min_neighbours:
                changes.extend(self._fill(end))
        return changes

    def avoided(self, a: Peer, b: Peer) -> bool:
        """Whether ``a`` and ``b`` must not be made neighbours now (see :meth:`replace_edge`)."""
        if not self._avoided:
            return False
        until = self._avoided.get(frozenset((a, b)))
        return until is not None and until > self._clock()

    def repair(self) -> Changes:
        """Top up every peer below the minimum (after a restore with other bounds): O(n)."""
        changes = Changes()
        short = [self._peers[s] for d in range(self.min_neighbours) for s in self._buckets[d]]
        for peer in short:
            if self.degree(peer) < self.min_neighbours:
                changes.extend(self._fill(peer))
        return changes

    # ------------------------------------------------------------------ restore
    def restore_peer(self, peer: Peer, seq: int) -> None:
        """Re-insert a peer from the store, without neighbours."""
        if peer not in self._slot:
            self._insert(peer, seq)

    def image(self, gen: int) -> GraphImage:
        """The packed graph, to store with batch ``gen``: one copy of each array (~66 MB
        at 10^6 peers, a few tens of milliseconds on the loop)."""
        ids = self._seq.tobytes()
        if self._free:  # a free slot's id is 0
            seqs = array("q", ids)
            for s in self._free:
                seqs[s] = 0
            ids = seqs.tobytes()
        return GraphImage(
            gen,
            self._width,
            ids,
            self._nbr.tobytes(),
            self._nid.tobytes(),
            bytes(self._flags),
            self._deg.tobytes(),
        )

    def slot_peers(self) -> list[Peer | None]:
        """Each slot's peer (None: free), a copy: the tables' image is packed by slot."""
        return list(self._peers)

    def restore(
        self,
        peers: Sequence[Peer],
        seqs: Sequence[int],
        links: Iterable[Link],
        image: GraphImage | None = None,
        gone: Iterable[tuple[int, int]] = (),
    ) -> int:
        """Fill an empty graph from the store: ``peers`` with their join sequence numbers
        (the store's peer ids, from 1); then either every link (a, b, NID, dialer or 0)
        by id straight into the packed arrays, or the packed ``image`` with the links
        removed (``gone``) and written (``links``) after it applied on top. Every
        restored edge is settled (both ends knew it before the restart). Returns the
        number of links dropped (an unknown end, a repeated pair or NID); ValueError
        for an image that does not fit together."""
        if self._slot:
            raise ValueError("PeerGraph.restore needs an empty graph")
        if len(seqs) != len(peers) or len(set(seqs)) != len(seqs) or 0 in seqs:
            raise ValueError("PeerGraph.restore: one distinct sequence number per peer")
        peers = _own_copies(peers)
        by_id = dict(zip(seqs, peers, strict=True))
        self._top_seq = max(seqs, default=0)
        if image is None:
            self._restore_peers(peers, seqs)
        else:
            self._restore_image(image, by_id)
            # A link rewritten after the image (its dialer fixed) replaces the imaged one.
            links = list(links)
            gone = itertools.chain(gone, ((a, b) for a, b, _nid, _d in links))
        slot = self._slot
        for a, b in gone:
            sa, sb = slot.get(by_id.get(a)), slot.get(by_id.get(b))
            if sa is not None and sb is not None and self._pos(sa, sb) >= 0:
                self._cut(sa, sb)
        return self._restore_links(
            (slot.get(by_id.get(a)), slot.get(by_id.get(b)), nid, slot.get(by_id.get(d), -1))
            for a, b, nid, d in links
        )

    def _restore_peers(self, peers: Sequence[Peer], seqs: Sequence[int]) -> None:
        """Slots 0 .. n-1 for ``peers``, in order, without neighbours."""
        n, w = len(peers), self._width
        self._peers = list(peers)
        self._slot = dict(zip(self._peers, range(n), strict=True))
        self._seq = array("q", seqs)
        self._nbr = _FILL * (n * w)
        self._nid = _ZERO * (n * w)
        self._flags = bytearray(n * w)
        self._deg = _ZERO * n
        self._bucket_pos = _ZERO * n
        self._load = array("d", bytes(8 * n))
        self._load_at = array("d", bytes(8 * n))

    def _restore_image(self, image: GraphImage, by_id: dict[int, Peer]) -> None:
        """The arrays from ``image``; slots of peers gone since are emptied and freed,
        peers that joined since get slots of their own (without neighbours yet)."""
        ids, nbr, nid, deg = array("q"), array("i"), array("i"), array("i")
        ids.frombytes(image.ids)
        nbr.frombytes(image.nbr)
        nid.frombytes(image.nid)
        deg.frombytes(image.deg)
        n, w = len(ids), image.width
        sizes = (len(nbr), len(nid), len(image.flags), len(deg))
        if w < 1 or sizes != (n * w, n * w, n * w, n) or max(deg, default=0) > w:
            raise ValueError("the stored graph image is inconsistent")
        if n and not -1 <= min(nbr) <= max(nbr) < n:
            raise ValueError("the stored graph image names a slot it does not have")
        if len(set(ids)) != n - ids.count(0) + (0 in ids):
            raise ValueError("the stored graph image gives a peer two slots")
        # (Checked before anything is changed: on ValueError the graph is still empty.)
        self._width = w
        # (C-level passes: a Python step per slot was ~1.5 s of a 10^6 restore.)
        self._peers = list(map(by_id.get, ids))  # (no peer has id 0: a free slot's)
        self._seq = ids
        self._nbr, self._nid, self._deg = nbr, nid, deg
        self._flags = bytearray(image.flags.translate(_RESTORED_FLAGS))
        self._bucket_pos = _ZERO * n
        self._load = array("d", bytes(8 * n))
        self._load_at = array("d", bytes(8 * n))
        self._slot = dict(zip(self._peers, range(n), strict=True))
        self._slot.pop(None, None)  # type: ignore[call-overload]
        empty = itertools.compress(range(n), map(operator.is_, self._peers, itertools.repeat(None)))
        for s in empty:
            if ids[s]:  # gone since the image: its edges go with it
                for other in list(nbr[s * w : s * w + deg[s]]):
                    self._cut(s, other)
            self._free.append(s)
        if w < self.max_neighbours:
            self._widen(self.max_neighbours)
        for sid in sorted(by_id.keys() - set(ids)):  # joined since the image
            self._insert(by_id[sid], sid)

    def _restore_links(self, links: Iterable[tuple[int | None, int | None, int, int]]) -> int:
        """Links by slot (a, b, NID, the slot of the end that dials or -1) into the
        arrays; then the degree buckets, once. The number of links dropped."""
        dropped = 0
        nbr, nids, flags, deg = self._nbr, self._nid, self._flags, self._deg
        w = self._width
        settled = _TOLD | _READY
        for sa, sb, nid, dialer in links:
            if sa is None or sb is None or sa == sb or not 1 <= nid <= MAX_NID:
                dropped += 1
                continue
            da, db = deg[sa], deg[sb]
            ba, bb = sa * w, sb * w
            if da and (sb in nbr[ba : ba + da] or nid in nids[ba : ba + da]):
                dropped += 1
                continue
            if db and nid in nids[bb : bb + db]:
                dropped += 1
                continue
            if da >= w or db >= w:
                self._widen(max(da, db) + 1)
                nbr, nids, flags, w = self._nbr, self._nid, self._flags, self._width
                ba, bb = sa * w, sb * w
            # Both ends knew it before the restart: usable at once.
            i, j = ba + da, bb + db
            nbr[i], nids[i], flags[i] = sb, nid, settled | (_DIALS if dialer == sa else 0)
            nbr[j], nids[j], flags[j] = sa, nid, settled | (_DIALS if dialer == sb else 0)
            deg[sa], deg[sb] = da + 1, db + 1
        self.version += 1
        self._rebuild_buckets()
        return dropped

    def _rebuild_buckets(self) -> None:
        """Every peer into the bucket of its degree, in C-level passes over the arrays."""
        top = self.max_neighbours
        n = len(self._peers)
        degree = np.minimum(np.array(self._deg, dtype=np.intc), top)
        degree[self._free] = -1  # (free slots are in no bucket)
        pos = np.zeros(n, dtype=np.intc)
        for d in range(top + 1):
            bucket = np.flatnonzero(degree == d).astype(np.intc)
            self._buckets[d] = array("i", bucket.tobytes())
            pos[bucket] = np.arange(len(bucket), dtype=np.intc)
        self._bucket_pos = array("i", pos.tobytes())

    def restore_edges(self, edges: Iterable[tuple[Peer, Peer, int, Peer | None]]) -> int:
        """Re-insert many edges from the store (a, b, nid, dialer) by identity, as
        :meth:`restore_edge` does (the same checks); the number dropped."""
        slot = self._slot
        return self._restore_links(
            (slot.get(a), slot.get(b), nid, slot.get(d, -1) if d is not None else -1)
            for a, b, nid, d in edges
        )

    def restore_edge(self, a: Peer, b: Peer, nid: int, dialer: Peer | None = None) -> None:
        """Re-insert an edge from the store, keeping its NID and dial direction."""
        sa, sb = self._slot.get(a), self._slot.get(b)
        if a == b or sa is None or sb is None or self._pos(sa, sb) >= 0:
            return
        if not 1 <= nid <= MAX_NID or self.peer_by_nid(a, nid) or self.peer_by_nid(b, nid):
            return
        need = max(self._deg[sa], self._deg[sb]) + 1
        if need > self._width:
            self._widen(need)
        self._link(sa, sb, nid)
        # Both ends knew it before the restart: usable at once.
        i, j = self._pos(sa, sb), self._pos(sb, sa)
        self._flags[i] = _TOLD | _READY | (_DIALS if dialer == a else 0)
        self._flags[j] = _TOLD | _READY | (_DIALS if dialer == b else 0)

    # ------------------------------------------------------------------ internals
    def _insert(self, peer: Peer, seq: int) -> None:
        if self._free:
            s = self._free.pop()
        else:
            s = len(self._peers)
            self._peers.append(None)
            w = self._width
            self._nbr.extend(_FILL * w)
            self._nid.extend(_ZERO * w)
            self._flags.extend(bytes(w))
            for column in (self._deg, self._bucket_pos):
                column.append(0)
            self._seq.append(0)
            self._load.append(0.0)
            self._load_at.append(0.0)
        self._peers[s] = peer
        self._slot[peer] = s
        self._deg[s] = 0
        self._seq[s] = seq
        self._top_seq = max(self._top_seq, seq)
        self._load[s] = 0.0
        self._bucket_add(s)
        self.version += 1

    def _widen(self, width: int) -> None:
        """Give every peer ``width`` neighbour slots (a restore brought a bigger degree)."""
        old = self._width
        pad = width - old
        nbr, nid, flags = array("i"), array("i"), bytearray()
        for s in range(len(self._peers)):
            nbr.extend(self._nbr[s * old : (s + 1) * old])
            nbr.extend(_FILL * pad)
            nid.extend(self._nid[s * old : (s + 1) * old])
            nid.extend(_ZERO * pad)
            flags.extend(self._flags[s * old : (s + 1) * old])
            flags.extend(bytes(pad))
        self._nbr, self._nid, self._flags, self._width = nbr, nid, flags, width

    def _bucket_add(self, s: int) -> None:
        bucket = self._buckets[min(self._deg[s], self.max_neighbours)]
        self._bucket_pos[s] = len(bucket)
        bucket.append(s)

    def _bucket_remove(self, s: int) -> None:
        bucket = self._buckets[min(self._deg[s], self.max_neighbours)]
        i = self._bucket_pos[s]
        last = bucket.pop()
        if last != s:
            bucket[i] = last
            self._bucket_pos[last] = i

    def _new_nid(self, sa: int, sb: int) -> int:
        """A random NID (uniform in 1 .. MAX_NID) neither end uses yet."""
        w, nids, deg = self._width, self._nid, self._deg
        while True:
            nid = self._rng.randint(1, MAX_NID)
            if (
                nid not in nids[sa * w : sa * w + deg[sa]]
                and nid not in nids[sb * w : sb * w + deg[sb]]
            ):
                return nid

    def _link(self, sa: int, sb: int, nid: int) -> None:
        self._bucket_remove(sa)
        self._bucket_remove(sb)
        w, deg, nbr, nids, flags = self._width, self._deg, self._nbr, self._nid, self._flags
        i, j = sa * w + deg[sa], sb * w + deg[sb]
        nbr[i], nids[i], flags[i], deg[sa] = sb, nid, 0, deg[sa] + 1
        nbr[j], nids[j], flags[j], deg[sb] = sa, nid, 0, deg[sb] + 1
        self._bucket_add(sa)
        self._bucket_add(sb)
        self.version += 1

    def _unlink(self, a: Peer, b: Peer) -> int:
        sa, sb = self._slot[a], self._slot[b]
        self._bucket_remove(sa)
        self._bucket_remove(sb)
        nid = self._cut(sa, sb)
        self._bucket_add(sa)
        self._bucket_add(sb)
        return nid

    def _cut(self, sa: int, sb: int) -> int:
        """Remove edge ``sa - sb`` from both rows (not from the degree buckets); its NID."""
        nid = self._nid[self._pos(sa, sb)]
        for s, other in ((sa, sb), (sb, sa)):
            i = self._pos(s, other)
            last = s * self._width + self._deg[s] - 1
            # The last neighbour takes the freed place: a peer's neighbours stay in front.
            self._nbr[i], self._nid[i], self._flags[i] = (
                self._nbr[last],
                self._nid[last],
                self._flags[last],
            )
            self._nbr[last], self._nid[last], self._flags[last] = -1, 0, 0
            self._deg[s] -= 1
        self.version += 1
        return nid

    def _avoid(self, a: Peer, b: Peer) -> None:
        """Keep ``a`` and ``b`` apart for AVOID_PAIR_SECONDS; forget expired and excess pairs."""
        now = self._clock()
        avoided = self._avoided
        while avoided and next(iter(avoided.values())) <= now:
            avoided.popitem(last=False)
        key = frozenset((a, b))
        avoided.pop(key, None)
        avoided[key] = now + AVOID_PAIR_SECONDS
        while len(avoided) > MAX_AVOIDED:
            avoided.popitem(last=False)

    def _connect(self, a: Peer, b: Peer, changes: Changes) -> None:
        sa, sb = self._slot[a], self._slot[b]
        nid = self._new_nid(sa, sb)
        self._link(sa, sb, nid)
        # :meth:`dialer` of an edge neither end was told of yet, without its searches.
        closed = self.closed
        if (a in closed) != (b in closed):
            dialer = a if a in closed else b
        else:
            dialer = a if self._seq[sa] > self._seq[sb] else b
        changes.added.append(Edge(a, b, nid, dialer))

    def _fill(self, peer: Peer) -> Changes:
        """Give ``peer`` neighbours until it reaches the minimum (or nobody is left)."""
        changes = Changes()
        while self.degree(peer) < self.min_neighbours:
            other = self._pick_open(peer)
            if other is not None:
                self._connect(peer, other, changes)
                continue
            if self.degree(peer) + 2 > self.max_neighbours or not self._split(peer, changes):
                break
        return changes

    def _excluded(self, peer: Peer, s: int, cand: int) -> bool:
        """Whether slot ``cand`` may not become a neighbour of ``peer`` (slot ``s``)."""
        return (
            cand == s
            or self._pos(s, cand) >= 0
            or self.avoided(peer, self._peers[cand])
            or self._peers[cand] in self.closed
        )

    def _pick_open(self, peer: Peer) -> Peer | None:
        """A random peer below the maximum degree, weighted by its free slots (max - degree),
        that is neither ``peer``'s neighbour nor avoided by it."""
        s = self._slot[peer]
        top = self.max_neighbours
        sizes = [len(self._buckets[d]) for d in range(top)]
        if sum(sizes) <= SMALL_OPEN_SET:
            # Few open peers (the usual case once the network is saturated): look at all.
            open_peers = [
                (c, top - d)
                for d in range(top)
                if sizes[d]
                for c in self._buckets[d]
                if not self._excluded(peer, s, c)
            ]
            if len(open_peers) <= 1:  # nothing to draw (the saturated network's usual case)
                return self._peers[open_peers[0][0]] if open_peers else None
            picked = self._rng.choices([c for c, _ in open_peers], [w for _, w in open_peers])[0]
            return self._peers[picked]
        # Many open peers: ``peer``, its few neighbours and the few it avoids are rarely
        # drawn, so sample (bounded: a peer may avoid many).
        weights = [n * (top - d) for d, n in enumerate(sizes)]
        total = sum(weights)
        for _ in range(OPEN_PICK_ATTEMPTS):
            bucket = self._buckets[_weighted_index(weights, self._rng.random() * total)]
            cand = bucket[int(self._rng.random() * len(bucket))]
            if not self._excluded(peer, s, cand):
                return self._peers[cand]
        return None

    def _split(self, peer: Peer, changes: Changes) -> bool:
        """Replace a random edge ``u - v`` by ``u - peer - v``; degrees of u and v stay."""
        s = self._slot[peer]
        for _ in range(PICK_ATTEMPTS):
            if len(self._slot) < 3:
                return False
            su = int(self._rng.random() * len(self._peers))
            u = self._peers[su]
            if u is None or su == s or self._pos(s, su) >= 0 or not self._deg[su]:
                continue
            base = su * self._width
            sv = self._nbr[base + int(self._rng.random() * self._deg[su])]
            v = self._peers[sv]
            if sv == s or self._pos(s, sv) >= 0 or self.avoided(peer, u) or self.avoided(peer, v):
                continue
            if u in self.closed or v in self.closed:
                continue
            self._unlink(u, v)
            changes.removed.append((u, v))
            self._connect(peer, u, changes)
            self._connect(peer, v, changes)
            return True
        return False


def _own_copies(peers: Sequence[Peer]) -> Sequence[Peer]:
    """Fresh copies of a restore's identities (``bytes`` of one length), made in one
    run while the store's rows are still alive, so they lie together in memory.

    The originals were read from the store between each row's transient objects
    (keys, addresses, the row itself); kept, each would pin a pool of the small
    object allocator full of freed neighbours once the rows go (~500 B a peer at
    10^6, measured), whereas the copies leave those pools, and their arenas, wholly
    free to be returned to the system."""
    if set(map(type, peers)) != {bytes} or len(set(map(len, peers))) != 1:  # type: ignore[arg-type]
        return peers
    size = len(peers[0])  # type: ignore[arg-type]
    blob = b"".join(peers)  # type: ignore[arg-type]
    return [blob[i : i + size] for i in range(0, len(blob), size)]


_FILL = array("i", [-1])
#: A stored edge's flags as restored: told and settled; who dials is kept.
_RESTORED_FLAGS = bytes(f & _DIALS | _TOLD | _READY for f in range(256))
_ZERO = array("i", [0])
#: ``bytes.translate`` table: a flags byte -> 1 if the edge is settled, else 0.
_SETTLED = bytes(1 if f & _READY else 0 for f in range(256))


class SettledView:
    """A :class:`anomos.interfaces.PeerGraphView` of a :class:`PeerGraph`, settled edges only.

    With an ``origin`` (the downloader a circuit starts from), the origin's own
    edges count as soon as it has been told of them: it waits for the link to its
    first hop itself, so a new peer's download need not wait for its edges to settle.
    """

    def __init__(self, graph: PeerGraph, origin: Peer | None = None) -> None:
        self.graph = graph
        self.origin = origin
        self.first_hops = graph.told_neighbours(origin) if origin is not None else set()

    def usable(self, a: Peer, b: Peer) -> bool:
        """Whether a circuit may cross edge ``a - b``."""
        if self.origin in (a, b):
            other = b if a == self.origin else a
            if other in self.first_hops:
                return True
        return self.graph.settled(a, b)

    def neighbours(self, peer: Peer) -> set[Peer]:
        settled = self.graph.settled_neighbours(peer)
        if peer == self.origin:
            return settled | self.first_hops
        if peer in self.first_hops:
            return settled | {self.origin}
        return settled

    def load(self, peer: Peer) -> float:
        return self.graph.load(peer)

    def distances(self, root: Peer, depth: int, allowed: Any = None) -> dict[Peer, int]:
        """Hop distances from ``root`` over usable edges, up to ``depth``, optionally only
        through ``allowed``: what :func:`_bfs` computes, over the graph's arrays."""
        g = self.graph
        keep: list[set[int] | None] | None = None
        if allowed is not None:
            slots = {s for p, s in g._slot.items() if p in allowed}
            keep = [slots] * (depth + 1)
        levels = self._levels(g._slot[root], depth, keep)
        peers = g._peers
        return {peers[s]: d for d, level in enumerate(levels) for s in level}

    def region(
        self, start: Peer, end: Peer, max_edges: int, without: Peer | None = None
    ) -> dict[Peer, int] | None:
        """:func:`search_region` over the graph's arrays (the bulk of a path search), in
        slots until the answer; ``without`` is a peer no walk may cross.

        One search around ``start`` to ``ceil(L/2)`` hops, then one from ``end`` that
        keeps, at distance ``k``, only nodes at most ``L - k`` from ``start`` (known
        exactly inside the first ball, and more than its radius outside it, so beyond
        ``L - ceil(L/2) - 1`` hops from ``end`` such nodes are dropped): exactly the
        nodes some walk of at most ``L`` edges can use. Every node on such a node's
        shortest way to ``end`` qualifies too, so the distances are exact; and the
        search looks at the few nodes between the two ends, not a whole region.
        """
        slot = self.graph._slot
        s0, s1 = slot[start], slot[end]
        hidden = {slot[without]} if without in slot else set()
        if s0 in hidden or s1 in hidden:
            return None
        half = (max_edges + 1) // 2
        upto: list[set[int]] = list(
            itertools.accumulate(self._levels(s0, half, None, hidden), operator.or_)
        )
        keep: list[set[int] | None] = [
            None if half + 1 + k <= max_edges else upto[min(max_edges - k, len(upto) - 1)]
            for k in range(max_edges + 1)
        ]
        levels = self._levels(s1, max_edges, keep, hidden)
        if not any(s0 in level for level in levels):
            return None
        peers = self.graph._peers
        return {peers[s]: d for d, level in enumerate(levels) for s in level}

    def _levels(
        self,
        root: int,
        depth: int,
        keep: list[set[int] | None] | None = None,
        hidden: set[int] | None = None,
    ) -> list[set[int]]:
        """Slots by hop distance from slot ``root`` over usable edges, up to ``depth``;
        at distance ``d`` only those in ``keep[d]`` (when it is not None), never ``hidden``.

        Level by level with set operations: each node costs a few C calls (its row of
        neighbour slots, filtered by the settled flag with ``bytes.translate`` and
        ``itertools.compress``); free slots of a row have no flags, so the whole row is
        read without looking up the degree.
        """
        g = self.graph
        nbr, flags, width = g._nbr, g._flags, g._width
        origin = g._slot.get(self.origin, -1) if self.origin is not None else -1
        hops = {g._slot[p] for p in self.first_hops if p in g._slot} if origin >= 0 else set()
        seen = {root}
        if hidden:
            seen |= hidden
        levels = [{root}]
        for d in range(1, depth + 1):
            frontier = levels[-1]
            found: list[int] = []
            for node in frontier:
                base = node * width
                row = nbr[base : base + width]
                found.extend(
                    itertools.compress(row, flags[base : base + width].translate(_SETTLED))
                )
            nxt = set(found)
            if origin >= 0:
                if origin in frontier:
                    nxt |= hops
                if not hops.isdisjoint(frontier):
                    nxt.add(origin)
            nxt -= seen
            if keep is not None and (allowed := keep[d]) is not None:
                nxt &= allowed
            if not nxt:
                break
            seen |= nxt
            levels.append(nxt)
        return levels

    def __contains__(self, peer: object) -> bool:
        return peer in self.graph

    def __len__(self) -> int:
        return len(self.graph)


def _weighted_index(weights: list[int], r: float) -> int:
    """The index ``r`` (in ``[0, sum(weights))``) falls into."""
    for i, w in enumerate(weights):
        if r < w:
            return i
        r -= w
    return len(weights) - 1


# ---------------------------------------------------------------------------- path search


def check_relay_bounds(min_relays: int, max_relays: int) -> None:
    """Refuse relay counts a tracking code cannot carry or that give no anonymity."""
    if not 1 <= min_relays <= max_relays <= MAX_RELAYS:
        raise ConfigError(f"relays {min_relays}-{max_relays}: need 1 <= MIN <= MAX <= {MAX_RELAYS}")


def _bfs(graph: Any, root: Peer, depth: int, allowed: Any = None) -> dict[Peer, int]:
    """Hop distances from ``root`` up to ``depth``, optionally only through ``allowed``."""
    fast = getattr(graph, "distances", None)
    if fast is not None:
        return fast(root, depth, allowed)  # type: ignore[no-any-return]
    dist = {root: 0}
    frontier = [root]
    for d in range(1, depth + 1):
        nxt = []
        for node in frontier:
            for n in graph.neighbours(node):
                if n not in dist and (allowed is None or n in allowed):
                    dist[n] = d
                    nxt.append(n)
        if not nxt:
            break
        frontier = nxt
    return dist


def search_region(graph: Any, start: Peer, end: Peer, max_edges: int) -> dict[Peer, int] | None:
    """Distances to ``end`` of every node that lies on some walk of at most
    ``max_edges`` edges from ``start`` to ``end``; ``None`` when there is none.

    Meet in the middle: any node of such a walk is within ``ceil(L/2)`` of
    ``start`` or within ``floor(L/2)`` of ``end``, so two small searches bound
    the region, and a third, inside it, gives exact distances to ``end``.
    A graph with a ``region`` method (:class:`SettledView`) computes it itself.
    """
    if start == end or start not in graph or end not in graph or max_edges < 1:
        return None
    fast = getattr(graph, "region", None)
    if fast is not None:
        return fast(start, end, max_edges)  # type: ignore[no-any-return]
    near_start = _bfs(graph, start, (max_edges + 1) // 2)
    near_end = _bfs(graph, end, max_edges // 2)
    if not any(n in near_start and near_start[n] + d <= max_edges for n, d in near_end.items()):
        return None
    region = near_start.keys() | near_end.keys()
    dist = _bfs(graph, end, max_edges, region)
    d0 = dist.get(start)
    if d0 is None or d0 > max_edges:
        return None
    return dist


def random_path(
    graph: Any,
    start: Peer,
    end: Peer,
    relays: int,
    rng: random.Random,
    *,
    region: dict[Peer, int] | None = None,
    weight: Callable[[Peer], float] | None = None,
    budget: int = MAX_EXPANSIONS,
) -> list[Peer] | None:
    """A random simple path ``[start, r1 .. r_relays, end]`` along edges, or ``None``.

    A depth-first walk from ``start`` that only steps to unvisited nodes from
    which ``end`` is reachable in the edges left; each step draws the next node
    at random (with probability proportional to ``weight`` when given) and
    backtracks on dead ends, expanding at most ``budget`` nodes.
    """
    edges = relays + 1
    if region is None:
        region = search_region(graph, start, end, edges)
    if region is None or region.get(start, edges + 1) > edges:
        return None
    path = [start]
    visited = {start}
    stack = [_candidates(graph, start, end, edges, region, visited, rng, weight)]
    expansions = 0
    while stack:
        options = stack[-1]
        if not options:
            stack.pop()
            visited.discard(path.pop())
            continue
        node = options.pop()
        path.append(node)
        if node == end:
            return path
        visited.add(node)
        expansions += 1
        if expansions > budget:
            return None
        remaining = edges - (len(path) - 1)
        stack.append(_candidates(graph, node, end, remaining, region, visited, rng, weight))
    return None


def _candidates(
    graph: Any,
    node: Peer,
    end: Peer,
    remaining: int,
    region: dict[Peer, int],
    visited: set[Peer],
    rng: random.Random,
    weight: Callable[[Peer], float] | None,
) -> list[Peer]:
    """Next steps from ``node`` with ``remaining`` edges to go, in pop order (last first)."""
    if remaining == 1:
        return [end] if end in graph.neighbours(node) else []
    opts = [
        n
        for n in graph.neighbours(node)
        if n != end and n not in visited and region.get(n, remaining) <= remaining - 1
    ]
    if weight is None:
        rng.shuffle(opts)
        return opts
    # Efraimidis-Spirakis: a weighted random permutation; heaviest key popped first.
    keyed = [(rng.random() ** (1.0 / max(weight(n), 1e-9)), n) for n in opts]
    keyed.sort(key=lambda kn: kn[0])
    return [n for _, n in keyed]
