"""``anomos demo``: a whole anonymous network on loopback, one transfer, verified.

A tracker and at least eight peers run as separate processes, each on its own
127.0.0.X address. Several seeders share a generated file; a downloader fetches
it over circuits through relays, from several sources at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from anomos import hookimpl
from anomos.config import parse_size
from anomos.errors import AnomosError
from anomos.torrent.metainfo import make_metainfo

if TYPE_CHECKING:  # (imported when the demo runs: every launch of anomos loads this plugin)
    from anomos.localnet import LocalNetwork

#: Seconds the network gets to form its neighbour links before the download.
SETTLE = 5.0
#: Announce interval of the demo's tracker, short so relayed bytes show up quickly.
ANNOUNCE_INTERVAL = 2


def _write_random(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            f.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@click.command("demo")
@click.option(
    "--peers",
    default=8,
    show_default=True,
    type=click.IntRange(4, 64),
    help="Peers besides the tracker (seeders + relays + the downloader).",
)
@click.option("--seeders", default=3, show_default=True, type=click.IntRange(1, 16))
@click.option("--size", "size_text", default="16MiB", show_default=True, help="Size of the file.")
@click.option(
    "--dir",
    "workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep everything (logs, state) here instead of a temporary folder.",
)
@click.option("--timeout", default=300.0, show_default=True, help="Give up after this long (s).")
def demo_command(
    peers: int, seeders: int, size_text: str, workdir: Path | None, timeout: float
) -> int:
    """Run a tracker and PEERS peers on loopback and download a file anonymously."""
    size = parse_size(size_text, "--size", minimum=1, maximum=4 << 30)
    relays = peers - seeders - 1
    if relays < 2:
        raise click.BadParameter("need at least 2 relays: raise --peers or lower --seeders")
    keep = workdir is not None
    root = workdir or Path(tempfile.mkdtemp(prefix="anomos-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    from anomos.localnet import LocalNetwork

    net = LocalNetwork(root / "net")
    try:
        click.echo(f"anomos demo in {root}")
        tracker = net.start_tracker("--interval", str(ANNOUNCE_INTERVAL))
        click.echo(
            f"tracker   {net.tracker_url}  fingerprint {net.fingerprint[:16]}...  "
            f"(pid {tracker.pid})"
        )
        share = root / "share"
        share.mkdir(exist_ok=True)
        data = share / "demo.bin"
        digest = _write_random(data, size)
        meta = make_metainfo(
            data, trackers=[net.tracker_url], fingerprint=net.fingerprint, progress=False
        )
        atorrent = root / "demo.atorrent"
        meta.save(atorrent)
        click.echo(
            f"file      {data.name}: {size} bytes, {len(meta.pieces)} pieces, "
            f"infohash {meta.infohash.hex()}"
        )
        for i in range(relays):
            net.start_peer(f"relay{i}", "relay")
        for i in range(seeders):
            net.start_peer(f"seeder{i}", "seed", str(atorrent), "--data", str(data))
        click.echo(
            f"peers     {seeders} seeders and {relays} relays, each its own process "
            "and loopback address"
        )
        time.sleep(SETTLE)
        dest = root / "download"
        summary_path = root / "summary.json"
        host = net.next_host()
        click.echo("download  through circuits from several sources at once:")
        env = dict(os.environ)
        env.setdefault("ANOMOS_PROGRESS", "1" if sys.stderr.isatty() else "0")
        code = subprocess.call(
            [
                sys.executable,
                "-m",
                "anomos",
                "get",
                str(atorrent),
                "--dest",
                str(dest),
                "--state",
                str(root / "net" / "downloader"),
                "--listen",
                f"{host}:0",
                "--summary",
                str(summary_path),
                "--timeout",
                str(timeout),
            ],
            env=env,
            timeout=timeout + 60,
        )
        if code != 0:
            raise AnomosError(f"the download failed (exit {code}); logs are in {root}")
        got = _sha256(dest / data.name)
        if got != digest:
            raise AnomosError("the downloaded file differs from the original")
        summary = json.loads(summary_path.read_text())
        click.echo(f"verified  SHA-256 {got[:16]}... matches the original")
        click.echo(
            f"circuits  {len(summary['circuits'])} used (the downloader never learns "
            "who the sources or relays are):"
        )
        for i, c in enumerate(summary["circuits"], 1):
            click.echo(
                f"  circuit {i}: {c['relays']} relays between downloader and source, "
                f"{c['received']} bytes received"
            )
        click.echo(
            f"throughput {summary['throughput'] / 1e6:.2f} MB/s "
            f"({size} bytes in {summary['seconds']:.2f} s)"
        )
        time.sleep(ANNOUNCE_INTERVAL + 1.5)  # every peer reports its relayed bytes
        _show_relay_credit(net, tracker.state_dir)
        return 0
    finally:
        net.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def _show_relay_credit(net: LocalNetwork, tracker_state: Path) -> None:
    """What the tracker credits each peer, read from its SQLite file."""
    import sqlite3

    from anomos.pluginmanager import get_plugins
    from anomos.tracker.store import DB_FILE

    policy = get_plugins(load_entrypoints=False).ratio_policy("relay-credit")
    db = sqlite3.connect(f"file:{tracker_state / DB_FILE}?mode=ro", uri=True)
    try:
        rows = {
            bytes(r[0]): r[1:]
            for r in db.execute("SELECT identity, uploaded, downloaded, relayed FROM accounts")
        }
    finally:
        db.close()
    click.echo(
        f"credit    as the tracker counts it ({policy.name}: relayed bytes count as uploaded):"
    )
    for proc in net.procs:
        info = proc.state_dir / "peer.json"
        if not info.exists():
            continue
        account = rows.get(bytes.fromhex(json.loads(info.read_text())["identity"]))
        if account is None:
            continue
        up, down, relayed = account
        ratio = policy.ratio(up, down, relayed)
        click.echo(
            f"  {proc.name:10} uploaded {up / 1e6:7.2f} MB  relayed {relayed / 1e6:7.2f} MB  "
            f"downloaded {down / 1e6:7.2f} MB  ratio {ratio:.2f}"
        )


@hookimpl
def anomos_add_commands(cli: click.Group) -> None:
    cli.add_command(demo_command)
