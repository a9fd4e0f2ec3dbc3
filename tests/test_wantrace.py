"""`anomos bench --wan --trace`: the session's timeline and what the analysis makes of
the seeder's uplink (made-up samples, no root needed)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import gevent
from test_session import tcp_pair

from anomos.bench.wantrace import _classes, analyse, tcp_sockets
from anomos.net.ratelimit import Throttle
from anomos.pluginmanager import get_plugins
from anomos.torrent import flowtrace
from anomos.torrent.flow import MIN_WINDOW
from anomos.torrent.metainfo import make_metainfo
from anomos.torrent.session import TorrentSession

RATE = 100 * 10**6  # bits/s
CAP = RATE / 8


def write(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def conn(out: int, win: int) -> dict[str, Any]:
    return {"c": "circuit", "out": out, "win": win, "queued": 0}


def test_where_the_uplink_went(tmp_path: Path) -> None:
    """The uplink full for the first second but a quarter idle later; the downloader
    received 0.9 of what it carried; one tick 0.5 s late; the endgame's last second."""
    size = 0.9 * CAP * 6.5  # received from t=10 to t=16.5
    down, up = [], []
    t, sent, cpu = 9.0, 0.0, (0, 0)
    while t <= 17.0:
        got = 0.0 if t < 10 else min(size, 1 + 0.9 * CAP * (t - 10))
        # Full uplink in the first second after the first block, then 75 % busy.
        rate = CAP if t < 11 else 0.75 * CAP
        if t not in (13.0, 13.25):  # the downloader did not run: a tick 0.5 s late
            down.append(
                {
                    "t": t,
                    "received": got,
                    "left": max(0.0, size - got),
                    "endgame": t >= 15.5,
                    "conns": [conn(3_000_000, 4_000_000), conn(500_000, 2_000_000)],
                }
            )
        # The downloader runs 0.3 of a core and waits for one 0.5 of the time.
        sched = {"get": (int(t * 0.3e9), int(t * 0.5e9)), "gone": None}
        up.append(
            {
                "t": t,
                "sent": sent,
                "nodes": {"1:9": sent, "1:5": 1.1 * sent},
                "cpu": cpu,
                "sched": sched,
            }
        )
        sent += rate * 0.25
        cpu = (cpu[0] + 45, cpu[1] + 50)  # 90 % busy
        t = round(t + 0.25, 2)
    write(tmp_path / "uplink.jsonl", up)
    write(tmp_path / "seed-1.jsonl", [{**d, "received": 0} for d in down])
    write(tmp_path / "get-2.jsonl", down)

    got = analyse(tmp_path, RATE)

    assert got["head"]["uplink_busy"] == 1.0
    assert 0.74 < got["middle"]["uplink_busy"] < 0.8
    assert abs(got["head"]["payload_of_capacity"] - 0.9) < 0.02
    assert got["middle"]["downloader_late_seconds"] == 0.5
    assert got["head"]["downloader_late_seconds"] == 0
    assert got["middle"]["machine_cpu_busy"] == 0.9
    assert got["endgame_seconds"] == 1.0
    assert got["in_flight"]["median_out_kib"] == 3_500_000 // 1024
    # The second circuit always had less than half its window out.
    assert got["in_flight"]["ticks_some_circuit_under_half"] == got["in_flight"]["ticks"]
    # The relay behind the seeder sent 1.1 times its bytes: listed first.
    assert list(got["uplinks_mb"]) == ["1:5", "1:9"]
    assert got["cores"] == {"get": {"running": 0.3, "waiting": 0.5}}


def test_tc_and_ss_output_parsed() -> None:
    tc = (
        "class htb 1:3 root leaf 3: prio 0 rate 100Mbit ceil 100Mbit burst 64Kb\n"
        " Sent 1234 bytes 10 pkt (dropped 0, overlimits 0 requeues 0)\n"
        " backlog 300b 2p requeues 0\n\n"
        "class htb 1:12 root leaf 12: prio 0 rate 100Mbit ceil 100Mbit burst 64Kb\n"
        " Sent 99 bytes 1 pkt (dropped 0, overlimits 0 requeues 0)\n"
        " backlog 0b 0p requeues 0\n"
    )
    assert _classes(tc) == {
        "1:3": {"sent": 1234, "backlog": 300},
        "1:12": {"sent": 99, "backlog": 0},
    }
    ss = (
        "ESTAB 0      7000   127.0.1.5:4000 127.0.1.6:5000\n"
        "\t bbr wscale:10,10 rtt:40.5/1.2 cwnd:200 bytes_acked:5000 "
        "bbr:(bw:90000000bps,mrtt:40) pacing_rate 95000000bps delivery_rate 80000000bps "
        "app_limited notsent:3000\n"
    )
    ((local, peer, queued, info),) = tcp_sockets(ss)
    assert (local, peer, queued) == ("127.0.1.5:4000", "127.0.1.6:5000", 7000)
    assert info["notsent"] == 3000 and info["cwnd"] == 200 and info["bbr_bw"] == 90_000_000
    assert info["rtt_ms"] == 40.5 and info["app_limited"] and info["acked"] == 5000


def test_the_session_timeline_is_off_unless_asked(monkeypatch: Any, tmp_path: Path) -> None:
    monkeypatch.delenv(flowtrace.TRACE_ENV, raising=False)
    assert flowtrace.trace_dir() is None
    monkeypatch.setenv(flowtrace.TRACE_ENV, str(tmp_path))
    assert flowtrace.trace_dir() == tmp_path


def test_sessions_write_their_timelines_when_asked(monkeypatch: Any, tmp_path: Path) -> None:
    """Over real sockets: the downloader's timeline shows its bytes and its connection's
    window; the seeder's lists a connection that never sent a handshake too."""
    trace = tmp_path / "trace"
    monkeypatch.setenv(flowtrace.TRACE_ENV, str(trace))
    data = tmp_path / "seed" / "file.bin"
    data.parent.mkdir()
    data.write_bytes(os.urandom(3 << 20))
    meta = make_metainfo(data, trackers=["https://127.0.0.1:1/announce"], progress=False)
    made = []
    try:
        for label, root in (("seeder", tmp_path / "seed"), ("leech", tmp_path / "leech")):
            made.append(
                TorrentSession(meta, root, plugins=get_plugins(load_entrypoints=False), label=label)
            )
            made[-1].start()
        seeder, leech = made
        slow = Throttle()  # 3 MiB in ~1 s: a few ticks with the connection open
        slow.set_rate(3e6)
        leech.download_throttles = (slow,)
        silent, _other_end = tcp_pair()
        seeder.add_connection(silent, "silent")  # no handshake, ever
        a, b = tcp_pair()
        seeder.add_connection(a, "leech")
        leech.add_connection(b, "seeder")
        assert leech.wait_complete(timeout=30)

        def lines(name: str) -> list[dict[str, Any]]:
            (path,) = trace.glob(f"{name}-{os.getpid()}.jsonl")
            return [json.loads(line) for line in path.read_text().splitlines()]

        def done() -> bool:
            got = lines("leech")
            silent_seen = any(c["c"] == "silent" for line in lines("seeder") for c in line["conns"])
            return bool(got) and got[-1]["received"] == meta.total_length and silent_seen

        deadline = time.monotonic() + 10
        while not done() and time.monotonic() < deadline:
            gevent.sleep(0.05)
        assert done()
        got = lines("leech")
        assert got[-1]["left"] == 0
        with_conn = [line for line in got if line["conns"]]
        assert with_conn and with_conn[0]["conns"][0]["win"] >= MIN_WINDOW
    finally:
        for session in made:
            session.close()
