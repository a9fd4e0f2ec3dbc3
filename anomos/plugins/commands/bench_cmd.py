"""``anomos bench``: measure throughput, relays, circuit set-up, the tracker and memory.

Prints a table and writes every figure (with each run and the machine) as
JSON. The defaults take two to three minutes; ``--quick`` about 15 seconds. See
docs/performance.md for the latest table and what limits each figure.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from anomos import hookimpl
from anomos.config import parse_size


def _sections(text: str) -> tuple[str, ...]:
    from anomos.bench.runner import SECTIONS

    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise click.BadParameter(f"sections are a comma-separated subset of {','.join(SECTIONS)}")
    return names


def _scale(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(n.replace("_", "")) for n in text.split(",") if n.strip())
    except ValueError:
        counts = ()
    if not counts or not all(100 <= n <= 10_000_000 for n in counts):
        raise click.BadParameter("--scale takes peer counts from 100 to 10000000, comma-separated")
    return counts


@click.command("bench")
@click.option("--quick", is_flag=True, help="Small sizes and one round (about 15 s).")
@click.option("--size", "size_text", default=None, help="File size for throughput [256MiB].")
@click.option("--runs", default=None, type=click.IntRange(1, 20), help="Rounds (medians) [5].")
@click.option(
    "--only",
    "only",
    default="tracker,cells,network,memory",
    show_default=True,
    help="Sections to run.",
)
@click.option(
    "--json",
    "json_path",
    default="anomos-bench.json",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write every figure as JSON.",
)
@click.option(
    "--dir",
    "workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep files and worker logs here instead of a temporary folder.",
)
@click.option(
    "--quiet-wait",
    default=None,
    type=click.FloatRange(0, 600),
    help="Before each timed network run, wait up to this long (s) for other programs "
    "to leave the CPUs [10; 0 with --quick].",
)
@click.option(
    "--scale",
    "scale",
    default=None,
    help="Registered peers of the tracker section, comma-separated [10000,100000]; "
    "1000000 needs about 2 GiB of RAM and several minutes.",
)
@click.option("--verbose-workers", is_flag=True, help="Workers log at INFO level.")
@click.option("--smoke", is_flag=True, hidden=True, help="Tiny sizes (the test suite's run).")
@click.option(
    "--wan",
    is_flag=True,
    help="Instead: anomos against a direct libtorrent download on an emulated WAN "
    "(root; per-node rate and one-way delay in a network namespace).",
)
@click.option(
    "--code",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="With --wan: run anomos from this source tree (compare before and after a change).",
)
@click.option(
    "--fast-start",
    is_flag=True,
    help="With --wan: time only the start of `anomos get` (launch to first piece, step by "
    "step; 1 MiB, 3-relay circuits, 100M:50ms unless given), this tree against --code.",
)
@click.option("--sources", type=click.IntRange(1, 8), help="With --wan: circuits at once [4].")
@click.option("--circuit-relays", help="With --wan: relays per circuit, e.g. 1-1 [the tracker's].")
@click.option(
    "--relay-rate",
    default=None,
    help="With --wan: a slower uplink for the relays than the seeder's (e.g. 20M): "
    "shows what a relay queues when its downstream is slower.",
)
@click.option(
    "--trace",
    is_flag=True,
    help="With --wan: trace each anomos run every 0.25 s (uplinks, sockets, each "
    "circuit's window and bytes in flight, CPU waits; in --dir) and say where the "
    "seeder's uplink went.",
)
@click.option(
    "--delay-line",
    type=click.Choice(["c", "python"]),
    help="With --wan: the emulation's delay line [c where a compiler exists, else python].",
)
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    help="With --wan: RATE:DELAY per node, repeatable [100M:20ms 100M:50ms 1G:50ms].",
)
def bench_command(
    quick: bool,
    size_text: str | None,
    runs: int | None,
    only: str,
    json_path: Path,
    workdir: Path | None,
    quiet_wait: float | None,
    scale: str | None,
    verbose_workers: bool,
    smoke: bool,
    wan: bool,
    profiles: tuple[str, ...],
    code: Path | None,
    relay_rate: str | None,
    sources: int | None,
    circuit_relays: str | None,
    fast_start: bool,
    trace: bool,
    delay_line: str | None,
) -> None:
    """Benchmark anomos on this machine: every peer a separate process on loopback."""
    if wan:
        wan_extra: dict[str, object] = {
            "sources": sources,
            "circuit_relays": circuit_relays,
            "fast_start": fast_start,
            "trace": trace or None,
            "delay_line": delay_line,
        }
        _wan(size_text, runs, profiles, code, relay_rate, wan_extra, json_path, workdir)
        return
    from anomos.bench.report import table
    from anomos.bench.runner import BenchOptions, run_bench

    overrides: dict[str, object] = {"sections": _sections(only)}
    if size_text is not None:
        overrides["size"] = parse_size(size_text, "--size", minimum=16 << 10, maximum=4 << 30)
    if runs is not None:
        overrides["runs"] = runs
    if quiet_wait is not None:
        overrides["quiet_wait"] = quiet_wait
    if scale is not None:
        overrides["tracker_peers"] = _scale(scale)
    preset = BenchOptions.smoke if smoke else BenchOptions.quick if quick else BenchOptions
    options = preset(**overrides)  # type: ignore[arg-type]
    result = run_bench(
        options,
        workdir=workdir,
        echo=lambda msg: click.echo(f"  {msg}", err=True),
        verbose=verbose_workers,
    )
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    click.echo(table(result))
    click.echo(f"({result['seconds']:.0f} s; every figure and run in {json_path})")


def _wan(
    size_text: str | None,
    runs: int | None,
    profiles: tuple[str, ...],
    code: Path | None,
    relay_rate: str | None,
    extra: dict[str, object],
    json_path: Path,
    workdir: Path | None,
) -> None:
    import signal
    import sys
    import tempfile

    from anomos.bench import wan

    # Stopped with SIGTERM, still take the namespace and its processes down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    overrides: dict[str, object] = {k: v for k, v in extra.items() if v is not None}
    if overrides.get("fast_start"):  # the case, unless told otherwise
        overrides = {"size": 1 << 20, "circuit_relays": "3-3", **overrides}
        overrides["profiles"] = (wan.Profile.parse("100M:50ms"),)
    if size_text is not None:
        overrides["size"] = parse_size(size_text, "--size", minimum=1 << 20, maximum=4 << 30)
    if runs is not None:
        overrides["runs"] = runs
    if profiles:
        overrides["profiles"] = tuple(wan.Profile.parse(p) for p in profiles)
    if code is not None:
        overrides["code"] = code.resolve()
    if overrides.get("delay_line") is not None:
        overrides["delay_line"] = wan.Implementation(overrides["delay_line"])
    if relay_rate is not None:
        overrides["relay_bits"] = wan.Profile.parse(f"{relay_rate}:0ms").rate_bits
    options = wan.WanOptions(**overrides)  # type: ignore[arg-type]
    if options.fast_start:
        with tempfile.TemporaryDirectory(prefix="anomos-wan-") as tmp:
            result = wan.run_fast_start(
                options, workdir or Path(tmp), echo=lambda msg: click.echo(f"  {msg}", err=True)
            )
        result["summary"] = rows = wan.summarize_fast_start(result)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        click.echo(wan.fast_start_table(rows))
        return
    with tempfile.TemporaryDirectory(prefix="anomos-wan-") as tmp:
        result = wan.run_wan(
            options, workdir or Path(tmp), echo=lambda msg: click.echo(f"  {msg}", err=True)
        )
    rows = wan.summarize(result)
    result["summary"] = rows
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    click.echo(wan.table(rows))


@hookimpl
def anomos_add_commands(cli: click.Group) -> None:
    cli.add_command(bench_command)
