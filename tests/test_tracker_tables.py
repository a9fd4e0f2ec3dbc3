"""The tracker's compact per-peer containers behave as the dicts and sets they replace."""

from __future__ import annotations

import random
import sys

import pytest

from anomos.tracker.graph import PeerGraph
from anomos.tracker.store import Account, PeerRow
from anomos.tracker.tables import (
    ADDRESS_BYTES,
    COUNTER_MAX,
    AccountTable,
    PeerTable,
    ReceiptBaselines,
    Reports,
    TorrentsByPeer,
)

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


# ---------------------------------------------------------------------- packed by graph slot


def _graph_with(peers: list[bytes]) -> PeerGraph:
    g = PeerGraph(min_neighbours=1, max_neighbours=3, rng=random.Random(1))
    for p in peers:
        g.add_peer(p)
    return g


def _key(rng: random.Random) -> bytes:
    return rng.randbytes(32)


ADDRESSES = [
    "10.0.0.1:6881",
    "255.255.255.255:65535",
    "[2001:db8::1]:7000",
    "abcdefghijklmnopqrstuvwxyz234567abcdefghijklmnopqrstuvwx.onion:443",
    "host.example:1",
    "x" * 250 + ":1",
    "",
]


@pytest.mark.parametrize("address", ADDRESSES)
def test_addresses_come_back_exactly(address):
    g = _graph_with([b"p" * 32, b"q" * 32])
    table = PeerTable(g)
    table.set(b"q" * 32, b"o" * 32, b"b" * 32, "192.0.2.1:1", 5.0)  # a neighbour's slot
    table.set(b"p" * 32, b"o" * 32, b"b" * 32, address, 5.0)
    assert table.address(b"p" * 32) == table[b"p" * 32].address == address
    assert table.address_bytes(b"p" * 32) == address.encode()
    assert table.address(b"q" * 32) == "192.0.2.1:1"
    # Short ones inline, long ones (an onion's) in the dict beside.
    assert bool(table._other) == (not address or len(address) > ADDRESS_BYTES)
    assert b"p" * 32 in table and len(table) == 2
    table.update(b"p" * 32, b"o" * 32, b"b" * 32, "10.9.9.9:9")
    assert table.address(b"p" * 32) == "10.9.9.9:9" and not table._other


def test_a_restore_loads_the_same_table_as_one_set_per_row():
    """``load`` writes the columns in place (the restart's fast path); it must leave
    exactly what a ``set`` per row leaves, for every kind of address."""
    rng = random.Random(5)
    peers = [rng.randbytes(32) for _ in ADDRESSES * 3]
    rows = [
        PeerRow(p, _key(rng), _key(rng), ADDRESSES[i % len(ADDRESSES)], 0.0, i + 1)
        for i, p in enumerate(peers)
    ]
    g = _graph_with(peers)
    loaded, one_by_one = PeerTable(g), PeerTable(g)
    loaded.load(rows, 7.0)
    for row in rows:
        one_by_one.set(row.identity, row.onion, row.box, row.address, 7.0)
    assert len(loaded) == len(one_by_one) == len(peers)
    assert {p: loaded[p] for p in peers} == {p: one_by_one[p] for p in peers}
    assert [loaded.address_bytes(p) for p in peers] == [r.address.encode() for r in rows]
    with pytest.raises(KeyError):
        PeerTable(g).load([PeerRow(b"z" * 32, b"o" * 32, b"b" * 32, "10.0.0.1:1", 0.0, 99)], 1.0)
    with pytest.raises(ValueError):
        PeerTable(g).load([PeerRow(peers[0], b"o" * 31, b"b" * 32, "10.0.0.1:1", 0.0, 1)], 1.0)


def test_peer_table_behaves_as_a_dict_of_rows_through_joins_updates_and_leaves():
    rng = random.Random(7)
    ids = [bytes([i]) * 32 for i in range(40)]
    g = _graph_with([])
    table, model = PeerTable(g), {}
    for step in range(3000):
        peer = rng.choice(ids)
        op = rng.random()
        address = rng.choice(
            [
                f"10.0.{rng.randrange(256)}.{rng.randrange(256)}:{rng.randrange(1, 65536)}",
                f"[2001:db8::{step:x}]:7000",
            ]
        )
        if peer not in model and op < 0.6:
            g.add_peer(peer)
            row = PeerRow(peer, _key(rng), _key(rng), address, float(step), g.seq(peer))
            table.set(peer, row.onion, row.box, row.address, row.last_seen)
            model[peer] = row
        elif peer in model and op < 0.3:
            onion = _key(rng) if rng.random() < 0.5 else model[peer].onion
            changed = table.update(peer, onion, model[peer].box, address)
            assert changed == ((onion, address) != (model[peer].onion, model[peer].address))
            model[peer].onion, model[peer].address = onion, address
        elif peer in model and op < 0.6:
            table.seen(peer, float(step))
            model[peer].last_seen = float(step)
        elif peer in model:
            table.discard(peer)
            g.remove_peer(peer)  # its slot is reused by the next peer to join
            del model[peer]
        assert len(table) == len(model)
    assert dict(table.items()) == model
    assert set(table) == set(model)
    for peer, row in model.items():
        assert table.public_keys(peer) == (row.onion, row.box)
        assert table.last_seen(peer) == row.last_seen
    gone = next(p for p in ids if p not in model)
    assert gone not in table and table.public_keys(gone) is None
    with pytest.raises(KeyError):
        table[gone]


def test_silent_since_lists_the_silent_live_peers_longest_silent_first():
    ids = [bytes([i]) * 32 for i in range(10)]
    g = _graph_with(ids)
    table = PeerTable(g)
    seen = [9.0, 3.0, 7.0, 1.0, 3.0, 20.0, 2.0, 11.0, 0.5, 4.0]
    for p, t in zip(ids, seen, strict=True):
        table.set(p, b"o" * 32, b"b" * 32, "10.0.0.1:1", t)
    table.discard(ids[8])  # silent longest, but gone
    # Ties (ids 1 and 4 at 3.0) keep slot order, as an insertion-ordered dict would.
    assert table.silent_since(5.0) == [ids[3], ids[6], ids[1], ids[4], ids[9]]
    table.seen(ids[3], 30.0)
    assert table.silent_since(5.0) == [ids[6], ids[1], ids[4], ids[9]]
    assert table.silent_since(0.0) == []
    assert PeerTable(_graph_with([])).silent_since(1e9) == []


def test_a_row_costs_its_columns_and_no_object():
    ids = [i.to_bytes(32) for i in range(2000)]
    g = _graph_with(ids)
    table = PeerTable(g)
    for p in ids:
        table.set(p, b"o" * 32, b"b" * 32, "10.1.2.3:6881", 1.0)
    assert table._other == {}  # every IPv4 address is inline
    columns = (table._keys, table._seen, table._alen, table._abuf)
    assert sum(map(sys.getsizeof, columns)) / len(ids) < 110  # 64 + 8 + 1 + 23, and slack


def test_receipt_baselines_by_slot_follow_a_reporter_in_and_out_of_the_graph():
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    g = _graph_with([a, b])
    r = ReceiptBaselines(g)
    # Outside the graph (a first announce comes before the join): the state only.
    assert r.begin(c, fresh=True) is True and c in r
    r.set_last(c, [(5, 1, 100)])
    assert r.last(c) == {}
    g.add_peer(c)
    assert r.begin(c, fresh=False) is True  # carried into its slot
    r.set_last(c, [(5, 1, 100), (9, 2, 1 << 62)])
    assert r.last(c) == {5: (1, 100), 9: (2, 1 << 62)}
    assert r.begin(c, fresh=False) is True and r.last(c) == {5: (1, 100), 9: (2, 1 << 62)}
    assert r.begin(c, fresh=True) is True and r.last(c) == {}  # a new session: none
    r.set_last(c, [(5, 1, 7)])
    # Leaving: the slot is cleared for the next peer, the state kept by identity.
    r.leaving(c)
    g.remove_peer(c)
    d = b"d" * 32
    g.add_peer(d)
    assert g.slot(d) is not None and d not in r and r.last(d) == {}
    assert r.begin(d, fresh=False) is False  # picked up mid-session
    assert c in r and r.begin(c, fresh=False) is True
    # A stopped session: nothing left.
    r.forget(c)
    assert c not in r and r.begin(c, fresh=False) is False
    # Other reporters' baselines are their own.
    assert r.begin(a, fresh=True) and r.last(a) == {}
    r.set_last(a, [(3, 4, 5)])
    assert r.last(b) == {} and r.last(a) == {3: (4, 5)}


def test_a_reporter_that_joins_keeps_no_state_by_identity():
    a, c = b"a" * 32, b"c" * 32
    g = _graph_with([a])
    r = ReceiptBaselines(g)
    assert r.begin(c, fresh=True)  # its first announce, before the join
    g.add_peer(c)
    r.joined(c)
    assert r._loose == {} and c in r  # in its slot now: no dict entry per registered peer
    assert r.begin(c, fresh=False) is True


def _account(rng: random.Random) -> Account:
    account = Account(
        *(rng.choice([0, 1, rng.randrange(1 << 62)]) for _ in range(4)),
        session=rng.choice([b"", b"s" * 8, rng.randbytes(rng.randint(1, 32))]),
        relayed_reported=rng.randrange(1 << 40),
    )
    for ih in rng.sample(IH, rng.choice([0, 1, 1, 3])):
        account.reports[ih] = (rng.randrange(1 << 40), rng.randrange(1 << 40))
    return account


def _same(a: Account, b: Account) -> bool:
    return a == b and dict(a.reports) == dict(b.reports)


def test_account_table_behaves_as_a_dict_of_accounts_through_joins_and_leaves():
    """Packed by slot while in the graph, kept by identity outside it: an account
    outlives its peer's stay, and a slot reused by the next peer holds nothing of it."""
    rng = random.Random(11)
    ids = [bytes([i]) * 32 for i in range(40)]
    g = _graph_with([])
    table: AccountTable = AccountTable(g)
    model: dict[bytes, Account] = {}
    for _ in range(4000):
        peer = rng.choice(ids)
        op = rng.random()
        if op < 0.3:
            account = _account(rng)
            table[peer] = account
            model[peer] = account
        elif op < 0.45 and peer not in g:
            g.add_peer(peer)
            table.joined(peer)
        elif op < 0.6 and peer in g:
            table.leaving(peer)
            g.remove_peer(peer)  # its slot goes to the next peer to join
        elif op < 0.65 and peer in model:
            del table[peer]
            del model[peer]
        assert len(table) == len(model)
        assert (peer in table) == (peer in model)
        if peer in model:
            assert _same(table[peer], model[peer])
            assert table.session(peer) == model[peer].session
        else:
            assert table.get(peer) is None and table.session(peer) is None
    assert sorted(table) == sorted(model)
    assert all(_same(table[p], a) for p, a in model.items())
    assert table._count == sum(p in g for p in model)  # the packed ones
    # Each packed first report's infohash is interned once; the others were let go.
    firsts = {next(iter(a.reports)) for p, a in model.items() if p in g and a.reports}
    assert table.infohashes() == len(firsts)


def test_a_restore_packs_the_same_accounts_as_one_set_each():
    rng = random.Random(12)
    ids = [rng.randbytes(32) for _ in range(300)]
    g = _graph_with(ids[:200])  # the last 100 are identities that left
    accounts = {p: _account(rng) for p in ids}
    bulk, one_by_one = AccountTable(g), AccountTable(g)
    bulk.update(accounts)
    for p, a in accounts.items():
        one_by_one[p] = a
    assert len(bulk) == len(one_by_one) == 300
    assert bulk._count == 200
    for p, a in accounts.items():
        assert _same(bulk[p], a) and _same(one_by_one[p], a)
    assert bulk.infohashes() == one_by_one.infohashes()


def test_account_counters_saturate_instead_of_overflowing():
    g = _graph_with([b"p" * 32])
    table = AccountTable(g)
    table[b"p" * 32] = Account(uploaded=COUNTER_MAX + 5, session=b"x")
    account = table[b"p" * 32]
    assert account.uploaded == COUNTER_MAX
    account.uploaded += 1  # as crediting does: stored back, still at the ceiling
    table[b"p" * 32] = account
    assert table[b"p" * 32].uploaded == COUNTER_MAX
    restored = AccountTable(g)  # a restore's bulk path saturates too
    big = Account(relayed_confirmed=COUNTER_MAX + 1, session=b"x")
    big.reports[IH[0]] = (COUNTER_MAX + 2, 1)
    restored.update({b"p" * 32: big})
    assert restored[b"p" * 32].relayed_confirmed == COUNTER_MAX
    assert restored[b"p" * 32].reports == {IH[0]: (COUNTER_MAX, 1)}


def test_an_account_costs_its_columns_and_no_object():
    ids = [i.to_bytes(32) for i in range(2000)]
    g = _graph_with(ids)
    table = AccountTable(g)
    for p in ids:
        account = Account(1 << 40, 1 << 41, 3, 4, b"8 bytes!", 5)
        account.reports[IH[0]] = (1 << 40, 1 << 41)
        table[p] = account
    assert not table._loose and not table._more and not table._long
    columns = (table._has, table._num, table._slen, table._sbuf, table._ih, table._rep)
    assert sum(map(sys.getsizeof, columns)) / len(ids) < 90  # 1 + 40 + 1 + 16 + 4 + 16, slack
    assert table.infohashes() == 1


def test_a_restore_keys_every_table_with_the_graphs_own_identities():
    """A restore keeps none of the store's identity objects (each would pin a pool of
    the allocator full of the restore's freed rows): the graph makes its own copies,
    and the swarms are keyed by them; a leecher's ``left`` is its swarm's size object."""
    from anomos.tracker.store import Snapshot
    from anomos.tracker.swarms import Swarms

    stored = [bytes(bytearray([i]) * 32) for i in range(1, 7)]  # as read from the store
    g = PeerGraph(min_neighbours=1, max_neighbours=3, rng=random.Random(1))
    g.restore(stored[:5], list(range(1, 6)), [])  # the sixth is not live
    assert all(g.own(p) == p and g.own(p) is not p for p in stored[:5])
    assert g.own(b"z" * 32) is None
    table = PeerTable(g)
    table.load([PeerRow(p, b"o" * 32, b"b" * 32, "10.0.0.1:1", 0.0, 0) for p in stored[:5]], 1.0)
    size = 1 << 30
    lefts = [int(str(size)) for _ in stored]  # one int object per row, as SQLite gives
    lefts[0] = 0
    snap = Snapshot(
        [], [], [], {}, [], {IH[0]: dict(zip(stored, lefts, strict=True))}, {IH[0]: size}, {}
    )
    swarms = Swarms()
    swarms.restore(snap, table)
    members = list(swarms.swarms[IH[0]]._left.items())
    assert len(members) == 5  # the sixth peer is not live
    assert all(peer is g.own(peer) for peer, _left in members)
    assert all(peer is g.own(peer) for peer in swarms.peer_torrents)
    assert all(left is swarms.swarms[IH[0]].size for _peer, left in members[1:])
