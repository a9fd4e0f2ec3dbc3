"""Turning a download request into circuits: sources, paths, tracking codes, sealed requests.

The downloader receives, per circuit, only the NID of its first hop, an opaque
tracking code, the per-hop layer keys and a request sealed to the source: never
who or where the source is. The relays are charged with load so later paths
avoid them while they are busy.
"""

from __future__ import annotations

import itertools
import logging
import random
import secrets
import struct
import time
from collections.abc import Callable, Collection, Container, Hashable, Iterator, Mapping
from typing import Any

import attrs
import nacl.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from anomos.interfaces import CipherSuite, PathPolicy
from anomos.protocol.onion import MAX_HOPS, Hop, build_tracking_code, current_epoch
from anomos.protocol.request import SourceRequest, seal_request
from anomos.tracker.client import SOURCE_TAG_SIZE, CircuitPlan
from anomos.tracker.graph import IndexedSet, PeerGraph, SettledView
from anomos.tracker.store import SwarmRow

log = logging.getLogger(__name__)

#: Seconds a sealed request stays valid at the source.
REQUEST_TTL = 300
#: Sources tried per circuit asked for, beyond which a request gives up (bounds the CPU
#: one request can cost in a big, sparse graph where most sources are out of reach).
SOURCE_TRIES_PER_CIRCUIT = 8
#: Sources tried at least, however few circuits are asked for.
MIN_SOURCE_TRIES = 16
#: Sources looked for near the downloader per circuit asked for (then the search stops).
NEAR_SOURCES_PER_CIRCUIT = 2
#: Peers the search around a downloader looks at, at most.
NEAR_BUDGET = 20_000
#: Seconds a source tag is honoured in ``avoid`` (a magnet's metadata fetch, which
#: hands them back, takes minutes at most).
SOURCE_TAG_TTL = 3600


@attrs.frozen
class PeerKeys:
    """The public keys the planner needs of a hop."""

    onion: bytes
    box: bytes


def candidate_sources(
    swarm: Mapping[Any, int], size: int, downloader: Hashable, rng: random.Random
) -> list[Hashable]:
    """Peers of ``swarm`` (peer -> bytes left) that have something, in random order.

    ``size`` is the largest ``left`` ever reported for the torrent: a peer
    with less left than that has at least one piece; a seed has nothing left.
    """
    sources = [p for p, left in swarm.items() if p != downloader and _has_data(left, size)]
    rng.shuffle(sources)
    return sources


def _has_data(left: int, size: int) -> bool:
    return left == 0 or left < size


class Swarm:
    """The peers of one torrent, with the ones that have data indexed for O(k) sampling.

    A downloader's request must not cost O(swarm size): sources are drawn at
    random from an index kept up to date on each announce. Only when the
    torrent's apparent size grows (a new largest ``left``) is the index rebuilt.
    Each member costs one dict entry (its ``left``): the counters it reports are
    kept in its account (``Account.reports``), not here.
    """

    def __init__(self) -> None:
        #: peer -> bytes it has left
        self._left: dict[Hashable, int] = {}
        self.size = 0
        self._sources = IndexedSet()

    @property
    def rows(self) -> Mapping[Hashable, SwarmRow]:
        """The members as rows (a live read-only view: ``left`` only)."""
        return _Rows(self._left)

    def __len__(self) -> int:
        return len(self._left)

    def __contains__(self, peer: object) -> bool:
        return peer in self._left

    def set(self, peer: Hashable, row: SwarmRow) -> None:
        self._left[peer] = row.left
        if row.left > self.size:
            self.size = row.left
            self._sources = IndexedSet()
            for p, left in self._left.items():
                if _has_data(left, self.size):
                    self._sources.add(p)
        elif _has_data(row.left, self.size):
            self._sources.add(peer)
        else:
            self._sources.discard(peer)

    def lefts(self) -> dict[Hashable, int]:
        """peer -> bytes left, a copy (made at C level: the store's image packs it)."""
        return self._left.copy()

    def load(self, lefts: Mapping[Any, int]) -> None:
        """Restore an empty swarm: its members at once (peer -> bytes left)."""
        if self._left:
            raise ValueError("Swarm.load needs an empty swarm")
        self._left = dict(lefts)
        self.size = size = max(self.size, max(self._left.values(), default=0))
        add = self._sources.add
        for peer in [p for p, left in self._left.items() if left == 0 or left < size]:
            add(peer)  # (those with data: _has_data)

    def remove(self, peer: Hashable) -> None:
        self._left.pop(peer, None)
        self._sources.discard(peer)

    def is_source(self, peer: Hashable) -> bool:
        return peer in self._sources

    def sources(self) -> Container[Hashable]:
        """The peers with data, for membership tests (a live view)."""
        return self._sources.members()

    def source_count(self) -> int:
        return len(self._sources)

    def sample_sources(self, k: int, exclude: Hashable, rng: random.Random) -> list[Hashable]:
        """Up to ``k`` distinct random peers with data, never ``exclude``."""
        n = len(self._sources)
        if n <= 2 * k + 1:
            picked = [p for p in self._sources if p != exclude]
            rng.shuffle(picked)
            return picked[:k]
        picked = [self._sources[i] for i in rng.sample(range(n), k + 1)]
        return [p for p in picked if p != exclude][:k]


class _Rows(Mapping[Hashable, SwarmRow]):
    """A swarm's members as :class:`SwarmRow` values, made on demand from ``left``."""

    __slots__ = ("_left",)

    def __init__(self, left: dict[Hashable, int]) -> None:
        self._left = left

    def __getitem__(self, peer: Hashable) -> SwarmRow:
        return SwarmRow(self._left[peer])

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._left)

    def __len__(self) -> int:
        return len(self._left)


def valid_path(path: list[Any], downloader: Hashable, source: Hashable, view: SettledView) -> bool:
    """A plugin's path is checked, not trusted: simple, along settled edges, with a relay.

    One rule for the planner and for ``anomos paths`` (anomos.tracker.simulate),
    so a policy is judged in simulation exactly as the tracker would judge it.
    """
    if path[0] != downloader or path[-1] != source or len(path) < 3:
        return False
    if len(set(path)) != len(path) or len(path) - 1 > MAX_HOPS:
        return False
    try:
        return all(view.usable(a, b) for a, b in itertools.pairwise(path))
    except KeyError:
        return False


#: A source tag's plaintext: the source's and the expiry (Unix seconds).
_TAG_BODY = struct.Struct(">QQ")
_TAG_NONCE = 12
assert _TAG_NONCE + _TAG_BODY.size + 16 == SOURCE_TAG_SIZE


@attrs.define(eq=False)
class SourceTags:
    """Names of a plan's source that only this tracker can read (``CircuitPlan.source_tag``).

    A downloader hands back the tags of sources that lied to it (``avoid`` in a
    circuit request) and is planned no circuit to them for that torrent again, while
    it learns nothing of who they are: a tag is the source's join number and an
    expiry under ChaCha20-Poly1305 with a fresh nonce, so two tags of one source look
    unrelated, and bound (associated data) to the downloader and the infohash, so a
    tag is worth nothing to anyone else or for another torrent. The key lives in this
    process only: after a restart old tags are ignored (a liar may be planned once more).
    """

    clock: Callable[[], float] = time.time
    _aead: ChaCha20Poly1305 = attrs.field(
        factory=lambda: ChaCha20Poly1305(ChaCha20Poly1305.generate_key()), init=False
    )

    def seal(self, downloader: int, infohash: bytes, source: int) -> bytes:
        """The tag of ``source`` for ``downloader`` (both join numbers) and ``infohash``."""
        nonce = secrets.token_bytes(_TAG_NONCE)
        body = _TAG_BODY.pack(source, int(self.clock()) + SOURCE_TAG_TTL)
        return nonce + self._aead.encrypt(nonce, body, _tag_context(downloader, infohash))

    def open(self, downloader: int, infohash: bytes, tags: Collection[bytes]) -> frozenset[int]:
        """The sources (join numbers) named by those of ``tags`` that are this tracker's,
        for this downloader and torrent, and not expired; the others are ignored."""
        context, now = _tag_context(downloader, infohash), self.clock()
        sources = set()
        for tag in tags:
            try:
                body = self._aead.decrypt(tag[:_TAG_NONCE], tag[_TAG_NONCE:], context)
            except (InvalidTag, ValueError):
                continue
            source, expires = _TAG_BODY.unpack(body)
            if now <= expires:
                sources.add(source)
        return frozenset(sources)


def _tag_context(downloader: int, infohash: bytes) -> bytes:
    return b"anomos source tag v1\x00" + downloader.to_bytes(8, "big") + infohash


@attrs.define(eq=False)
class Planner:
    """Plans circuits over ``graph`` with one path policy and one cipher suite."""

    graph: PeerGraph
    policy: PathPolicy
    suite: CipherSuite
    #: peer -> its public keys (the tracker's live peer table).
    keys: Callable[[Hashable], PeerKeys]
    #: The tracker's long-term key: it signs every sealed request (sources check it).
    tracker_key: ec.EllipticCurvePrivateKey = attrs.field(kw_only=True, repr=False)
    rng: random.Random = attrs.field(factory=random.SystemRandom)
    clock: Callable[[], float] = time.time
    #: Circuits planned since start (for /stats).
    planned: int = 0
    tags: SourceTags = attrs.field(
        default=attrs.Factory(lambda self: SourceTags(self.clock), takes_self=True), init=False
    )

    def avoided(
        self, downloader: Hashable, infohash: bytes, tags: Collection[bytes]
    ) -> frozenset[int]:
        """The sources (join numbers) ``downloader`` asks not to be planned to again."""
        if not tags or downloader not in self.graph:
            return frozenset()
        return self.tags.open(self.graph.seq(downloader), infohash, tags)

    def plan(
        self,
        downloader: Hashable,
        infohash: bytes,
        sources: list[Hashable],
        count: int,
        avoid: Container[int] = frozenset(),
    ) -> list[CircuitPlan]:
        """Up to ``count`` circuits from ``downloader`` to distinct ``sources`` (tried in
        order), none to a source whose join number is in ``avoid``."""
        plans: list[CircuitPlan] = []
        if downloader not in self.graph:
            return plans
        view = self.graph.settled_view(downloader)
        for source in sources[: self.source_tries(count)]:
            if len(plans) >= count:
                break
            if source == downloader or source not in self.graph:
                continue
            if avoid and self.graph.seq(source) in avoid:
                continue
            path = self.policy.find_path(view, downloader, source, self.rng)
            if not path or not valid_path(path, downloader, source, view):
                continue
            try:
                plans.append(self.circuit(path, infohash))
            except (ValueError, nacl.exceptions.CryptoError) as exc:
                # A key the server let through but the crypto refuses: skip, never fail.
                log.warning("cannot plan a circuit to a source: %s", exc)
        return plans

    def sources(
        self,
        downloader: Hashable,
        swarm: Swarm,
        count: int,
        depth: int,
        avoid: Collection[int] = frozenset(),
    ) -> list[Hashable]:
        """Sources to try for ``count`` circuits: first a few within ``depth`` hops of the
        downloader (the only ones a path can reach), nearest first, then random ones;
        never one whose join number is in ``avoid``.

        Sampling the swarm blindly first would mostly draw sources out of reach in a
        big graph, each costing a failed path search; the search around the downloader
        stops as soon as it found enough.
        """
        tries = self.source_tries(count)
        if downloader not in self.graph:
            return []
        enough = NEAR_SOURCES_PER_CIRCUIT * count + len(avoid)
        near = self.graph.nearest(downloader, depth, NEAR_BUDGET, swarm.sources(), enough)
        if len(near) < tries + len(avoid):
            seen = set(near)
            drawn = swarm.sample_sources(tries + len(avoid), downloader, self.rng)
            near += [p for p in drawn if p not in seen]
        if avoid:
            near = [p for p in near if p not in self.graph or self.graph.seq(p) not in avoid]
        return near[:tries]

    @staticmethod
    def source_tries(count: int) -> int:
        """Sources worth trying for ``count`` circuits."""
        return max(MIN_SOURCE_TRIES, SOURCE_TRIES_PER_CIRCUIT * count)

    def circuit(self, path: list[Any], infohash: bytes) -> CircuitPlan:
        """The plan for ``path = [downloader, r1 .. rk, source]``."""
        hops = [
            Hop(self.keys(path[i]).onion, self.graph.nid(path[i], path[i + 1]))
            for i in range(1, len(path) - 1)
        ]
        source = path[-1]
        hops.append(Hop(self.keys(source).onion, None))
        code, layers = build_tracking_code(hops, current_epoch(self.clock()))
        material = self.suite.tracker_material()
        request = SourceRequest(
            infohash=infohash,
            suite=self.suite.name,
            material=material,
            expires=int(self.clock()) + REQUEST_TTL,
        )
        blob = seal_request(request, self.keys(source).box, self.tracker_key)
        for relay in path[1:-1]:
            self.graph.add_load(relay)
        self.planned += 1
        return CircuitPlan(
            first_nid=self.graph.nid(path[0], path[1]),
            tracking_code=code,
            layers=layers,
            request_blob=blob,
            suite=self.suite.name,
            material=material,
            source_tag=self.tags.seal(self.graph.seq(path[0]), infohash, self.graph.seq(source)),
        )
