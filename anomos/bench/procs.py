"""Starting benchmark workers and talking to them (the driver's side of :mod:`anomos.bench.node`).

Each worker is a ``python -m anomos.bench node`` process with its own state
directory, loopback address(es) and log file. :class:`Cluster` wires workers
into a topology by giving every edge an NID and telling both ends, as the
tracker would.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import gevent
import psutil

from anomos.errors import AnomosError

#: Seconds a worker gets to start listening.
START_TIMEOUT = 60.0
#: Seconds a command may take unless the caller says otherwise.
COMMAND_TIMEOUT = 120.0


@attrs.define(eq=False)
class Worker:
    """One worker process; :meth:`call` sends a command and waits for its reply."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    pid: int = 0
    personas: list[dict[str, str]] = attrs.field(factory=list)

    def call(self, op: str, timeout: float = COMMAND_TIMEOUT, **kw: Any) -> dict[str, Any]:
        """Run ``op`` in the worker; raise AnomosError if it fails or times out."""
        assert self.popen.stdin is not None
        try:
            self.popen.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
            self.popen.stdin.flush()
        except OSError:
            raise AnomosError(f"bench worker {self.name} is gone: {self.log_tail()}") from None
        reply = self._read(timeout, op)
        if not reply.get("ok"):
            raise AnomosError(f"bench worker {self.name}: {op} failed: {reply.get('error')}")
        return reply

    def _read(self, timeout: float, what: str) -> dict[str, Any]:
        assert self.popen.stdout is not None
        error = AnomosError(f"bench worker {self.name}: no answer to {what} in {timeout:g} s")
        with gevent.Timeout(timeout, error):
            line = self.popen.stdout.readline()
        if not line:
            raise AnomosError(f"bench worker {self.name} exited: {self.log_tail()}")
        try:
            reply: dict[str, Any] = json.loads(line)
        except ValueError:
            raise AnomosError(f"bench worker {self.name} said {line[:80]!r}") from None
        return reply

    def wait_ready(self) -> None:
        reply = self._read(START_TIMEOUT, "start")
        self.pid = int(reply["pid"])
        self.personas = reply["personas"]

    def cpu(self) -> float:
        """CPU seconds (user + system) of the process so far, seen from outside."""
        t = psutil.Process(self.popen.pid).cpu_times()
        return float(t.user + t.system)

    def rss(self) -> int:
        return int(psutil.Process(self.popen.pid).memory_info().rss)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            try:
                assert self.popen.stdin is not None
                self.popen.stdin.close()
            except OSError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


@attrs.define(eq=False)
class Cluster:
    """Workers under ``workdir``, each on fresh 127.x.y.z addresses."""

    workdir: Path = attrs.field(converter=Path)
    workers: list[Worker] = attrs.field(factory=list)
    verbose: bool = False
    _hosts: itertools.count[int] = attrs.field(factory=lambda: itertools.count(2))
    _block: int = attrs.field(factory=lambda: 20 + os.getpid() % 200)
    _nids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1001))
    _nid_map: dict[tuple[int, int], int] = attrs.field(factory=dict)

    def next_host(self) -> str:
        n = next(self._hosts)
        return f"127.{self._block}.{n // 250}.{n % 250 + 2}"

    def spawn(
        self,
        name: str,
        personas: int = 1,
        env: dict[str, str] | None = None,
        python: str | None = None,
    ) -> Worker:
        """Start a worker with ``personas`` identities (under ``python``, default this
        interpreter: another venv runs an old tree with the libraries of its day);
        returns once it listens."""
        state = self.workdir / name
        state.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / f"{name}.log"
        argv = [python or sys.executable, "-m", "anomos.bench", "node", "--state", str(state)]
        for _ in range(personas):
            argv += ["--host", self.next_host()]
        if self.verbose:
            argv.append("-v")
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", ANOMOS_PROGRESS="0", **(env or {}))
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=full_env
            )
        worker = Worker(name, popen, log_path)
        self.workers.append(worker)
        worker.wait_ready()
        return worker

    def connect(self, edges: list[tuple[Worker, int, Worker, int]]) -> None:
        """Make each ``(a, persona of a, b, persona of b)`` an edge (``a`` dials), as the
        tracker would, and wait until every link is up; :meth:`nid` names the edges."""
        lists: dict[tuple[Worker, int], list[dict[str, Any]]] = {}
        for a, pa, b, pb in edges:
            nid = next(self._nids)
            self._nid_map[_key(a, pa, b, pb)] = self._nid_map[_key(b, pb, a, pa)] = nid
            for (x, px), (y, py), dial in (((a, pa), (b, pb), True), ((b, pb), (a, pa), False)):
                other = y.personas[py]
                lists.setdefault((x, px), []).append(
                    {
                        "nid": nid,
                        "address": other["address"],
                        "identity": other["identity"],
                        "dial": dial,
                    }
                )
        for (worker, persona), neighbours in lists.items():
            worker.call("neighbours", persona=persona, neighbours=neighbours)
        for worker in {w for w, _ in lists}:
            worker.call("wait_links", timeout=60.0)

    def nid(self, a: Worker, b: Worker, pa: int = 0, pb: int = 0) -> int:
        """The NID of the edge between persona ``pa`` of ``a`` and ``pb`` of ``b``."""
        return self._nid_map[_key(a, pa, b, pb)]

    def path(self, chain: list[Worker], *, personas: list[int] | None = None) -> dict[str, Any]:
        """``first_nid``, ``hops`` and the source's ``box`` for a download along ``chain``.

        ``chain = [downloader, relay, ..., source]``: what the tracker puts in a plan.
        """
        ps = personas or [0] * len(chain)
        hops: list[list[Any]] = []
        for i in range(1, len(chain)):
            nxt = self.nid(chain[i], chain[i + 1], ps[i], ps[i + 1]) if i + 1 < len(chain) else None
            hops.append([chain[i].personas[ps[i]]["onion"], nxt])
        return {
            "first_nid": self.nid(chain[0], chain[1], ps[0], ps[1]),
            "hops": hops,
            "box": chain[-1].personas[ps[-1]]["box"],
        }

    def stop(self) -> None:
        for worker in reversed(self.workers):
            worker.stop()
        self.workers.clear()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _key(a: Worker, pa: int, b: Worker, pb: int) -> tuple[int, int]:
    return (id(a) * 64 + pa, id(b) * 64 + pb)


def _busy_cpu() -> float | None:
    """CPU seconds all processes of the machine spent busy so far (Linux), else None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...
    busy = sum(fields[:3]) + sum(fields[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    """CPU seconds of this process and of its children already waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@attrs.define(eq=False)
class CpuWatch:
    """How much CPU *other* programs took while a measurement ran.

    The benchmark shares the machine: anything else running steals cores
    from the workers and lowers the figures. :meth:`stop` returns the CPU
    seconds the machine was busy minus what this process, its children and
    ``workers`` used, also as a share of all cores over the interval.
    """

    workers: list[Worker]
    _t0: float = attrs.field(init=False)
    _busy0: float | None = attrs.field(init=False)
    _own0: float = attrs.field(init=False)
    _workers0: list[float] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._t0 = time.monotonic()
        self._busy0 = _busy_cpu()
        self._own0 = _own_cpu()
        self._workers0 = [w.cpu() for w in self.workers]

    def stop(self) -> dict[str, float]:
        busy = _busy_cpu()
        if busy is None or self._busy0 is None:
            return {}
        ours = _own_cpu() - self._own0
        ours += sum(w.cpu() - c for w, c in zip(self.workers, self._workers0, strict=True))
        other = max(0.0, busy - self._busy0 - ours)
        span = max(time.monotonic() - self._t0, 1e-9)
        return {"background_cpu": other, "background_share": other / (span * (os.cpu_count() or 1))}


def machine_busy(seconds: float = 0.5) -> float | None:
    """Share of all cores busy over ``seconds`` (this process sleeping), or None."""
    b0 = _busy_cpu()
    t0 = time.monotonic()
    gevent.sleep(seconds)
    b1 = _busy_cpu()
    if b0 is None or b1 is None:
        return None
    return (b1 - b0) / ((time.monotonic() - t0) * (os.cpu_count() or 1))


def wait_quiet(max_wait: float, threshold: float = 0.1, sample: float = 0.5) -> float:
    """Wait (up to ``max_wait`` s) until other programs use under ``threshold`` of the CPUs.

    Call it while the workers are idle. Returns the seconds waited; a shared
    machine rarely stays busy for long, and a run measured in a quiet moment
    says more than one measured beside someone's test suite.
    """
    waited = 0.0
    while waited < max_wait:
        busy = machine_busy(sample)
        if busy is None or busy < threshold:
            break
        waited += sample
    return waited
