"""A benchmark worker: real links, circuits and torrent sessions, steered without a tracker.

``anomos bench`` plays the tracker itself: it tells each worker its
neighbours and hands the downloader the hops of a path, from which the worker
builds the tracking code and the sealed request exactly as the tracker's
planner does. That is how the benchmark gets paths of exactly 0 to 3 relays
(the tracker never plans a circuit without a relay) and thousands of circuits
through one relay; everything below the tracker is the code a peer runs.

A worker hosts one or more *personas* (an identity, a :class:`LinkManager`
and a :class:`CircuitSwitch`, each on its own loopback address), so a few
processes can give a relay many links. It reads one JSON command per line on
standard input and answers one JSON line on standard output: first
``{"ok": true, "pid": ..., "personas": [...]}`` once listening, then one reply
per command (``{"ok": false, "error": "..."}`` on failure). End of input stops it.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import gevent
import gevent.pool
import psutil
from cryptography.hazmat.primitives.asymmetric import ec
from gevent.fileobject import FileObjectPosix

from anomos.config import Settings
from anomos.errors import AnomosError
from anomos.identity import PeerIdentity
from anomos.interfaces import CipherSuite
from anomos.net import link as linkmod
from anomos.net.circuit import CircuitStream, CircuitSwitch
from anomos.net.link import LinkManager
from anomos.pluginmanager import Plugins, get_plugins
from anomos.protocol.onion import Hop, build_tracking_code, current_epoch
from anomos.protocol.request import SourceRequest, seal_request, tracker_fingerprint
from anomos.torrent.metainfo import Metainfo
from anomos.torrent.session import TorrentSession
from anomos.tracker.client import CircuitPlan, Neighbour

log = logging.getLogger(__name__)

#: Seconds a sealed request stays valid (as the tracker's planner).
REQUEST_TTL = 300
#: Seconds allowed for one circuit to open.
OPEN_TIMEOUT = 30.0
#: The benchmark plays the tracker: every worker signs and trusts requests with this
#: fixed key (loopback only, never a real tracker's).
BENCH_TRACKER_KEY = ec.derive_private_key(0xA7030505, ec.SECP256R1())
BENCH_TRACKERS = frozenset({tracker_fingerprint(BENCH_TRACKER_KEY.public_key())})
#: Commands profiled (with cProfile, into $ANOMOS_BENCH_PROFILE) when that is set.
PROFILED_OPS = frozenset({"download", "latency", "open", "profile"})
#: Longest command line accepted on standard input.
MAX_COMMAND = 1 << 20


@attrs.define(eq=False)
class Persona:
    """One identity of the worker, with its own links and circuit switch."""

    identity: PeerIdentity
    links: LinkManager
    switch: CircuitSwitch

    def describe(self) -> dict[str, Any]:
        ident = self.identity
        return {
            "address": self.links.address,
            "identity": ident.identity_public.hex(),
            "onion": ident.onion_public.hex(),
            "box": ident.box_public.hex(),
        }


def make_plan(
    suite: CipherSuite, first_nid: int, hops: list[list[Any]], box: bytes, infohash: bytes
) -> CircuitPlan:
    """What the tracker's planner would hand a downloader for this path.

    ``hops`` is ``[[onion key hex, next NID or None], ...]`` in path order, the
    source last (its next NID is None).
    """
    code, layers = build_tracking_code(
        [Hop(bytes.fromhex(onion), nid) for onion, nid in hops], current_epoch()
    )
    material = suite.tracker_material()
    request = SourceRequest(
        infohash=infohash,
        suite=suite.name,
        material=material,
        expires=int(time.time()) + REQUEST_TTL,
    )
    blob = seal_request(request, box, BENCH_TRACKER_KEY)
    return CircuitPlan(first_nid, code, layers, blob, suite.name, material)


@attrs.define(eq=False)
class Worker:
    """The worker's state and its command handlers (``op_<name>``)."""

    plugins: Plugins
    personas: list[Persona]
    sessions: dict[bytes, TorrentSession] = attrs.field(factory=dict)
    #: Streams kept open on purpose (``open`` and sink circuits).
    held: list[CircuitStream] = attrs.field(factory=list)
    #: Whether circuits asking for an unknown torrent are parked instead of refused.
    sink: bool = False

    @classmethod
    def start(cls, state: Path, hosts: list[str], plugins: Plugins) -> Worker:
        worker = cls(plugins, [])
        for i, host in enumerate(hosts):
            settings = Settings(
                listen=f"{host}:0",
                state_dir=state / f"p{i}",
                # The CPU probe's --rate: a source paced like one on a WAN link.
                max_send_rate=int(os.environ.get("ANOMOS_BENCH_MAX_SEND_RATE", "0")),
            )
            identity = PeerIdentity.load_or_create(settings.state_dir)
            links = LinkManager(identity, plugins, settings, on_frame=None)
            switch = CircuitSwitch(
                links, identity, plugins, on_request=worker._on_request, trackers=BENCH_TRACKERS
            )
            links.start()
            worker.personas.append(Persona(identity, links, switch))
        return worker

    def stop(self) -> None:
        for stream in self.held:
            stream.close()
        for session in self.sessions.values():
            session.close()
        for p in self.personas:
            p.switch.close()
            p.links.close()

    # ------------------------------------------------------------------ serving
    def _on_request(self, request: SourceRequest) -> Callable[[CircuitStream], None] | None:
        session = self.sessions.get(bytes(request.infohash))
        if session is not None and session.complete:
            return lambda stream: session.add_connection(stream, "bench")  # type: ignore[misc]
        if self.sink:
            return self.held.append
        return None

    def _persona(self, cmd: dict[str, Any]) -> Persona:
        return self.personas[int(cmd.get("persona", 0))]

    def _plan(self, cmd: dict[str, Any]) -> CircuitPlan:
        suite = self.plugins.cipher_suite(cmd.get("suite", "x25519"))
        return make_plan(
            suite,
            int(cmd["first_nid"]),
            cmd["hops"],
            bytes.fromhex(cmd["box"]),
            bytes.fromhex(cmd["infohash"]),
        )

    # ------------------------------------------------------------------ commands
    def op_neighbours(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Adopt a neighbour list, as if the tracker had sent it."""
        persona = self._persona(cmd)
        persona.links.set_neighbours(
            Neighbour(int(n["nid"]), n["address"], bytes.fromhex(n["identity"]), bool(n["dial"]))
            for n in cmd["neighbours"]
        )
        return {}

    def op_wait_links(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Wait until every persona has a link to each of its assigned neighbours."""
        deadline = time.monotonic() + float(cmd.get("timeout", 30.0))
        for p in self.personas:
            for nid in p.links.neighbours():
                p.links.wait_for(nid, max(0.0, deadline - time.monotonic()))
        return {}

    def op_seed(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Serve a torrent whose data is complete on disk."""
        meta = Metainfo.load(cmd["atorrent"])
        session = TorrentSession(meta, cmd["data"], plugins=self.plugins)
        session.start()
        if not session.complete:
            raise AnomosError(f"{meta.name}: data incomplete at {cmd['data']}")
        self.sessions[meta.infohash] = session
        return {}

    def op_sink(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Accept (and keep open) circuits for any torrent, serving nothing."""
        self.sink = True
        return {}

    def op_download(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Fetch a torrent over one circuit along the given path; timings in seconds."""
        meta = Metainfo.load(cmd["atorrent"])
        dest = Path(cmd["dest"])
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        session = TorrentSession(meta, dest, plugins=self.plugins)
        session.start()
        persona = self._persona(cmd)
        plan = self._plan({**cmd, "infohash": meta.infohash.hex()})
        cpu0 = _cpu()
        t0 = time.monotonic()
        stream = persona.switch.open_circuit(plan, OPEN_TIMEOUT)
        t1 = time.monotonic()
        try:
            session.add_connection(stream, "bench")
            if not session.wait_complete(float(cmd.get("timeout", 600))):
                raise AnomosError("download did not complete in time")
            t2 = time.monotonic()
        finally:
            stream.close()
            session.close()
        return {
            "open": t1 - t0,
            "seconds": t2 - t0,
            "size": meta.total_length,
            "received": stream.bytes_received,
            "cpu": _cpu() - cpu0,
        }

    def op_latency(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Open and close ``count`` circuits one after another; seconds to open each.

        Timed from the call that sends CREATE until the source's REPLY (the
        first cell back from the source) is in and the keys are agreed; the
        tracking code and the sealed request are built before the clock starts.
        """
        persona = self._persona(cmd)
        times = []
        for _ in range(int(cmd["count"])):
            plan = self._plan(cmd)
            t0 = time.perf_counter()
            stream = persona.switch.open_circuit(plan, OPEN_TIMEOUT)
            times.append(time.perf_counter() - t0)
            stream.close()
            gevent.sleep(float(cmd.get("pause", 0.002)))
        return {"seconds": times}

    def op_open(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Open ``count`` circuits (``parallel`` at a time) and keep them open."""
        persona = self._persona(cmd)
        failures: list[str] = []

        def one() -> None:
            try:
                self.held.append(persona.switch.open_circuit(self._plan(cmd), OPEN_TIMEOUT))
            except AnomosError as exc:
                failures.append(str(exc))

        pool = gevent.pool.Pool(int(cmd.get("parallel", 32)))
        t0 = time.monotonic()
        for _ in range(int(cmd["count"])):
            pool.spawn(one)
        pool.join()
        return {
            "opened": int(cmd["count"]) - len(failures),
            "failed": len(failures),
            "error": failures[0] if failures else None,
            "seconds": time.monotonic() - t0,
        }

    def op_close_held(self, cmd: dict[str, Any]) -> dict[str, Any]:
        held, self.held = self.held, []
        for stream in held:
            stream.close()
        return {"closed": len(held)}

    def op_profile(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Idle for ``seconds``: profiles the whole process when $ANOMOS_BENCH_PROFILE is set."""
        gevent.sleep(float(cmd.get("seconds", 1.0)))
        return {}

    def op_stats(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Counters for the driver: relayed bytes, CPU seconds, RSS, live circuits."""
        if cmd.get("gc"):
            gc.collect()
            gevent.sleep(0.05)
        return {
            "relayed": sum(p.switch.relayed_bytes for p in self.personas),
            "cpu": _cpu(),
            "rss": psutil.Process().memory_info().rss,
            "circuits": sum(len(p.switch.circuits()) for p in self.personas),
            "held": len(self.held),
        }

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        handler = getattr(self, f"op_{cmd.get('op')}", None)
        if handler is None:
            return {"ok": False, "error": f"unknown op {cmd.get('op')!r}"}
        profile_dir = os.environ.get("ANOMOS_BENCH_PROFILE")
        profiler = cProfile.Profile() if profile_dir and cmd.get("op") in PROFILED_OPS else None
        try:
            if profiler is not None:
                profiler.enable()
            return {"ok": True, **handler(cmd)}
        except (AnomosError, OSError, ValueError, KeyError) as exc:
            log.info("%s failed: %s", cmd.get("op"), exc)
            return {"ok": False, "error": " ".join(f"{type(exc).__name__}: {exc}".split())}
        finally:
            if profiler is not None:
                # Every greenlet of the process ran under the profiler, not only this op.
                profiler.disable()
                path = Path(str(profile_dir)) / f"{cmd['op']}-{os.getpid()}-{time.time():.0f}.prof"
                profiler.dump_stats(path)


def _cpu() -> float:
    """CPU seconds (user + system) this process used so far, to the microsecond."""
    return time.process_time()


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m anomos.bench node")
    parser.add_argument("--state", required=True, type=Path, help="state directory")
    parser.add_argument(
        "--host", required=True, action="append", help="loopback address (once per persona)"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # The benchmark opens thousands of circuits back to back through one relay to
    # measure set-up latency and memory, not the per-neighbour CREATE rate limit.
    linkmod.CREATE_RATE = linkmod.CREATE_BURST = 1_000_000
    plugins = get_plugins(load_entrypoints=False)
    worker = Worker.start(args.state, args.host, plugins)
    _reply({"ok": True, "pid": os.getpid(), "personas": [p.describe() for p in worker.personas]})
    stdin = FileObjectPosix(sys.stdin.fileno(), "rb", close=False)
    try:
        while True:
            line = stdin.readline(MAX_COMMAND)
            if not line:
                break
            try:
                cmd = json.loads(line)
            except ValueError:
                _reply({"ok": False, "error": "command is not JSON"})
                continue
            if cmd.get("op") == "stop":
                break
            _reply(worker.handle(cmd))
    finally:
        worker.stop()
    return 0
