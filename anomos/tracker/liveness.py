"""Which peers are still there: silence past the expiry, and neighbours' reports.

The tracker learns that a peer is gone in two ways: it stops announcing (it
is expired after ``EXPIRY_INTERVALS`` intervals), or its neighbours report
their links to it lost. One report only takes the edge out of planning (a
circuit over it would fail); enough reporters drop the peer. A report older
than the peer's own last announce is void (it came back since), and so is
every report once the peer speaks again. A neighbour reported
``unreachable`` (never linked: a firewall, a partition) is not suspected at
all: only that one edge is replaced, a few per announce and within the
reporter's allowance (:class:`anomos.tracker.limits.Limits`). This module
decides; the orchestrator (:mod:`anomos.tracker.server`) acts on each verdict
before the next report is judged.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from anomos.tracker.graph import PeerGraph
from anomos.tracker.limits import Limits
from anomos.tracker.store import PeerRow
from anomos.tracker.tables import PeerTable

log = logging.getLogger(__name__)

#: A peer silent for this many intervals is expired.
EXPIRY_INTERVALS = 3
#: Distinct neighbours that must report a peer lost before it is dropped (fewer
#: if it has fewer neighbours); one report only stops planning over that edge.
LOST_REPORTS_TO_DROP = 2
#: Edges one announce may have replaced by reporting neighbours "unreachable" (more
#: are ignored), so that one peer cannot churn the graph fast.
UNREACHABLE_PER_ANNOUNCE = 2


class Verdict(enum.Enum):
    """What to do about one reported neighbour."""

    #: Replace the edge between reporter and neighbour (``unreachable``).
    REPLACE = "replace"
    #: Suspected: the edge is out of planning; wait for another reporter.
    SUSPECT = "suspect"
    #: Enough neighbours lost it: drop the peer.
    DROP = "drop"


class Liveness:
    """Last-seen order of the live peers, and the lost reports against them."""

    def __init__(self, graph: PeerGraph, limits: Limits, peers: PeerTable) -> None:
        self.graph = graph
        self.limits = limits
        #: live peers; the expiry order is a scan of their last-seen column
        self.peers = peers
        #: peer -> neighbours that reported it lost since it last announced -> when
        self.reports: dict[bytes, dict[bytes, float]] = {}

    def spoke(self, peer: bytes, now: float) -> None:
        """``peer`` announced: it is alive, earlier reports of it being lost are void."""
        self.reports.pop(peer, None)
        self.peers.seen(peer, now)

    def forget(self, peer: bytes) -> None:
        self.reports.pop(peer, None)

    def silent_since(self, deadline: float) -> Iterator[bytes]:
        """Peers not seen since ``deadline``, longest silent first (each still silent
        and live when its turn comes)."""
        for peer in self.peers.silent_since(deadline):
            if peer in self.peers and self.peers.last_seen(peer) < deadline:
                yield peer

    def judge(
        self,
        peer: bytes,
        lost: list[tuple[int, int, str]],
        now: float,
        peers: Mapping[bytes, PeerRow],
        network: str | None,
    ) -> Iterator[tuple[bytes, Verdict]]:
        """``peer`` lost its links to these NIDs: a verdict per neighbour that counts,
        judged one at a time (the graph may change between two)."""
        replaced = 0
        for nid, age_ms, why in lost:
            other: Any = self.graph.peer_by_nid(peer, nid)
            row = peers.get(other) if other is not None else None
            if other is None or row is None:
                continue
            if why == "unreachable":
                if replaced >= UNREACHABLE_PER_ANNOUNCE or not self.limits.replacement_allowed(
                    peer, network
                ):
                    log.info(
                        "peer %s reports neighbour %s unreachable: over %d per announce "
                        "or its allowance, ignored",
                        peer.hex()[:16],
                        other.hex()[:16],
                        UNREACHABLE_PER_ANNOUNCE,
                    )
                    continue
                replaced += 1
                yield other, Verdict.REPLACE
                continue
            if row.last_seen >= now - age_ms / 1000.0:
                continue
            self.graph.unsettle(peer, other)
            reporters = self.reports.setdefault(other, {})
            reporters[peer] = now
            log.info(
                "peer %s reports neighbour %s: %s (%d report(s))",
                peer.hex()[:16],
                other.hex()[:16],
                why,
                len(reporters),
            )
            if len(reporters) >= min(LOST_REPORTS_TO_DROP, self.graph.degree(other)):
                yield other, Verdict.DROP
            else:
                yield other, Verdict.SUSPECT
