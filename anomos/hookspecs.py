"""Every ``anomos_*`` hook, documented where it is specified.

Grouped by phase. Setup hooks are *historic*: a plugin registered late still
receives the call. Lifecycle hooks are notifications; their return values are
ignored and an exception in one is logged, never fatal to the caller.

``docs/hooks.md`` mirrors this module; ``tests/test_hookspecs.py`` fails when
the two disagree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from anomos import hookspec

if TYPE_CHECKING:
    import click

    from anomos.registry import Registry


# ----------------------------------------------------------------------------- setup


@hookspec(historic=True)
def anomos_register_transports(registry: Registry[Any]) -> None:
    """Add transport factories with ``registry.add(name, factory)``.

    :param registry: transports by name; a factory is called as
        ``factory(settings)`` and returns an :class:`anomos.interfaces.Transport`.

    Called once per plugin manager, right after plugins are loaded.
    """


@hookspec(historic=True)
def anomos_register_path_policies(registry: Registry[Any]) -> None:
    """Add path policies with ``registry.add(name, factory)``.

    :param registry: path policies by name; a factory is called as
        ``factory(min_relays=..., max_relays=...)`` and returns an
        :class:`anomos.interfaces.PathPolicy`.

    Called once per plugin manager, right after plugins are loaded.
    """


@hookspec(historic=True)
def anomos_register_cipher_suites(registry: Registry[Any]) -> None:
    """Add end-to-end cipher suites with ``registry.add(name, factory)``.

    :param registry: cipher suites by name; a factory is called with no
        argument and returns an :class:`anomos.interfaces.CipherSuite`.

    Called once per plugin manager, right after plugins are loaded.
    """


@hookspec(historic=True)
def anomos_register_ratio_policies(registry: Registry[Any]) -> None:
    """Add ratio accounting policies with ``registry.add(name, factory)``.

    :param registry: ratio policies by name; a factory is called with no
        argument and returns an :class:`anomos.interfaces.RatioPolicy`.

    Called once per plugin manager, right after plugins are loaded.
    """


@hookspec(historic=True)
def anomos_add_commands(cli: click.Group) -> None:
    """Add subcommands to the ``anomos`` command line.

    :param cli: the top-level click group; use ``cli.add_command(cmd)``.
        A command reaches the plugin facade through
        ``click.get_current_context().obj`` (an :class:`anomos.pluginmanager.Plugins`).

    Called when the command line is built, before arguments are parsed.
    """


@hookspec(historic=True)
def anomos_add_options(command: click.Command) -> None:
    """Add options to an existing subcommand.

    :param command: a subcommand; append ``click.Option`` objects to
        ``command.params``. Values of added options are collected in
        ``Plugins.options`` (a dict) instead of being passed to the command.

    Called for every subcommand after all ``anomos_add_commands`` calls.
    """


# ----------------------------------------------------------------------------- lifecycle


@hookspec
def anomos_tracker_started(tracker: Any) -> None:
    """A tracker is serving.

    :param tracker: the :class:`anomos.tracker.server.Tracker`.
    """


@hookspec
def anomos_tracker_stopped(tracker: Any) -> None:
    """A tracker has stopped serving.

    :param tracker: the :class:`anomos.tracker.server.Tracker`.
    """


@hookspec
def anomos_peer_started(peer: Any) -> None:
    """A peer (seeder, downloader or relay) is listening and has announced.

    :param peer: the :class:`anomos.peer.node.Peer`.
    """


@hookspec
def anomos_peer_stopped(peer: Any) -> None:
    """A peer has closed its links and stopped.

    :param peer: the :class:`anomos.peer.node.Peer`.
    """


@hookspec
def anomos_neighbour_up(peer: Any, nid: int, address: str) -> None:
    """A neighbour link finished its authenticated handshake.

    :param peer: the local peer.
    :param nid: the neighbour id of the link, as assigned by the tracker.
    :param address: the neighbour's contact address.
    """


@hookspec
def anomos_neighbour_down(peer: Any, nid: int, reason: str) -> None:
    """A neighbour link closed.

    :param peer: the local peer.
    :param nid: the neighbour id of the link.
    :param reason: one line saying why (``"closed"``, ``"timeout"``, a protocol error).
    """


@hookspec
def anomos_circuit_opened(peer: Any, circuit: Any) -> None:
    """A circuit through, from or to this peer is ready to carry cells.

    :param peer: the local peer.
    :param circuit: the circuit; relays see only its ids on each link.
    """


@hookspec
def anomos_circuit_closed(peer: Any, circuit: Any, reason: str) -> None:
    """A circuit was torn down (BREAK, link loss, error or normal end).

    :param peer: the local peer.
    :param circuit: the circuit.
    :param reason: one line saying why.
    """


@hookspec
def anomos_piece_verified(torrent: Any, index: int) -> None:
    """A piece passed its SHA-1 check and was written to disk.

    :param torrent: the :class:`anomos.torrent.session.TorrentSession`.
    :param index: the piece index.
    """


@hookspec
def anomos_piece_failed(torrent: Any, index: int, source: str) -> None:
    """A piece failed its SHA-1 check and was discarded.

    :param torrent: the :class:`anomos.torrent.session.TorrentSession`.
    :param index: the piece index.
    :param source: label of the connection(s) that sent the bad data.
    """


@hookspec
def anomos_download_complete(torrent: Any) -> None:
    """Every piece of the torrent's wanted files (all, by default) is verified on disk;
    again if a file is wanted later and completes.

    :param torrent: the :class:`anomos.torrent.session.TorrentSession`.
    """
