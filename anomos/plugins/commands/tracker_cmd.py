"""``anomos tracker``: run a tracker until SIGINT or SIGTERM.

Prints the announce URL and the identity fingerprint peers must pin, and
writes both to ``STATE/tracker.json`` so scripts (and tests) can pick them up.
"""

from __future__ import annotations

import json
import signal
import urllib.parse
from pathlib import Path
from typing import Any

import click
import gevent
import gevent.event

from anomos import hookimpl
from anomos.config import parse_size, split_address
from anomos.errors import ConfigError
from anomos.fsutil import atomic_write, lock_state_dir
from anomos.pluginmanager import Plugins

TRACKER_JSON = "tracker.json"
#: Where tor's connections to an onion service's target come from.
ONION_CLIENT_ADDRESSES = ("127.0.0.1", "::1")


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
    doc = json.dumps({"url": url, "fingerprint": fingerprint}, indent=1) + "\n"
    atomic_write(path, doc.encode(), mode=0o644)  # what peers need: not a secret
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
@click.option(
    "--min-ratio",
    default=0.0,
    show_default=True,
    type=float,
    help="Share ratio a peer needs to be given circuits (relayed bytes count); 0: no minimum.",
)
@click.option(
    "--ratio-grace",
    default="1G",
    show_default=True,
    help="Bytes a peer may download before --min-ratio applies.",
)
@click.option(
    "--ipv4-prefix",
    default=24,
    show_default=True,
    type=click.IntRange(8, 32),
    help="Leading bits of a client's IPv4 address that make one network (32: every address).",
)
@click.option(
    "--ipv6-prefix",
    default=64,
    show_default=True,
    type=click.IntRange(16, 128),
    help="Leading bits of a client's IPv6 address that make one network.",
)
@click.option(
    "--join-burst",
    default=16,
    show_default=True,
    type=click.IntRange(1, None),
    help="New peers one network may bring in back to back ...",
)
@click.option(
    "--join-every",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0.001),
    help="... and then one per this many seconds.",
)
@click.option(
    "--probe-reachability/--no-probe-reachability",
    default=True,
    show_default=True,
    help="Dial each peer back to learn whether it is behind NAT, and plan edges so that "
    "peers nobody can dial dial out (docs/operations.md).",
)
@click.option(
    "--onion",
    is_flag=True,
    help="Also publish the tracker as a v3 onion service (key kept in STATE/onion_key).",
)
@click.option(
    "--tor-control",
    default="127.0.0.1:9051",
    show_default=True,
    help="ControlPort (HOST:PORT or unix:PATH) of the tor that publishes --onion.",
)
@click.option("--tor-launch", is_flag=True, help="With --onion: start a tor of our own.")
@click.option(
    "--onion-client-auth",
    multiple=True,
    metavar="PUBKEY",
    help="With --onion: only clients holding this v3 client-auth key may connect (repeatable).",
)
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
    min_ratio: float,
    ratio_grace: str,
    ipv4_prefix: int,
    ipv6_prefix: int,
    join_burst: int,
    join_every: float,
    probe_reachability: bool,
    onion: bool,
    tor_control: str,
    tor_launch: bool,
    onion_client_auth: tuple[str, ...],
) -> None:
    """Run a tracker: assign neighbours, plan circuits, keep ratios."""
    from anomos.tracker.limits import LimitSettings
    from anomos.tracker.server import Tracker
    from anomos.tracker.settings import TrackerSettings

    split_address(listen)
    min_n, max_n = parse_range(neighbours, "--neighbours")
    min_r, max_r = parse_range(relays, "--relays")
    if interval < 1:
        raise ConfigError("--interval must be at least 1 second")
    if (tor_launch or onion_client_auth) and not onion:
        raise ConfigError("--tor-launch and --onion-client-auth need --onion")
    click.get_current_context().with_resource(lock_state_dir(state))
    settings = TrackerSettings(
        path_policy=path_policy,
        cipher_suite=cipher_suite,
        ratio_policy=ratio_policy,
        min_neighbours=min_n,
        max_neighbours=max_n,
        min_relays=min_r,
        max_relays=max_r,
        interval=interval,
        min_ratio=min_ratio,
        ratio_grace=parse_size(ratio_grace, "--ratio-grace"),
        limits=LimitSettings(
            join_burst=join_burst,
            join_every=join_every,
            ipv4_prefix=ipv4_prefix,
            ipv6_prefix=ipv6_prefix,
        ),
        # Behind an onion service every client arrives from tor's loopback end.
        shared_clients=ONION_CLIENT_ADDRESSES if onion else (),
        probe_reachability=probe_reachability,
    )
    tracker = Tracker(state, listen, plugins, settings)
    done = gevent.event.Event()
    handlers = [gevent.signal_handler(sig, done.set) for sig in (signal.SIGINT, signal.SIGTERM)]
    tracker.start()
    tor = None
    try:
        url = tracker.url
        if onion:
            tor, url = _publish_onion(
                state, tracker.url, tor_control, tor_launch, onion_client_auth
            )
        path = write_tracker_json(state, url, tracker.fingerprint)
        click.echo(f"tracker: {url}")
        click.echo(f"fingerprint: {tracker.fingerprint}")
        click.echo(f"written to {path}")
        done.wait()
    finally:
        for handler in handlers:
            handler.cancel()
        tracker.stop()
        if tor is not None:
            tor.close()
    click.echo("tracker stopped")


def _publish_onion(
    state: Path, url: str, control: str, launch: bool, client_auth: tuple[str, ...]
) -> tuple[Any, str]:
    """Publish the tracker's HTTPS port as a v3 onion service on port 443.

    Returns the object keeping tor's control connection open (closing it
    removes the service) and the onion announce URL. Never falls back to the
    clearnet URL: if tor is unavailable this raises.
    """
    from anomos.tor.control import connect_control, launch_tor
    from anomos.tor.onion import publish

    parsed = urllib.parse.urlsplit(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 443
    if launch:
        launched = launch_tor(state / "tor")
        controller, closer = launched.controller, launched
    else:
        controller = connect_control(control)
        closer = controller
    onion = publish(
        controller,
        port,
        key_path=state / "onion_key",
        client_auth_keys=client_auth,
        virtual_port=443,
        target_host=host,
    )
    return closer, f"https://{onion}{parsed.path}"


@hookimpl
def anomos_add_commands(cli: click.Group) -> None:
    cli.add_command(tracker_command)
