"""Tracker benchmarks, in this process on one core: codes, plans, announces, paths.

* tracking codes built per second (the onion alone), for 3 and 5 hops;
* circuit plans per second: code, tracker material and the sealed request,
  what the tracker does per circuit besides finding the path;
* with 10,000 and 100,000 registered peers (1 % of them seeding one
  torrent): announces answered per second through the tracker's WSGI
  application (signature check, bencode, graph, reply; TLS and HTTP parsing
  excluded, as they are the web server's), path computation and whole
  circuit requests, p50 and p99.

Peers are registered by calling the tracker's announce handler directly (no
signature to check, one shared pair of public keys) to keep set-up short;
the announces that are timed are fully signed re-announces, the steady
state of a tracker whose peers announce every interval.
"""

from __future__ import annotations

import functools
import io
import os
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from anomos.bench.report import median, percentile
from anomos.identity import PeerIdentity, x25519_public
from anomos.pluginmanager import Plugins, get_plugins
from anomos.protocol.onion import Hop, build_tracking_code, current_epoch
from anomos.protocol.request import SourceRequest, seal_request
from anomos.tracker.client import signed_body

Echo = Callable[[str], None]

#: Real (signing) identities whose re-announces are timed.
SIGNED_PEERS = 200
#: Fraction of registered peers that seed the benchmark torrent.
SEED_FRACTION = 0.01


def _quiet(_msg: str) -> None:
    pass


def _rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls of ``fn`` per second, over at least ``seconds`` (after one warm-up call)."""
    fn()
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(20):
            fn()
        n += 20
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - t0)


def code_rates(seconds: float, hop_counts: tuple[int, ...] = (3, 5)) -> dict[str, float]:
    """Tracking codes built per second for each path length (hops = relays + source)."""
    keys = [x25519_public(os.urandom(32)) for _ in range(max(hop_counts))]
    epoch = current_epoch()
    out = {}
    for n in hop_counts:
        hops = [Hop(keys[i], 1000 + i if i < n - 1 else None) for i in range(n)]
        out[str(n)] = _rate(functools.partial(build_tracking_code, hops, epoch), seconds)
    return out


def plan_rate(plugins: Plugins, seconds: float, relays: int = 3) -> float:
    """Circuit plans per second: what the planner does per circuit once it has the path."""
    suite = plugins.cipher_suite("x25519")
    n = relays + 1
    hops = [Hop(x25519_public(os.urandom(32)), 1000 + i if i < n - 1 else None) for i in range(n)]
    box = PeerIdentity.generate().box_public
    infohash = os.urandom(20)
    tracker_key = ec.generate_private_key(ec.SECP256R1())

    def plan() -> None:
        build_tracking_code(hops, current_epoch())
        material = suite.tracker_material()
        req = SourceRequest(infohash, suite.name, material, int(time.time()) + 300)
        seal_request(req, box, tracker_key)

    return _rate(plan, seconds)


def _inner(ident: PeerIdentity | None, address: str, infohash: bytes, left: int) -> dict[str, Any]:
    onion = ident.onion_public if ident else _SHARED[0]
    box = ident.box_public if ident else _SHARED[1]
    return {
        "time": int(time.time()),
        "session": b"bench",
        "onion": onion,
        "box": box,
        "address": address,
        "torrents": [
            {"infohash": infohash, "uploaded": 0, "downloaded": 0, "left": left, "event": ""}
        ],
        "relayed": 0,
        "stopped": 0,
    }


def _signed_address(j: int) -> str:
    """The contact address of the ``j``-th signing identity."""
    return f"10.255.0.{j % 250}:{7000 + j}"


_SHARED = (x25519_public(os.urandom(32)), x25519_public(os.urandom(32)))


def _bytes_keys(d: dict[str, Any]) -> dict[bytes, Any]:
    """The dict as the tracker sees it after bencode decoding (byte-string keys and values)."""
    out: dict[bytes, Any] = {}
    for k, v in d.items():
        if isinstance(v, str):
            v = v.encode()
        elif isinstance(v, list):
            v = [_bytes_keys(x) if isinstance(x, dict) else x for x in v]
        out[k.encode()] = v
    return out


def _environ(path: str, body: bytes) -> dict[str, Any]:
    return {
        "PATH_INFO": path,
        "REQUEST_METHOD": "POST",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
    }


def graph_bench(
    plugins: Plugins,
    peers: int,
    *,
    announces: int = 3000,
    samples: int = 1000,
    echo: Echo = _quiet,
) -> dict[str, Any]:
    """One tracker with ``peers`` registered: announce rate, path and request latencies."""
    from anomos.tracker.limits import LimitSettings
    from anomos.tracker.server import ANNOUNCE_PATH, Tracker

    state = tempfile.mkdtemp(prefix="anomos-bench-tracker-")
    try:
        tracker = Tracker(
            state,
            "127.0.0.1:0",
            plugins,
            rate=1e12,
            burst=1e12,
            edge_settle=0.0,
            limits=LimitSettings.unlimited(),
        )
        infohash = os.urandom(20)
        size = 1 << 30
        rng = random.Random(1)
        echo(f"tracker: registering {peers:,} peers")
        t0 = time.perf_counter()
        signed = [PeerIdentity.generate() for _ in range(min(SIGNED_PEERS, peers))]
        for i in range(peers - len(signed)):
            left = 0 if rng.random() < SEED_FRACTION else size
            address = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:6881"
            tracker.announce(
                secrets.token_bytes(32), _bytes_keys(_inner(None, address, infohash, left))
            )
        for j, ident in enumerate(signed):
            inner = _bytes_keys(_inner(ident, _signed_address(j), infohash, size))
            tracker.announce(ident.identity_public, inner)
        join_rate = peers / (time.perf_counter() - t0)
        # Every peer announced once; let every edge settle as if all had announced again.
        for peer in list(tracker.peers):
            tracker.graph.mark_told(peer)

        # Every request differs (a nonce): the tracker refuses one it has seen.
        bodies = [
            signed_body(
                signed[i % len(signed)],
                ANNOUNCE_PATH,
                {
                    **_inner(
                        signed[i % len(signed)], _signed_address(i % len(signed)), infohash, size
                    ),
                    "nonce": i.to_bytes(8, "big"),
                },
                tracker.fingerprint,
            )
            for i in range(announces)
        ]
        statuses: list[str] = []

        def start_response(status: str, _headers: list[Any]) -> None:
            statuses.append(status)

        echo(f"tracker: {announces:,} signed announces")
        t0 = time.perf_counter()
        for i in range(announces):
            body = bodies[i]
            tracker.wsgi(_environ(ANNOUNCE_PATH, body), start_response)
        announce_rate = announces / (time.perf_counter() - t0)
        bad = [s for s in statuses if not s.startswith("200")]
        if bad:
            raise RuntimeError(f"tracker refused benchmark announces: {bad[0]}")

        echo(f"tracker: {samples:,} path computations and circuit requests")
        view = tracker.graph.settled_view()
        policy = tracker.planner.policy
        everyone = list(tracker.peers)
        path_times = []
        found = 0
        for _ in range(samples):
            start = rng.choice(everyone)
            near = list(tracker.graph.within(start, tracker.max_relays + 1, 2000))
            end = rng.choice(near[1:]) if len(near) > 1 else rng.choice(everyone)
            t = time.perf_counter()
            path = policy.find_path(view, start, end, rng)
            path_times.append(time.perf_counter() - t)
            found += path is not None
        request_times = []
        planned = 0
        for i in range(samples):
            ident = signed[i % len(signed)]
            t = time.perf_counter()
            reply = tracker.circuits(ident.identity_public, {b"infohash": infohash, b"count": 1})
            request_times.append(time.perf_counter() - t)
            planned += len(reply["circuits"])
        tracker.stop()
        return {
            "peers": peers,
            "joins_per_second": join_rate,
            "announces_per_second": announce_rate,
            "path_p50": percentile(path_times, 50),
            "path_p99": percentile(path_times, 99),
            "paths_found": found / samples,
            "request_p50": percentile(request_times, 50),
            "request_p99": percentile(request_times, 99),
            "requests_planned": planned / samples,
        }
    finally:
        shutil.rmtree(state, ignore_errors=True)


def tracker_section(
    *,
    peer_counts: tuple[int, ...] = (10_000, 100_000),
    seconds: float = 2.0,
    announces: int = 3000,
    samples: int = 1000,
    repeats: int = 3,
    echo: Echo = _quiet,
) -> dict[str, Any]:
    """Section ``tracker`` of the result (code rates are medians of ``repeats``)."""
    plugins = get_plugins(load_entrypoints=False)
    echo("tracker: tracking codes and circuit plans per second, one core")
    code_runs = [code_rates(seconds) for _ in range(repeats)]
    codes = {k: median([r[k] for r in code_runs]) for k in code_runs[0]}
    plans = median([plan_rate(plugins, seconds) for _ in range(repeats)])
    graphs = [
        graph_bench(plugins, n, announces=announces, samples=samples, echo=echo)
        for n in peer_counts
    ]
    return {
        "codes_per_second": codes,
        "code_runs": code_runs,
        "plans_per_second": plans,
        "graphs": graphs,
    }
