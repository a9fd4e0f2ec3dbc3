"""``anomos bench`` keeps working: a tiny run of every section, checked for sane values.

Nothing here depends on speed: the figures only have to exist, be positive
and be consistent (p50 <= p99, ratios matching rates), so a slow or busy
machine passes as long as the benchmark itself works.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from anomos.bench.report import percentile, table
from anomos.testing import run_anomos


def test_percentile_is_nearest_rank() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 99) == 5.0
    assert percentile(values, 1) == 1.0
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([], 50) == 0.0


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
@pytest.mark.integration
def test_bench_smoke_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = run_anomos("bench", "--smoke", "--json", str(out), "--dir", str(tmp_path / "w"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert "plain TCP copy" in proc.stdout and "circuit set-up" in proc.stdout

    tp = result["throughput"]
    tcp = tp["tcp"]["median"]
    assert _positive(tcp)
    assert [a["relays"] for a in tp["anomos"]] == list(result["options"]["relays"])
    for item in tp["anomos"]:
        assert _positive(item["median"])
        assert item["ratio"] == pytest.approx(item["median"] / tcp)
        for run in item["runs"]:
            assert run["size"] == tp["size"]
            assert run["received"] >= tp["size"]  # the whole file came over the circuit
            assert 0 < run["open"] < run["seconds"]

    assert 1 in result["options"]["relays"]
    relay = result["relay"]
    assert _positive(relay["rate"]) and _positive(relay["cpu_per_gb"])
    assert relay["cells_per_file"] >= 1  # every byte of the file crossed the relay

    bg = result["background"]  # other programs' CPU share during the runs, for the warning
    assert 0 <= bg["median_share"] <= bg["max_share"] <= 1

    setup = result["setup"]
    assert [s["relays"] for s in setup] == list(result["options"]["relays"])
    for s in setup:
        assert s["count"] == result["options"]["setup_count"]
        assert 0 < s["p50"] <= s["p99"] <= s["max"]

    tr = result["tracker"]
    assert set(tr["codes_per_second"]) == {"3", "5"}
    assert all(_positive(v) for v in tr["codes_per_second"].values())
    assert _positive(tr["plans_per_second"])
    for g in tr["graphs"]:
        assert _positive(g["announces_per_second"])
        assert 0 < g["path_p50"] <= g["path_p99"]
        assert 0 < g["request_p50"] <= g["request_p99"]
        assert g["requests_planned"] > 0.5  # circuit requests really produced plans
        memory = g["memory_per_peer"]  # the RSS by holder, beside the counted state
        assert memory["counted"] == pytest.approx(g["counted_per_peer"])
        assert memory["accounted"] == pytest.approx(
            memory["counted"]
            + memory["sqlite"]
            + memory["python_free"]
            + memory["malloc_free"]
            + memory["mapped_files"]
        )

    cells = result["cells"]
    for name in ("aes_ctr", "layer_add", "layer_remove", "e2e_seal"):
        assert _positive(cells[name]["seconds"])
        assert cells[name]["rate"] == pytest.approx(cells["cell"] / cells[name]["seconds"])
    assert "cell layer: wide-block, add" in proc.stdout

    mem = result["memory"]
    assert [p["circuits"] for p in mem["points"]] == list(result["options"]["memory_counts"])
    for p in mem["points"]:
        assert p["rss"] > mem["idle_rss"] * 0.5 and math.isfinite(p["per_circuit"])

    assert table(result).count("\n") >= 10


@pytest.mark.slow
@pytest.mark.integration
def test_cpu_per_byte_probe_measures_every_role(tmp_path: Path) -> None:
    from anomos.bench.cells import ROLES, cpu_per_byte

    result = cpu_per_byte(tmp_path, {"new": None}, size=4 << 20, runs=1)
    median = result["trees"]["new"]["median"]
    for role in ROLES:
        assert _positive(median[role]) and median[f"{role}_system"] <= median[role]
    # every byte of the file crossed the relay, in cells of at most 32,741 bytes of data
    assert median["cells_per_mib"] >= (1 << 20) / 32741
    assert _positive(median["mb_per_s"])


def test_memory_breakdown_adds_up_to_the_rss_and_sees_each_holder() -> None:
    """The tracker benchmark's breakdown: its parts are the RSS, and what is allocated
    shows up in the part that holds it (small objects in Python's allocator, a large
    buffer in malloc's, SQLite's cache in SQLite's)."""
    import sqlite3

    from anomos.bench.tracker import memory_breakdown

    before = memory_breakdown()
    assert before, "glibc and /proc are there on the project's machines"
    parts = sum(v for k, v in before.items() if k != "rss")
    assert abs(parts - before["rss"]) < 0.02 * before["rss"]
    small = [bytes(40) + bytes([i % 256]) for i in range(200_000)]  # ~16 MB of objects
    large = bytearray(32 << 20)
    large[::4096] = b"x" * len(large[::4096])  # touched: resident
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (x BLOB)")
    db.executemany("INSERT INTO t VALUES (?)", ((bytes(1000),) for _ in range(8000)))
    after = memory_breakdown()
    grew = {k: after[k] - before[k] for k in after}
    assert grew["python_objects"] > 12 << 20
    assert grew["malloc_objects"] > 30 << 20
    assert grew["sqlite"] > 4 << 20
    assert abs(sum(v for k, v in after.items() if k != "rss") - after["rss"]) < 0.02 * after["rss"]
    del small, large
    db.close()
