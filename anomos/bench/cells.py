"""Cell crypto benchmarks, in this process on one core: what one hop spends per cell.

* the per-hop onion layer (:class:`~anomos.protocol.layers.OnionLayer`),
  adding and removing, against plain AES-256-CTR over the same cell (the
  malleable layer anomos used before, one long-lived stream: the floor any
  per-hop layer is compared with);
* the end-to-end AEAD sealing one record, for scale.

Each figure is the best of ``repeats`` timings of ``cells`` cells: many
timings shorter than a scheduler time slice, so that some run undisturbed by
other programs, as a per-core cost should be measured.

:func:`cpu_per_byte` (``python -m anomos.bench.cells --cpu [--old TREE]``) is
the whole path instead: the CPU each process of a one-relay download spends
per MiB it serves, relays or receives, over real TLS links on loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from anomos.interfaces import SessionKeys
from anomos.protocol import e2e
from anomos.protocol.layers import OnionLayer, add_layers, remove_layers


def _seconds_per_call(fn: Callable[[], object], cells: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(cells):
            fn()
        best = min(best, (time.perf_counter() - t0) / cells)
    return best


def cells_section(*, cells: int = 10, repeats: int = 300) -> dict[str, Any]:
    """Section ``cells`` of the result: seconds per cell and bytes per second per core."""
    body = bytearray(os.urandom(e2e.CELL_BODY))
    key, start = os.urandom(32), os.urandom(16)
    ctr = Cipher(algorithms.AES(key), modes.CTR(start)).encryptor()
    layer = OnionLayer(key, start)
    channel = e2e.E2EChannel(SessionKeys(send=os.urandom(32), recv=os.urandom(32)))
    data = bytes(e2e.MAX_RECORD_DATA)
    timings = {
        # What a relay did per cell before issue 11: one long-lived CTR stream, new bytes.
        "aes_ctr": lambda: ctr.update(body),
        # What a relay does per cell: its layer into a fresh buffer (the link sends it later).
        "layer_add": lambda: add_layers((layer,), body),
        "layer_remove": lambda: remove_layers((layer,), body),
        "e2e_seal": lambda: channel.seal_mutable(e2e.DATA, data),
    }
    out: dict[str, Any] = {"cell": e2e.CELL_BODY}
    for name, fn in timings.items():
        seconds = _seconds_per_call(fn, cells, repeats)
        out[name] = {"seconds": seconds, "rate": e2e.CELL_BODY / seconds}
    return out


# ----------------------------------------------------------------------------- CPU per byte

#: Roles of a one-relay download, as the CPU probe reports them.
ROLES = ("source", "relay", "downloader")


def _cpu_times(worker: Any) -> tuple[float, float]:
    """(user, system) CPU seconds of a worker process so far."""
    import psutil

    t = psutil.Process(worker.popen.pid).cpu_times()
    return float(t.user), float(t.system)


def cpu_per_byte(
    workdir: Path,
    trees: dict[str, Path | None],
    *,
    size: int = 64 << 20,
    runs: int = 3,
    echo: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """CPU microseconds per MiB each role of a one-relay download spends, per tree.

    For every tree (``None``: this one) a downloader, a relay and a source run as
    separate worker processes on loopback, linked by real TLS links; each run
    downloads the whole file over one circuit, and each process's CPU time
    (user + system, from outside) over the run is divided by the MiB it moved:
    served (source), relayed (relay) and received (downloader). Runs of the
    trees alternate, so a busy phase of the machine hits each; medians of
    ``runs``.
    """
    from anomos.bench.network import bench_torrent
    from anomos.bench.procs import Cluster

    files, _data, atorrent = bench_torrent(workdir, "cpu", size, copies=2)
    mib = size / (1 << 20)
    samples: dict[str, dict[str, list[float]]] = {
        name: {
            **{r: [] for r in ROLES},
            **{f"{r}_system": [] for r in ROLES},
            "seconds": [],
            "cells_per_mib": [],
        }
        for name in trees
    }
    clusters = []
    try:
        nets = {}
        for name, tree in trees.items():
            env = {"PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"} if tree else None
            net = Cluster(workdir / f"cpu-{name}")
            clusters.append(net)
            d, r, s = (net.spawn(role, env=env) for role in ("downloader", "relay", "source"))
            net.connect([(d, 0, r, 0), (r, 0, s, 0)])
            s.call("seed", atorrent=str(atorrent), data=str(files))
            nets[name] = (net, {"downloader": d, "relay": r, "source": s})
        for i in range(runs):
            for name, (net, workers) in nets.items():
                echo(f"CPU per byte: run {i + 1} of {runs}, {name}")
                path = net.path([workers["downloader"], workers["relay"], workers["source"]])
                cpu0 = {role: _cpu_times(w) for role, w in workers.items()}
                relayed0 = workers["relay"].call("stats")["relayed"]
                reply = workers["downloader"].call(
                    "download", atorrent=str(atorrent), dest=str(files / f"dl-{name}"), **path
                )
                for role, w in workers.items():
                    user, system = (b - a for a, b in zip(cpu0[role], _cpu_times(w), strict=True))
                    samples[name][role].append((user + system) / mib * 1e6)
                    samples[name][f"{role}_system"].append(system / mib * 1e6)
                samples[name]["seconds"].append(reply["seconds"])
                relayed = workers["relay"].call("stats")["relayed"] - relayed0
                samples[name]["cells_per_mib"].append(relayed / e2e.CELL_BODY / mib)
    finally:
        for net in clusters:
            net.stop()
        if files != workdir:
            shutil.rmtree(files, ignore_errors=True)
    out: dict[str, Any] = {"size": size, "runs": runs, "trees": {}}
    for name, got in samples.items():
        med = {key: statistics.median(values) for key, values in got.items()}
        med["mb_per_s"] = size / med["seconds"] / 1e6
        out["trees"][name] = {"median": med, "runs": got}
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m anomos.bench.cells --cpu [--old TREE]``: the CPU-per-byte probe."""
    parser = argparse.ArgumentParser(prog="python -m anomos.bench.cells", description=__doc__)
    parser.add_argument("--cpu", action="store_true", help="the CPU-per-byte probe (processes)")
    parser.add_argument("--old", type=Path, help="also run this source tree, alternating")
    parser.add_argument("--size", type=int, default=64, help="MiB per download (default 64)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="keep the workers' logs here")
    parser.add_argument("--json", type=Path, help="write every run here")
    args = parser.parse_args(argv)
    if not args.cpu:
        for name, fig in cells_section().items():
            if isinstance(fig, dict):
                print(
                    f"{name:14} {fig['rate'] / 1e6:9.1f} MB/s  {fig['seconds'] * 1e6:7.1f} us/cell"
                )
        return 0
    trees: dict[str, Path | None] = {"new": None}
    if args.old is not None:
        trees = {"old": args.old.resolve(), "new": None}
    with contextlib.ExitStack() as stack:
        workdir = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        result = cpu_per_byte(
            workdir,
            trees,
            size=args.size << 20,
            runs=args.runs,
            echo=lambda m: print(m, flush=True),
        )
    print(f"\nCPU us per MiB, medians of {args.runs} ({args.size} MiB over one relay)")
    print(f"{'tree':6} {'source':>15} {'relay':>15} {'downloader':>15} {'MB/s':>8} {'cells':>6}")
    print(f"{'':6} {'(of it kernel)':>15} {'':>15} {'':>15} {'':>8} {'/MiB':>6}")
    for name, tree in result["trees"].items():
        m = tree["median"]
        cols = "".join(f" {m[r]:7.0f} ({m[r + '_system']:5.0f})" for r in ROLES)
        print(f"{name:6}{cols} {m['mb_per_s']:8.1f} {m['cells_per_mib']:6.1f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
