"""Log every anomos lifecycle event as one JSON line, and read the log back.

Shows both command-line hooks: ``anomos_add_options`` adds ``--hooklog FILE``
to every command that runs a tracker or a peer (those with ``--listen``), and
``anomos_add_commands`` adds ``anomos events FILE`` to print or count the log.

Where a record goes: the ``--hooklog`` value of the command that started the
role (read from ``.plugins.options`` of the tracker, peer or torrent the event
is about), else the ``ANOMOS_HOOKLOG`` environment variable, which also
reaches the child processes of ``anomos demo`` and ``anomos testnet``; with
neither, events are ignored.

The log names neighbours' addresses: keep it to test networks.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from anomos import hookimpl
from anomos.errors import ConfigError

__version__ = "0.1.0"

#: Name of the added option, which is also its key in ``Plugins.options``.
OPTION = "hooklog"
#: Environment variable naming the log when no ``--hooklog`` was given.
ENV = "ANOMOS_HOOKLOG"
#: Longest line ``anomos events`` accepts; longer ones count as malformed.
MAX_LINE = 64 * 1024
#: Longest text field written (reasons come from the network).
MAX_TEXT = 200


# ----------------------------------------------------------------------------- writing


def log_path(obj: Any) -> Path | None:
    """The log for events about ``obj`` (a tracker, peer or torrent), if any."""
    for holder in (getattr(obj, "plugins", None), getattr(obj, "settings", None)):
        options = getattr(holder, "options", None)
        if isinstance(options, dict) and options.get(OPTION):
            return Path(options[OPTION])
    env = os.environ.get(ENV)
    return Path(env) if env else None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)[:MAX_TEXT]


def _address(obj: Any) -> str | None:
    return _text(getattr(obj, "address", None) or None)


def _infohash(torrent: Any) -> str | None:
    infohash = getattr(getattr(torrent, "metainfo", None), "infohash", None)
    return infohash.hex() if isinstance(infohash, bytes) else None


def _circuit(circuit: Any) -> str:
    """Type and identity within the process, so an open pairs with its close."""
    return f"{type(circuit).__name__}@{id(circuit):x}"


def record(event: str, about: Any, **fields: Any) -> None:
    """Append one JSON line; a single ``write`` on an O_APPEND descriptor, so
    several processes may share one log without interleaving lines."""
    path = log_path(about)
    if path is None:
        return
    entry = {"time": round(time.time(), 6), "pid": os.getpid(), "event": event, **fields}
    line = json.dumps(entry, sort_keys=True, allow_nan=False) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@hookimpl
def anomos_tracker_started(tracker: Any) -> None:
    record("tracker_started", tracker, address=_address(tracker))


@hookimpl
def anomos_tracker_stopped(tracker: Any) -> None:
    record("tracker_stopped", tracker, address=_address(tracker))


@hookimpl
def anomos_peer_started(peer: Any) -> None:
    record("peer_started", peer, peer=_address(peer))


@hookimpl
def anomos_peer_stopped(peer: Any) -> None:
    record("peer_stopped", peer, peer=_address(peer))


@hookimpl
def anomos_neighbour_up(peer: Any, nid: int, address: str) -> None:
    record("neighbour_up", peer, peer=_address(peer), nid=int(nid), address=_text(address))


@hookimpl
def anomos_neighbour_down(peer: Any, nid: int, reason: str) -> None:
    record("neighbour_down", peer, peer=_address(peer), nid=int(nid), reason=_text(reason))


@hookimpl
def anomos_circuit_opened(peer: Any, circuit: Any) -> None:
    record("circuit_opened", peer, peer=_address(peer), circuit=_circuit(circuit))


@hookimpl
def anomos_circuit_closed(peer: Any, circuit: Any, reason: str) -> None:
    record(
        "circuit_closed", peer, peer=_address(peer), circuit=_circuit(circuit), reason=_text(reason)
    )


@hookimpl
def anomos_piece_verified(torrent: Any, index: int) -> None:
    record("piece_verified", torrent, infohash=_infohash(torrent), index=int(index))


@hookimpl
def anomos_piece_failed(torrent: Any, index: int, source: str) -> None:
    record(
        "piece_failed", torrent, infohash=_infohash(torrent), index=int(index), source=_text(source)
    )


@hookimpl
def anomos_download_complete(torrent: Any) -> None:
    record("download_complete", torrent, infohash=_infohash(torrent))


# ----------------------------------------------------------------------------- reading


def read_events(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a log and the number of malformed lines skipped.

    A process killed mid-write leaves a partial last line, so malformed lines
    are counted, not fatal; a line longer than :data:`MAX_LINE` is malformed.
    """
    events: list[dict[str, Any]] = []
    bad = 0
    for line in _lines(path):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if isinstance(entry, dict) and isinstance(entry.get("event"), str):
            events.append(entry)
        elif line.strip():
            bad += 1
    return events, bad


def _lines(path: Path) -> Iterator[bytes]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, generator keeps it open
    except OSError as exc:
        raise ConfigError(f"cannot read event log {path}: {exc.strerror or exc}") from None
    with f:
        while line := f.readline(MAX_LINE + 1):
            if len(line) > MAX_LINE:
                while line and not line.endswith(b"\n"):  # skip the rest of it
                    line = f.readline(MAX_LINE)
                yield b"\x00"  # counted as malformed
                continue
            yield line


def _describe(entry: dict[str, Any]) -> str:
    when = entry.get("time")
    stamp = (
        time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when * 1000) % 1000:03d}"
        if isinstance(when, (int, float))
        else "?"
    )
    rest = " ".join(
        f"{k}={v}" for k, v in sorted(entry.items()) if k not in ("time", "pid", "event")
    )
    return f"{stamp} {entry.get('pid', '?'):>7} {entry['event']:17} {rest}".rstrip()


@click.command("events")
@click.argument("log", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--event", "only", multiple=True, help="Show only this event (repeatable), e.g. peer_started."
)
@click.option("--count", is_flag=True, help="Print how many of each event, not the events.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list, or counts).")
def events_command(log: Path, only: tuple[str, ...], count: bool, as_json: bool) -> None:
    """Print the lifecycle events recorded in LOG by --hooklog."""
    events, bad = read_events(log)
    if only:
        events = [e for e in events if e["event"] in only]
    if count:
        counts = dict(sorted(Counter(e["event"] for e in events).items()))
        if as_json:
            click.echo(json.dumps(counts, indent=2))
        else:
            for name, n in counts.items():
                click.echo(f"{n:8} {name}")
    elif as_json:
        click.echo(json.dumps(events, indent=2))
    else:
        for entry in events:
            click.echo(_describe(entry))
    if bad:
        click.echo(f"anomos: warning: skipped {bad} malformed line(s) in {log}", err=True)


# ----------------------------------------------------------------------------- CLI hooks


@hookimpl
def anomos_add_commands(cli: click.Group) -> None:
    cli.add_command(events_command)


@hookimpl
def anomos_add_options(command: click.Command) -> None:
    """``--hooklog FILE`` on every command that runs a role (it has ``--listen``)."""
    names = {p.name for p in command.params}
    if "listen" in names and OPTION not in names:
        command.params.append(
            click.Option(
                [f"--{OPTION}"],
                metavar="FILE",
                type=click.Path(dir_okay=False),
                help=f"Append every lifecycle event to FILE as JSON lines [env: {ENV}].",
            )
        )
