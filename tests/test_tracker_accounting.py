"""Receipt baselines in accounting.py, over the packed table: a sender is credited only
for what it sent since the baseline it has itself."""

from __future__ import annotations

import random

from anomos.tracker.accounting import Accounting
from anomos.tracker.graph import PeerGraph
from anomos.tracker.requests import AnnounceRequest
from anomos.tracker.store import Account, Batch

R, S1, S2 = b"r" * 32, b"s" * 32, b"t" * 32


class _Ratio:
    def ratio(self, uploaded: int, downloaded: int, relayed: int) -> float:
        return float("inf")


def _announce(receipts: dict[int, int], session: bytes = b"one") -> AnnounceRequest:
    return AnnounceRequest(session, b"o" * 32, b"b" * 32, "10.0.0.1:1", 0, False, {}, [], receipts)


def _setup() -> tuple[PeerGraph, Accounting]:
    g = PeerGraph(min_neighbours=1, max_neighbours=3, rng=random.Random(1))
    for seq, p in enumerate((R, S1, S2), 1):
        g.restore_peer(p, seq)
    return g, Accounting(_Ratio(), g, min_ratio=0, ratio_grace=0)  # type: ignore[arg-type]


def test_receipts_credit_the_increase_per_sender_and_a_new_sender_at_an_old_nid_afresh():
    g, acc = _setup()
    g.restore_edge(R, S1, 7)
    acc.announce(R, _announce({7: 1000}), Batch())  # a new session: counted from zero
    assert acc.accounts[S1].relayed_confirmed == 1000
    acc.announce(R, _announce({7: 1500}), Batch())
    assert acc.accounts[S1].relayed_confirmed == 1500  # only the 500 more
    # The edge goes and another peer gets the same NID: its counter began at zero, so
    # all of it is its own, not the increase over S1's baseline.
    g._unlink(R, S1)  # no top-up: the next edge is made by hand, with that NID
    g.restore_edge(R, S2, 7)
    assert g.peer_by_nid(R, 7) == S2
    acc.announce(R, _announce({7: 1800}), Batch())
    assert acc.accounts[S2].relayed_confirmed == 1800
    assert acc.accounts[S1].relayed_confirmed == 1500


def test_baselines_picked_up_mid_session_credit_nothing_at_first():
    g, acc = _setup()
    g.restore_edge(R, S1, 7)
    acc.accounts[R] = Account(session=b"one")  # as restored from the store after a restart
    acc.announce(R, _announce({7: 1000}), Batch())
    assert S1 not in acc.accounts or acc.accounts[S1].relayed_confirmed == 0
    acc.announce(R, _announce({7: 1600}), Batch())
    assert acc.accounts[S1].relayed_confirmed == 600
