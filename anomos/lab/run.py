"""One policy, one seed: a simulated week of a tracker, measured from the adversary's side.

Nothing of the tracker is modelled: the graph is a real
:class:`~anomos.tracker.graph.PeerGraph` (peers join with ``add_peer``, leave
with ``remove_peer``, and are told of their edges with ``mark_told``), the
policy is the registered plugin, and every circuit is asked for with
:func:`~anomos.tracker.simulate.plan_circuit`, the planner's own step. Only
the peers (who is online, who downloads when, from which sources) and the
clock are simulated. Announces are instantaneous: an edge is usable as soon
as it exists.

The schedule comes from the seed alone, so every policy faces the same
joins, leaves and download requests. Colluder sets are nested (the set for
a fraction c is a prefix of one ranking), so one run measures every c at once:
a circuit is compromised at c when the ranks of its first and last relays
are both below ``round(c * peers)``.
"""

from __future__ import annotations

import math
import random
import time
from array import array
from collections.abc import Hashable
from typing import Any

from anomos.bench.report import percentile
from anomos.interfaces import PathPolicy
from anomos.lab.experiment import Adversary, Experiment
from anomos.lab.metrics import (
    PredecessorLog,
    degree_of_anonymity,
    first_observer,
    quantile,
)
from anomos.tracker.graph import IndexedSet, PeerGraph
from anomos.tracker.planner import Planner
from anomos.tracker.simulate import SimClock, SimOptions, build_graph, load_spread, plan_circuit

HOUR = 3600.0
DAY = 24 * HOUR
#: Event kinds, in the order they happen at one instant.
JOIN, LEAVE, SYBILS, DOWNLOAD = range(4)
#: Seconds of simulated time the capacity adversary's warm-up is spread over.
WARMUP = HOUR


def schedule(exp: Experiment, seed: int) -> list[tuple[float, int, int]]:
    """Every (time, kind, peer) of the run, in order, from the seed alone.

    Each honest peer alternates exponential online sessions and offline gaps
    (none without churn); downloads arrive as a Poisson process of
    ``downloads_per_day`` per peer (a download while offline is dropped).
    """
    rng = random.Random(f"{seed}:lab:schedule")
    horizon = exp.days * DAY
    events: list[tuple[float, int, int]] = []
    rate = exp.downloads_per_day / DAY
    for peer in range(exp.peers):
        t = rng.expovariate(rate)
        while t < horizon:
            events.append((t, DOWNLOAD, peer))
            t += rng.expovariate(rate)
        if exp.session_hours > 0:
            t, online = rng.expovariate(1 / (exp.session_hours * HOUR)), True
            while t < horizon:
                events.append((t, LEAVE if online else JOIN, peer))
                mean = exp.offline_hours if online else exp.session_hours
                t += rng.expovariate(1 / (max(mean, 1e-6) * HOUR))
                online = not online
    if exp.adversary is Adversary.SYBIL:
        events.append((min(exp.sybil_hours * HOUR, horizon), SYBILS, -1))
    events.sort()
    return events


class LabRun:
    """The state of one run; :meth:`run` returns its figures."""

    def __init__(self, exp: Experiment, policy: PathPolicy, seed: int) -> None:
        self.exp = exp
        self.policy = policy
        self.seed = seed
        self.clock = SimClock()
        self.graph: PeerGraph = build_graph(
            SimOptions(
                peers=exp.peers,
                min_neighbours=exp.min_neighbours,
                max_neighbours=exp.max_neighbours,
                seed=seed,
            ),
            self.clock,
        )
        self.rng = random.Random(f"{seed}:lab:policy")
        self.sources_rng = random.Random(f"{seed}:lab:sources")
        self.online = IndexedSet()
        for peer in range(exp.peers):
            self.online.add(peer)
        #: colluder -> rank; a peer colludes at c when its rank < round(c * peers)
        self.rank: dict[Hashable, int] = {}
        self.thresholds = [round(c * exp.peers) for c in exp.colluding]
        self.never = exp.peers * 10  # the rank of an honest peer
        self.tries = Planner.source_tries(exp.circuits_per_download)
        # cost
        self.asked = 0
        self.planned = 0
        self.invalid = 0
        self.relay_counts: dict[int, int] = {}
        self.relayed: dict[Hashable, int] = {}
        self.times_ns = array("q")
        self.joins = self.leaves = 0
        # anonymity
        self.downloads = 0
        self.empty_downloads = 0
        #: threshold ranks of compromised circuits / downloads -> how many (sparse)
        self.circuit_t: dict[int, int] = {}
        self.download_t: dict[int, int] = {}
        #: downloader -> lowest download threshold so far
        self.best: dict[int, int] = {}
        #: downloader -> [(time, threshold)] each time ``best`` fell
        self.lows: dict[int, list[tuple[float, int]]] = {}
        #: predecessor attack target -> per c, the round it was named at (None: never)
        self.named_at: dict[int, list[int | None]] = {}
        #: capacity adversary: peer -> circuits it relayed in the warm-up
        self.warmup: dict[Hashable, int] = {}
        #: per c: colluding relays seen -> [circuits observed, predecessor was the downloader]
        self.classes: list[dict[int, list[int]]] = [{} for _ in self.thresholds]

    # ------------------------------------------------------------------ graph
    def _tell(self, changes: Any) -> None:
        """Every end of a new edge announces at once (instantaneous announces)."""
        for edge in changes.added:
            for end in (edge.a, edge.b):
                if end in self.graph:
                    self.graph.mark_told(end)

    def join(self, peer: int) -> None:
        self._tell(self.graph.add_peer(peer))
        self.graph.mark_told(peer)
        self.online.add(peer)
        self.joins += 1

    def leave(self, peer: int) -> None:
        self._tell(self.graph.remove_peer(peer))
        self.online.discard(peer)
        self.leaves += 1

    # ------------------------------------------------------------------ adversary
    def place_random(self) -> None:
        order = list(range(self.exp.peers))
        random.Random(f"{self.seed}:lab:adversary").shuffle(order)
        self.rank = {peer: i for i, peer in enumerate(order[: self.thresholds[-1]])}

    def place_capacity(self) -> None:
        """The peers the policy relays through most in a warm-up of one circuit per peer."""
        rng = random.Random(f"{self.seed}:lab:warmup")
        count = self.warmup
        n = self.exp.peers
        self.clock.now = -WARMUP
        for _ in range(n):
            d = rng.randrange(n)
            s = rng.randrange(n - 1)
            planned = plan_circuit(self.policy, self.graph, d, s + (s >= d), self.rng)
            for relay in (planned.path or [])[1:-1]:
                count[relay] = count.get(relay, 0) + 1
            self.clock.advance(WARMUP / n)
        keyed = sorted(range(n), key=lambda p: (-count.get(p, 0), rng.random()))
        self.rank = {peer: i for i, peer in enumerate(keyed[: self.thresholds[-1]])}
        self.clock.now = 0.0

    def add_sybils(self) -> None:
        for i in range(self.thresholds[-1]):
            peer = self.exp.peers + i
            self.rank[peer] = i
            self.join(peer)
        self.joins -= self.thresholds[-1]

    # ------------------------------------------------------------------ downloads
    def download(self, peer: int, now: float) -> None:
        """Ask for ``circuits_per_download`` circuits from random online sources, as the
        planner does (sources in order, at most ``source_tries`` of them)."""
        self.downloads += 1
        online = self.online
        sources = [online.choice(self.sources_rng) for _ in range(self.tries)]
        got = 0
        lowest = self.never
        tried: set[Hashable] = set()
        for source in sources:
            if got >= self.exp.circuits_per_download:
                break
            if source == peer or source in tried:
                continue
            tried.add(source)
            self.asked += 1
            planned = plan_circuit(self.policy, self.graph, peer, source, self.rng)
            self.times_ns.append(planned.ns)
            self.invalid += planned.invalid
            if planned.path is None:
                continue
            got += 1
            lowest = min(lowest, self.circuit(planned.path))
        if not got:
            self.empty_downloads += 1
            return
        if lowest < self.thresholds[-1]:
            self.download_t[lowest] = self.download_t.get(lowest, 0) + 1
        best = self.best.get(peer)
        if best is None or lowest < best:
            self.best[peer] = lowest
            if lowest < self.thresholds[-1]:
                self.lows.setdefault(peer, []).append((now, lowest))

    def circuit(self, path: list[Hashable]) -> int:
        """Account one planned circuit; its threshold rank (compromised at c iff below c's)."""
        relays = path[1:-1]
        self.planned += 1
        k = len(relays)
        self.relay_counts[k] = self.relay_counts.get(k, 0) + 1
        for relay in relays:
            self.relayed[relay] = self.relayed.get(relay, 0) + 1
        never = self.never
        ranks = [self.rank.get(r, never) for r in relays]
        t = max(ranks[0], ranks[-1])
        if t < self.thresholds[-1]:
            self.circuit_t[t] = self.circuit_t.get(t, 0) + 1
        if min(ranks) < self.thresholds[-1]:
            for i, threshold in enumerate(self.thresholds):
                first, seen = first_observer(ranks, threshold)
                if first >= 0:
                    counts = self.classes[i].setdefault(seen, [0, 0])
                    counts[0] += 1
                    counts[1] += first == 0
        return t

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        cpu = time.process_time()
        exp = self.exp
        if exp.adversary is Adversary.RANDOM:
            self.place_random()
        elif exp.adversary is Adversary.CAPACITY:
            self.place_capacity()
        honest = [p for p in range(exp.peers) if p not in self.rank]
        offline: set[int] = set()
        for now, kind, peer in schedule(exp, self.seed):
            self.clock.now = now
            if kind == SYBILS:
                self.add_sybils()
            elif peer in self.rank:
                continue  # colluders stay online and do not download
            elif kind == DOWNLOAD:
                if peer not in offline:
                    self.download(peer, now)
            elif kind == LEAVE:
                offline.add(peer)
                self.leave(peer)
            else:
                offline.discard(peer)
                self.join(peer)
        self.clock.now = exp.days * DAY
        predecessor = self.predecessor_attack(honest, offline)
        figures = self.figures(honest)
        figures.update(predecessor)
        figures["seconds"] = time.perf_counter() - started
        figures["cpu_seconds"] = time.process_time() - cpu
        return figures

    def predecessor_attack(self, honest: list[int], offline: set[int]) -> dict[str, Any]:
        """Re-plan circuits for ``targets`` downloaders until the colluders name each.

        Each target downloads again and again from one source (that is how
        the colluders link the rounds to one downloader, as in Wright et al.).
        """
        exp = self.exp
        rng = random.Random(f"{self.seed}:lab:targets")
        candidates = [p for p in honest if p not in offline]
        targets = rng.sample(candidates, min(exp.targets, len(candidates)))
        named: list[list[float]] = [[] for _ in self.thresholds]
        never = self.never
        for target in targets:
            logs = [PredecessorLog(target) for _ in self.thresholds]
            source = self.reachable_source(target, rng)
            for _ in range(exp.rounds if source is not None else 0):
                path = plan_circuit(self.policy, self.graph, target, source, self.rng).path
                ranks = [self.rank.get(r, never) for r in path[1:-1]] if path else []
                for log, threshold in zip(logs, self.thresholds, strict=True):
                    first, _ = first_observer(ranks, threshold)
                    log.add(path[first] if path and first >= 0 else None)
                if all(log.named_at is not None for log in logs):
                    break
                self.clock.advance(1.0)
            self.named_at[target] = [log.named_at for log in logs]
            for i, log in enumerate(logs):
                named[i].append(math.inf if log.named_at is None else float(log.named_at))
        return {
            "pred_targets": len(targets),
            "pred_named": [
                sum(not math.isinf(r) for r in rs) / len(rs) if rs else 0.0 for rs in named
            ],
            "pred_rounds_median": [quantile(rs, 0.5) for rs in named],
            "pred_rounds": [
                [None if math.isinf(r) else int(r) for r in sorted(rs)] for rs in named
            ],
        }

    def reachable_source(self, target: int, rng: random.Random) -> Hashable | None:
        """A source the policy can reach from ``target`` (at most ``source_tries`` draws)."""
        for _ in range(self.tries):
            source = self.online.choice(rng)
            if (
                source != target
                and source not in self.rank
                and plan_circuit(self.policy, self.graph, target, source, self.rng).path
            ):
                return source
        return None

    def figures(self, honest: list[int]) -> dict[str, Any]:
        exp = self.exp
        hours = math.ceil(exp.days * 24)
        active = [p for p in honest if p in self.best]
        population = exp.peers + (self.thresholds[-1] if exp.adversary is Adversary.SYBIL else 0)
        out: dict[str, Any] = {
            "circuit_compromise": [],
            "download_compromise": [],
            "users_compromised": [],
            "first_compromise_hours_median": [],
            "compromised_over_time": [],
            "degree": [],
            "observed": [],
        }
        for i, threshold in enumerate(self.thresholds):
            bad_circuits = sum(n for t, n in self.circuit_t.items() if t < threshold)
            bad_downloads = sum(n for t, n in self.download_t.items() if t < threshold)
            planned_downloads = self.downloads - self.empty_downloads
            out["circuit_compromise"].append(bad_circuits / self.planned if self.planned else 0.0)
            out["download_compromise"].append(
                bad_downloads / planned_downloads if planned_downloads else 0.0
            )
            firsts = []
            for peer in active:
                when = next((t for t, low in self.lows.get(peer, ()) if low < threshold), None)
                firsts.append(math.inf if when is None else when / HOUR)
            compromised = [f for f in firsts if not math.isinf(f)]
            out["users_compromised"].append(len(compromised) / len(active) if active else 0.0)
            out["first_compromise_hours_median"].append(quantile(compromised, 0.5))
            ordered = sorted(compromised)
            curve, j = [], 0
            for h in range(1, hours + 1):
                while j < len(ordered) and ordered[j] <= h:
                    j += 1
                curve.append(j / len(active) if active else 0.0)
            out["compromised_over_time"].append(curve)
            classes = {k: (n, hits) for k, (n, hits) in self.classes[i].items()}
            observed = sum(n for n, _ in classes.values())
            out["observed"].append(observed / self.planned if self.planned else 0.0)
            out["degree"].append(degree_of_anonymity(classes, population - threshold))
        relays = sum(k * n for k, n in self.relay_counts.items())
        times_us = [t / 1000 for t in self.times_ns]
        load = load_spread(self.relayed, population)
        planned_downloads = self.downloads - self.empty_downloads
        out.update(
            {
                "downloads": self.downloads,
                "active_downloaders": len(active),
                "circuits": self.planned,
                "asked": self.asked,
                "invalid": self.invalid,
                "planned_share": self.planned / self.asked if self.asked else 0.0,
                "circuits_per_download": self.planned / planned_downloads
                if planned_downloads
                else 0.0,
                "downloads_without_circuit": self.empty_downloads / self.downloads
                if self.downloads
                else 0.0,
                "relays_mean": relays / self.planned if self.planned else 0.0,
                "relays_share": {
                    str(k): self.relay_counts[k] / self.planned for k in sorted(self.relay_counts)
                },
                "gini": load["gini"],
                "max_over_mean": load["max_over_mean"],
                "find_path_us_p50": percentile(times_us, 50),
                "find_path_us_p99": percentile(times_us, 99),
                "peers_end": len(self.graph),
                "joins_per_hour": self.joins / (exp.days * 24),
                "leaves_per_hour": self.leaves / (exp.days * 24),
            }
        )
        return out


def run_one(exp: Experiment, policy: PathPolicy, seed: int) -> dict[str, Any]:
    """The figures of ``policy`` under ``exp`` with ``seed`` (docs/research.md)."""
    return LabRun(exp, policy, seed).run()
