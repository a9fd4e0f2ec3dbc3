"""``anomos daemon`` and the commands that drive it over its Transmission RPC:
``add``, ``list``, ``pause``, ``resume``, ``remove``, ``select``, ``limits`` (and
``info ID``: :func:`show_torrent`)."""

from __future__ import annotations

import base64
import json
import os
import signal
from pathlib import Path
from typing import Any

import click
import gevent
import gevent.event

from anomos import hookimpl
from anomos.errors import ConfigError
from anomos.pluginmanager import Plugins
from anomos.torrent.magnet import Magnet, is_magnet


@click.command("daemon")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The TOML config file (default: daemon.toml in the XDG config folder, if it exists).",
)
@click.option(
    "--state",
    "state_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="State folder: identity, torrents, resume data (default: under XDG_STATE_HOME).",
)
@click.pass_obj
def daemon_command(plugins: Plugins, config_path: Path | None, state_dir: Path | None) -> None:
    """Run one long-lived peer that downloads, seeds and relays many torrents, driven
    over the Transmission RPC (transmission-remote, GUI remotes, `anomos add/list`).

    Stops cleanly on Ctrl-C or SIGTERM, saving every torrent's resume data.
    """
    from anomos.daemon.config import default_config_file, default_state_dir, load_config
    from anomos.daemon.core import Daemon
    from anomos.daemon.rpc import RPC_PATH, RpcApp, RpcServer
    from anomos.daemon.web import WEB_PATH
    from anomos.fsutil import atomic_write
    from anomos.plugins.commands.peer_cmds import hold_state_dir

    config = load_config(config_path or default_config_file(), required=config_path is not None)
    state_dir = state_dir or default_state_dir()
    hold_state_dir(state_dir)
    daemon = Daemon(plugins, config, state_dir)
    app = RpcApp(daemon, config)
    server = RpcServer((config.rpc_bind_address, config.rpc_port), app)
    try:
        server.start()
    except OSError as exc:
        raise ConfigError(
            f"cannot serve the RPC on {config.rpc_bind_address}:{config.rpc_port}: "
            f"{exc.strerror or exc}"
        ) from None
    host = config.rpc_bind_address
    base = f"http://{f'[{host}]' if ':' in host else host}:{server.server_port}"
    url, web = base + RPC_PATH, base + WEB_PATH
    try:
        daemon.start()
        click.echo(f"anomos daemon: RPC at {url}, web page at {web} (state in {state_dir})")
        doc = {"url": url, "web": web, "pid": os.getpid()}  # (written last: "ready")
        atomic_write(state_dir / "rpc.json", json.dumps(doc).encode())
        stop = gevent.event.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            gevent.signal_handler(sig, stop.set)
        stop.wait()
        click.echo("anomos daemon: stopping (saving resume data)")
    finally:
        server.stop(timeout=2)
        daemon.stop()
        (state_dir / "rpc.json").unlink(missing_ok=True)  # `anomos list` finds no stale URL


# ---------------------------------------------------------------------------- remote commands


def _default_url() -> str:
    from anomos.daemon.config import DEFAULT_RPC_PORT, default_state_dir

    try:
        return str(json.loads((default_state_dir() / "rpc.json").read_text())["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"http://127.0.0.1:{DEFAULT_RPC_PORT}/transmission/rpc"


def rpc_options(fn: Any) -> Any:
    fn = click.option(
        "--auth",
        envvar="ANOMOS_RPC_AUTH",
        metavar="USER:PASSWORD",
        default="",
        help="RPC credentials, if the daemon has rpc-username set (env ANOMOS_RPC_AUTH).",
    )(fn)
    return click.option(
        "--rpc",
        "rpc_url",
        envvar="ANOMOS_RPC",
        metavar="URL",
        default=None,
        help="The daemon's RPC URL (env ANOMOS_RPC; default: the one the daemon of the "
        "default state folder printed, else http://127.0.0.1:9091/transmission/rpc).",
    )(fn)


def _client(rpc_url: str | None, auth: str) -> Any:
    from anomos.daemon.client import RpcClient

    user, _, password = auth.partition(":")
    return RpcClient(rpc_url or _default_url(), user, password)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


def _ids(ids: tuple[str, ...]) -> list[int | str]:
    return [int(i) if i.isdigit() else i for i in ids]


@click.command("add")
@click.argument(
    "atorrents",
    metavar="ATORRENT|MAGNET...",
    nargs=-1,
    required=True,
)
@click.option("--paused", is_flag=True, help="Add without starting.")
@click.option(
    "--download-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the data goes (default: the daemon's download-dir).",
)
@rpc_options
def add_command(
    atorrents: tuple[str, ...],
    paused: bool,
    download_dir: Path | None,
    rpc_url: str | None,
    auth: str,
) -> None:
    """Give each ATORRENT (or anomos magnet link) to the running daemon."""
    client = _client(rpc_url, auth)
    for given in atorrents:
        args: dict[str, Any] = {"paused": paused}
        if is_magnet(given):
            args["filename"] = str(Magnet.parse(given))  # a malformed link fails here
        else:
            args["metainfo"] = base64.b64encode(_read(Path(given))).decode()
        if download_dir is not None:
            args["download-dir"] = str(download_dir.resolve())
        reply = client.call("torrent-add", **args)
        added = reply.get("torrent-added") or reply.get("torrent-duplicate") or {}
        what = "added" if "torrent-added" in reply else "already there"
        click.echo(f"{what}: {added.get('id')} {added.get('name')} ({added.get('hashString')})")


_STATUS = {
    0: "Stopped",
    1: "Check wait",
    2: "Verifying",
    3: "Queued",
    4: "Downloading",
    5: "Queued",
    6: "Seeding",
}


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def _state(t: dict[str, Any]) -> str:
    """The state word transmission-remote -l shows."""
    if t["error"]:
        return "Error"
    if t["status"] == 0:
        return "Finished" if t.get("isFinished") else "Stopped"
    if t["status"] == 4 and not (t["rateDownload"] or t["rateUpload"]):
        return "Idle"
    if t["status"] == 4 and t["rateUpload"]:
        return "Up & Down"
    return _STATUS.get(t["status"], "?")


def _eta(seconds: int, left: int) -> str:
    if left == 0:
        return "Done"
    if seconds < 0:
        return "Unknown"
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h {rest // 60} min" if hours else f"{rest // 60} min {rest % 60} s"


@click.command("list")
@rpc_options
def list_command(rpc_url: str | None, auth: str) -> None:
    """The daemon's torrents, one line each (as transmission-remote -l), with circuits."""
    fields = [
        "id",
        "name",
        "status",
        "percentDone",
        "sizeWhenDone",
        "leftUntilDone",
        "eta",
        "rateDownload",
        "rateUpload",
        "uploadRatio",
        "error",
        "errorString",
        "isFinished",
        "peersSendingToUs",
        "anomos-circuits",
    ]
    torrents = _client(rpc_url, auth).call("torrent-get", fields=fields)["torrents"]
    click.echo(
        f"{'ID':>4}  {'Done':>5}  {'Have':>9}  {'ETA':>12}  {'Up':>9}  {'Down':>9}  "
        f"{'Ratio':>5}  {'Circ':>4}  {'Src':>3}  {'Status':<11}  Name"
    )
    up = down = have = 0
    for t in torrents:
        got = t["sizeWhenDone"] - t["leftUntilDone"]
        have += got
        up += t["rateUpload"]
        down += t["rateDownload"]
        ratio = "None" if t["uploadRatio"] < 0 else f"{t['uploadRatio']:.1f}"
        mark = "*" if t["error"] else " "
        click.echo(
            f"{t['id']:>4}{mark} {t['percentDone']:>5.0%}  {_size(got):>9}  "
            f"{_eta(t['eta'], t['leftUntilDone']):>12}  {_size(t['rateUpload']) + '/s':>9}  "
            f"{_size(t['rateDownload']) + '/s':>9}  {ratio:>5}  "
            f"{t['anomos-circuits']['open']:>4}  {t['peersSendingToUs']:>3}  "
            f"{_state(t):<11}  {t['name']}"
        )
        if t["error"]:
            click.echo(f"       error: {t['errorString']}")
    click.echo(
        f"Sum:         {_size(have):>9}  {'':>12}  {_size(up) + '/s':>9}  {_size(down) + '/s':>9}"
    )


def _simple(name: str, method: str, doc: str, *options: Any) -> click.Command:
    def command(ids: tuple[str, ...], rpc_url: str | None, auth: str, **flags: Any) -> None:
        args: dict[str, Any] = {"ids": _ids(ids)}
        if flags.get("delete_data"):
            args["delete-local-data"] = True
        _client(rpc_url, auth).call(method, **args)
        click.echo(f"{name}: {' '.join(ids)}")

    fn: Any = rpc_options(click.argument("ids", metavar="ID...", nargs=-1, required=True)(command))
    for option in options:
        fn = option(fn)
    return click.command(name, help=doc)(fn)


pause_command = _simple("pause", "torrent-stop", "Stop the torrents ID... (a number or infohash).")
resume_command = _simple("resume", "torrent-start", "Start the torrents ID... again.")
remove_command = _simple(
    "remove",
    "torrent-remove",
    "Remove the torrents ID... from the daemon.",
    click.option("--delete-data", is_flag=True, help="Delete the downloaded files too."),
)


def _index_list(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> list[int] | None:
    """``0,3,4`` -> [0, 3, 4] (file indices as `anomos select ID` lists them)."""
    if value is None:
        return None
    try:
        indices = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        raise click.BadParameter(f"{value!r}: give file indices like 0,3,4") from None
    if not indices or indices[0] < 0:
        raise click.BadParameter(f"{value!r}: give file indices like 0,3,4")
    return indices


_PRIORITY_NAMES = {-1: "low", 0: "normal", 1: "high"}


@click.command("select")
@click.argument("torrent_id", metavar="ID")
@click.option(
    "--only", callback=_index_list, metavar="INDEX[,INDEX...]", help="Fetch only these files."
)
@click.option(
    "--exclude", callback=_index_list, metavar="INDEX[,INDEX...]", help="Fetch all but these."
)
@click.option("--all", "every", is_flag=True, help="Fetch every file.")
@click.option("--high", callback=_index_list, metavar="INDEX[,...]", help="High priority.")
@click.option("--normal", callback=_index_list, metavar="INDEX[,...]", help="Normal priority.")
@click.option("--low", callback=_index_list, metavar="INDEX[,...]", help="Low priority.")
@rpc_options
def select_command(
    torrent_id: str,
    only: list[int] | None,
    exclude: list[int] | None,
    every: bool,
    high: list[int] | None,
    normal: list[int] | None,
    low: list[int] | None,
    rpc_url: str | None,
    auth: str,
) -> None:
    """Choose the files of torrent ID to fetch, and their priorities, then list its files
    (with no option: only list them). As `anomos get --only/--exclude`: a piece shared
    with a wanted file is fetched whole."""
    if sum(x is not None and x is not False for x in (only, exclude, every or None)) > 1:
        raise ConfigError("give one of --only, --exclude and --all")
    client = _client(rpc_url, auth)
    ids = _ids((torrent_id,))

    def files() -> dict[str, Any]:
        found = client.call("torrent-get", ids=ids, fields=["id", "name", "files", "fileStats"])
        if not found["torrents"]:
            raise ConfigError(f"no torrent {torrent_id} in the daemon (see `anomos list`)")
        return dict(found["torrents"][0])

    count = len(files()["files"])
    change: dict[str, Any] = {}
    if only is not None or exclude is not None or every:
        named = set(only if only is not None else exclude or [])
        if named and max(named) >= count:
            raise ConfigError(f"no file {max(named)}: torrent {torrent_id} has {count}")
        fetch = named if only is not None else set(range(count)) - named
        unwanted = sorted(set(range(count)) - fetch)
        if fetch:
            change["files-wanted"] = sorted(fetch)
        if unwanted:  # (an empty list would mean "every file")
            change["files-unwanted"] = unwanted
    for key, indices in (
        ("priority-high", high),
        ("priority-normal", normal),
        ("priority-low", low),
    ):
        if indices is not None:
            change[key] = indices
    if change:
        client.call("torrent-set", ids=ids, **change)
    torrent = files()
    click.echo(f"{torrent['id']}: {torrent['name']}")
    click.echo(f"{'#':>3}  {'Done':>5}  {'Get':<3}  {'Priority':<8}  {'Size':>9}  Name")
    for index, (f, st) in enumerate(zip(torrent["files"], torrent["fileStats"], strict=True)):
        done = f["bytesCompleted"] / f["length"] if f["length"] else 1.0
        click.echo(
            f"{index:>3}  {done:>5.0%}  {'yes' if st['wanted'] else 'no':<3}  "
            f"{_PRIORITY_NAMES.get(st['priority'], '?'):<8}  {_size(f['length']):>9}  {f['name']}"
        )


def _speed(kb: int, enabled: bool) -> str:
    return f"{kb} kB/s" if enabled else "unlimited"


def _limit_value(text: str, name: str, *, whole: bool = True) -> int | float | None:
    """``--down 500``: a number; ``off``: None (no limit)."""
    if text.lower() in ("off", "none", "unlimited"):
        return None
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        raise ConfigError(f"--{name} {text!r}: give a number or off") from None
    if value < 0:
        raise ConfigError(f"--{name} {text!r}: give a number or off")
    return value


@click.command("limits")
@click.argument("torrent_id", metavar="[ID]", required=False)
@click.option("--down", metavar="KB/S|off", help="Download limit in kB/s (1000 bytes).")
@click.option("--up", metavar="KB/S|off", help="Upload limit in kB/s (relaying is not counted).")
@click.option("--ratio", metavar="RATIO|off", help="Stop seeding at this share ratio.")
@click.option("--idle", metavar="MINUTES|off", help="Stop seeding after this long idle.")
@click.option(
    "--download-queue", metavar="N|off", help="(Daemon-wide) torrents downloading at once."
)
@click.option("--seed-queue", metavar="N|off", help="(Daemon-wide) torrents seeding at once.")
@click.option(
    "--session-limits/--no-session-limits",
    default=None,
    help="(A torrent) whether the daemon-wide speed limits also apply to it.",
)
@rpc_options
def limits_command(
    torrent_id: str | None,
    down: str | None,
    up: str | None,
    ratio: str | None,
    idle: str | None,
    download_queue: str | None,
    seed_queue: str | None,
    session_limits: bool | None,
    rpc_url: str | None,
    auth: str,
) -> None:
    """Show or set the daemon's speed, seed and queue limits, or (with ID) one
    torrent's. A torrent's --ratio/--idle also take `session` (follow the daemon's)."""
    client = _client(rpc_url, auth)
    if torrent_id is None:
        if session_limits is not None:
            raise ConfigError("--session-limits is for one torrent: give its ID")
        change: dict[str, Any] = {}
        for text, name, key, whole in (
            (down, "down", "speed-limit-down", True),
            (up, "up", "speed-limit-up", True),
            (ratio, "ratio", "seedRatioLimit", False),
            (idle, "idle", "idle-seeding-limit", True),
            (download_queue, "download-queue", "download-queue-size", True),
            (seed_queue, "seed-queue", "seed-queue-size", True),
        ):
            if text is None:
                continue
            value = _limit_value(text, name, whole=whole)
            enabled = {
                "seedRatioLimit": "seedRatioLimited",
                "idle-seeding-limit": "idle-seeding-limit-enabled",
            }.get(key, key.removesuffix("-size") + "-enabled")
            change[enabled] = value is not None
            if value is not None:
                change[key] = value
        if change:
            client.call("session-set", **change)
        s = client.call("session-get")
        click.echo(
            f"download:        {_speed(s['speed-limit-down'], s['speed-limit-down-enabled'])}"
        )
        click.echo(f"upload:          {_speed(s['speed-limit-up'], s['speed-limit-up-enabled'])}")
        cap = s.get("anomos-max-send-rate") or 0
        click.echo(
            f"send cap:        {_size(cap) + '/s' if cap else 'unlimited'} "
            "(max-send-rate: relayed and own uploads together)"
        )
        click.echo(f"seed ratio:      {s['seedRatioLimit'] if s['seedRatioLimited'] else 'off'}")
        idle_text = f"{s['idle-seeding-limit']} min" if s["idle-seeding-limit-enabled"] else "off"
        click.echo(f"seed idle:       {idle_text}")
        for what in ("download", "seed"):
            size = s[f"{what}-queue-size"] if s[f"{what}-queue-enabled"] else "off"
            click.echo(f"{what + ' queue:':<17}{size}")
        return
    if download_queue is not None or seed_queue is not None:
        raise ConfigError("queue sizes are daemon-wide: leave out the ID")
    change = {}
    for text, name, key in ((down, "down", "downloadLimit"), (up, "up", "uploadLimit")):
        if text is not None:
            value = _limit_value(text, name)
            change[key.replace("Limit", "Limited")] = value is not None
            if value is not None:
                change[key] = value
    for text, name, key, mode in (
        (ratio, "ratio", "seedRatioLimit", "seedRatioMode"),
        (idle, "idle", "seedIdleLimit", "seedIdleMode"),
    ):
        if text is None:
            continue
        if text.lower() == "session":
            change[mode] = 0
            continue
        value = _limit_value(text, name, whole=key == "seedIdleLimit")
        change[mode] = 2 if value is None else 1
        if value is not None:
            change[key] = value
    if session_limits is not None:
        change["honorsSessionLimits"] = session_limits
    ids = _ids((torrent_id,))
    if change:
        client.call("torrent-set", ids=ids, **change)
    found = client.call("torrent-get", ids=ids, fields=["id", "name", *_TORRENT_LIMITS])
    if not found["torrents"]:
        raise ConfigError(f"no torrent {torrent_id} in the daemon (see `anomos list`)")
    _echo_torrent_limits(found["torrents"][0])


_TORRENT_LIMITS = [
    "downloadLimit",
    "downloadLimited",
    "uploadLimit",
    "uploadLimited",
    "honorsSessionLimits",
    "seedRatioLimit",
    "seedRatioMode",
    "seedIdleLimit",
    "seedIdleMode",
]
_MODES = {0: "the daemon's", 2: "off"}


def _echo_torrent_limits(t: dict[str, Any]) -> None:
    click.echo(f"download:        {_speed(t['downloadLimit'], t['downloadLimited'])}")
    click.echo(f"upload:          {_speed(t['uploadLimit'], t['uploadLimited'])}")
    click.echo(f"daemon limits:   {'apply too' if t['honorsSessionLimits'] else 'ignored'}")
    ratio = _MODES.get(t["seedRatioMode"], str(t["seedRatioLimit"]))
    idle = _MODES.get(t["seedIdleMode"], f"{t['seedIdleLimit']} min")
    click.echo(f"seed ratio:      {ratio}")
    click.echo(f"seed idle:       {idle}")


def _when(stamp: int) -> str:
    import datetime

    if not stamp:
        return "-"
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S")


def show_torrent(torrent_id: str, rpc_url: str | None = None, auth: str = "") -> None:
    """`anomos info ID`: one torrent of the daemon, as transmission-remote -t ID -i."""
    client = _client(rpc_url, auth)
    fields = [
        "id",
        "name",
        "hashString",
        "status",
        "error",
        "errorString",
        "isFinished",
        "percentDone",
        "sizeWhenDone",
        "leftUntilDone",
        "totalSize",
        "haveValid",
        "downloadedEver",
        "uploadedEver",
        "uploadRatio",
        "rateDownload",
        "rateUpload",
        "eta",
        "downloadDir",
        "addedDate",
        "doneDate",
        "queuePosition",
        "peersSendingToUs",
        "peersGettingFromUs",
        "pieceCount",
        "pieceSize",
        "files",
        "anomos-circuits",
        *_TORRENT_LIMITS,
    ]
    found = client.call("torrent-get", ids=_ids((torrent_id,)), fields=fields)
    if not found["torrents"]:
        raise ConfigError(f"no torrent {torrent_id} in the daemon (see `anomos list`)")
    t = found["torrents"][0]
    circuits = t["anomos-circuits"]
    ratio = "None" if t["uploadRatio"] < 0 else f"{t['uploadRatio']:.2f}"
    rows = [
        ("id", t["id"]),
        ("name", t["name"]),
        ("hash", t["hashString"]),
        ("state", _state(t)),
        ("error", t["errorString"] if t["error"] else "none"),
        ("location", t["downloadDir"]),
        ("percent done", f"{t['percentDone']:.1%}"),
        ("eta", _eta(t["eta"], t["leftUntilDone"])),
        ("download speed", f"{_size(t['rateDownload'])}/s"),
        ("upload speed", f"{_size(t['rateUpload'])}/s"),
        ("have", f"{_size(t['haveValid'])} of {_size(t['sizeWhenDone'])} wanted"),
        ("total size", f"{_size(t['totalSize'])} ({len(t['files'])} files)"),
        ("pieces", f"{t['pieceCount']} of {_size(t['pieceSize'])}"),
        ("downloaded", _size(t["downloadedEver"])),
        ("uploaded", _size(t["uploadedEver"])),
        ("ratio", ratio),
        ("queue position", t["queuePosition"]),
        ("sources", f"{t['peersSendingToUs']} sending, {t['peersGettingFromUs']} fetching"),
        (
            "circuits",
            f"{circuits['open']} open, {circuits['failed']} failed; ended by relay count: "
            + (
                ", ".join(f"{k}: {v}" for k, v in sorted(circuits["ended-by-relays"].items()))
                or "-"
            ),
        ),
        ("added", _when(t["addedDate"])),
        ("completed", _when(t["doneDate"])),
    ]
    for label, value in rows:
        click.echo(f"{label + ':':<17}{value}")
    _echo_torrent_limits(t)


@hookimpl
def anomos_add_commands(cli: click.Group) -> None:
    for command in (
        daemon_command,
        add_command,
        list_command,
        pause_command,
        resume_command,
        remove_command,
        select_command,
        limits_command,
    ):
        cli.add_command(command)
