"""``anomos daemon`` and the commands that drive it over its Transmission RPC:
``add``, ``list``, ``pause``, ``resume``, ``remove``."""

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
        "anomos-circuits",
    ]
    torrents = _client(rpc_url, auth).call("torrent-get", fields=fields)["torrents"]
    click.echo(
        f"{'ID':>4}  {'Done':>5}  {'Have':>9}  {'ETA':>12}  {'Up':>9}  {'Down':>9}  "
        f"{'Ratio':>5}  {'Circ':>4}  {'Status':<11}  Name"
    )
    up = down = have = 0
    for t in torrents:
        got = t["sizeWhenDone"] - t["leftUntilDone"]
        have += got
        up += t["rateUpload"]
        down += t["rateDownload"]
        ratio = "None" if t["uploadRatio"] < 0 else f"{t['uploadRatio']:.1f}"
        status = "Error" if t["error"] else _STATUS.get(t["status"], "?")
        mark = "*" if t["error"] else " "
        click.echo(
            f"{t['id']:>4}{mark} {t['percentDone']:>5.0%}  {_size(got):>9}  "
            f"{_eta(t['eta'], t['leftUntilDone']):>12}  {_size(t['rateUpload']) + '/s':>9}  "
            f"{_size(t['rateDownload']) + '/s':>9}  {ratio:>5}  "
            f"{t['anomos-circuits']['open']:>4}  {status:<11}  {t['name']}"
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


@hookimpl
def anomos_add_commands(cli: click.Group) -> None:
    for command in (
        daemon_command,
        add_command,
        list_command,
        pause_command,
        resume_command,
        remove_command,
    ):
        cli.add_command(command)
