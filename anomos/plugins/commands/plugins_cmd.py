"""``anomos plugins``: what is loaded, which hooks each plugin implements,
and which transports, path policies, cipher suites and ratio policies exist."""

from __future__ import annotations

import json

import click

from anomos import hookimpl
from anomos.pluginmanager import Plugins


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_obj
def plugins_command(plugins: Plugins, as_json: bool) -> None:
    """List loaded plugins, the hooks each implements, and registered parts."""
    impls = plugins.implementations()
    parts = {
        kind: {name: registry.owner(name) for name in registry}
        for kind, registry in plugins.registries().items()
    }
    if as_json:
        click.echo(json.dumps({"plugins": impls, "registered": parts}, indent=2))
        return
    click.echo("plugins:")
    for name, hooks in impls.items():
        click.echo(f"  {name}")
        for hook in hooks:
            click.echo(f"      {hook}")
    click.echo("registered:")
    for kind, entries in parts.items():
        for name, owner in entries.items():
            click.echo(f"  {kind:13} {name:14} from {owner}")


@hookimpl
def anomos_add_commands(cli: click.Group) -> None:
    cli.add_command(plugins_command)
