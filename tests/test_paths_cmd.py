"""``anomos paths``: path policies compared on one simulated tracker graph."""

import json
from pathlib import Path
from typing import Any

import pytest

from anomos.testing import run_anomos
from anomos.tracker.simulate import SimClock, SimOptions, build_graph, gini, load_spread, simulate

POLICIES = ("weighted", "random-walk", "fixed")
SMALL = ("--peers", "300", "--circuits", "800", "--relays", "2-4")


def run_paths(out: Path, *extra: str) -> dict[str, Any]:
    args = ["paths", *SMALL, "--json", str(out), "--seed", "1"]
    for name in POLICIES:
        args += ["--policy", name]
    result = run_anomos(*args, *extra)
    assert result.returncode == 0, result.stderr
    for name in POLICIES:
        assert name in result.stdout
    return json.loads(out.read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_paths(tmp_path_factory.mktemp("paths") / "paths.json")


def reproducible(report: dict[str, Any]) -> dict[str, Any]:
    """Everything but wall-clock figures and the machine."""
    policies = {
        name: {k: v for k, v in r.items() if k not in ("seconds", "find_path_us")}
        for name, r in report["policies"].items()
    }
    return {"options": report["options"], "graph": report["graph"], "policies": policies}


def test_json_has_options_environment_and_every_policy(report):
    assert report["options"]["peers"] == 300
    assert report["options"]["circuits"] == 800
    assert report["options"]["policies"] == list(POLICIES)
    assert report["environment"]["python"]
    assert report["graph"]["peers"] == 300
    assert 4 <= report["graph"]["degree_min"] <= report["graph"]["degree_max"] <= 6
    assert set(report["policies"]) == set(POLICIES)
    for r in report["policies"].values():
        assert r["circuits"] == 800
        assert r["find_path_us"]["p50"] <= r["find_path_us"]["p99"]
        assert r["load"]["hops"] == round(r["relays_mean"] * r["planned"])


def test_nearly_all_pairs_planned_and_no_invalid_path(report):
    for name, r in report["policies"].items():
        assert r["planned_share"] >= 0.95, name
        assert r["invalid"] == 0, name


def test_fixed_always_uses_max_relays(report):
    fixed = report["policies"]["fixed"]
    assert fixed["relays_share"] == {"4": 1.0}
    assert fixed["relays_mean"] == 4.0


def test_weighted_relay_counts_vary_within_bounds(report):
    shares = report["policies"]["weighted"]["relays_share"]
    assert set(shares) <= {"2", "3", "4"}
    assert len(shares) >= 2
    assert sum(shares.values()) == pytest.approx(1.0)
    assert 2 <= report["policies"]["weighted"]["relays_mean"] <= 4


def test_load_aware_weighted_spreads_load_at_least_as_evenly(report):
    weighted = report["policies"]["weighted"]["load"]
    blind = report["policies"]["random-walk"]["load"]
    # The Gini coefficient sums over every relay; the busiest relay alone is one draw,
    # so it may come out a little above the blind policy's on a given seed.
    assert weighted["gini"] <= blind["gini"]
    assert weighted["max_over_mean"] <= blind["max_over_mean"] * 1.1


def test_same_seed_same_results_other_seed_other_results(report, tmp_path):
    again = run_paths(tmp_path / "again.json")
    assert reproducible(again) == reproducible(report)
    other = run_paths(tmp_path / "other.json", "--seed", "2")
    assert reproducible(other)["policies"] != reproducible(report)["policies"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--peers", "2"), "--peers 2: need 3 <= N <= 1,000,000"),
        (("--peers", "many"), "--peers 'many' is not a whole number"),
        (("--circuits", "0"), "--circuits 0: need 1"),
        (("--circuits", "10000001"), "--circuits 10000001: need 1"),
        (("--rate", "0"), "--rate 0: need"),
        (("--relays", "0-2"), "--relays 0-2: need 1 <= MIN <= MAX <= 7"),
        (("--relays", "2-9"), "--relays 2-9: need"),
        (("--neighbours", "six"), "--neighbours 'six' is not MIN-MAX"),
        (("--neighbours", "0-3"), "--neighbours 0-3: need"),
        (("--policy", "nope"), "unknown path policy 'nope'"),
    ],
)
def test_bad_option_is_one_line_and_status_2(tmp_path, args, message):
    out = tmp_path / "paths.json"
    result = run_anomos("paths", "--json", str(out), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("anomos: error: "), result.stderr
    assert message in lines[0]
    assert not out.exists()


def test_gini_on_known_inputs():
    assert gini([5, 5, 5, 5]) == 0.0
    assert gini([0, 0, 0, 1]) == pytest.approx(0.75)  # one holds all: (n-1)/n
    assert gini([1, 2, 3, 4]) == pytest.approx(0.25)
    assert gini([4, 3, 2, 1]) == pytest.approx(0.25)  # order does not matter
    assert gini([]) == 0.0
    assert gini([0, 0]) == 0.0


def test_load_spread_counts_idle_peers():
    spread = load_spread({"a": 6, "b": 2}, peers=4)
    assert spread["hops"] == 8
    assert spread["distinct_relays"] == 2
    assert spread["mean"] == 2.0
    assert spread["max_over_mean"] == 3.0
    assert spread["gini"] == pytest.approx(gini([6, 2, 0, 0]))
    assert spread["top_peers"] == 1
    assert spread["top_share"] == 0.75


def test_every_policy_gets_the_same_settled_graph():
    options = SimOptions(peers=200, circuits=1)
    first = build_graph(options, SimClock())
    second = build_graph(options, SimClock())
    assert list(first.edges()) == list(second.edges())
    assert all(first.settled(e.a, e.b) for e in first.edges())


def test_paths_the_planner_would_refuse_are_not_counted():
    class NoRelay:
        name = "no-relay"

        def find_path(self, graph, start, end, rng):
            return [start, end]

    run = simulate(NoRelay(), SimOptions(peers=50, circuits=20))
    assert (run.planned, run.invalid, run.relayed) == (0, 20, {})
