"""Path policies compared on a simulated tracker graph (``anomos paths``).

Nothing of the tracker is re-implemented here: the graph is a real
:class:`~anomos.tracker.graph.PeerGraph` grown the way announces grow it, the
policies are the registered plugins, every path is judged by the planner's
own :func:`~anomos.tracker.planner.valid_path`, and relays are charged load as
:meth:`~anomos.tracker.planner.Planner.circuit` charges them. Only time is
fake: a clock that advances ``1 / rate`` per circuit, so the load decays with
``LOAD_HALF_LIFE`` as it would under that request rate, however fast the
simulation runs.

Everything random comes from the seed, and peers are ints (whose hashes, unlike
those of bytes, are the same in every process), so a seed gives the same
graph, the same pairs and the same paths on every run; only timings differ.
"""

from __future__ import annotations

import math
import random
import time
from array import array
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import attrs

from anomos.bench.report import percentile
from anomos.errors import ConfigError
from anomos.interfaces import PathPolicy
from anomos.tracker.graph import MAX_RELAYS, PeerGraph
from anomos.tracker.planner import valid_path

#: Bounds of the simulation's inputs: enough for a big network, small enough to finish.
MIN_PEERS = 3
MAX_PEERS = 1_000_000
MAX_NEIGHBOURS = 64
MAX_CIRCUITS = 10_000_000
MIN_RATE = 0.001
MAX_RATE = 1_000_000.0
MAX_SEED = 2**63 - 1
#: Share of the peers whose relayed hops make up ``top_share`` (the busiest 1 %).
TOP_FRACTION = 0.01


@attrs.frozen
class SimOptions:
    """One simulated tracker: its graph, its policy bounds and its request stream."""

    peers: int = 1000
    min_neighbours: int = 4
    max_neighbours: int = 6
    min_relays: int = 2
    max_relays: int = 4
    circuits: int = 5000
    rate: float = 50.0
    seed: int = 1
    #: Share of the peers nobody can dial (behind NAT): planned as the tracker plans
    #: them (``PeerGraph.closed``), never two of them neighbours.
    unreachable: float = 0.0

    def check(self) -> None:
        """Refuse inputs that are meaningless or would not finish, with one line."""
        if not MIN_PEERS <= self.peers <= MAX_PEERS:
            raise ConfigError(f"--peers {self.peers}: need {MIN_PEERS} <= N <= {MAX_PEERS:,}")
        if not 1 <= self.min_neighbours <= self.max_neighbours <= MAX_NEIGHBOURS:
            raise ConfigError(
                f"--neighbours {self.min_neighbours}-{self.max_neighbours}: "
                f"need 1 <= MIN <= MAX <= {MAX_NEIGHBOURS}"
            )
        if not 1 <= self.min_relays <= self.max_relays <= MAX_RELAYS:
            raise ConfigError(
                f"--relays {self.min_relays}-{self.max_relays}: "
                f"need 1 <= MIN <= MAX <= {MAX_RELAYS}"
            )
        if not 1 <= self.circuits <= MAX_CIRCUITS:
            raise ConfigError(f"--circuits {self.circuits}: need 1 <= N <= {MAX_CIRCUITS:,}")
        if not MIN_RATE <= self.rate <= MAX_RATE:
            raise ConfigError(f"--rate {self.rate:g}: need {MIN_RATE:g} <= R <= {MAX_RATE:,.0f}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed {self.seed}: need 0 <= N <= 2**63-1")
        if not 0 <= self.unreachable < 1:
            raise ConfigError(f"--unreachable {self.unreachable:g}: need 0 <= SHARE < 1")


def unreachable_peers(options: SimOptions) -> frozenset[int]:
    """The peers nobody can dial, drawn from the seed alone (the same for every policy)."""
    rng = random.Random(f"{options.seed}:unreachable")
    return frozenset(rng.sample(range(options.peers), round(options.unreachable * options.peers)))


@attrs.define
class SimClock:
    """The graph's clock: simulated seconds, advanced by the simulation, not by the wall."""

    now: float = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def build_graph(options: SimOptions, clock: Callable[[], float]) -> PeerGraph:
    """The settled graph of ``options.peers`` peers that have all announced.

    Peers join as announces make them join (``add_peer``, then ``top_up`` for
    those an early, small network left short), and every peer is then told of
    its neighbours (``mark_told``), so with ``edge_settle=0`` every edge is
    usable: the steady state of a tracker whose peers have all announced since
    the last change. The same seed builds the same graph.
    """
    graph = PeerGraph(
        min_neighbours=options.min_neighbours,
        max_neighbours=options.max_neighbours,
        rng=random.Random(f"{options.seed}:graph"),
        clock=clock,
        edge_settle=0,
    )
    graph.closed = unreachable_peers(options)
    for peer in range(options.peers):
        graph.add_peer(peer)
    for peer in range(options.peers):
        graph.top_up(peer)
    for peer in range(options.peers):
        graph.mark_told(peer)
    return graph


def random_pairs(options: SimOptions) -> Iterator[tuple[int, int]]:
    """``options.circuits`` (downloader, source) pairs of distinct peers, from the seed alone,
    so every policy is asked for the same circuits in the same order."""
    rng = random.Random(f"{options.seed}:pairs")
    for _ in range(options.circuits):
        downloader = rng.randrange(options.peers)
        source = rng.randrange(options.peers - 1)
        yield downloader, source + (source >= downloader)


@attrs.define
class PolicyRun:
    """What one policy did with every circuit asked of it."""

    policy: str
    circuits: int = 0
    planned: int = 0
    #: paths the policy returned that the planner's rule refused (a buggy policy)
    invalid: int = 0
    #: relays per circuit -> circuits planned with that many
    relay_counts: dict[int, int] = attrs.field(factory=dict)
    #: peer -> circuits it relayed (peers that relayed nothing are absent)
    relayed: dict[Hashable, int] = attrs.field(factory=dict)
    #: nanoseconds of every ``find_path`` call, planned or not
    times_ns: array[int] = attrs.field(factory=lambda: array("q"))
    #: size and degrees of the graph it ran on (the same for every policy of one seed)
    graph: dict[str, Any] = attrs.field(factory=dict)
    #: wall-clock seconds of the whole run (graph included)
    seconds: float = 0.0


@attrs.frozen
class Planned:
    """One circuit asked of a policy, judged as the planner judges it."""

    #: ``[downloader, relays..., source]``, or None when the policy found none
    #: or returned one the planner's rule refuses
    path: list[Hashable] | None
    #: the policy returned a path that :func:`valid_path` refused (a buggy policy)
    invalid: bool
    #: nanoseconds the ``find_path`` call took
    ns: int


def plan_circuit(
    policy: PathPolicy, graph: PeerGraph, downloader: Hashable, source: Hashable, rng: random.Random
) -> Planned:
    """Ask ``policy`` for one circuit as :meth:`~anomos.tracker.planner.Planner.plan` does:
    on the downloader's settled view, checked by :func:`valid_path`, relays charged load.

    The one step ``anomos paths`` and ``anomos lab`` share, so both judge a
    policy exactly as the tracker would.
    """
    view = graph.settled_view(downloader)
    begin = time.perf_counter_ns()
    path = policy.find_path(view, downloader, source, rng)
    ns = time.perf_counter_ns() - begin
    if not path:
        return Planned(None, False, ns)
    if not valid_path(path, downloader, source, view):
        return Planned(None, True, ns)
    for relay in path[1:-1]:
        graph.add_load(relay)
    return Planned(list(path), False, ns)


def simulate(
    policy: PathPolicy,
    options: SimOptions,
    *,
    on_circuit: Callable[[], object] | None = None,
) -> PolicyRun:
    """Plan ``options.circuits`` circuits with ``policy`` on a fresh graph, as the planner would.

    A fresh graph per policy (from the same seed) keeps one policy's load from
    steering the next; the policy's own random numbers also come from the seed.
    """
    started = time.perf_counter()
    clock = SimClock()
    graph = build_graph(options, clock)
    rng = random.Random(f"{options.seed}:policy")
    run = PolicyRun(policy=policy.name, graph=graph_summary(graph))
    step = 1.0 / options.rate
    for downloader, source in random_pairs(options):
        planned = plan_circuit(policy, graph, downloader, source, rng)
        run.times_ns.append(planned.ns)
        run.circuits += 1
        if planned.path is not None:
            relays = planned.path[1:-1]
            for relay in relays:
                run.relayed[relay] = run.relayed.get(relay, 0) + 1
            run.relay_counts[len(relays)] = run.relay_counts.get(len(relays), 0) + 1
            run.planned += 1
        run.invalid += planned.invalid
        clock.advance(step)
        if on_circuit is not None:
            on_circuit()
    run.seconds = time.perf_counter() - started
    return run


def gini(values: Sequence[float]) -> float:
    """Gini coefficient: 0 when every value is equal, (n-1)/n when one holds everything.

    One number for how unevenly relay work is spread, comparable across graph sizes.
    """
    n = len(values)
    total = float(sum(values))
    if n == 0 or total <= 0:
        return 0.0
    weighted = sum(rank * value for rank, value in enumerate(sorted(values), 1))
    return 2.0 * weighted / (n * total) - (n + 1) / n


def load_spread(relayed: dict[Hashable, int], peers: int) -> dict[str, float]:
    """How the relay hops spread over all ``peers`` (a peer that relayed nothing counts as 0).

    Counting idle peers is what makes the figures comparable: a policy that
    keeps using the same few relays shows a high max/mean, Gini and top share.
    """
    counts = sorted(relayed.values(), reverse=True)
    hops = sum(counts)
    mean = hops / peers
    top = max(1, math.ceil(peers * TOP_FRACTION))
    values = counts + [0] * (peers - len(counts))
    return {
        "hops": hops,
        "distinct_relays": len(counts),
        "max": counts[0] if counts else 0,
        "mean": mean,
        "max_over_mean": counts[0] / mean if hops else 0.0,
        "gini": gini(values),
        "top_peers": top,
        "top_share": sum(counts[:top]) / hops if hops else 0.0,
    }


def summarize(run: PolicyRun, options: SimOptions) -> dict[str, Any]:
    """The JSON figures of one policy's run."""
    planned = run.planned
    relays = sum(k * n for k, n in run.relay_counts.items())
    times_us = [t / 1000 for t in run.times_ns]
    return {
        "circuits": run.circuits,
        "planned": planned,
        "planned_share": planned / run.circuits if run.circuits else 0.0,
        "invalid": run.invalid,
        "relays_mean": relays / planned if planned else 0.0,
        "relays_share": {str(k): run.relay_counts[k] / planned for k in sorted(run.relay_counts)},
        "find_path_us": {
            "p50": percentile(times_us, 50),
            "p99": percentile(times_us, 99),
        },
        "load": load_spread(run.relayed, options.peers),
        "reachable": reachable_load(run.relayed, options),
        "seconds": run.seconds,
    }


def reachable_load(relayed: dict[Hashable, int], options: SimOptions) -> dict[str, float]:
    """How much of the relaying falls on the peers that can be dialled: their share of
    the relay hops, and the mean hops per reachable and per unreachable peer."""
    closed = unreachable_peers(options)
    hops = sum(relayed.values())
    on_closed = sum(n for peer, n in relayed.items() if peer in closed)
    reachable = options.peers - len(closed)
    return {
        "peers": reachable,
        "hop_share": (hops - on_closed) / hops if hops else 0.0,
        "mean_hops": (hops - on_closed) / reachable if reachable else 0.0,
        "mean_hops_unreachable": on_closed / len(closed) if closed else 0.0,
    }


def graph_summary(graph: PeerGraph) -> dict[str, Any]:
    """Size and degrees of the graph every policy ran on."""
    degrees = [graph.degree(p) for p in graph]
    shut = [graph.degree(p) for p in graph if p in graph.closed]
    return {
        "peers": len(graph),
        "edges": graph.edge_count(),
        "degree_min": min(degrees, default=0),
        "degree_max": max(degrees, default=0),
        "degree_mean": sum(degrees) / len(degrees) if degrees else 0.0,
        "unreachable": len(shut),
        "degree_mean_unreachable": sum(shut) / len(shut) if shut else 0.0,
        "isolated_unreachable": sum(d == 0 for d in shut),
    }
