"""Tracker benchmarks, in this process on one core: codes, plans, announces, paths.

* tracking codes built per second (the onion alone), for 3 and 5 hops;
* circuit plans per second: code, tracker material and the sealed request,
  what the tracker does per circuit besides finding the path;
* with 10,000 and 100,000 registered peers by default (``--scale`` for
  others, 1 % of them seeding one torrent): joins and announces answered
  per second through the tracker's WSGI application from distinct peers
  (signature check, bencode, graph, reply; TLS and HTTP parsing excluded, as
  they are the web server's), path computation and whole circuit requests,
  p50 and p99, bytes per peer (RSS growth, the state's objects counted, and
  the RSS by holder: :func:`memory_breakdown`),
  the longest gap between two served requests (a stall) and the restart time.

Most peers are registered in bulk, written straight into the tracker's store
(one shared pair of public keys) and restored from it, to keep set-up short
at 10^6; every timed request is a real signed one from a peer of its own; see
:func:`graph_bench`.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import io
import json
import operator
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
import psutil
from cryptography.hazmat.primitives.asymmetric import ec

from anomos import bencode
from anomos.bench.report import median, percentile
from anomos.identity import PeerIdentity, x25519_public
from anomos.pluginmanager import Plugins, get_plugins
from anomos.protocol.onion import Hop, build_tracking_code, current_epoch
from anomos.protocol.request import SourceRequest, seal_request
from anomos.tracker.client import signed_body
from anomos.tracker.graph import MAX_NID

if TYPE_CHECKING:
    from anomos.tracker.server import Tracker

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


class _Gaps:
    """The longest gap between two served requests, per phase: a stall of the event loop
    (a garbage collection, an inline write) shows up as one long gap. Measured in CPU
    time of the serving thread as well as wall time: on a shared machine the wall time
    also holds the time other programs had the core."""

    def __init__(self) -> None:
        self.longest: dict[str, float] = {}
        self.longest_wall: dict[str, float] = {}
        self._cpu, self._wall = time.thread_time(), time.perf_counter()

    def tick(self, phase: str) -> None:
        gevent.sleep(0)  # let the tracker's own greenlets (flushes, expiry) run, as serving does
        cpu, wall = time.thread_time(), time.perf_counter()
        self._note(self.longest, phase, cpu - self._cpu)
        self._note(self.longest_wall, phase, wall - self._wall)
        self._cpu, self._wall = cpu, wall

    @staticmethod
    def _note(longest: dict[str, float], phase: str, gap: float) -> None:
        if gap > longest.get(phase, 0.0):
            longest[phase] = gap

    def restart(self) -> None:
        self._cpu, self._wall = time.thread_time(), time.perf_counter()


#: Attributes of the tracker and its graph that hold per-peer state (others are shared
#: machinery: plugins, keys, the database handle, the random source).
_STATE = (
    "peers",
    "accounts",
    "swarms",
    "membership.peer_torrents",
    "sizes",
    "accounting.receipts",
    "liveness.reports",
    "persistence.pending",
    "limits",
    "recent",
)
_SKIP = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
    random.Random,
)


def counted_bytes(tracker: Any) -> int:
    """Bytes of every object the tracker's state holds (each counted once), numpy buffers
    included: what ``sys.getsizeof`` says, summed over a walk of the references."""
    roots = [operator.attrgetter(name)(tracker) for name in _STATE]
    roots += [
        v
        for k, v in vars(tracker.graph).items()
        if k not in ("_rng", "_clock") and not isinstance(v, _SKIP)
    ]
    seen: set[int] = set()
    stack = roots
    total = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _SKIP):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if gc.is_tracked(obj) or isinstance(obj, dict):
            stack.extend(gc.get_referents(obj))
    return total


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _pymalloc() -> tuple[int, int]:
    """(bytes in live blocks, bytes of arenas) of Python's small-object allocator, from
    ``sys._debugmallocstats`` (which writes to the C stderr: caught in a file, not a
    pipe, which could fill up or never see its end)."""
    with tempfile.TemporaryFile() as out:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read().decode()

    def figure(label: str) -> int:
        found = re.search(re.escape(label) + r"\s*=\s*([\d,]+)", text)
        return int(found.group(1).replace(",", "")) if found else 0

    return figure("# bytes in allocated blocks"), figure("Total")


def memory_breakdown() -> dict[str, int]:
    """The process's RSS by who holds it, each part measured, the parts adding up to
    the RSS (glibc and Linux only; an empty dict elsewhere):

    * ``python_objects``: live blocks of Python's small-object allocator (objects up
      to 512 B: ``bytes``, ints, small tuples, attrs objects);
    * ``python_free``: the rest of its arenas: blocks freed but in pools that still
      hold a live object, empty pools in arenas that do, alignment (an arena is
      returned to the system only once all of it is free);
    * ``malloc_objects``: glibc ``malloc`` blocks in use other than SQLite's: the
      buffers of arrays, numpy arrays, bytearrays and the tables of large dicts and
      lists (``malloc`` and ``mmap``-ed chunks);
    * ``sqlite``: SQLite's own memory (``sqlite3_memory_used``: its page cache mostly);
    * ``malloc_free``: resident pages glibc keeps after ``free`` (what is left of the
      anonymous and heap RSS);
    * ``mapped_files``: resident pages of files (libraries) and stacks.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libsqlite = ctypes.CDLL("libsqlite3.so.0")
    except OSError:
        return {}
    libc.mallinfo2.restype = _Mallinfo2
    libsqlite.sqlite3_memory_used.restype = ctypes.c_int64
    anonymous = files = 0
    with open("/proc/self/smaps") as f:
        name = ""
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                fields = line.split()
                name = fields[5] if len(fields) > 5 else ""
            elif line.startswith("Rss:"):
                kib = int(line.split()[1]) * 1024
                if name in ("", "[heap]"):
                    anonymous += kib
                else:
                    files += kib
    info = libc.mallinfo2()
    objects, arenas = _pymalloc()
    sqlite = int(libsqlite.sqlite3_memory_used())
    in_use = info.uordblks + info.hblkhd
    return {
        "rss": _rss(),
        "python_objects": objects,
        "python_free": arenas - objects,
        "malloc_objects": in_use - sqlite,
        "sqlite": sqlite,
        "malloc_free": anonymous - arenas - in_use,
        "mapped_files": files,
    }


def _memory_per_peer(
    before: dict[str, int], after: dict[str, int], counted: int, peers: int
) -> dict[str, float]:
    """What the tracker added to each part of :func:`memory_breakdown`, per peer, beside
    ``counted`` (the walk of its state) and what the walk plus the parts it cannot see
    (SQLite, the allocators' free memory, mapped files) add up to: ``accounted``, which
    should match the RSS growth; ``unaccounted`` is the difference, objects outside the
    walk (the benchmark's own, the store's) and measuring noise."""
    if not before or not after:
        return {}
    per = {k: (after[k] - before[k]) / peers for k in after}
    beside = per["sqlite"] + per["python_free"] + per["malloc_free"] + per["mapped_files"]
    per["counted"] = counted / peers
    per["accounted"] = per["counted"] + beside
    per["unaccounted"] = per["rss"] - per["accounted"]
    return per


#: No rate limit, edges usable at once, and an announce interval longer than any run:
#: a registration that outlasts 3 intervals would otherwise see its first peers expire.
_SETTINGS: dict[str, Any] = {
    "rate": 1e12,
    "burst": 1e12,
    "edge_settle": 0.0,
    "interval": 24 * 3600,
}


#: Peers per transaction of the bulk set-up (bounds its transient memory).
BULK_CHUNK = 50_000


def random_links(
    peers: int, rng: random.Random, degrees: tuple[int, int] = (4, 6)
) -> list[tuple[int, int]]:
    """A random graph on peers 1 .. ``peers`` with each degree in ``degrees`` (as the
    tracker's), sorted: each peer's ends paired at random (the configuration model),
    self-loops and repeated pairs dropped (a restore tops up the few peers they leave
    below the minimum, as it does for any stored graph)."""
    lo, hi = degrees
    ends: list[int] = []
    for p in range(1, peers + 1):
        ends.extend((p,) * rng.randint(lo, hi))
    rng.shuffle(ends)
    if len(ends) % 2:
        ends.pop()
    span = peers + 1
    pairs = {  # each pair as one int: a third of the memory of a set of tuples
        a * span + b if a < b else b * span + a
        for a, b in zip(ends[::2], ends[1::2], strict=True)
        if a != b
    }
    del ends
    return [divmod(pair, span) for pair in sorted(pairs)]


def populate(state: str, peers: int, infohash: bytes, size: int, rng: random.Random) -> None:
    """Write ``peers`` registered peers straight into the tracker's store in ``state``,
    as joins would have left them (a peer row, an account with its report, a swarm row,
    1 % seeding, and the neighbour graph), through the store's own batches, in
    transactions of BULK_CHUNK peers: the bulk part of the scale benchmark's set-up
    (10^6 peers in a minute or two instead of hours of joins). The tracker then
    restores them as after a restart; every request the benchmark times is real."""
    from anomos.tracker.store import Account, Batch, PeerRow, Store

    store = Store(state)
    onion, box = _SHARED
    # In key order, so the identity-keyed tables (accounts, reports) grow at their end
    # instead of taking a random B-tree insert per row.
    identities = sorted(rng.randbytes(32) for _ in range(peers))
    try:
        for first in range(1, peers + 1, BULK_CHUNK):
            batch = Batch()
            for i in range(first, min(first + BULK_CHUNK, peers + 1)):
                identity = identities[i - 1]
                address = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:6881"
                batch.peers[i] = PeerRow(identity, onion, box, address, 0.0, i)
                batch.accounts[identity] = Account(session=b"bench")
                batch.set_report(identity, infohash, (0, 0))
                seeds = i % round(1 / SEED_FRACTION) == 1  # 1 %, the first peer among them
                batch.set_swarm(infohash, i, 0 if seeds else size)
            batch.torrents[infohash] = size
            store.write(batch)
        links = random_links(peers, rng)
        for first in range(0, len(links), 4 * BULK_CHUNK):
            batch = Batch()
            for a, b in links[first : first + 4 * BULK_CHUNK]:
                batch.add_edge(a, b, rng.randint(1, MAX_NID))
            store.write(batch)
    finally:
        store.close()


def _timed_open(state: str, plugins: Plugins) -> tuple[Tracker, float, float]:
    """The benchmark's tracker opened (restored) on ``state``, and what opening it
    took: (tracker, wall seconds, CPU seconds)."""
    from anomos.tracker.limits import LimitSettings
    from anomos.tracker.server import Tracker
    from anomos.tracker.settings import TrackerSettings

    t0, c0 = time.perf_counter(), time.process_time()
    settings = TrackerSettings(limits=LimitSettings.unlimited(), **_SETTINGS)
    tracker = Tracker(state, "127.0.0.1:0", plugins, settings)
    return tracker, time.perf_counter() - t0, time.process_time() - c0


def restart_in_new_process(state: str) -> tuple[float, float]:
    """A restart as an operator's: a new Python process opens the tracker on ``state``
    (a clean stop's database). (wall seconds from the launch until it has restored,
    CPU seconds of the process by then: the interpreter's start and imports included),
    beside the restart inside the benchmark's process, which holds other state."""
    launched = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from anomos.bench.tracker import restart_main; restart_main()",
            state,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    opened = json.loads(proc.stdout.splitlines()[-1])
    return opened["restored_at"] - launched, opened["cpu"]


def restart_main() -> None:
    """:func:`restart_in_new_process`'s child: STATE; prints one JSON line."""
    tracker, _wall, _cpu = _timed_open(sys.argv[1], get_plugins(load_entrypoints=False))
    restored_at, cpu = time.time(), time.process_time()
    tracker.stop()
    print(json.dumps({"restored_at": restored_at, "cpu": cpu}))


def populate_main() -> None:
    """:func:`populate` from the command line: STATE PEERS INFOHASH-HEX SIZE."""
    state, peers, infohash, size = sys.argv[1:5]
    populate(state, int(peers), bytes.fromhex(infohash), int(size), random.Random(2))


def graph_bench(
    plugins: Plugins,
    peers: int,
    *,
    announces: int = 3000,
    samples: int = 1000,
    echo: Echo = _quiet,
) -> dict[str, Any]:
    """One tracker with ``peers`` registered: joins, announces, paths, signed circuit
    requests, memory per peer, the longest stall and the restart time; then the same
    announces and requests on the restarted tracker (the steady state at that size).

    Most peers are registered in bulk (:func:`populate`: written into the store, then
    restored by the tracker, shared public keys) to keep set-up short; the last
    ``announces`` join through the
    WSGI application with their own keys and signatures (the join rate), and then each
    of them announces once more (the announce rate: distinct peers, so nothing is
    served from a cache one peer warmed). TLS and HTTP parsing are the web server's
    and are excluded. Rates and latencies are CPU time of the serving thread (the
    writer thread's work is not in them; it does not hold up serving).
    """
    from anomos.tracker.identity import TrackerIdentity
    from anomos.tracker.server import ANNOUNCE_PATH, CIRCUITS_PATH

    state = tempfile.mkdtemp(prefix="anomos-bench-tracker-")
    gaps = _Gaps()
    try:
        infohash = os.urandom(20)
        size = 1 << 30
        rng = random.Random(1)
        joiners = min(announces, peers)
        echo(f"tracker: {joiners:,} identities")
        signed = [PeerIdentity.generate() for _ in range(joiners)]
        # Requests are signed for this tracker (its key, made here, is the one it loads),
        # each with a nonce of its own: the tracker refuses a signed request it has seen.
        fingerprint = TrackerIdentity.load_or_create(state).fingerprint
        nonces = iter(range(1 << 62))

        def nonce() -> bytes:
            return next(nonces).to_bytes(8)

        def bodies() -> list[bytes]:
            return [
                signed_body(
                    ident,
                    ANNOUNCE_PATH,
                    {
                        **_inner(ident, f"10.255.{j >> 8 & 255}.{j & 255}:7000", infohash, size),
                        "nonce": nonce(),
                    },
                    fingerprint,
                )
                for j, ident in enumerate(signed)
            ]

        def asks() -> list[bytes]:
            inner = {"time": int(time.time()), "infohash": infohash, "count": 1}
            return [
                signed_body(
                    signed[rng.randrange(len(signed))],
                    CIRCUITS_PATH,
                    {**inner, "nonce": nonce()},
                    fingerprint,
                )
                for _ in range(samples)
            ]

        statuses: list[str] = []

        def start_response(status: str, _headers: list[Any]) -> None:
            statuses.append(status)

        def serve(tracker: Tracker, path: str, requests: list[bytes], phase: str) -> list[Any]:
            """Serve ``requests``; their CPU times and replies."""
            out = []
            for body in requests:
                t = time.thread_time()
                reply = tracker.wsgi(_environ(path, body), start_response)
                out.append((time.thread_time() - t, reply))
                gaps.tick(phase)
            bad = [s for s in statuses if not s.startswith("200")]
            if bad:
                raise RuntimeError(f"tracker refused benchmark requests: {bad[0]}")
            return out

        def rate(served: list[Any]) -> float:
            return len(served) / sum(t for t, _ in served)

        def circuits(tracker: Tracker, phase: str) -> tuple[list[float], int]:
            requests = asks()  # signed before the clock starts: not a stall of the tracker
            gaps.restart()
            served = serve(tracker, CIRCUITS_PATH, requests, phase)
            planned = sum(len(bencode.decode(b"".join(r))[b"circuits"]) for _, r in served)
            return [t for t, _ in served], planned

        registered = peers - joiners
        echo(f"tracker: writing {registered:,} registered peers to its store (bulk)")
        t0 = time.perf_counter()
        # In a process of its own: its transient memory stays out of this one's RSS.
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from anomos.bench.tracker import populate_main; populate_main()",
                state,
                str(registered),
                infohash.hex(),
                str(size),
            ],
            check=True,
        )
        written = time.perf_counter() - t0
        gc.collect()
        rss0 = _rss()
        parts0 = memory_breakdown()
        echo(f"tracker: restoring them ({written:.0f} s to write)")
        tracker, first_restore, first_restore_cpu = _timed_open(state, plugins)
        tracker.start()
        registration = time.perf_counter() - t0
        if len(tracker.peers) != registered:
            raise RuntimeError(f"restored {len(tracker.peers):,} peers of {registered:,}")
        echo(f"tracker: {joiners:,} signed joins, then as many signed announces")
        join_bodies = bodies()
        gaps.restart()
        join_rate = rate(serve(tracker, ANNOUNCE_PATH, join_bodies, "joins"))
        # Every peer announced once; let every edge settle as if all had announced again.
        for peer in list(tracker.peers):
            tracker.graph.mark_told(peer)
        announce_bodies = bodies()
        gaps.restart()
        announce_rate = rate(serve(tracker, ANNOUNCE_PATH, announce_bodies, "announces"))

        echo(f"tracker: {samples:,} path computations and circuit requests")
        view = tracker.graph.settled_view()
        policy = tracker.planner.policy
        everyone = list(tracker.peers)
        path_times = []
        found = 0
        for _ in range(samples):
            start = rng.choice(everyone)
            near = list(tracker.graph.within(start, tracker.settings.max_relays + 1, 2000))
            end = rng.choice(near[1:]) if len(near) > 1 else rng.choice(everyone)
            t = time.thread_time()
            path = policy.find_path(view, start, end, rng)
            path_times.append(time.thread_time() - t)
            found += path is not None
        # The benchmark's own list of every peer would be young for the collector: a
        # generation-0 collection walking it took ~50 ms at 10^6, counted as a stall of
        # the tracker's (which never holds such a list while serving).
        del everyone, near
        gc.collect()
        gaps.restart()
        request_times, planned = circuits(tracker, "circuits")
        gc.collect()
        rss = _rss() - rss0
        parts = memory_breakdown()
        echo("tracker: counting the bytes of its state")
        counted = counted_bytes(tracker)
        memory = _memory_per_peer(parts0, parts, counted, peers)
        # A restart as after a crash: the last graph image (taken by the first write
        # after the bulk restore) plus every link written since (the timed joins).
        tracker.flush()
        echo("tracker: restart after a crash (the last image and the links since)")
        crashed, crash_restart, crash_restart_cpu = _timed_open(state, plugins)
        crashed_peers = len(crashed.peers)
        crashed.stop()
        del crashed
        tracker.stop()
        del view, policy
        tracker = None  # type: ignore[assignment]
        gc.collect()
        echo("tracker: restart (a new process, as an operator's)")
        restart, restart_cpu = restart_in_new_process(state)
        echo("tracker: restart (in this process)")
        again, here, here_cpu = _timed_open(state, plugins)
        restored = len(again.peers)
        if restored != peers:
            raise RuntimeError(f"the restarted tracker has {restored:,} peers of {peers:,}")
        again.start()
        echo("tracker: announces and circuit requests after the restart")
        announce_bodies = bodies()
        gaps.restart()
        steady_rate = rate(serve(again, ANNOUNCE_PATH, announce_bodies, "announces after restart"))
        gaps.restart()
        steady_times, steady_planned = circuits(again, "circuits after restart")
        again.stop()
        steady = ("announces after restart", "circuits after restart")
        return {
            "peers": peers,
            "registration_seconds": registration,
            "bulk_write_seconds": written,
            "first_restore_seconds": first_restore,
            "first_restore_cpu_seconds": first_restore_cpu,
            "joins_per_second": join_rate,
            "announces_per_second": announce_rate,
            "path_p50": percentile(path_times, 50),
            "path_p99": percentile(path_times, 99),
            "paths_found": found / samples,
            "request_p50": percentile(request_times, 50),
            "request_p99": percentile(request_times, 99),
            "requests_planned": planned / samples,
            "rss_per_peer": rss / peers,
            "counted_per_peer": counted / peers,
            "memory_per_peer": memory,
            "longest_stall": max(gaps.longest.values()),
            "stalls": gaps.longest,
            "stalls_wall": gaps.longest_wall,
            "restart_seconds": restart,
            "restart_cpu_seconds": restart_cpu,
            "restart_in_process_seconds": here,
            "restart_in_process_cpu_seconds": here_cpu,
            "crash_restart_seconds": crash_restart,
            "crash_restart_cpu_seconds": crash_restart_cpu,
            "crash_restored_peers": crashed_peers,
            "rss_bytes": rss,
            "restored_peers": restored,
            "steady_announces_per_second": steady_rate,
            "steady_request_p50": percentile(steady_times, 50),
            "steady_request_p99": percentile(steady_times, 99),
            "steady_requests_planned": steady_planned / samples,
            "steady_longest_stall": max(gaps.longest[k] for k in steady),
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
