"""Memory stays flat while thousands of circuits are opened and closed.

Four peers in one process over the memory transport (TLS still runs): a
downloader, two relays and a source. Every circuit is built from a fresh
tracking code, carries a request and its answer both ways, and is closed.
After a warm-up, the memory Python has allocated (tracemalloc) and the
process's resident size must stop growing, except for the two replay caches,
which grow by design (one entry per circuit, until their epoch ends) and are
bounded; and once the circuits are closed nothing of them is left behind.
"""

from __future__ import annotations

import gc
import os
import tracemalloc
from typing import Any

import gevent
import gevent.pool
import pytest
from test_circuit import exchange, net, plan_for, read_exactly  # noqa: F401  (net: fixture)

from anomos.net import link as linkmod
from anomos.net.circuit import CircuitSwitch
from anomos.protocol.onion import REPLAY_CACHE_LIMIT
from anomos.protocol.request import REQUEST_REPLAY_LIMIT

WARMUP = 300
ROUNDS = 4
PER_ROUND = 500
CONCURRENT = 16
#: Allocations (outside the replay caches) a closed circuit may leave behind, on
#: average: far below what one leaked circuit holds (streams, layer ciphers,
#: queues, events: tens of KiB).
MAX_BYTES_PER_CIRCUIT = 64
#: Bytes that may differ between two snapshots whatever the number of circuits:
#: cells in flight, buffers of the frames being read, allocator free lists.
SLACK = 4 * 2**20
#: The replay caches hold one tag (tracking code, per hop) and one digest
#: (sealed request, at the source) per circuit: a few hundred bytes in all.
MAX_CACHE_BYTES_PER_CIRCUIT = 1024

_CACHES = ("*/anomos/protocol/onion.py", "*/anomos/protocol/request.py")


def rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def traced(snapshot: tracemalloc.Snapshot, caches: bool) -> int:
    """Bytes allocated in the replay caches' modules (or everywhere else)."""
    filters = [tracemalloc.Filter(caches, pattern) for pattern in _CACHES]
    return sum(stat.size for stat in snapshot.filter_traces(filters).statistics("filename"))


def leftovers(switch: CircuitSwitch) -> list[Any]:
    """Anything a closed circuit could leave in the switch or on its links."""
    left: list[Any] = list(switch.circuits())
    left += [e for e in switch._ends.values() if e]
    for link in switch.links.links.values():
        left += list(link._circ_ids) + [q for q in link._queues.values() if q]
        left += list(link._active)
    left += [g for g in switch._group if not g.dead]
    return left


@pytest.mark.slow
def test_memory_stays_flat_over_thousands_of_circuits(
    net: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Circuits back to back from one neighbour: lift the CREATE rate limit (tested
    # in test_circuit.py), which would otherwise pace this test at 200 per second.
    monkeypatch.setattr(linkmod, "CREATE_RATE", 1e9)
    nodes = net(4, "memory")
    downloader, source = nodes[0], nodes[-1]
    source.serve = exchange
    # The test harness's own records would keep every circuit alive: keep nothing.
    source.served = _Discard()
    for node in nodes:
        node.events.opened, node.events.closed = _Discard(), _Discard()
    payload = os.urandom(48 * 1024)

    def one() -> None:
        stream = downloader.switch.open_circuit(plan_for(nodes), timeout=20)
        try:
            stream.sendall(len(payload).to_bytes(4, "big") + payload)
            assert read_exactly(stream, len(payload)) == payload[::-1]
        finally:
            stream.close()

    def run(count: int) -> None:
        pool = gevent.pool.Pool(CONCURRENT)
        for _ in range(count):
            pool.spawn(one).link_exception(lambda g: failures.append(g.exception))
        pool.join(raise_error=False)
        with gevent.Timeout(10, AssertionError("circuits not torn down")):
            while any(leftovers(n.switch) for n in nodes):
                gevent.sleep(0.05)

    failures: list[BaseException] = []
    run(WARMUP)
    tracemalloc.start(1)
    try:
        gc.collect()
        first = tracemalloc.take_snapshot()
        rss_first = rss()
        samples = []
        for _ in range(ROUNDS):
            run(PER_ROUND)
            gc.collect()
            samples.append(traced(tracemalloc.take_snapshot(), caches=False))
        last = tracemalloc.take_snapshot()
        rss_last = rss()
    finally:
        tracemalloc.stop()
    assert not failures, failures[:3]
    circuits = ROUNDS * PER_ROUND

    growth = traced(last, caches=False) - traced(first, caches=False)
    cache_growth = traced(last, caches=True) - traced(first, caches=True)
    print(
        f"\n{circuits} circuits after {WARMUP} warm-up: {growth / circuits:.1f} B/circuit "
        f"outside the replay caches, {cache_growth / circuits:.0f} B/circuit in them, "
        f"RSS {(rss_last - rss_first) / 2**20:+.1f} MiB; per round {samples}"
    )
    assert growth < SLACK + MAX_BYTES_PER_CIRCUIT * circuits, (growth, samples)
    # Flat: the later rounds add (next to) nothing.
    assert samples[-1] - samples[1] < SLACK / 4 + MAX_BYTES_PER_CIRCUIT * PER_ROUND * 2, samples
    assert cache_growth < MAX_CACHE_BYTES_PER_CIRCUIT * circuits, cache_growth
    # Resident memory: bounded too (tracemalloc's own traces included).
    assert rss_last - rss_first < 48 * 2**20

    # Nothing of the closed circuits is left: no circuit ends, ids, queues or timers.
    for node in nodes:
        assert leftovers(node.switch) == []
        assert all(link.circuit_count == 0 for link in node.links.links.values())
        # the caches stay within their bounds
        assert node.switch._reader.cached_tags() <= REPLAY_CACHE_LIMIT
        assert len(node.switch._seen) <= REQUEST_REPLAY_LIMIT
    assert len(source.switch._seen) >= circuits  # ... which are real: one entry per circuit


class _Discard(list):  # type: ignore[type-arg]
    """A list that keeps nothing."""

    def append(self, item: Any) -> None:
        pass
