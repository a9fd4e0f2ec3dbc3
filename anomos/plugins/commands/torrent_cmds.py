"""``anomos make``, ``anomos info`` and ``anomos anonymize``: .atorrent files.

Output files are written atomically (temporary file + rename), never over
the input and never inside the folder being shared; an existing output is
replaced only with ``--force``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import click

from anomos import hookimpl
from anomos.config import parse_size
from anomos.errors import ConfigError, MetainfoError
from anomos.torrent.magnet import Magnet, is_magnet
from anomos.torrent.metainfo import (
    MAX_METAINFO_SIZE,
    Metainfo,
    anonymize,
    make_metainfo,
)


def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_output(out: Path, *, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    for source in inputs:
        if _same_file(out, source):
            raise ConfigError(f"output {out} is the input file; choose another -o")
    if out.exists() and not out.is_file():
        raise ConfigError(f"output {out} exists and is not a file")
    if out.exists() and not force:
        raise ConfigError(f"output {out} exists; use --force to replace it")
    if not out.parent.is_dir():
        raise ConfigError(f"folder of output {out} does not exist")


def _summary(meta: Metainfo, out: Path) -> str:
    """What make and anonymize print: the file written, and its magnet when it has one."""
    magnet = _magnet(meta)
    return (
        f"wrote {out}: {meta.name}, {human(meta.total_length)} in {len(meta.files)} file(s), "
        f"{meta.piece_count} pieces of {human(meta.piece_length)}, infohash {meta.infohash_hex}"
    ) + (f"\nmagnet: {magnet}" if magnet else "")


def _magnet(meta: Metainfo) -> str | None:
    """The anomos magnet link, for a torrent that names and pins its tracker."""
    if not meta.trackers or meta.fingerprint is None:
        return None
    return str(Magnet.from_metainfo(meta))


_tracker_option = click.option(
    "--tracker",
    "-t",
    "trackers",
    multiple=True,
    required=True,
    metavar="URL",
    help="anomos tracker URL (https://...); repeat for fallbacks, tried in order.",
)
_fingerprint_option = click.option(
    "--fingerprint",
    required=True,
    metavar="FP",
    help="SHA-256 of the tracker's public key, in hex (pins its identity).",
)
_output_option = click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The .atorrent file to write.",
)
_force_option = click.option("--force", is_flag=True, help="Replace the output if it exists.")


@click.command("make")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@_tracker_option
@_output_option
@click.option(
    "--piece-size",
    metavar="BYTES",
    help="Piece length, a power of two from 16K to 64M (default: chosen from the size "
    "as libtorrent does).",
)
@_fingerprint_option
@click.option(
    "--private", is_flag=True, help="Set the private flag in info (changes the infohash)."
)
@_force_option
def make_command(
    path: Path,
    trackers: tuple[str, ...],
    output: Path,
    piece_size: str | None,
    fingerprint: str | None,
    private: bool,
    force: bool,
) -> None:
    """Hash PATH (a file or folder) into a new .atorrent.

    The infohash is the one libtorrent or mktorrent give the same files with
    the same piece size, so the content can also be checked by other clients.
    """
    piece_length = parse_size(piece_size, "piece size") if piece_size is not None else None
    root = Path(os.path.abspath(path))
    out = Path(os.path.abspath(output))
    if out == root or out.is_relative_to(root) or _same_file(out, root):
        raise ConfigError(f"output {output} must not be inside the shared path {path}")
    real_root = Path(os.path.realpath(root))
    if Path(os.path.realpath(out)).is_relative_to(real_root):
        raise ConfigError(f"output {output} must not be inside the shared path {path}")
    _check_output(out, force=force)
    meta = make_metainfo(
        root,
        trackers=trackers,
        piece_length=piece_length,
        fingerprint=fingerprint,
        private=private,
        progress=True,
    )
    meta.save(out)
    click.echo(_summary(meta, output))


def info_dict(meta: Metainfo) -> dict[str, Any]:
    """The JSON shape of ``anomos info --json``."""
    return {
        "name": meta.name,
        "infohash": meta.infohash_hex,
        "length": meta.total_length,
        "piece_length": meta.piece_length,
        "piece_count": meta.piece_count,
        "private": meta.private,
        "multi_file": meta.multi_file,
        "anomos": meta.is_anomos,
        "legacy": meta.legacy,
        "trackers": list(meta.trackers),
        "fingerprint": meta.fingerprint,
        "magnet": _magnet(meta),
        "files": [
            {
                "index": i,
                "path": "/".join(f.path),
                "length": f.length,
                "offset": f.offset,
                "pad": f.pad,
            }
            for i, f in enumerate(meta.files)
        ],
    }


def _magnet_info(magnet: Magnet, as_json: bool) -> None:
    shown = {
        "name": magnet.name,
        "infohash": magnet.infohash_hex,
        "trackers": list(magnet.trackers),
        "fingerprint": magnet.fingerprint,
        "magnet": str(magnet),
    }
    if as_json:
        click.echo(json.dumps(shown, indent=2))
        return
    click.echo(f"name:         {magnet.name or '(none given)'}")
    click.echo(f"infohash:     {magnet.infohash_hex}")
    for url in magnet.trackers:
        click.echo(f"tracker:      {url}")
    click.echo(f"fingerprint:  {magnet.fingerprint}")
    click.echo("metadata:     not in a magnet: `get` and `add` fetch it from a source")


@click.command("info")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info_command(file: Path, as_json: bool) -> None:
    """Show what a .atorrent (or plain .torrent) holds, after validating it, or what
    an anomos magnet link names; given the ID of a torrent of the running daemon
    instead (a number or infohash), show that."""
    if is_magnet(str(file)):
        _magnet_info(Magnet.parse(str(file)), as_json)
        return
    if not file.exists() and re.fullmatch(r"\d{1,9}|[0-9a-fA-F]{40}", str(file)):
        from anomos.plugins.commands.daemon_cmd import show_torrent

        # The daemon as `anomos list` finds it: ANOMOS_RPC / ANOMOS_RPC_AUTH, else rpc.json.
        show_torrent(str(file), os.environ.get("ANOMOS_RPC"), os.environ.get("ANOMOS_RPC_AUTH", ""))
        return
    meta = Metainfo.load(file)
    if as_json:
        click.echo(json.dumps(info_dict(meta), indent=2))
        return
    click.echo(f"name:         {meta.name}")
    click.echo(f"infohash:     {meta.infohash_hex}")
    click.echo(f"size:         {human(meta.total_length)} ({meta.total_length} bytes)")
    click.echo(f"pieces:       {meta.piece_count} of {human(meta.piece_length)}")
    click.echo(f"private:      {'yes' if meta.private else 'no'}")
    if meta.legacy:
        click.echo("format:       1 (old: BitTorrent clients open it too; rewrite with anonymize)")
    if meta.is_anomos:
        for url in meta.trackers:
            click.echo(f"tracker:      {url}")
        click.echo(f"fingerprint:  {meta.fingerprint or '(none: tracker identity not pinned)'}")
        click.echo(f"magnet:       {_magnet(meta) or '(none: needs a fingerprint)'}")
    else:
        click.echo("trackers:     none (a plain .torrent; use `anomos anonymize`)")
    click.echo(f"files:        {len(meta.files)} (INDEX, bytes, path: `get --only INDEX,...`)")
    for i, f in enumerate(meta.files):
        pad = "  (padding)" if f.pad else ""
        click.echo(f"  {i:>5}  {f.length:>14}  {'/'.join(f.path)}{pad}")


@click.command("anonymize")
@click.argument("torrent", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_tracker_option
@_fingerprint_option
@_output_option
@_force_option
def anonymize_command(
    torrent: Path,
    trackers: tuple[str, ...],
    fingerprint: str | None,
    output: Path,
    force: bool,
) -> None:
    """Turn a plain .torrent into an .atorrent with the same infohash.

    Keeps info byte for byte; drops every tracker, web seed, DHT node and
    comment, then adds the anomos trackers and fingerprint.
    """
    out = Path(os.path.abspath(output))
    _check_output(out, force=force, inputs=(Path(os.path.abspath(torrent)),))
    try:
        with open(torrent, "rb") as f:
            data = f.read(MAX_METAINFO_SIZE + 1)
    except OSError as exc:
        raise MetainfoError(f"cannot read {torrent}: {exc.strerror or exc}") from None
    try:
        meta = anonymize(data, trackers=trackers, fingerprint=fingerprint)
    except MetainfoError as exc:
        raise MetainfoError(f"{torrent}: {exc}") from None
    meta.save(out)
    click.echo(_summary(meta, output))


@hookimpl
def anomos_add_commands(cli: click.Group) -> None:
    cli.add_command(make_command)
    cli.add_command(info_command)
    cli.add_command(anonymize_command)
