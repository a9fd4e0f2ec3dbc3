"""Everything ``anomos bench`` measures, in one call: :func:`run_bench`.

The sections run one after another so none competes with another for the
cores: ``tracker`` and ``cells`` (in this process), ``network`` (throughput,
one relay, circuit set-up; worker processes), ``memory`` (worker processes)
and ``daemon`` (an ``anomos daemon`` with many torrents; not in the default set).
"""

from __future__ import annotations

import os
import platform
import shutil
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from anomos import __version__
from anomos.bench.cells import cells_section
from anomos.bench.network import relay_memory, throughput_and_setup
from anomos.bench.procs import machine_busy
from anomos.bench.report import MiB
from anomos.bench.tracker import tracker_section

SECTIONS = ("tracker", "cells", "network", "memory", "daemon")


@attrs.frozen
class BenchOptions:
    """What to measure and how much; :meth:`quick` and :meth:`smoke` are smaller presets."""

    size: int = 256 * MiB
    runs: int = 5
    relays: tuple[int, ...] = (0, 1, 2, 3)
    setup_count: int = 200
    memory_counts: tuple[int, ...] = (1000, 10000)
    memory_pairs: int = 10
    #: The daemon section: idle torrents added, then torrents downloading at once, of this size.
    daemon_idle: int = 100
    daemon_downloading: int = 10
    daemon_size: int = 8 * MiB
    tracker_peers: tuple[int, ...] = (10_000, 100_000)
    tracker_seconds: float = 2.0
    tracker_repeats: int = 3
    announces: int = 3000
    samples: int = 1000
    #: Cells per timing of the per-hop layer, and timings (the best counts).
    cell_count: int = 10
    cell_repeats: int = 300
    sections: tuple[str, ...] = SECTIONS
    timeout: float = 600.0
    #: Seconds to wait, before each timed network run, for other programs to go quiet.
    quiet_wait: float = 10.0

    @classmethod
    def quick(cls, **kw: Any) -> BenchOptions:
        """About 15 seconds: small file, one round, fewer circuits and peers."""
        base: dict[str, Any] = {
            "size": 32 * MiB,
            "runs": 1,
            "setup_count": 50,
            "memory_counts": (100, 1000),
            "memory_pairs": 2,
            "daemon_size": 2 * MiB,
            "tracker_peers": (10_000,),
            "tracker_seconds": 0.5,
            "tracker_repeats": 1,
            "announces": 1000,
            "samples": 200,
            "cell_repeats": 100,
            "quiet_wait": 0.0,
        }
        return cls(**{**base, **kw})

    @classmethod
    def smoke(cls, **kw: Any) -> BenchOptions:
        """A few seconds: proves every section still runs (the test suite uses it)."""
        base: dict[str, Any] = {
            "size": 1 * MiB,
            "runs": 1,
            "relays": (0, 1, 2),
            "setup_count": 5,
            "memory_counts": (10, 20),
            "memory_pairs": 2,
            "daemon_idle": 4,
            "daemon_downloading": 2,
            "daemon_size": 256 * 1024,
            "tracker_peers": (300,),
            "tracker_seconds": 0.05,
            "tracker_repeats": 1,
            "announces": 50,
            "samples": 20,
            "cell_count": 5,
            "cell_repeats": 2,
            "timeout": 120.0,
            "quiet_wait": 0.0,
        }
        return cls(**{**base, **kw})


def machine() -> dict[str, Any]:
    """Where the figures were measured."""
    import cryptography
    import gevent
    import nacl

    return {
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "anomos": __version__,
        "cryptography": cryptography.__version__,
        "openssl": ssl.OPENSSL_VERSION,
        "pynacl": nacl.__version__,
        "gevent": gevent.__version__,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_bench(
    options: BenchOptions,
    *,
    workdir: Path | None = None,
    echo: Callable[[str], None] = lambda _m: None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Measure the chosen sections; the result dict (written as JSON by the command)."""
    started = time.time()
    t0 = time.monotonic()
    keep = workdir is not None
    root = workdir or Path(tempfile.mkdtemp(prefix="anomos-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "started": started,
        "machine": {**machine(), "busy_at_start": machine_busy()},
        "options": attrs.asdict(options),
    }
    try:
        if "tracker" in options.sections:
            result["tracker"] = tracker_section(
                peer_counts=options.tracker_peers,
                seconds=options.tracker_seconds,
                announces=options.announces,
                samples=options.samples,
                repeats=options.tracker_repeats,
                echo=echo,
            )
        if "cells" in options.sections:
            echo("cells: per-hop layer and end-to-end AEAD per cell, one core")
            result["cells"] = cells_section(cells=options.cell_count, repeats=options.cell_repeats)
        if "network" in options.sections:
            result.update(
                throughput_and_setup(
                    root,
                    size=options.size,
                    runs=options.runs,
                    relays=options.relays,
                    setup_count=options.setup_count,
                    timeout=options.timeout,
                    quiet_wait=options.quiet_wait,
                    echo=echo,
                    verbose=verbose,
                )
            )
        if "memory" in options.sections:
            result["memory"] = relay_memory(
                root,
                counts=options.memory_counts,
                pairs=options.memory_pairs,
                echo=echo,
                verbose=verbose,
            )
        if "daemon" in options.sections:
            from anomos.bench.daemon import daemon_memory

            result["daemon"] = daemon_memory(
                root / "daemon",
                idle=options.daemon_idle,
                downloading=options.daemon_downloading,
                download_size=options.daemon_size,
                echo=echo,
                verbose=verbose,
            )
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    result["seconds"] = time.monotonic() - t0
    return result
