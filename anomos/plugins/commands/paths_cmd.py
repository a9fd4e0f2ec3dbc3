"""``anomos paths``: compare path policies on one and the same simulated tracker graph.

For researchers who swap routing policies: every policy plans the same
circuits on the same graph, with the tracker's own code (see
:mod:`anomos.tracker.simulate`), and the command prints one row per policy
and writes every figure, the options and the machine as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import click

from anomos import hookimpl
from anomos.errors import ConfigError
from anomos.pluginmanager import Plugins


class Number(click.ParamType):
    """An int or float option whose bad value is one ``anomos: error:`` line, not a usage text."""

    def __init__(self, kind: type[int] | type[float]) -> None:
        self.kind = kind
        self.name = "whole number" if kind is int else "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, self.kind):
            return value
        try:
            return self.kind(value)
        except (TypeError, ValueError):
            option = param.opts[0] if param is not None else "value"
            raise ConfigError(f"{option} {value!r} is not a {self.name}") from None


def number_option(
    flag: str, kind: type[int] | type[float], metavar: str, help: str, default: Any = None
) -> Any:
    """A click option taking a number (a bad value is one line); its default shown."""
    return click.option(
        flag,
        metavar=metavar,
        default=default,
        show_default=default is not None,
        type=Number(kind),
        help=help,
    )


@click.command("paths")
@click.option(
    "--policy",
    "policies",
    multiple=True,
    metavar="NAME",
    help="Path policy to compare (repeatable) [every registered one].",
)
@number_option("--peers", int, "N", "Peers in the graph.", default=1000)
@click.option(
    "--neighbours", metavar="MIN-MAX", default="4-6", show_default=True, help="Neighbours per peer."
)
@click.option(
    "--relays", metavar="MIN-MAX", default="2-4", show_default=True, help="Relays per circuit."
)
@number_option("--circuits", int, "N", "Circuits per policy.", default=5000)
@number_option(
    "--rate",
    float,
    "R",
    "Circuits per simulated second (relay load decays over simulated time).",
    default=50.0,
)
@number_option("--seed", int, "N", "Seed of everything random.", default=1)
@number_option(
    "--unreachable",
    float,
    "SHARE",
    "Share of peers nobody can dial (behind NAT), planned as the tracker plans them.",
    default=0.0,
)
@click.option(
    "--json",
    "json_path",
    default="anomos-paths.json",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write every figure as JSON.",
)
@click.pass_obj
def paths_command(
    plugins: Plugins,
    policies: tuple[str, ...],
    peers: int,
    neighbours: str,
    relays: str,
    circuits: int,
    rate: float,
    seed: int,
    unreachable: float,
    json_path: Path,
) -> None:
    """Compare path policies on one simulated tracker graph: success, relays, time, load spread."""
    from anomos.bench.runner import machine
    from anomos.plugins.commands.tracker_cmd import parse_range
    from anomos.progress import bar
    from anomos.tracker.simulate import SimOptions, simulate, summarize

    min_n, max_n = parse_range(neighbours, "--neighbours")
    min_r, max_r = parse_range(relays, "--relays")
    options = SimOptions(
        peers=peers,
        min_neighbours=min_n,
        max_neighbours=max_n,
        min_relays=min_r,
        max_relays=max_r,
        circuits=circuits,
        rate=rate,
        seed=seed,
        unreachable=unreachable,
    )
    options.check()
    names = list(dict.fromkeys(policies)) or plugins.path_policies.names()
    chosen = {name: plugins.path_policy(name, min_relays=min_r, max_relays=max_r) for name in names}
    if not json_path.parent.is_dir():
        raise ConfigError(f"--json {json_path}: no folder {json_path.parent}")

    results: dict[str, Any] = {}
    graph: dict[str, Any] = {}
    with bar(circuits * len(chosen), "paths", unit="circuit") as progress:
        for name, policy in chosen.items():
            run = simulate(policy, options, on_circuit=lambda: progress.update())
            graph = graph or run.graph
            results[name] = {
                "owner": plugins.path_policies.owner(name),
                **summarize(run, options),
            }
    report = {
        "options": {**attrs.asdict(options), "policies": names},
        "environment": machine(),
        "graph": graph,
        "policies": results,
    }
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    click.echo(table(report))
    click.echo(f"(every figure in {json_path})")


#: Columns of the printed table: heading and how wide.
_COLUMNS = (
    ("policy", -14),
    ("planned", 8),
    ("relays", 7),
    ("relay counts", -22),
    ("p50 us", 8),
    ("p99 us", 8),
    ("relays used", 12),
    ("max/mean", 9),
    ("Gini", 6),
    ("top 1 %", 8),
    ("on reachable", 13),
)


def table(report: dict[str, Any]) -> str:
    """One row per policy: planned share, relays, find_path time, relay load spread."""
    from anomos.lab.report import aligned

    rows = [[heading for heading, _ in _COLUMNS]]
    peers = report["graph"].get("peers", 0)
    for name, r in report["policies"].items():
        load = r["load"]
        counts = " ".join(f"{k}:{v:.0%}" for k, v in r["relays_share"].items()) or "-"
        rows.append(
            [
                name,
                f"{r['planned_share']:.1%}",
                f"{r['relays_mean']:.2f}",
                counts,
                f"{r['find_path_us']['p50']:,.0f}",
                f"{r['find_path_us']['p99']:,.0f}",
                f"{load['distinct_relays']:,}/{peers:,}",
                f"{load['max_over_mean']:.2f}",
                f"{load['gini']:.3f}",
                f"{load['top_share']:.1%}",
                f"{r['reachable']['hop_share']:.1%}",
            ]
        )
    lines = aligned(rows, _COLUMNS)
    o = report["options"]
    g = report["graph"]
    lines.append(
        f"{g.get('peers', 0):,} peers, {o['min_neighbours']}-{o['max_neighbours']} neighbours "
        f"(mean degree {g.get('degree_mean', 0):.2f}), {o['min_relays']}-{o['max_relays']} relays, "
        f"{o['circuits']:,} circuits at {o['rate']:g}/s, seed {o['seed']}"
    )
    if g.get("unreachable"):
        lines.append(
            f"{g['unreachable']:,} peers unreachable ({o['unreachable']:.0%}): mean degree "
            f"{g['degree_mean_unreachable']:.2f}, {g['isolated_unreachable']:,} with no neighbour"
        )
    return "\n".join(lines)


@hookimpl
def anomos_add_commands(cli: click.Group) -> None:
    cli.add_command(paths_command)
