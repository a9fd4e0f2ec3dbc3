"""Statistics and the printed table of ``anomos bench``.

Medians of several runs, nearest-rank percentiles, and the sections of
the JSON result rendered as one plain-text table (also pasted into
docs/performance.md).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

MB = 1e6
GB = 1e9
KiB = 1024
MiB = 1024 * 1024
#: Share of the CPUs taken by other programs above which the table warns.
BUSY_WARNING = 0.05


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100): a value that was actually measured."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def _fmt(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def table(result: dict[str, Any]) -> str:
    """The human-readable table of a result dict (whatever sections it has)."""
    rows: list[tuple[str, str, str]] = []
    tp = result.get("throughput")
    if tp:
        size = tp["size"] / MiB
        rows.append(
            (
                f"plain TCP copy, {size:g} MiB",
                f"{_fmt(tp['tcp']['median'] / MB)} MB/s",
                f"median of {len(tp['tcp']['runs'])}",
            )
        )
        for item in tp["anomos"]:
            rows.append(
                (
                    f"anonymous download, {item['relays']} relays",
                    f"{_fmt(item['median'] / MB)} MB/s",
                    f"{item['ratio']:.1%} of TCP; median of {len(item['runs'])}",
                )
            )
    relay = result.get("relay")
    if relay:
        rows.append(
            (
                "one relay: cells forwarded",
                f"{_fmt(relay['rate'] / MB)} MB/s",
                f"both ways ({relay['cells_per_file']:.2f}x the file) in the 1-relay "
                f"download; {relay['core_share']:.0%} of a core",
            )
        )
        per_core = GB / relay["cpu_per_gb"] / MB if relay["cpu_per_gb"] > 0 else math.inf
        rows.append(
            (
                "one relay: CPU per GB forwarded",
                f"{relay['cpu_per_gb']:.2f} s",
                f"= {_fmt(per_core, 0)} MB/s per core",
            )
        )
    for item in result.get("setup", []):
        rows.append(
            (
                f"circuit set-up, {item['relays']} relays",
                f"p50 {item['p50'] * 1e3:.1f} ms",
                f"p99 {item['p99'] * 1e3:.1f} ms ({item['count']} circuits)",
            )
        )
    tr = result.get("tracker")
    if tr:
        for hops, rate in sorted(tr["codes_per_second"].items(), key=lambda kv: int(kv[0])):
            rows.append((f"tracking codes built, {hops} hops", f"{_fmt(rate, 0)} /s", "one core"))
        rows.append(
            (
                "circuit plans (code + sealed request)",
                f"{_fmt(tr['plans_per_second'], 0)} /s",
                "one core, 3 relays",
            )
        )
        for item in tr["graphs"]:
            n = f"{item['peers']:,} peers"
            rows.append(
                (
                    f"tracker joins, {n}",
                    f"{_fmt(item['joins_per_second'], 0)} /s",
                    "one core, signed, distinct peers, no TLS",
                )
            )
            rows.append(
                (
                    f"tracker announces, {n}",
                    f"{_fmt(item['announces_per_second'], 0)} /s",
                    "one core, signed, distinct peers, no TLS",
                )
            )
            rows.append(
                (
                    f"tracker bytes per peer, {n}",
                    f"{_fmt(item['rss_per_peer'], 0)} B RSS",
                    _memory_note(item),
                )
            )
            rows.append(
                (
                    f"tracker longest stall, {n}",
                    f"{item['longest_stall'] * 1e3:.1f} ms",
                    "CPU, between two served requests",
                )
            )
            rows.append(
                (
                    f"tracker restart, {n}",
                    f"{item['restart_seconds']:.1f} s",
                    f"{item.get('restart_cpu_seconds', 0.0):.1f} s CPU, a new process;"
                    f" in this one {item.get('restart_in_process_cpu_seconds', 0.0):.1f} s CPU;"
                    " after a crash"
                    f" {item.get('crash_restart_seconds', 0.0):.1f} s"
                    f" ({item.get('crash_restart_cpu_seconds', 0.0):.1f} s CPU)",
                )
            )
            rows.append(
                (
                    f"path computation, {n}",
                    f"p99 {item['path_p99'] * 1e3:.2f} ms",
                    f"p50 {item['path_p50'] * 1e3:.2f} ms",
                )
            )
            rows.append(
                (
                    f"circuit request, {n}",
                    f"p99 {item['request_p99'] * 1e3:.2f} ms",
                    f"p50 {item['request_p50'] * 1e3:.2f} ms (1 circuit)",
                )
            )
    cells = result.get("cells")
    if cells:
        ctr = cells["aes_ctr"]["seconds"]
        for key, name in (
            ("aes_ctr", "cell layer: AES-256-CTR (before)"),
            ("layer_add", "cell layer: wide-block, add"),
            ("layer_remove", "cell layer: wide-block, remove"),
            ("e2e_seal", "end-to-end AEAD: seal a record"),
            ("layer_add_short", "cell layer: wide-block, add (short cell)"),
            ("e2e_seal_short", "end-to-end AEAD: seal a short record"),
        ):
            item = cells.get(key)
            if item is None:  # (a result from before short cells)
                continue
            rows.append(
                (
                    name,
                    f"{_fmt(item['rate'] / MB, 0)} MB/s",
                    f"one core; {item['seconds'] * 1e6:.1f} us per cell, "
                    f"{item['seconds'] / ctr:.1f}x AES-CTR",
                )
            )
    mem = result.get("memory")
    if mem:
        rows.append(("relay RSS, idle (links up)", f"{_fmt(mem['idle_rss'] / MiB)} MiB", ""))
        for point in mem["points"]:
            rows.append(
                (
                    f"relay RSS, {point['circuits']:,} circuits",
                    f"{_fmt(point['rss'] / MiB)} MiB",
                    f"{_fmt(point['marginal'] / KiB, 2)} KiB per added circuit "
                    f"({_fmt(point['per_circuit'] / KiB, 2)} over idle)",
                )
            )
    daemon = result.get("daemon")
    if daemon:
        rows.append(
            ("daemon RSS, started (no torrent)", f"{_fmt(daemon['rss_started'] / MiB)} MiB", "")
        )
        rows.append(
            (
                f"daemon RSS, {daemon['idle_torrents']} idle torrents",
                f"{_fmt(daemon['rss_idle'] / MiB)} MiB",
                f"{_fmt(daemon['per_idle_torrent'] / KiB)} KiB per torrent (seeding, no traffic)",
            )
        )
        rows.append(
            (
                f"daemon RSS, + {daemon['downloads']} downloading",
                f"{_fmt(daemon['rss_downloading_peak'] / MiB)} MiB",
                f"peak; up to {daemon['downloading_at_once']} at once, "
                f"{_fmt(daemon['download_size'] / MiB)} MiB each; "
                f"{_fmt(daemon['rss_after_downloads'] / MiB)} MiB once done",
            )
        )
    if not rows:
        return "(no results)"
    notes = []
    busy = result.get("machine", {}).get("busy_at_start")
    if busy is not None and busy > BUSY_WARNING:
        notes.append(f"warning: the machine was {busy:.0%} busy before the benchmark started")
    bg = result.get("background")
    if bg and bg["max_share"] > BUSY_WARNING:
        notes.append(
            f"warning: other programs took up to {bg['max_share']:.0%} of the CPUs during the "
            f"network runs (median {bg['median_share']:.0%}): throughput figures are low"
        )
    if bg and bg.get("waited_for_quiet", 0) > 0:
        notes.append(f"waited {bg['waited_for_quiet']:.0f} s in all for other programs to go quiet")
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{'measure':<{w0}}  {'result':>{w1}}  notes", "-" * (w0 + w1 + 30)]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    return "\n".join(lines + notes)


def _memory_note(item: dict[str, Any]) -> str:
    """The counted state per peer, and with what the walk cannot see (SQLite, the
    allocators' free memory, libraries): the figure that should match the RSS."""
    note = f"{_fmt(item['counted_per_peer'], 0)} B counted"
    memory = item.get("memory_per_peer")
    if memory:
        note += (
            f"; + SQLite {_fmt(memory['sqlite'], 0)}, allocators' free "
            f"{_fmt(memory['python_free'] + memory['malloc_free'], 0)}, libraries "
            f"{_fmt(memory['mapped_files'], 0)} = {_fmt(memory['accounted'], 0)} B"
        )
    return note
