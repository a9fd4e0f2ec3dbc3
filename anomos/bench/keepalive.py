"""What HTTP keep-alive saves the tracker's HTTPS front end, measured from one client.

A tracker runs in its own process (rate limits lifted); one client in this
process sends the same requests over TLS 1.3, either each on a new connection
with ``Connection: close`` (what :class:`anomos.tracker.client.TrackerClient`
does) or all on one kept-alive connection, alternating the two in one run so
that both see the same machine load. The difference is a TCP set-up and a full
TLS handshake per request. Two kinds of request: ``GET /stats`` (the front end
alone) and signed announces of one peer (signature check, replay check, the
announce handler). Run: ``python -m anomos.bench.keepalive [--requests 500]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from anomos.config import split_address
from anomos.identity import PeerIdentity
from anomos.tracker.client import signed_body
from anomos.tracker.identity import pinned_context


def _serve(state: str) -> None:
    """The tracker process: print its address and fingerprint, serve until stdin closes."""
    from gevent import monkey

    monkey.patch_all()
    import gevent

    from anomos.pluginmanager import get_plugins
    from anomos.tracker.limits import LimitSettings
    from anomos.tracker.server import Tracker
    from anomos.tracker.settings import TrackerSettings

    settings = TrackerSettings(
        rate=1e12, burst=1e12, edge_settle=0.0, limits=LimitSettings.unlimited()
    )
    tracker = Tracker(state, "127.0.0.1:0", get_plugins(load_entrypoints=False), settings)
    tracker.start()
    print(json.dumps({"address": tracker.address, "fingerprint": tracker.fingerprint}))
    sys.stdout.flush()
    gevent.get_hub().threadpool.spawn(sys.stdin.read).get()
    tracker.stop()


def _announce_bodies(fingerprint: str, count: int) -> list[bytes]:
    me = PeerIdentity.generate()
    session = secrets.token_bytes(8)
    return [
        signed_body(
            me,
            "/announce",
            {
                "time": int(time.time()),
                "nonce": secrets.token_bytes(8),
                "session": session,
                "onion": me.onion_public,
                "box": me.box_public,
                "address": "127.0.0.1:7000",
                "torrents": [],
                "relayed": 0,
                "stopped": 0,
            },
            fingerprint,
        )
        for _ in range(count)
    ]


def _rate(
    host: str, port: int, requests: Sequence[tuple[str, str, bytes | None]], keep: bool
) -> float:
    """Requests per second (wall) for ``requests`` sent one after the other."""
    context = pinned_context()
    headers = {"Content-Type": "application/x-bencode"}
    if not keep:
        headers["Connection"] = "close"
    conn: http.client.HTTPSConnection | None = None
    sockets = set()
    started = time.perf_counter()
    for method, path, body in requests:
        if conn is None or not keep:
            conn = http.client.HTTPSConnection(host, port, context=context, timeout=30)
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"tracker answered {resp.status} to {path}")
        sockets.add(id(conn.sock))
        if not keep:
            conn.close()
    took = time.perf_counter() - started
    if conn is not None:
        conn.close()
    if keep and len(sockets) != 1:
        raise RuntimeError(f"keep-alive used {len(sockets)} connections, not one")
    return len(requests) / took


def keepalive_bench(requests: int = 500, rounds: int = 3) -> dict[str, Any]:
    """Median requests per second over ``rounds``, each kind with and without keep-alive."""
    state = tempfile.mkdtemp(prefix="anomos-bench-keepalive-")
    proc = subprocess.Popen(
        [sys.executable, "-m", "anomos.bench.keepalive", "--serve", state],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        host, port = split_address(info["address"])
        runs: dict[str, list[float]] = {}
        for _ in range(rounds):
            stats = [("GET", "/stats", None)] * requests
            for keep in (False, True):
                announces = [
                    ("POST", "/announce", b)
                    for b in _announce_bodies(info["fingerprint"], requests)
                ]
                label = "keepalive" if keep else "new_connection"
                runs.setdefault(f"stats_{label}", []).append(_rate(host, port, stats, keep))
                runs.setdefault(f"announce_{label}", []).append(_rate(host, port, announces, keep))
        result: dict[str, Any] = {k: statistics.median(v) for k, v in runs.items()}
        result.update(requests=requests, rounds=rounds, runs=runs)
        return result
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=30)
        shutil.rmtree(state, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="requests per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each kind (median)")
    parser.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args.serve)
        return 0
    result = keepalive_bench(args.requests, args.rounds)
    print(f"one client over TLS 1.3, {args.requests} requests per run, median of {args.rounds}")
    for kind in ("stats", "announce"):
        new, kept = result[f"{kind}_new_connection"], result[f"{kind}_keepalive"]
        print(
            f"  {kind:9s} new connection each: {new:8,.0f} /s   kept alive: {kept:8,.0f} /s"
            f"   x{kept / new:.1f}"
        )
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
