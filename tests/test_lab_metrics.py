"""The lab's definitions against cases worked by hand or in closed form.

The closed forms run through the whole lab (a real PeerGraph, the registered
policies, the planner step), not only through the formulas.
"""

from __future__ import annotations

import math
import random

import pytest

from anomos.lab.experiment import Adversary, Experiment
from anomos.lab.metrics import (
    PredecessorLog,
    circuit_compromised,
    degree_of_anonymity,
    first_observer,
    mean_ci,
    posterior_entropy,
    uniform_circuit_compromise,
)
from anomos.lab.run import LabRun
from anomos.pluginmanager import get_plugins


def test_mean_ci_is_the_t_based_95_percent_interval():
    mean, ci = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert ci == pytest.approx(4.303 * 1.0 / math.sqrt(3))  # t(0.975, 2 df) * sd / sqrt(n)
    assert mean_ci([5.0]) == (5.0, 0.0)
    assert mean_ci([2.0] * 40) == (2.0, 0.0)  # beyond the table: the normal quantile


def test_compromise_needs_colluders_at_both_ends_of_the_relay_chain():
    colluding = {"a", "b"}
    assert circuit_compromised(["a", "x", "b"], colluding)
    assert not circuit_compromised(["a", "b", "x"], colluding)  # the last hop is honest
    assert not circuit_compromised(["x", "a", "b"], colluding)  # the first hop is honest
    assert circuit_compromised(["a"], colluding)  # one relay sees both ends
    assert not circuit_compromised([], colluding)
    assert first_observer([9, 1, 0, 9], threshold=2) == (1, 2)
    assert first_observer([9, 9], threshold=2) == (-1, 0)


def test_posterior_entropy_of_a_hand_worked_case():
    # half the mass on the predecessor, half over 4 others: 0.5*1 + 0.5*log2(8) = 2 bits
    assert posterior_entropy(0.5, 5) == pytest.approx(2.0)
    assert posterior_entropy(1.0, 5) == 0.0  # certain
    assert posterior_entropy(1 / 5, 5) == pytest.approx(math.log2(5))  # a blind guess
    # 10 circuits seen by one colluder (half had the downloader before it), 5 by two
    # (always the downloader): (10 * 2 bits + 5 * 0) / 15 / log2(5)
    classes = {1: (10, 5), 2: (5, 5)}
    assert degree_of_anonymity(classes, 5) == pytest.approx(20 / 15 / math.log2(5))
    assert degree_of_anonymity({}, 5) == 1.0


def test_predecessor_attack_names_the_downloader_on_a_hand_worked_sequence():
    log = PredecessorLog("D")
    seen = ["x", "D", None, "y", "D"]
    assert [log.add(p) for p in seen] == [False, False, False, False, True]
    assert log.named_at == 5  # D twice, every other once
    tie = PredecessorLog("D")
    for p in ["D", "x", "x", "D"]:
        tie.add(p)
    assert tie.named_at is None  # 2 against 2 is no answer
    tie.add("D")
    assert tie.named_at == 5


#: A complete graph of PEERS, COLLUDERS of them colluding (round(0.25 * 13) = 3).
PEERS, COLLUDERS = 13, 3


def complete_run(policy: str, relays: int, seed: int, peers: int = PEERS) -> LabRun:
    """A lab run on a complete graph, where each circuit's relays are a uniform
    ordered sample of the peers other than its two ends."""
    exp = Experiment(
        peers=peers,
        min_neighbours=peers - 1,
        max_neighbours=peers - 1,
        min_relays=relays,
        max_relays=relays,
        colluding=(0.25,),
        days=1.0,
        downloads_per_day=160.0,
        circuits_per_download=1,
        targets=1,
        rounds=1,
        seed=seed,
    )
    plugins = get_plugins(load_entrypoints=False)
    run = LabRun(exp, plugins.path_policy(policy, min_relays=relays, max_relays=relays), seed)
    assert all(run.graph.degree(p) == peers - 1 for p in run.graph)  # complete
    return run


@pytest.fixture(scope="module")
def two_relays() -> tuple[LabRun, dict]:
    run = complete_run("original", 2, seed=5)
    return run, run.run()


@pytest.mark.parametrize("relays", [2, 3])
def test_uniform_relays_give_the_closed_form_per_circuit_compromise(relays, two_relays):
    """n peers besides the downloader, c of them colluding (the source is any of the n,
    which averages out): first and last relay colluding with probability
    (c/n)((c-1)/(n-1)), whatever the number of relays."""
    figures = two_relays[1] if relays == 2 else complete_run("fixed", 3, seed=3).run()
    n, c = PEERS - 1, COLLUDERS
    expected = uniform_circuit_compromise(n, c)
    assert expected == pytest.approx(3 / 12 * 2 / 11)
    circuits = figures["circuits"]
    assert circuits > 1500
    sigma = math.sqrt(expected * (1 - expected) / circuits)
    assert abs(figures["circuit_compromise"][0] - expected) < 4 * sigma, figures
    # with one circuit per download, per-download compromise is per-circuit compromise
    assert figures["download_compromise"][0] == pytest.approx(figures["circuit_compromise"][0])


def test_two_uniform_relays_give_the_known_posterior_and_entropy(two_relays):
    """Two relays on a complete graph: a circuit seen by one colluder had it first or
    second with equal chance, so the predecessor is the downloader with probability
    1/2; seen by two, always. Hence the degree of anonymity in closed form."""
    run, figures = two_relays
    one, both = run.classes[0][1], run.classes[0][2]
    assert one[1] / one[0] == pytest.approx(0.5, abs=4 * math.sqrt(0.25 / one[0]))
    assert both[1] == both[0]
    honest = PEERS - COLLUDERS
    share = one[1] / one[0]
    h = posterior_entropy(share, honest)
    expected = one[0] * h / (one[0] + both[0]) / math.log2(honest)
    assert figures["degree"][0] == pytest.approx(expected)
    assert posterior_entropy(0.5, honest) == pytest.approx(1 + 0.5 * math.log2(honest - 1))


def test_guard_predecessor_attack_names_exactly_the_downloaders_with_a_colluding_guard():
    """With a fixed first relay, a colluding guard sees its downloader every round (named at
    round 2); an honest guard hides it for ever (the colluders blame the guard)."""
    exp = Experiment(peers=300, days=0.5, colluding=(0.2,), targets=40, rounds=30, seed=2)
    plugins = get_plugins(load_entrypoints=False)
    policy = plugins.path_policy("guard", min_relays=2, max_relays=4)
    run = LabRun(exp, policy, 2)
    run.run()
    threshold = run.thresholds[0]
    named = colluding = 0
    for target, (at,) in run.named_at.items():
        guard = policy.guard(run.graph.settled_view(target), target, random.Random())
        if run.rank.get(guard, run.never) < threshold:
            colluding += 1
            assert at == 2
        else:
            assert at is None
        named += at is not None
    assert len(run.named_at) == 40 and 0 < named == colluding < 40


def test_capacity_colluders_are_the_busiest_relays_of_the_warm_up():
    exp = Experiment(
        peers=200, days=0.2, colluding=(0.05, 0.1), adversary=Adversary.CAPACITY, targets=1
    )
    plugins = get_plugins(load_entrypoints=False)
    run = LabRun(exp, plugins.path_policy("weighted", min_relays=2, max_relays=4), 1)
    run.place_capacity()
    counts = run.warmup
    colluders = set(run.rank)
    assert len(colluders) == 20
    least = min(counts.get(p, 0) for p in colluders)
    assert all(counts.get(p, 0) <= least for p in range(200) if p not in colluders)
    # nested: the set for c = 0.05 is the busiest half of the set for 0.1
    top = [p for p, r in run.rank.items() if r < 10]
    assert min(counts.get(p, 0) for p in top) >= max(counts.get(p, 0) for p in colluders - set(top))
