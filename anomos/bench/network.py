"""Benchmarks over real processes on loopback: throughput, one relay, set-up latency, memory.

Throughput and set-up latency share one network of five workers, every one a
neighbour of every other: downloader ``D``, relays ``R1..R3`` and source
``S``. A path of ``k`` relays is ``D, R1..Rk, S``; 0 relays is ``D`` and
``S`` adjacent (still a circuit: a one-hop tracking code, the layers and the
end-to-end channel). Each download fetches the whole file over one circuit
into a fresh directory, the pieces hashed and written and the file fsynced,
timed from the call that sends CREATE to the verified end. The plain TCP
copy of the same file runs in each round too, so every ratio compares
numbers measured minutes apart on the same machine.

The memory benchmark gives one relay ``pairs`` links on each side (a worker
with ``pairs`` personas opening circuits, another parking them) and reads
the relay's RSS after opening 1,000 and 10,000 circuits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent

from anomos.bench.procs import Cluster, CpuWatch, Worker, wait_quiet
from anomos.bench.report import GB, median, percentile
from anomos.errors import AnomosError
from anomos.torrent.metainfo import make_metainfo

Echo = Callable[[str], None]
#: Plain TCP copies per round (cheap, and the noisiest figure).
TCP_COPIES = 3
#: Circuits opened and closed on each link before the memory baseline is taken.
WARM_UP = 20
#: Placeholder announce URL of the benchmark torrent (no tracker is contacted).
BENCH_TRACKER = "https://127.0.0.1:1/announce"


def _quiet(_msg: str) -> None:
    pass


def write_random(path: Path, size: int) -> None:
    """``size`` random bytes: nothing along the way can compress or dedupe them."""
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            f.write(chunk)
            left -= len(chunk)


def tcp_copy(src: Path, dest: Path, host: str, timeout: float) -> dict[str, float]:
    """One plain TCP copy of ``src`` between two fresh processes; bytes and seconds."""
    module = [sys.executable, "-m", "anomos.bench.tcpcopy"]
    recv = subprocess.Popen(
        [*module, "recv", host, str(dest)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        assert recv.stdout is not None
        with gevent.Timeout(30, AnomosError("TCP copy receiver did not start")):
            port = json.loads(recv.stdout.readline())["port"]
        subprocess.run(
            [*module, "send", str(src), f"{host}:{port}"],
            check=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        with gevent.Timeout(timeout, AnomosError("TCP copy receiver did not finish")):
            result: dict[str, float] = json.loads(recv.stdout.readline())
        recv.wait(10)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait(5)
        dest.unlink(missing_ok=True)
    if result["bytes"] != src.stat().st_size:
        raise AnomosError(f"TCP copy moved {result['bytes']} bytes, not {src.stat().st_size}")
    return result


def throughput_and_setup(
    workdir: Path,
    *,
    size: int,
    runs: int,
    relays: tuple[int, ...] = (0, 1, 2, 3),
    setup_count: int = 200,
    timeout: float = 600.0,
    quiet_wait: float = 0.0,
    echo: Echo = _quiet,
    verbose: bool = False,
) -> dict[str, Any]:
    """Sections ``throughput``, ``relay`` and ``setup`` of the result.

    Before each timed run, waits up to ``quiet_wait`` s for other programs to
    leave the CPUs alone (see :func:`~anomos.bench.procs.wait_quiet`).
    """
    files, data, atorrent = bench_torrent(workdir, "bench", size, copies=3)
    try:
        result = _network(
            workdir,
            files,
            data,
            atorrent,
            size,
            runs,
            relays,
            setup_count,
            timeout,
            quiet_wait,
            echo,
            verbose,
        )
    finally:
        if files != workdir:
            shutil.rmtree(files, ignore_errors=True)
    result["throughput"]["files_on"] = "tmpfs" if files != workdir else "disk"
    return result


def bench_torrent(workdir: Path, name: str, size: int, copies: int) -> tuple[Path, Path, Path]:
    """A file of ``size`` random bytes and its .atorrent for the benchmark's tracker:
    (the folder the data and downloads live in, with room for ``copies`` of it; the
    file; the .atorrent in ``workdir``). The caller removes the folder when it is not
    ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    files = _data_dir(workdir, copies * size)
    data = files / f"{name}.bin"
    write_random(data, size)
    atorrent = workdir / f"{name}.atorrent"
    make_metainfo(data, trackers=[BENCH_TRACKER], progress=False).save(atorrent)
    return files, data, atorrent


def _data_dir(workdir: Path, need: int) -> Path:
    """Where the file and the downloads live: RAM (/dev/shm) when it has room.

    Every download still hashes, writes and fsyncs each piece; on tmpfs the
    fsync costs nothing, so the disk's speed (and the host's write-back of
    earlier runs, which made the plain copy vary from 0.4 to 1.9 GB/s) stays
    out of figures meant for the network and the crypto.
    """
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > need + (256 << 20):
            return Path(tempfile.mkdtemp(prefix="anomos-bench-", dir=shm))
    except OSError:
        pass
    return workdir


def _network(
    workdir: Path,
    files: Path,
    data: Path,
    atorrent: Path,
    size: int,
    runs: int,
    relays: tuple[int, ...],
    setup_count: int,
    timeout: float,
    quiet_wait: float,
    echo: Echo,
    verbose: bool,
) -> dict[str, Any]:
    most = max(relays)
    with Cluster(workdir / "net", verbose=verbose) as net:
        echo(f"starting {most + 2} worker processes (downloader, {most} relays, source)")
        d = net.spawn("downloader")
        rs = [net.spawn(f"relay{i + 1}") for i in range(most)]
        s = net.spawn("source")
        nodes = [d, *rs, s]
        net.connect([(a, 0, b, 0) for i, a in enumerate(nodes) for b in nodes[i + 1 :]])
        s.call("seed", atorrent=str(atorrent), data=str(files))
        infohash = _infohash(atorrent)

        setup = []
        for k in relays:
            echo(f"circuit set-up, {k} relays: {setup_count} circuits one after another")
            path = net.path([d, *rs[:k], s])
            reply = d.call("latency", count=setup_count, infohash=infohash, timeout=timeout, **path)
            times = reply["seconds"]
            setup.append(
                {
                    "relays": k,
                    "count": len(times),
                    "p50": percentile(times, 50),
                    "p99": percentile(times, 99),
                    "max": max(times),
                }
            )

        tcp_runs: list[dict[str, float]] = []
        downloads: dict[int, list[dict[str, Any]]] = {k: [] for k in relays}
        relay_runs: list[dict[str, float]] = []
        waited = 0.0
        for r in range(runs):
            echo(f"round {r + 1} of {runs}: plain TCP copy x{TCP_COPIES}")
            for _ in range(TCP_COPIES):
                waited += wait_quiet(quiet_wait)
                watch = CpuWatch(nodes)
                copy = tcp_copy(data, files / "tcp.out", net.next_host(), timeout)
                tcp_runs.append({**copy, **watch.stop()})
            for k in relays:
                echo(f"round {r + 1} of {runs}: download through {k} relays")
                path = net.path([d, *rs[:k], s])
                cpu0 = {w.name: w.cpu() for w in nodes}
                before = rs[0].call("stats") if k == 1 else None
                waited += wait_quiet(quiet_wait)
                watch = CpuWatch(nodes)
                reply = d.call(
                    "download",
                    atorrent=str(atorrent),
                    dest=str(files / "dl"),
                    timeout=timeout,
                    **path,
                )
                reply.update(watch.stop())
                cpu = {w.name: w.cpu() - cpu0[w.name] for w in nodes if w in (d, s, *rs[:k])}
                shutil.rmtree(files / "dl", ignore_errors=True)
                reply["rate"] = reply["size"] / reply["seconds"]
                reply["cpu_by_process"] = cpu
                downloads[k].append(reply)
                if before is not None:
                    after = rs[0].call("stats")
                    relayed = after["relayed"] - before["relayed"]
                    relay_cpu = after["cpu"] - before["cpu"]
                    relay_runs.append(
                        {
                            "relayed": relayed,
                            "seconds": reply["seconds"],
                            "cpu": relay_cpu,
                            "rate": relayed / reply["seconds"],
                            "cpu_per_gb": relay_cpu / (relayed / GB),
                            "core_share": relay_cpu / reply["seconds"],
                            "cells_per_file": relayed / size,
                        }
                    )
    tcp_median = median([t["bytes"] / t["seconds"] for t in tcp_runs])
    anomos = []
    for k in relays:
        rates = [x["rate"] for x in downloads[k]]
        anomos.append(
            {
                "relays": k,
                "median": median(rates),
                "ratio": median(rates) / tcp_median,
                "runs": downloads[k],
            }
        )
    shares = [x.get("background_share", 0.0) for x in tcp_runs] + [
        x.get("background_share", 0.0) for runs_k in downloads.values() for x in runs_k
    ]
    result: dict[str, Any] = {
        "background": {
            "median_share": median(shares),
            "max_share": max(shares),
            "waited_for_quiet": waited,
        },
        "throughput": {
            "size": size,
            "tcp": {"median": tcp_median, "runs": tcp_runs},
            "anomos": anomos,
        },
        "setup": setup,
    }
    if relay_runs:
        result["relay"] = {
            "rate": median([x["rate"] for x in relay_runs]),
            "cpu_per_gb": median([x["cpu_per_gb"] for x in relay_runs]),
            "core_share": median([x["core_share"] for x in relay_runs]),
            "cells_per_file": median([x["cells_per_file"] for x in relay_runs]),
            "runs": relay_runs,
        }
    return result


def _infohash(atorrent: Path) -> str:
    from anomos.torrent.metainfo import Metainfo

    return Metainfo.load(atorrent).infohash.hex()


def relay_memory(
    workdir: Path,
    *,
    counts: tuple[int, ...] = (1000, 10000),
    pairs: int = 10,
    echo: Echo = _quiet,
    verbose: bool = False,
) -> dict[str, Any]:
    """Section ``memory``: a relay's RSS with each number of open circuits in ``counts``.

    ``pairs`` client links and ``pairs`` sink links keep every link under its
    circuit limit; each circuit is fully open (keys agreed) and idle.
    """
    infohash = os.urandom(20).hex()
    with Cluster(workdir / "mem", verbose=verbose) as net:
        echo(f"memory: a relay with {pairs} links on each side")
        clients = net.spawn("clients", personas=pairs)
        relay = net.spawn("relay")
        sinks = net.spawn("sinks", personas=pairs)
        edges: list[tuple[Worker, int, Worker, int]] = []
        for i in range(pairs):
            edges += [(clients, i, relay, 0), (relay, 0, sinks, i)]
        net.connect(edges)
        sinks.call("sink")
        paths = [net.path([clients, relay, sinks], personas=[i, 0, i]) for i in range(pairs)]
        # Warm up every link and code path once, then measure from an idle relay.
        for i in range(pairs):
            clients.call("open", persona=i, count=WARM_UP, infohash=infohash, **paths[i])
        clients.call("close_held")
        sinks.call("close_held")
        time.sleep(0.5)
        idle = relay.call("stats", gc=True)
        points: list[dict[str, float]] = []
        opened = 0
        for target in sorted(counts):
            echo(f"memory: opening circuits up to {target}")
            for i in range(pairs):
                want = target * (i + 1) // pairs - target * i // pairs
                have = opened * (i + 1) // pairs - opened * i // pairs
                if want > have:
                    reply = clients.call(
                        "open",
                        persona=i,
                        count=want - have,
                        infohash=infohash,
                        timeout=600,
                        **paths[i],
                    )
                    if reply["failed"]:
                        raise AnomosError(f"memory benchmark: circuits failed: {reply['error']}")
            opened = target
            time.sleep(0.5)
            stats = relay.call("stats", gc=True)
            if stats["circuits"] != target:
                raise AnomosError(f"relay holds {stats['circuits']} circuits, expected {target}")
            before = points[-1] if points else {"circuits": 0, "rss": idle["rss"]}
            points.append(
                {
                    "circuits": target,
                    "rss": stats["rss"],
                    "per_circuit": (stats["rss"] - idle["rss"]) / target,
                    "marginal": (stats["rss"] - before["rss"]) / (target - before["circuits"]),
                }
            )
    return {"idle_rss": idle["rss"], "pairs": pairs, "points": points}
