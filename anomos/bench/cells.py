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
    short = bytearray(os.urandom(e2e.SHORT_BODY))
    key, start = os.urandom(32), os.urandom(16)
    ctr = Cipher(algorithms.AES(key), modes.CTR(start)).encryptor()
    layer = OnionLayer(key, start)
    channel = e2e.E2EChannel(SessionKeys(send=os.urandom(32), recv=os.urandom(32)))
    data = bytes(e2e.MAX_RECORD_DATA)
    request_batch = bytes(64 * 17)  # the largest batch of BitTorrent requests
    timings = {
        # What a relay did per cell before issue 11: one long-lived CTR stream, new bytes.
        "aes_ctr": (lambda: ctr.update(body), e2e.CELL_BODY),
        # What a relay does per cell: its layer into a fresh buffer (the link sends it later).
        "layer_add": (lambda: add_layers((layer,), body), e2e.CELL_BODY),
        "layer_remove": (lambda: remove_layers((layer,), body), e2e.CELL_BODY),
        "e2e_seal": (lambda: channel.seal_mutable(e2e.DATA, data), e2e.CELL_BODY),
        # The same for a short cell (a batch of requests, a SENDME).
        "layer_add_short": (lambda: add_layers((layer,), short), e2e.SHORT_BODY),
        "e2e_seal_short": (lambda: channel.seal_mutable(e2e.DATA, request_batch), e2e.SHORT_BODY),
    }
    out: dict[str, Any] = {"cell": e2e.CELL_BODY, "short_cell": e2e.SHORT_BODY}
    for name, (fn, size) in timings.items():
        seconds = _seconds_per_call(fn, cells, repeats)
        out[name] = {"seconds": seconds, "rate": size / seconds}
    return out


# ----------------------------------------------------------------------------- CPU per byte

#: Roles of a one-relay download, as the CPU probe reports them.
ROLES = ("source", "relay", "downloader")


#: What the probe counts per MiB besides CPU time: context switches (wake-ups and
#: preemptions) and minor page faults.
COUNTERS = ("user", "system", "switches", "faults")


def _counters(worker: Any) -> dict[str, float]:
    """CPU seconds (user, system), context switches and minor page faults of a
    worker process so far."""
    import psutil

    proc = psutil.Process(worker.popen.pid)
    t, sw = proc.cpu_times(), proc.num_ctx_switches()
    stat = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return {
        "user": float(t.user),
        "system": float(t.system),
        "switches": float(sw.voluntary + sw.involuntary),
        "faults": float(stat[7]),
    }


def _tree_atorrent(tree: Path, data: Path, dest: Path, python: str | None) -> Path:
    """The .atorrent of ``data`` as ``tree``'s code writes it (the format has changed
    since some of the trees worth comparing: each seeds and reads its own)."""
    import subprocess

    from anomos.bench.network import BENCH_TRACKER

    script = (
        "import sys; from pathlib import Path; "
        "from anomos.torrent.metainfo import make_metainfo; "
        "make_metainfo(Path(sys.argv[1]), trackers=[sys.argv[3]], progress=False)"
        ".save(Path(sys.argv[2]))"
    )
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}
    subprocess.run(
        [python or sys.executable, "-c", script, str(data), str(dest), BENCH_TRACKER],
        env=env,
        check=True,
    )
    return dest


def cpu_per_byte(
    workdir: Path,
    trees: dict[str, Path | None],
    *,
    size: int = 64 << 20,
    runs: int = 3,
    pythons: dict[str, str] | None = None,
    rate: int = 0,
    echo: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """CPU microseconds per MiB each role of a one-relay download spends, per tree.

    For every tree (``None``: this one) a downloader, a relay and a source run as
    separate worker processes on loopback, linked by real TLS links; each run
    downloads the whole file over one circuit, and each process's CPU time
    (user + system, from outside) over the run is divided by the MiB it moved:
    served (source), relayed (relay) and received (downloader). Runs of the
    trees alternate, so a busy phase of the machine hits each; medians of
    ``runs``. ``pythons`` names another interpreter for a tree (its venv's
    libraries: trees before 2026-12-05 need a cryptography < 51, which still
    allowed in-place ``update_into``). ``rate`` (bytes/s, 0: none) caps what the
    source sends, as on a WAN link: CPU per byte at the rates a WAN sees, where
    each wake-up has fewer cells to handle.
    """
    from anomos.bench.network import bench_torrent
    from anomos.bench.procs import Cluster

    files, data, atorrent = bench_torrent(workdir, "cpu", size, copies=2)
    mib = size / (1 << 20)
    samples: dict[str, dict[str, list[float]]] = {
        name: {
            **{r: [] for r in ROLES},
            **{f"{r}_{c}": [] for r in ROLES for c in COUNTERS[1:]},
            "seconds": [],
            "cells_per_mib": [],
        }
        for name in trees
    }
    clusters = []
    try:
        nets = {}
        atorrents = {}
        for name, tree in trees.items():
            env = {"PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"} if tree else None
            python = (pythons or {}).get(name)
            if tree is not None:
                atorrents[name] = _tree_atorrent(
                    tree, data, workdir / f"cpu-{name}.atorrent", python
                )
            else:
                atorrents[name] = atorrent
            net = Cluster(workdir / f"cpu-{name}")
            clusters.append(net)
            paced = {**(env or {}), "ANOMOS_BENCH_MAX_SEND_RATE": str(rate)}
            d, r, s = (
                net.spawn(role, env=paced if role == "source" else env, python=python)
                for role in ("downloader", "relay", "source")
            )
            net.connect([(d, 0, r, 0), (r, 0, s, 0)])
            s.call("seed", atorrent=str(atorrents[name]), data=str(files))
            nets[name] = (net, {"downloader": d, "relay": r, "source": s})
        for i in range(runs):
            for name, (net, workers) in nets.items():
                echo(f"CPU per byte: run {i + 1} of {runs}, {name}")
                path = net.path([workers["downloader"], workers["relay"], workers["source"]])
                before = {role: _counters(w) for role, w in workers.items()}
                relayed0 = workers["relay"].call("stats")["relayed"]
                reply = workers["downloader"].call(
                    "download",
                    atorrent=str(atorrents[name]),
                    dest=str(files / f"dl-{name}"),
                    **path,
                )
                for role, w in workers.items():
                    spent = {k: v - before[role][k] for k, v in _counters(w).items()}
                    samples[name][role].append((spent["user"] + spent["system"]) / mib * 1e6)
                    samples[name][f"{role}_system"].append(spent["system"] / mib * 1e6)
                    for c in COUNTERS[2:]:
                        samples[name][f"{role}_{c}"].append(spent[c] / mib)
                samples[name]["seconds"].append(reply["seconds"])
                relayed = workers["relay"].call("stats")["relayed"] - relayed0
                # (in full cells' worth: short cells count for what they weigh)
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


def _revision(tree: Path) -> str:
    """The short commit a source tree is checked out at (its folder's name if none)."""
    import subprocess

    got = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return got.stdout.strip() or tree.name


def main(argv: list[str] | None = None) -> int:
    """``python -m anomos.bench.cells --cpu [--old TREE]``: the CPU-per-byte probe."""
    parser = argparse.ArgumentParser(prog="python -m anomos.bench.cells", description=__doc__)
    parser.add_argument("--cpu", action="store_true", help="the CPU-per-byte probe (processes)")
    parser.add_argument(
        "--old",
        type=Path,
        action="append",
        help="also run this source tree, alternating (repeat for several: a bisection)",
    )
    parser.add_argument("--old-python", help="run the old trees under this interpreter")
    parser.add_argument("--size", type=int, default=64, help="MiB per download (default 64)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--rate", type=float, default=0, help="cap the source's sending at this many MB/s"
    )
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
    if args.old:
        olds = [tree.resolve() for tree in args.old]
        names = ["old"] if len(olds) == 1 else [f"old-{_revision(tree)}" for tree in olds]
        trees = {**dict(zip(names, olds, strict=True)), "new": None}
    with contextlib.ExitStack() as stack:
        workdir = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        result = cpu_per_byte(
            workdir,
            trees,
            size=args.size << 20,
            runs=args.runs,
            rate=int(args.rate * 1e6),
            pythons={name: args.old_python for name in trees if name != "new"}
            if args.old_python
            else None,
            echo=lambda m: print(m, flush=True),
        )
    paced = f", the source paced at {args.rate:g} MB/s" if args.rate else ""
    print(f"\nCPU us per MiB, medians of {args.runs} ({args.size} MiB over one relay{paced})")
    width = max(6, *(len(name) for name in result["trees"]))
    print(
        f"{'tree':{width}} {'source':>15} {'relay':>15} {'downloader':>15} {'MB/s':>8} {'cells':>6}"
    )
    print(f"{'':{width}} {'(of it kernel)':>15} {'':>15} {'':>15} {'':>8} {'/MiB':>6}")
    for name, tree in result["trees"].items():
        m = tree["median"]
        cols = "".join(f" {m[r]:7.0f} ({m[r + '_system']:5.0f})" for r in ROLES)
        print(f"{name:{width}}{cols} {m['mb_per_s']:8.1f} {m['cells_per_mib']:6.1f}")
    print("\nper MiB (source, relay, downloader): context switches, minor page faults")
    for name, tree in result["trees"].items():
        m = tree["median"]
        cols = "".join(f" {m[r + '_switches']:7.1f} {m[r + '_faults']:7.1f}" for r in ROLES)
        print(f"{name:{width}}{cols}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
