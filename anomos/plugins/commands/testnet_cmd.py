"""``anomos testnet tor``: a private, offline Tor network on loopback for development.

Runs until SIGINT or SIGTERM, then stops every tor it started.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click
import gevent
import gevent.event

from anomos import hookimpl
from anomos.errors import AnomosError
from anomos.tor import TESTNET_START_TIMEOUT

if TYPE_CHECKING:
    from anomos.tor.testnet import TorTestNetwork

EXIT_INTERRUPTED = 130


@click.group("testnet")
def testnet_group() -> None:
    """Private test networks for development and tests."""


@testnet_group.command("tor")
@click.option(
    "--dir",
    "workdir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the tors' keys, torrc files and logs.",
)
@click.option(
    "--authorities",
    default=3,
    show_default=True,
    type=click.IntRange(1, 9),
    help="Directory authorities.",
)
@click.option(
    "--relays",
    default=2,
    show_default=True,
    type=click.IntRange(0, 20),
    help="Relays besides the authorities.",
)
@click.option(
    "--timeout",
    default=TESTNET_START_TIMEOUT,
    show_default=True,
    type=click.FloatRange(1),
    help="Seconds the network gets to come up.",
)
def tor_command(workdir: Path, authorities: int, relays: int, timeout: float) -> int:
    """Run a private Tor network (authorities, relays, a client and an onion-service tor).

    Prints the client's SOCKS port and the two control ports, then a line
    starting with "ready"; stops cleanly on SIGINT or SIGTERM.
    """
    from anomos.tor.testnet import TorTestNetwork  # stem: only when asked for

    # a ConfigError here (too small a network) is reported before any handler is set
    network = TorTestNetwork(workdir, authorities=authorities, relays=relays)
    stop = gevent.event.Event()
    handlers = [gevent.signal_handler(sig, stop.set) for sig in (signal.SIGINT, signal.SIGTERM)]
    began = time.monotonic()
    try:
        starter = gevent.spawn(_start, network, timeout)
        gevent.wait([starter, stop], count=1)
        if not starter.ready():
            starter.kill()
            click.echo("anomos: interrupted before the Tor network was ready", err=True)
            return EXIT_INTERRUPTED
        if starter.value is not None:
            raise starter.value
        click.echo(f"socks: {network.socks_address}")
        click.echo(f"client control: {network.client_control_address}")
        click.echo(f"service control: {network.service_control_address}")
        click.echo(f"workdir: {network.workdir}")
        click.echo(f"ready: Tor network up in {time.monotonic() - began:.1f} s; Ctrl-C stops it")
        stop.wait()
        return 0
    finally:
        network.stop()
        for handler in handlers:
            handler.cancel()


def _start(network: TorTestNetwork, timeout: float) -> AnomosError | None:
    """Start the network; hand an error back instead of letting gevent print a traceback."""
    try:
        network.start(timeout)
    except AnomosError as exc:
        return exc
    return None


@hookimpl
def anomos_add_commands(cli: click.Group) -> None:
    cli.add_command(testnet_group)
