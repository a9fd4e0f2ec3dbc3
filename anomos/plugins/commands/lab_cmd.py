"""``anomos lab``: anonymity figures per path policy, under an adversary and churn.

For researchers who swap routing policies: where ``anomos paths`` says what a
policy costs, the lab says whether it is safer, on the tracker's own graph
and planner step (see :mod:`anomos.lab`). An experiment comes from a TOML
file, a preset or flags (flags win); the command prints one row per policy
and colluding fraction and writes JSON, CSV and, with ``--plots``, PNG
figures. docs/research.md defines every figure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from anomos import hookimpl
from anomos.errors import ConfigError
from anomos.pluginmanager import Plugins
from anomos.plugins.commands.paths_cmd import number_option

#: flag -> experiment setting, for the flags given on the command line.
_FLAGS = (
    "peers",
    "neighbours",
    "relays",
    "colluding",
    "adversary",
    "sybil_hours",
    "days",
    "downloads_per_day",
    "circuits_per_download",
    "session_hours",
    "offline_hours",
    "targets",
    "rounds",
    "seed",
    "seeds",
    "jobs",
)


def _out(default: str | None, what: str) -> Any:
    return click.option(
        f"--{what}",
        f"{what}_path",
        default=default,
        show_default=default is not None,
        type=click.Path(dir_okay=False, path_type=Path),
        help=f"Where to write every figure as {what.upper()}.",
    )


@click.command("lab")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Experiment as TOML (keys as the flags, with _ or -).",
)
@click.option("--preset", type=click.Choice(["bench", "research"]), help="A named experiment.")
@click.option(
    "--policy",
    "policies",
    multiple=True,
    metavar="NAME[:MIN-MAX]",
    help="Path policy to compare, optionally with its own relay bounds (repeatable) "
    "[every registered one].",
)
@number_option("--peers", int, "N", "Peers at the start [1000].")
@click.option("--neighbours", metavar="MIN-MAX", help="Neighbours per peer [4-6].")
@click.option("--relays", metavar="MIN-MAX", help="Relays per circuit [2-4].")
@click.option(
    "--colluding",
    metavar="FRACTIONS",
    help="Colluding fractions of the peers, comma-separated [0.01,0.05,0.1,0.2].",
)
@click.option(
    "--adversary",
    type=click.Choice(["random", "sybil", "capacity"]),
    help="Where the colluders are: random peers, sybils joining at --sybil-hours, "
    "or the peers the policy relays through most [random].",
)
@number_option("--sybil-hours", float, "H", "When sybils join [24].")
@number_option("--days", float, "D", "Simulated days [7].")
@number_option("--downloads-per-day", float, "R", "Downloads per online peer per day [1].")
@number_option("--circuits-per-download", int, "N", "Circuits per download [4].")
@number_option(
    "--session-hours", float, "H", "Churn: mean online session of a peer, hours; 0 for none [0]."
)
@number_option("--offline-hours", float, "H", "Churn: mean time offline [8].")
@number_option("--targets", int, "N", "Downloaders the predecessor attack follows.")
@number_option("--rounds", int, "N", "Predecessor attack rounds at most.")
@number_option("--seed", int, "N", "First seed [1].")
@number_option("--seeds", int, "K", "Seeds (runs per policy) [3].")
@number_option("--jobs", int, "N", "Worker processes [1].")
@_out("anomos-lab.json", "json")
@_out(None, "csv")
@click.option(
    "--plots",
    "plots_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write the PNG figures into (needs matplotlib: the lab extra).",
)
@click.pass_obj
def lab_command(
    plugins: Plugins,
    config_path: Path | None,
    preset: str | None,
    policies: tuple[str, ...],
    json_path: Path,
    csv_path: Path | None,
    plots_dir: Path | None,
    **flags: Any,
) -> None:
    """Anonymity per path policy: compromise, degree of anonymity, predecessor attack, cost.

    Settings come from --preset, then --config, then the flags (each wins over
    the one before).
    """
    from anomos.bench.runner import machine
    from anomos.lab.experiment import PRESETS, Experiment, from_mapping, read_toml
    from anomos.lab.report import table, to_csv
    from anomos.lab.runner import run_experiment
    from anomos.progress import bar

    exp = from_mapping(PRESETS[preset]) if preset else Experiment()
    if config_path:
        exp = from_mapping(read_toml(config_path), exp)
    given = {k: v for k, v in flags.items() if k in _FLAGS and v is not None}
    if policies:
        given["policies"] = list(dict.fromkeys(policies))
    exp = from_mapping(given, exp)
    for path, flag in ((json_path, "--json"), (csv_path, "--csv")):
        if path is not None and not path.parent.is_dir():
            raise ConfigError(f"{flag} {path}: no folder {path.parent}")
    if plots_dir is not None:
        from anomos.lab.plots import _pyplot

        _pyplot()  # refuse before hours of work when matplotlib is missing
        if not plots_dir.is_dir():
            raise ConfigError(f"--plots {plots_dir}: no such folder")

    specs = exp.policy_specs(plugins.path_policies.names())
    with bar(len(specs) * exp.seeds, "lab", unit="run") as progress:
        report = run_experiment(plugins, exp, on_run=lambda: progress.update())
    report["environment"] = machine()
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    if csv_path is not None:
        csv_path.write_text(to_csv(report))
    click.echo(table(report))
    written = [str(json_path)] + ([str(csv_path)] if csv_path else [])
    if plots_dir is not None:
        from anomos.lab.plots import write_plots

        written += [str(p) for p in write_plots(report, plots_dir)]
    click.echo(f"(every figure in {', '.join(written)})")


@hookimpl
def anomos_add_commands(cli: click.Group) -> None:
    cli.add_command(lab_command)
