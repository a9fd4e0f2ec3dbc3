"""Turning a download request into circuits: sources, paths, tracking codes, sealed requests.

The downloader receives, per circuit, only the NID of its first hop, an opaque
tracking code, the per-hop layer keys and a request sealed to the source: never
who or where the source is. The relays are charged with load so later paths
avoid them while they are busy.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import attrs

from anomos.interfaces import CipherSuite, PathPolicy
from anomos.protocol.onion import MAX_HOPS, Hop, build_tracking_code, current_epoch
from anomos.protocol.request import SourceRequest, seal_request
from anomos.tracker.client import CircuitPlan
from anomos.tracker.graph import PeerGraph

#: Seconds a sealed request stays valid at the source.
REQUEST_TTL = 300
#: Sources tried per circuit asked for, beyond which a request gives up (bounds the CPU
#: one request can cost in a big, sparse graph where most sources are out of reach).
SOURCE_TRIES_PER_CIRCUIT = 8
#: Sources tried at least, however few circuits are asked for.
MIN_SOURCE_TRIES = 16


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
    sources = [p for p, left in swarm.items() if p != downloader and (left == 0 or left < size)]
    rng.shuffle(sources)
    return sources


@attrs.define(eq=False)
class Planner:
    """Plans circuits over ``graph`` with one path policy and one cipher suite."""

    graph: PeerGraph
    policy: PathPolicy
    suite: CipherSuite
    #: peer -> its public keys (the tracker's live peer table).
    keys: Callable[[Hashable], PeerKeys]
    rng: random.Random = attrs.field(factory=random.SystemRandom)
    clock: Callable[[], float] = time.time
    #: Circuits planned since start (for /stats).
    planned: int = 0

    def plan(
        self, downloader: Hashable, infohash: bytes, sources: list[Hashable], count: int
    ) -> list[CircuitPlan]:
        """Up to ``count`` circuits from ``downloader`` to distinct ``sources`` (tried in order)."""
        plans: list[CircuitPlan] = []
        if downloader not in self.graph:
            return plans
        tries = max(MIN_SOURCE_TRIES, SOURCE_TRIES_PER_CIRCUIT * count)
        for source in sources[:tries]:
            if len(plans) >= count:
                break
            if source == downloader or source not in self.graph:
                continue
            path = self.policy.find_path(self.graph, downloader, source, self.rng)
            if not path or not self._valid(path, downloader, source):
                continue
            plans.append(self.circuit(path, infohash))
        return plans

    def _valid(self, path: list[Any], downloader: Hashable, source: Hashable) -> bool:
        """A plugin's path is checked, not trusted: simple, along edges, at least one relay."""
        if path[0] != downloader or path[-1] != source or len(path) < 3:
            return False
        if len(set(path)) != len(path) or len(path) - 1 > MAX_HOPS:
            return False
        try:
            for a, b in itertools.pairwise(path):
                self.graph.nid(a, b)
        except KeyError:
            return False
        return True

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
        blob = seal_request(request, self.keys(source).box)
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
        )
