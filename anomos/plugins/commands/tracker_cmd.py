"""``anomos tracker``: run a tracker until SIGINT or SIGTERM.

Prints the announce URL and the identity fingerprint peers must pin, and
writes both to ``STATE/tracker.json`` so scripts (and tests) can pick them up.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import click
import gevent
import gevent.event

from anomos import hookimpl
from anomos.config import split_address
from anomos.errors import ConfigError
from anomos.pluginmanager import Plugins

TRACKER_JSON = "tracker.json"


def parse_range(text: str, what: str) -> tuple[int, int]:
    """``"4-6"`` -> ``(4, 6)``; ``"3"`` -> ``(3, 3)``; a one-line error otherwise."""
    lo, sep, hi = text.partition("-")
    try:
        low = int(lo)
        high = int(hi) if sep else low
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not MIN-MAX") from None
    if not 0 <= low <= high:
        raise ConfigError(f"{what} {text!r} needs 0 <= MIN <= MAX")
    return low, high


def write_tracker_json(state_dir: Path, url: str, fingerprint: str) -> Path:
    path = state_dir / TRACKER_JSON
    tmp = path.with_name(f".{TRACKER_JSON}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"url": url, "fingerprint": fingerprint}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


@click.command("tracker")
@click.option(
    "--state",
    "state",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="State directory (TLS identity, database, tracker.json).",
)
@click.option("--listen", required=True, help="HOST:PORT to serve HTTPS on (port 0 picks one).")
@click.option("--path-policy", default="weighted", show_default=True, help="Path policy plugin.")
@click.option("--cipher-suite", default="x25519", show_default=True, help="Cipher suite plugin.")
@click.option("--ratio-policy", default="relay-credit", show_default=True, help="Ratio plugin.")
@click.option("--neighbours", default="4-6", show_default=True, help="Neighbours per peer.")
@click.option("--relays", default="2-4", show_default=True, help="Relays per circuit.")
@click.option("--interval", default=60, show_default=True, help="Announce interval, seconds.")
@click.pass_obj
def tracker_command(
    plugins: Plugins,
    state: Path,
    listen: str,
    path_policy: str,
    cipher_suite: str,
    ratio_policy: str,
    neighbours: str,
    relays: str,
    interval: int,
) -> None:
    """Run a tracker: assign neighbours, plan circuits, keep ratios."""
    from anomos.tracker.server import Tracker

    split_address(listen)
    min_n, max_n = parse_range(neighbours, "--neighbours")
    min_r, max_r = parse_range(relays, "--relays")
    if interval < 1:
        raise ConfigError("--interval must be at least 1 second")
    tracker = Tracker(
        state,
        listen,
        plugins,
        path_policy=path_policy,
        cipher_suite=cipher_suite,
        ratio_policy=ratio_policy,
        min_neighbours=min_n,
        max_neighbours=max_n,
        min_relays=min_r,
        max_relays=max_r,
        interval=interval,
    )
    done = gevent.event.Event()
    handlers = [gevent.signal_handler(sig, done.set) for sig in (signal.SIGINT, signal.SIGTERM)]
    tracker.start()
    try:
        path = write_tracker_json(state, tracker.url, tracker.fingerprint)
        click.echo(f"tracker: {tracker.url}")
        click.echo(f"fingerprint: {tracker.fingerprint}")
        click.echo(f"written to {path}")
        done.wait()
    finally:
        for handler in handlers:
            handler.cancel()
        tracker.stop()
    click.echo("tracker stopped")


@hookimpl
def anomos_add_commands(cli: click.Group) -> None:
    cli.add_command(tracker_command)
