"""``anomos bench --wan --trace``: where the seeder's uplink goes, every 0.25 s.

:class:`UplinkWatch` samples, in the namespace, what every node's emulated
uplink sent (its HTB class; the seeder's backlog too), every TCP socket
(``ss``: bytes unsent and acknowledged, congestion window, BBR's bandwidth,
pacing and delivery rates) and how busy the machine's CPUs were; the
downloader and the seeder write their own timelines
(:mod:`anomos.torrent.flowtrace`: per circuit bytes, requests in flight,
window, rate, minimum RTT). :func:`analyse` lines them up on the one
monotonic clock and says where the seeder's uplink capacity went between the
first block and the last: carried payload, carried other bytes (TCP/IP, TLS,
cell headers and padding, copies), or was idle, in the first second, the
middle and the tail (the endgame); how late the downloader's ticks came (its
process did not run), and how much each node's uplink sent (a relay on
several circuits may need more than the seeder).
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomos.torrent.flowtrace import INTERVAL

#: Bytes of TCP payload the HTB counts per full frame (MTU 1500, timestamps).
FRAME_PAYLOAD = 1448 / 1514
#: The first seconds after the first block and the last seconds before the end: the
#: start (windows growing) and the tail (last pieces) apart from the middle.
HEAD_SECONDS = 1.0
#: A timeline tick this many intervals after the last one came late.
LATE = 1.2


class UplinkWatch(threading.Thread):
    """Samples the uplinks, sockets and CPUs into ``out`` (JSON lines) every INTERVAL s;
    ``address`` is the seeder's."""

    def __init__(
        self, prefix: Sequence[str], address: str, out: Path, pids: dict[str, int] | None = None
    ) -> None:
        super().__init__(daemon=True)
        self.prefix, self.address, self.out = list(prefix), address, out
        self.pids = dict(pids or {})
        self.classid = f"1:{address.rpartition('.')[2]}"  # WanNet.add_node's numbering
        self._stop_event = threading.Event()

    def run(self) -> None:
        due = time.monotonic()
        with open(self.out, "w", encoding="utf-8") as out:
            while not self._stop_event.wait(max(0.0, due - time.monotonic())):
                due += INTERVAL
                out.write(json.dumps(self.sample(), separators=(",", ":")) + "\n")

    def sample(self) -> dict[str, Any]:
        """One line: both tools in one process start, so that a tick takes little."""
        t = time.monotonic()
        script = "tc -s class show dev lo; echo --; ss -tniH"
        tc, _, ss = subprocess.run(
            [*self.prefix, "sh", "-c", script], capture_output=True, text=True
        ).stdout.partition("--\n")
        classes = _classes(tc)
        mine = classes.get(self.classid, {})
        send_q = unsent = 0
        links = []
        for local, peer, queued, info in tcp_sockets(ss):
            link = {"from": local, "to": peer, "send_q": queued, **info}
            links.append(link)
            if local.rpartition(":")[0] == self.address:
                send_q += queued
                unsent += info.get("notsent", 0)
        return {
            "t": round(t, 4),
            "cpu": _cpu_jiffies(),
            "sched": {name: _schedstat(pid) for name, pid in self.pids.items()},
            "sent": mine.get("sent"),
            "backlog": mine.get("backlog"),
            "nodes": {cid: c["sent"] for cid, c in classes.items()},
            "send_q": send_q,
            "unsent": unsent,
            "links": links,
        }

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of every CPU of the machine since boot (/proc/stat):
    the emulation and a dozen Python processes share two cores here."""
    with open("/proc/stat", encoding="ascii") as f:
        ticks = [int(n) for n in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return sum(ticks) - idle, sum(ticks)


def _schedstat(pid: int) -> tuple[int, int] | None:
    """(ns on a CPU, ns runnable but waiting for one) of process ``pid`` (its main
    thread), or None once it is gone: a process that waits long for a CPU runs late."""
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as f:
            ran, waited = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    return int(ran), int(waited)


_CLASS = re.compile(r"class htb (\S+) .*?Sent (\d+) bytes.*?backlog (\d+)b", re.S)


def _classes(tc: str) -> dict[str, dict[str, int]]:
    """Bytes sent and waiting per HTB class (each node's uplink) in ``tc -s class show``."""
    return {
        m.group(1): {"sent": int(m.group(2)), "backlog": int(m.group(3))}
        for m in _CLASS.finditer(tc)
    }


_SS_FIELDS = {
    "notsent": re.compile(r"notsent:(\d+)"),
    "cwnd": re.compile(r"\bcwnd:(\d+)"),
    "pacing": re.compile(r"pacing_rate (\d+)bps"),
    "delivery": re.compile(r"delivery_rate (\d+)bps"),
    "bbr_bw": re.compile(r"bbr:\(bw:(\d+)bps"),
    "acked": re.compile(r"bytes_acked:(\d+)"),
    "retrans": re.compile(r"bytes_retrans:(\d+)"),
    "rtt_ms": re.compile(r"\brtt:([\d.]+)/"),
}


def tcp_sockets(ss: str) -> list[tuple[str, str, int, dict[str, Any]]]:
    """(local address:port, peer address:port, Send-Q, figures: Recv-Q and the details on
    the line after) of each established TCP socket in ``ss -tniH`` output."""
    out: list[tuple[str, str, int, dict[str, Any]]] = []
    for line in ss.splitlines():
        fields = line.split()
        if fields and fields[0] == "ESTAB" and len(fields) >= 5:
            local, peer = fields[3], fields[4]
            out.append((local, peer, int(fields[2]), {"recv_q": int(fields[1])}))
        elif out and line[:1].isspace():
            info = out[-1][3]
            for name, pattern in _SS_FIELDS.items():
                found = pattern.search(line)
                if found:
                    info[name] = float(found.group(1)) if name == "rtt_ms" else int(found.group(1))
            info["app_limited"] = "app_limited" in line
    return out


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def analyse(folder: Path, rate_bits: int, getter: str = "get") -> dict[str, Any]:
    """Where the seeder's uplink went from the downloader's first block to its end.

    ``folder`` holds ``uplink.jsonl`` (:class:`UplinkWatch`) and the sessions'
    timelines; the downloader's is the one whose bytes received grew. Capacity
    is the link's rate in frame payload (what TCP could carry); of it, each
    phase reports the share carried as file payload received, as other bytes,
    and idle (the HTB sent less than its rate), and the seconds the
    downloader's ticks came late (its process did not run).
    """
    uplink = _lines(folder / "uplink.jsonl")
    timelines = [_lines(p) for p in sorted(folder.glob("*.jsonl")) if p.name != "uplink.jsonl"]
    down = max(timelines, key=lambda tl: tl[-1]["received"] if tl else 0, default=[])
    if not uplink or not down or not down[-1]["received"]:
        return {}
    first = next(s["t"] for s in down if s["received"] > 0)
    last = next(s["t"] for s in down if s["left"] == 0) if down[-1]["left"] == 0 else down[-1]["t"]
    endgame = next((s["t"] for s in down if s["t"] > first and s["endgame"]), last)
    cap = rate_bits / 8  # bytes/s the HTB lets through, frames and all
    phases = {
        "head": (first, min(first + HEAD_SECONDS, endgame)),
        "middle": (min(first + HEAD_SECONDS, endgame), endgame),
        "tail": (endgame, last),
    }
    out: dict[str, Any] = {
        "first_block": first,
        "seconds": round(last - first, 3),
        "endgame_seconds": round(last - endgame, 3),
    }
    for name, (a, b) in phases.items():
        if b - a < INTERVAL:
            out[name] = {"seconds": round(max(0.0, b - a), 3)}
            continue
        sent = _delta(uplink, "sent", a, b)
        got = _delta(down, "received", a, b)
        capacity = cap * (b - a)
        ticks = [s["t"] for s in down if a <= s["t"] <= b]
        gaps = [y - x for x, y in itertools.pairwise(ticks)]
        late = sum(gap - INTERVAL for gap in gaps if gap > LATE * INTERVAL)
        out[name] = {
            "seconds": round(b - a, 3),
            "uplink_busy": round(sent / capacity, 3),
            "payload_of_sent": round(got / sent, 3) if sent else None,
            "payload_of_capacity": round(got / capacity, 3),
            "payload_of_frames": round(got / (capacity * FRAME_PAYLOAD), 3),
            "downloader_late_seconds": round(late, 2),
            "machine_cpu_busy": _busy(uplink, a, b),
            "mbs": round(got / (b - a) / 1e6, 2),
        }
    out["in_flight"] = _in_flight(down, first, last)
    out["uplinks_mb"] = _uplinks(uplink, first, last)
    out["cores"] = _cores(uplink, first, last)
    return out


def _cores(uplink: list[dict[str, Any]], a: float, b: float) -> dict[str, dict[str, float]]:
    """Per traced process between ``a`` and ``b``: cores it ran on, and cores' worth of
    time it was runnable but waited for a CPU (from its schedstat)."""
    inside = [u for u in uplink if a <= u["t"] <= b and u.get("sched")]
    if len(inside) < 2:
        return {}
    out = {}
    for name in inside[0]["sched"]:
        first, last = inside[0]["sched"].get(name), inside[-1]["sched"].get(name)
        if first is None or last is None:
            continue
        seconds = (inside[-1]["t"] - inside[0]["t"]) * 1e9
        out[name] = {
            "running": round((last[0] - first[0]) / seconds, 3),
            "waiting": round((last[1] - first[1]) / seconds, 3),
        }
    return out


def _uplinks(uplink: list[dict[str, Any]], a: float, b: float) -> dict[str, float]:
    """MB each node's uplink (HTB class) sent between ``a`` and ``b``, busiest first: a
    relay on several circuits, or next to the seeder on all of them, carries the
    file's bytes forward and the requests back, and may need more than the seeder."""
    if not uplink or "nodes" not in uplink[0]:
        return {}
    classes = set(uplink[0]["nodes"]) & set(uplink[-1]["nodes"])
    sent = {
        cid: _delta([{"t": u["t"], "v": u["nodes"].get(cid)} for u in uplink], "v", a, b)
        for cid in classes
    }
    return {cid: round(v / 1e6, 2) for cid, v in sorted(sent.items(), key=lambda kv: -kv[1])}


def _busy(uplink: list[dict[str, Any]], a: float, b: float) -> float | None:
    """Share of the machine's CPU time that was busy between ``a`` and ``b``."""
    inside = [u["cpu"] for u in uplink if a <= u["t"] <= b and "cpu" in u]
    if len(inside) < 2 or inside[-1][1] == inside[0][1]:
        return None
    return round((inside[-1][0] - inside[0][0]) / (inside[-1][1] - inside[0][1]), 3)


def _delta(samples: list[dict[str, Any]], key: str, a: float, b: float) -> float:
    """``key``'s growth between times ``a`` and ``b``, interpolated between samples."""
    return _at(samples, key, b) - _at(samples, key, a)


def _at(samples: list[dict[str, Any]], key: str, t: float) -> float:
    points = [(s["t"], s[key]) for s in samples if s.get(key) is not None]
    if not points:
        return 0.0
    if t <= points[0][0]:
        return float(points[0][1])
    for (t0, v0), (t1, v1) in itertools.pairwise(points):
        if t0 <= t <= t1:
            return v0 + (v1 - v0) * (t - t0) / (t1 - t0) if t1 > t0 else float(v1)
    return float(points[-1][1])


def _in_flight(down: list[dict[str, Any]], first: float, last: float) -> dict[str, Any]:
    """The downloader's requests in flight against its windows, summed over circuits
    (medians of the ticks from the first block to the end), and the ticks where some
    circuit had less than half its window outstanding (it could not ask: no pieces
    left to pick, or choked)."""
    ticks = [s for s in down if first <= s["t"] <= last and s["conns"]]
    if not ticks:
        return {}
    out = sorted(sum(c["out"] for c in s["conns"]) for s in ticks)
    win = sorted(sum(c["win"] for c in s["conns"]) for s in ticks)
    starved = sum(1 for s in ticks if any(c["out"] < c["win"] / 2 for c in s["conns"]))
    return {
        "median_out_kib": out[len(out) // 2] // 1024,
        "median_window_kib": win[len(win) // 2] // 1024,
        "ticks": len(ticks),
        "ticks_some_circuit_under_half": starved,
    }
