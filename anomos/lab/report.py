"""Every run of an experiment folded into one report: JSON, a table and CSV.

Figures are per policy and per colluding fraction c, as the mean over seeds
with the half-width of a t-based 95 % confidence interval. The JSON keeps
what varies between runs of the same seed (timings, the machine) under
``timing`` and ``environment`` only, so the rest is bit-for-bit the same.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from anomos.lab.experiment import Experiment
from anomos.lab.metrics import mean_ci

#: Figures with one value per colluding fraction, in table order.
PER_C = (
    "circuit_compromise",
    "download_compromise",
    "users_compromised",
    "first_compromise_hours_median",
    "degree",
    "observed",
    "pred_named",
    "pred_rounds_median",
)
#: Figures with one value per run: the cost side and the network.
PER_RUN = (
    "relays_mean",
    "planned_share",
    "circuits_per_download",
    "downloads_without_circuit",
    "gini",
    "max_over_mean",
    "downloads",
    "circuits",
    "invalid",
    "peers_end",
    "joins_per_hour",
    "leaves_per_hour",
)
#: Figures that differ between two runs of one seed.
TIMING = ("find_path_us_p50", "find_path_us_p99", "seconds", "cpu_seconds")


def _stat(values: Sequence[float | None]) -> dict[str, Any]:
    known = [float(v) for v in values if v is not None]
    mean, ci = mean_ci(known)
    return {"mean": mean if known else None, "ci95": ci if known else None, "n": len(known)}


def aggregate(runs: dict[str, list[dict[str, Any]]], exp: Experiment) -> dict[str, Any]:
    """``runs``: policy label -> one figures dict per seed (in seed order)."""
    policies: dict[str, Any] = {}
    timing: dict[str, Any] = {}
    for label, per_seed in runs.items():
        entry: dict[str, Any] = {}
        for name in PER_C:
            entry[name] = [_stat([r[name][i] for r in per_seed]) for i in range(len(exp.colluding))]
        for name in PER_RUN:
            entry[name] = _stat([r[name] for r in per_seed])
        hours = len(per_seed[0]["compromised_over_time"][0])
        entry["compromised_over_time"] = [
            [_stat([r["compromised_over_time"][i][h] for r in per_seed]) for h in range(hours)]
            for i in range(len(exp.colluding))
        ]
        entry["pred_rounds"] = [
            [r["pred_rounds"][i] for r in per_seed] for i in range(len(exp.colluding))
        ]
        entry["relays_share"] = [r["relays_share"] for r in per_seed]
        policies[label] = entry
        timing[label] = {name: _stat([r[name] for r in per_seed]) for name in TIMING}
    return {"experiment": exp.as_json(), "policies": policies, "timing": timing}


def _pm(stat: dict[str, Any], fmt: str, scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean'] * scale:{fmt}}±{stat['ci95'] * scale:{fmt}}"


#: Table columns: heading, width, cell.
_COLUMNS: tuple[tuple[str, int], ...] = (
    ("policy", -16),
    ("c", 5),
    ("circuit %", 13),
    ("download %", 13),
    ("users %", 13),
    ("degree", 11),
    ("pred. named %", 13),
    ("relays", 10),
    ("circ/dl", 8),
    ("Gini", 11),
    ("p50 us", 7),
)


def aligned(rows: list[list[str]], columns: Sequence[tuple[str, int]]) -> list[str]:
    """``rows`` as lines of fixed columns: (heading, width), a negative width left-aligned."""
    return [
        "  ".join(
            cell.ljust(-width) if width < 0 else cell.rjust(width)
            for cell, (_, width) in zip(row, columns, strict=True)
        ).rstrip()
        for row in rows
    ]


def table(report: dict[str, Any]) -> str:
    """One row per policy and c: compromise (per circuit, per download, users ever),
    degree of anonymity, predecessor attack, then the cost of the same runs."""
    exp = report["experiment"]
    rows = [[h for h, _ in _COLUMNS]]
    for label, r in report["policies"].items():
        for i, c in enumerate(exp["colluding"]):
            rows.append(
                [
                    label,
                    f"{c:g}",
                    _pm(r["circuit_compromise"][i], ".2f", 100),
                    _pm(r["download_compromise"][i], ".2f", 100),
                    _pm(r["users_compromised"][i], ".1f", 100),
                    _pm(r["degree"][i], ".3f"),
                    _pm(r["pred_named"][i], ".0f", 100),
                    _pm(r["relays_mean"], ".2f"),
                    f"{r['circuits_per_download']['mean']:.2f}",
                    _pm(r["gini"], ".3f"),
                    f"{report['timing'][label]['find_path_us_p50']['mean']:,.0f}",
                ]
            )
    lines = aligned(rows, _COLUMNS)
    first = next(iter(report["policies"].values()))
    lines.append(
        f"{exp['peers']:,} peers, {exp['min_neighbours']}-{exp['max_neighbours']} neighbours, "
        f"{exp['min_relays']}-{exp['max_relays']} relays, {exp['days']:g} days, "
        f"{exp['downloads_per_day']:g} downloads/peer/day x "
        f"{exp['circuits_per_download']} circuits, "
        f"churn {first['leaves_per_hour']['mean']:,.1f} leaves/h, "
        f"adversary {exp['adversary']}, seeds {exp['seed']}..{exp['seed'] + exp['seeds'] - 1} "
        "(mean ± 95 % CI)"
    )
    return "\n".join(lines)


def to_csv(report: dict[str, Any]) -> str:
    """One row per policy, c and figure: mean, CI half-width, seeds that had a value."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["policy", "colluding", "figure", "mean", "ci95", "n"])
    exp = report["experiment"]
    for label, r in report["policies"].items():
        for i, c in enumerate(exp["colluding"]):
            for name in PER_C:
                s = r[name][i]
                writer.writerow([label, c, name, s["mean"], s["ci95"], s["n"]])
        for name in PER_RUN:
            s = r[name]
            writer.writerow([label, "", name, s["mean"], s["ci95"], s["n"]])
        for name, s in report["timing"][label].items():
            writer.writerow([label, "", name, s["mean"], s["ci95"], s["n"]])
    return out.getvalue()
