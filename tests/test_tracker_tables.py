"""The tracker's compact per-peer containers behave as the dicts and sets they replace."""

from __future__ import annotations

import random
import sys

import pytest

from anomos.tracker.tables import Reports, TorrentsByPeer

IH = [bytes([i]) * 20 for i in range(8)]


def test_reports_behave_as_a_dict_through_random_operations():
    rng = random.Random(3)
    reports, model = Reports(), {}
    for _ in range(3000):
        ih = rng.choice(IH[:4])
        op = rng.random()
        if op < 0.5:
            counters = (rng.randrange(1 << 40), rng.randrange(1 << 40))
            reports[ih] = counters
            model[ih] = counters
        elif op < 0.8:
            if ih in model:
                del reports[ih]
                del model[ih]
            else:
                with pytest.raises(KeyError):
                    del reports[ih]
        elif op < 0.85:
            reports.clear()
            model.clear()
        assert reports == model
        assert len(reports) == len(model)
        assert sorted(reports) == sorted(model)
        assert reports.get(ih) == model.get(ih)
        assert (ih in reports) == (ih in model)
    with pytest.raises(KeyError):
        reports[b"\xff" * 20]


def test_one_report_is_smaller_than_a_dict_of_one():
    reports = Reports()
    reports[IH[0]] = (1, 2)
    assert sys.getsizeof(reports) < sys.getsizeof({IH[0]: (1, 2)}) + sys.getsizeof((1, 2))
    assert reports._more is None


def test_torrents_by_peer_behave_as_a_dict_of_sets_and_intern_infohashes():
    rng = random.Random(5)
    table, model = TorrentsByPeer(), {}
    peers = [bytes([p]) * 32 for p in range(6)]
    for _ in range(3000):
        peer = rng.choice(peers)
        # A new bytes object each time, as each announce decodes its own.
        ih = bytes(bytearray(rng.choice(IH)))
        op = rng.random()
        if op < 0.5:
            table.setdefault(peer, set()).add(ih)
            model.setdefault(peer, set()).add(ih)
        elif op < 0.85:
            table.get(peer, set()).discard(ih)
            model.get(peer, set()).discard(ih)
        else:
            table.pop(peer, None)
            model.pop(peer, None)
        model = {p: s for p, s in model.items() if s}  # an emptied peer holds nothing
        assert {p: set(table.get(p, ())) for p in table} == model
        assert sorted(table.get(peer, ())) == sorted(model.get(peer, ()))
        assert len(table.setdefault(peer)) == len(model.get(peer, ()))
        # Each distinct infohash is kept once, and only while some peer holds it.
        assert table.infohashes() == len(set().union(*model.values()))
        held = [ih for p in table for ih in table.of(p)]
        assert len({id(ih) for ih in held}) == len(set(held))
    table.pop(peers[0])
    assert peers[0] not in table and list(table.get(peers[0], ())) == []
