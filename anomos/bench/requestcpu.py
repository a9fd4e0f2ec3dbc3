"""Where a signed join and a signed announce spend the tracker's CPU, part by part.

One tracker in this process with ``--peers`` registered (as in
:func:`anomos.bench.tracker.graph_bench`); then ``--requests`` identities of
their own join, and announce once more, signed, through the WSGI application
(TLS and HTTP parsing excluded). CPU time of this thread: rates and medians
from every other request; the parts are timed on the others, each with a
wrapper (so they do not add up exactly); garbage collection is counted with
``gc.callbacks``; the Ed25519 check alone is timed on the same bodies. Run:
``python -m anomos.bench.requestcpu [--peers 3000] [--requests 1000]``;
docs/performance.md ("Third pass: request CPU") has the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import nacl.bindings

from anomos import bencode
from anomos.bench.tracker import _SETTINGS, _bytes_keys, _environ, _inner
from anomos.identity import PeerIdentity
from anomos.pluginmanager import get_plugins
from anomos.tracker import http, server
from anomos.tracker.client import signed_body, signed_message
from anomos.tracker.identity import TrackerIdentity
from anomos.tracker.limits import LimitSettings
from anomos.tracker.settings import TrackerSettings


def _timed(obj: Any, name: str, parts: dict[str, float], part: str) -> Callable[[], None]:
    """Time every call of ``obj.name`` into ``parts[part]``; the undo."""
    orig = getattr(obj, name)

    def wrapper(*args: Any, **kw: Any) -> Any:
        t = time.thread_time()
        try:
            return orig(*args, **kw)
        finally:
            parts[part] = parts.get(part, 0.0) + time.thread_time() - t

    setattr(obj, name, wrapper)
    return lambda: setattr(obj, name, orig)


def request_cpu(peers: int = 3000, requests: int = 1000) -> dict[str, Any]:
    """Per phase (joins, announces): requests per CPU second, the median, each part in us."""
    state = tempfile.mkdtemp(prefix="anomos-bench-requestcpu-")
    try:
        infohash, size, rng = os.urandom(20), 1 << 30, random.Random(1)
        fingerprint = TrackerIdentity.load_or_create(state).fingerprint
        tracker = server.Tracker(
            state,
            "127.0.0.1:0",
            get_plugins(load_entrypoints=False),
            TrackerSettings(limits=LimitSettings.unlimited(), **_SETTINGS),
        )
        for i in range(peers):
            left = 0 if rng.random() < 0.01 else size
            address = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:6881"
            inner = _bytes_keys(_inner(None, address, infohash, left))
            tracker.announce(secrets.token_bytes(32), inner)
        tracker.flush()
        gc.collect()
        gc.freeze()
        idents = [PeerIdentity.generate() for _ in range(requests)]
        nonces = iter(range(1 << 62))
        gc_cpu = [0.0, 0.0]  # total, start of the running collection

        def on_gc(phase: str, _info: dict[str, Any]) -> None:
            if phase == "start":
                gc_cpu[1] = time.thread_time()
            else:
                gc_cpu[0] += time.thread_time() - gc_cpu[1]

        gc.callbacks.append(on_gc)
        statuses: list[str] = []
        out: dict[str, Any] = {}
        for phase in ("joins", "announces"):
            bodies = [
                signed_body(
                    ident,
                    server.ANNOUNCE_PATH,
                    {
                        **_inner(ident, f"10.255.{j >> 8 & 255}.{j & 255}:7000", infohash, size),
                        "nonce": next(nonces).to_bytes(8),
                    },
                    fingerprint,
                )
                for j, ident in enumerate(idents)
            ]
            if phase == "announces":
                for peer in list(tracker.peers):
                    tracker.graph.mark_told(peer)
            plain: list[float] = []
            parts: dict[str, float] = {}
            gc_cpu[0] = 0.0
            for k, body in enumerate(bodies):
                undo = []
                if k % 2:
                    undo = [
                        _timed(tracker.front, "verify", parts, "envelope"),
                        _timed(server, "parse_announce", parts, "fields"),
                        _timed(tracker.graph, "add_peer", parts, "graph join"),
                        _timed(tracker.accounting, "announce", parts, "accounting"),
                        _timed(tracker.membership, "update", parts, "swarms"),
                        _timed(tracker, "_reply", parts, "reply built"),
                        _timed(http, "encode_announce_reply", parts, "reply encoded"),
                    ]
                t = time.thread_time()
                tracker.wsgi(_environ(server.ANNOUNCE_PATH, body), lambda s, _h: statuses.append(s))
                spent = time.thread_time() - t
                for u in reversed(undo):
                    u()
                if not k % 2:
                    plain.append(spent)
            refused = [s for s in statuses if not s.startswith("200")]
            if refused:
                raise RuntimeError(f"tracker refused benchmark requests: {refused[0]}")
            timed = requests // 2
            envelopes = [bencode.decode(b) for b in bodies]
            signed = [
                (
                    e[b"sig"] + signed_message(fingerprint, server.ANNOUNCE_PATH, e[b"msg"]),
                    e[b"peer"],
                )
                for e in envelopes
            ]
            t = time.thread_time()
            for message, key in signed:
                nacl.bindings.crypto_sign_open(message, key)
            ed25519 = (time.thread_time() - t) / len(signed)
            out[phase] = {
                "per_second": len(plain) / sum(plain),
                "median_us": statistics.median(plain) * 1e6,
                "parts_us": {p: v / timed * 1e6 for p, v in parts.items()},
                "ed25519_check_us": ed25519 * 1e6,
                "gc_us": gc_cpu[0] / requests * 1e6,
            }
        gc.callbacks.remove(on_gc)
        tracker.stop()
        out["load_average"] = os.getloadavg()[0]
        return out
    finally:
        gc.unfreeze()
        shutil.rmtree(state, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=3000, help="peers registered first")
    parser.add_argument("--requests", type=int, default=1000, help="signed joins, then announces")
    args = parser.parse_args(argv)
    print(json.dumps(request_cpu(args.peers, args.requests), indent=1))


if __name__ == "__main__":
    main()
