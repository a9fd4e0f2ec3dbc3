"""``anomos seed``, ``anomos get`` and ``anomos relay``: the peer roles."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import click
import gevent
import gevent.event

from anomos import hookimpl
from anomos.config import Settings
from anomos.errors import AnomosError, ConfigError, StorageError
from anomos.fsutil import atomic_write, check_room, check_writable, lock_state_dir
from anomos.net.ratelimit import parse_rate
from anomos.peer.launch import DEFAULT_STALL_LIMIT, TrackerDialAhead, process_started
from anomos.pluginmanager import Plugins
from anomos.progress import bar
from anomos.torrent.magnet import Magnet, is_magnet
from anomos.torrent.metainfo import Metainfo

listen_option = click.option(
    "--listen",
    default="127.0.0.1:0",
    show_default=True,
    help="HOST:PORT to listen on; HOST is also the source address of every outgoing connection.",
)
state_option = click.option(
    "--state",
    "state_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for this peer's keys and resume data.",
)


def _rate(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    try:
        return parse_rate(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def transport_option(fn: Any) -> Any:
    """``--transport`` to listen and dial with, ``--dial-transport`` for what it cannot reach,
    ``--max-send-rate`` for how much bandwidth the peer gives, ``--upnp`` to open a port."""
    fn = click.option(
        "--upnp",
        is_flag=True,
        help="Ask the home router (UPnP-IGD) to forward a public port to this peer, so "
        "others can dial it from outside (off by default: docs/operations.md).",
    )(fn)
    fn = click.option(
        "--max-send-rate",
        default="0",
        show_default=True,
        callback=_rate,
        metavar="RATE",
        help="Bytes per second all neighbour links may send together, relayed cells and "
        "own uploads alike (e.g. 500k, 2M); 0 for no limit.",
    )(fn)
    fn = click.option(
        "--dial-transport",
        "dial_transports",
        multiple=True,
        metavar="NAME",
        help="Another transport for addresses the first cannot reach (e.g. tor for .onion).",
    )(fn)
    return click.option(
        "--transport", default="tcp", show_default=True, help="Transport to listen and dial with."
    )(fn)


def _settings(
    listen: str,
    state_dir: Path,
    transport: str,
    dial_transports: tuple[str, ...],
    max_send_rate: int,
    plugins: Plugins,
    upnp: bool = False,
) -> Settings:
    for name in (transport, *dial_transports):
        plugins.transports.get(name)  # an unknown name is a one-line error before anything starts
    hold_state_dir(state_dir)
    return Settings(
        listen=listen,
        state_dir=state_dir,
        transport=transport,
        dial_transports=tuple(dial_transports),
        max_send_rate=max_send_rate,
        upnp=upnp,
        options=plugins.options,
    )


def hold_state_dir(state_dir: Path) -> None:
    """Lock ``state_dir`` for as long as this command runs: one process per identity."""
    click.get_current_context().with_resource(lock_state_dir(state_dir))


def _tracker_of(metainfo: Metainfo, path: Path) -> tuple[str, str]:
    if not metainfo.is_anomos:
        raise ConfigError(
            f"{path} is a plain .torrent, not an .atorrent; make one with "
            f"`anomos anonymize {path} --tracker URL --fingerprint FP -o OUT.atorrent`"
        )
    if not metainfo.fingerprint:
        raise ConfigError(
            f"{path} does not pin the tracker's identity (no fingerprint); remake it with "
            "--fingerprint"
        )
    if metainfo.legacy:
        click.echo(
            f"warning: {path} is an old-format .atorrent that BitTorrent clients also open "
            "(its infohash could reach the public DHT); rewrite it with `anomos anonymize`",
            err=True,
        )
    return metainfo.trackers[0], metainfo.fingerprint


def _data_root(metainfo: Metainfo, data: Path) -> Path:
    """``--data`` may name the content itself or the folder that holds it."""
    if (data / metainfo.name).exists():
        return data
    if data.name == metainfo.name and data.exists():
        return data.parent
    raise ConfigError(
        f"--data {data}: neither it nor {data / metainfo.name} holds {metainfo.name!r}"
    )


def _file_indices(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> frozenset[int] | None:
    """``--only 0,3,4``: a set of file indices."""
    if value is None:
        return None
    try:
        indices = frozenset(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give file indices like 0,3,4") from None
    if not indices or min(indices) < 0:
        raise click.BadParameter(f"{value!r}: give file indices like 0,3,4")
    return indices


def _chosen_files(
    metainfo: Metainfo, only: frozenset[int] | None, exclude: frozenset[int] | None
) -> set[int]:
    """The indices of the files to fetch: --only, or all but --exclude, or all."""
    every = set(range(len(metainfo.files)))
    if only is not None and exclude is not None:
        raise ConfigError("give --only or --exclude, not both")
    named = only if only is not None else exclude or frozenset()
    if named - every:
        raise ConfigError(
            f"no file {min(named - every)} in {metainfo.name!r}: it has {len(every)} "
            "(see `anomos info`)"
        )
    return set(only) if only is not None else every - named


def _check_room_for_a_new_download(
    metainfo: Metainfo,
    dest: Path,
    state_dir: Path,
    only: frozenset[int] | None,
    exclude: frozenset[int] | None,
) -> None:
    """A download this state never started, into a --dest that holds none of it, needs
    room for all of its chosen files: say so before the tracker is dialled. (Anything
    else is checked exactly once the torrent is added: resume data, files already there.)"""
    from anomos.torrent.resume import resume_path

    if (dest / metainfo.name).exists() or resume_path(state_dir / "resume", metainfo).exists():
        return
    chosen = _chosen_files(metainfo, only, exclude)
    files = metainfo.files
    check_room(dest, sum(files[i].length for i in chosen if not files[i].pad))


def _run_until_signal(peer: Any) -> None:
    stop = gevent.event.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, stop.set)
    stop.wait()
    peer.stop()


class Stopped(Exception):
    """SIGINT or SIGTERM arrived: stop cleanly (resume data saved), one line, no traceback."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop_on_signals() -> Callable[[], None]:
    """From now on, the first SIGINT or SIGTERM raises :class:`Stopped` in this greenlet
    (wherever it waits), instead of gevent's KeyboardInterrupt noise or a silent death.

    Returns ``disarm``: once called (when the peer is stopping anyway), signals are
    ignored, so none can interrupt the stop itself.
    """
    target = gevent.getcurrent()
    armed = [True]

    def on_signal(signum: int) -> None:
        if armed[0]:
            armed[0] = False
            gevent.kill(target, Stopped(signum))

    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, on_signal, sig)

    def disarm() -> None:
        armed[0] = False

    return disarm


def _make_peer(plugins: Plugins, settings: Settings, url: str, fingerprint: str) -> Any:
    """The peer, with its tracker dialled before the peer's modules are imported (most
    of a launch's CPU time: the TCP handshake completes meanwhile)."""
    ahead = TrackerDialAhead.start(plugins, settings, url)
    from anomos.peer.node import Peer  # imported late: keeps `anomos --help` fast

    try:
        return Peer(
            plugins, settings, tracker_url=url, fingerprint=fingerprint, tracker_ahead=ahead
        )
    except BaseException:
        if ahead is not None:
            ahead.close()
        raise


@click.command("seed")
@click.argument(
    "atorrents",
    metavar="ATORRENT...",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="The shared file or folder, or the folder that holds the data of every ATORRENT.",
)
@state_option
@listen_option
@transport_option
@click.pass_obj
def seed_command(
    plugins: Plugins,
    atorrents: tuple[Path, ...],
    data: Path,
    state_dir: Path,
    listen: str,
    transport: str,
    dial_transports: tuple[str, ...],
    max_send_rate: int,
    upnp: bool,
) -> None:
    """Share the data of each ATORRENT anonymously, and relay for others, until stopped.

    One peer seeds them all, so they must name the same tracker.
    """
    metainfos = [Metainfo.load(a) for a in atorrents]
    trackers = [_tracker_of(m, path) for m, path in zip(metainfos, atorrents, strict=True)]
    url, fingerprint = trackers[0]
    for tracker, path in zip(trackers, atorrents, strict=True):
        if tracker != (url, fingerprint):
            raise ConfigError(f"{path}: names another tracker than {atorrents[0]}; seed it apart")
    if len({m.infohash for m in metainfos}) != len(metainfos):
        raise ConfigError("the same torrent is given twice")
    peer = _make_peer(
        plugins,
        _settings(listen, state_dir, transport, dial_transports, max_send_rate, plugins, upnp),
        url,
        fingerprint,
    )
    for metainfo in metainfos:
        session = peer.add_torrent(metainfo, _data_root(metainfo, data))
        session.set_wanted(range(len(metainfo.files)), True)  # a seed serves every file
        if not session.complete:
            raise ConfigError(
                f"--data {data}: only {session.progress:.0%} of {metainfo.name!r} "
                "is present and valid"
            )
    peer.start()
    for metainfo in metainfos:
        click.echo(f"seeding {metainfo.name} ({metainfo.infohash.hex()}) from {peer.address}")
    _run_until_signal(peer)


@click.command("get")
@click.argument("atorrent", metavar="ATORRENT|MAGNET")
@click.option(
    "--dest",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to download into.",
)
@state_option
@listen_option
@transport_option
@click.option(
    "--sources",
    default=4,
    show_default=True,
    type=click.IntRange(1, 8),
    help="Circuits (sources) to download from at once.",
)
@click.option("--timeout", default=None, type=float, help="Give up after this many seconds.")
@click.option(
    "--stall-limit",
    default=DEFAULT_STALL_LIMIT,
    show_default=True,
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Give up when no piece has arrived for this long (the tracker down, the disk "
    "full, no source with a good copy of the missing pieces); 0 to keep trying.",
)
@click.option(
    "--summary",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a JSON summary (circuits, hop counts, throughput) here.",
)
@click.option("--keep-seeding", is_flag=True, help="Stay and seed after the download.")
@click.option(
    "--only",
    "only",
    callback=_file_indices,
    metavar="INDEX[,INDEX...]",
    help="Download only these files (indices as `anomos info` lists them).",
)
@click.option(
    "--exclude",
    callback=_file_indices,
    metavar="INDEX[,INDEX...]",
    help="Download every file but these.",
)
@click.pass_obj
def get_command(
    plugins: Plugins,
    atorrent: str,
    dest: Path,
    state_dir: Path,
    listen: str,
    transport: str,
    dial_transports: tuple[str, ...],
    max_send_rate: int,
    upnp: bool,
    sources: int,
    timeout: float | None,
    stall_limit: float,
    summary: Path | None,
    keep_seeding: bool,
    only: frozenset[int] | None,
    exclude: frozenset[int] | None,
) -> int:
    """Download ATORRENT (or an anomos magnet link) anonymously; exits 0 once every
    piece of the chosen files (all of them by default) is verified.

    A magnet's metadata is fetched first, from a source over a circuit, and
    checked against its infohash.

    --only or --exclude choose files by the index `anomos info` prints; a piece
    shared with a chosen file is fetched whole. Without either, every file is
    fetched (also those an earlier --only left out: their pieces on disk are kept).

    SIGINT or SIGTERM stops it cleanly: the pieces on disk are kept in the resume
    data, and the next run starts from them without hashing them again.
    """
    launched = process_started()  # the summary's times count from here
    disarm = _stop_on_signals()
    magnet = Magnet.parse(atorrent) if is_magnet(atorrent) else None
    metainfo: Metainfo | None = None
    if magnet is None:
        metainfo = Metainfo.load(atorrent)
        _chosen_files(metainfo, only, exclude)  # bad indices fail before the network
        url, fingerprint = _tracker_of(metainfo, Path(atorrent))
    else:
        url, fingerprint = magnet.trackers[0], magnet.fingerprint
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create --dest {dest}: {exc.strerror or exc}") from None
    check_writable(dest)  # a read-only folder fails now, not after building circuits
    if metainfo is not None:  # (before the tracker is dialled)
        _check_room_for_a_new_download(metainfo, dest, state_dir, only, exclude)
    peer = _make_peer(
        plugins,
        _settings(listen, state_dir, transport, dial_transports, max_send_rate, plugins, upnp),
        url,
        fingerprint,
    )
    from anomos.peer.download import DownloadStalled, MetadataFetch

    session: Any = None

    def kept() -> str:
        if metainfo is None:
            return "no metadata yet"
        have = sum(map(session.has_piece, range(len(metainfo.pieces)))) if session else 0
        return f"{have}/{len(metainfo.pieces)} pieces kept in {state_dir}"

    try:
        if metainfo is None:
            assert magnet is not None
            peer.start()
            metainfo = MetadataFetch(peer, magnet, timeout=stall_limit or None).run()
            click.echo(f"metadata of {metainfo.name} ({metainfo.infohash_hex}) received", err=True)
        chosen = _chosen_files(metainfo, only, exclude)
        session = peer.add_torrent(metainfo, dest)
        session.set_wanted(chosen, True)
        session.set_wanted(set(range(len(metainfo.files))) - chosen, False)
        check_room(dest, session.left_until_done)  # no room fails now, not after building circuits
        if magnet is None:
            peer.start()
        size = session.size_when_done
        progress = bar(size, f"get {metainfo.name}")
        left_at_start = session.left_until_done
        progress.update(size - left_at_start)

        def on_progress(s: Any) -> None:
            progress.update(size - s.left_until_done - progress.n)

        session.on_progress = on_progress
        try:
            report = peer.download(
                session,
                sources=sources,
                timeout=timeout,
                stall_limit=stall_limit or None,
                launched=launched,
            )
        finally:
            progress.close()
        # The size, rate and start of what was asked for, not of the whole torrent.
        report = attrs.evolve(report, size=session.size_when_done, left_at_start=left_at_start)
        _report_download(peer, session, report, summary)
        if keep_seeding:
            gevent.event.Event().wait()  # until a signal raises Stopped
    except Stopped as exc:
        disarm()
        peer.stop()  # saves the resume data
        click.echo(f"stopped by {exc}: {kept()}", err=True)
        # Seeding after a complete download ends this way: that is a success.
        return 0 if session is not None and session.complete else 128 + exc.signum
    except DownloadStalled as exc:
        disarm()
        peer.stop()
        click.echo(f"anomos: error: gave up: {exc} ({kept()})", err=True)
        return 1
    finally:
        disarm()
        peer.stop()
    return 0


def _report_download(peer: Any, session: Any, report: Any, summary: Path | None) -> None:
    """The lines (and the JSON summary) a finished download leaves."""
    metainfo = session.metainfo
    relays = sorted(c.relays for c in report.circuits)
    files = session.file_progress()
    real = [i for i, f in enumerate(metainfo.files) if not f.pad]
    wanted = sum(1 for i in real if files[i].wanted)
    click.echo(
        f"complete: {metainfo.name} {wanted} of {len(real)} files, "
        f"{report.size} bytes in {report.seconds:.2f} s "
        f"({report.throughput / 1e6:.2f} MB/s) over {len(report.circuits)} circuits "
        f"(relays per circuit: {relays})"
    )
    result = report.to_json()
    result["files_wanted"] = wanted
    result["files"] = len(real)
    # CPU seconds this process took (the benchmarks compare it with the wall time).
    result["cpu_seconds"] = round(sum(os.times()[:2]), 3)
    try:
        account = peer.announce()  # the tracker credits what we uploaded and relayed (confirmed)
    except AnomosError as exc:
        click.echo(f"ratio: unknown (final announce failed: {exc})")
    else:
        click.echo(
            f"ratio: {account.ratio:.2f} as the tracker counts it (confirmed by neighbours: "
            f"uploaded {account.uploaded} of {account.uploaded_claimed} claimed, "
            f"relayed {account.relayed} of {account.relayed_claimed}; "
            f"downloaded {account.downloaded} bytes)"
        )
        result["account"] = {
            "ratio": account.ratio,
            "uploaded": account.uploaded,
            "uploaded_claimed": account.uploaded_claimed,
            "relayed": account.relayed,
            "relayed_claimed": account.relayed_claimed,
            "downloaded": account.downloaded,
        }
    if summary is not None:
        atomic_write(summary, json.dumps(result, indent=2, default=str).encode(), mode=0o644)


@click.command("relay")
@click.argument("url")
@click.option("--fingerprint", required=True, help="The tracker's identity fingerprint (hex).")
@state_option
@listen_option
@transport_option
@click.pass_obj
def relay_command(
    plugins: Plugins,
    url: str,
    fingerprint: str,
    state_dir: Path,
    listen: str,
    transport: str,
    dial_transports: tuple[str, ...],
    max_send_rate: int,
    upnp: bool,
) -> None:
    """Donate bandwidth: relay circuits for the tracker at URL until stopped."""
    peer = _make_peer(
        plugins,
        _settings(listen, state_dir, transport, dial_transports, max_send_rate, plugins, upnp),
        url,
        fingerprint,
    )
    peer.start()
    click.echo(f"relaying from {peer.address}")
    _run_until_signal(peer)


@hookimpl
def anomos_add_commands(cli: click.Group) -> None:
    for command in (seed_command, get_command, relay_command):
        cli.add_command(command)
