"""The ``anomos`` command line, assembled from plugins.

Every subcommand comes from a plugin's ``anomos_add_commands``; this module
only builds the group, routes plugin-added options, and turns every
:class:`anomos.errors.AnomosError` into one line on standard error.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from anomos import __version__
from anomos.errors import AnomosError
from anomos.pluginmanager import Plugins, get_plugins

EXIT_USAGE = 2


def build_cli(plugins: Plugins) -> click.Group:
    """The top-level group with every plugin's commands and options."""

    @click.group(
        name="anomos",
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    )
    @click.version_option(__version__, prog_name="anomos")
    @click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
    def cli(verbose: int) -> None:
        """anomos: anonymous peer-to-peer file sharing derived from BitTorrent."""
        level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
        logging.basicConfig(
            level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
        )

    plugins.hook.anomos_add_commands.call_historic(kwargs={"cli": cli})
    for command in list(cli.commands.values()):
        before = {p.name for p in command.params}
        plugins.hook.anomos_add_options.call_historic(kwargs={"command": command})
        added = {p.name for p in command.params if p.name} - {n for n in before if n}
        if added and command.callback is not None:
            command.callback = _route_plugin_options(command.callback, added, plugins)
    return cli


def _route_plugin_options(
    callback: Callable[..., Any], names: set[str], plugins: Plugins
) -> Callable[..., Any]:
    """Keep plugin-added option values out of the command's own arguments."""

    @functools.wraps(callback)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for name in names:
            plugins.options[name] = kwargs.pop(name, None)
        return callback(*args, **kwargs)

    return wrapper


def run(argv: list[str] | None = None) -> int:
    """Run the CLI; the return value is the process exit status."""
    try:
        plugins = get_plugins()
        cli = build_cli(plugins)
        result = cli.main(args=argv, prog_name="anomos", obj=plugins, standalone_mode=False)
    except AnomosError as exc:
        click.echo(f"anomos: error: {exc}", err=True)
        return EXIT_USAGE
    except click.UsageError as exc:
        # One line like every other error; the command's --help has the rest.
        where = exc.ctx.command_path if exc.ctx is not None else "anomos"
        message = exc.format_message().rstrip(".")
        click.echo(f"anomos: error: {message} (see {where} --help)", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("anomos: interrupted", err=True)
        return 130
    except OSError as exc:
        click.echo(
            f"anomos: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True
        )
        return 1
    return result if isinstance(result, int) else 0
