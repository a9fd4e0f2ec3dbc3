"""The four kinds of pluggable parts, as structural types.

A plugin registers a *factory* (usually a class) for one of these kinds through
the matching ``anomos_register_*`` hook (see :mod:`anomos.hookspecs`). The core
only ever talks to these protocols, so a built-in plugin and a third-party one
are interchangeable.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Hashable, Iterable
from typing import Any, ClassVar, Protocol, runtime_checkable

import attrs

#: Called by a :class:`Listener` for every accepted connection, in its own greenlet.
ConnectionHandler = Callable[[socket.socket, str], None]


# --------------------------------------------------------------------------- transports
@runtime_checkable
class Listener(Protocol):
    """A listening endpoint created by :meth:`Transport.listen`."""

    #: The address other peers should dial, e.g. ``"127.0.0.5:6881"`` or
    #: ``"abcd...xyz.onion:6881"``.
    address: str

    def close(self) -> None:
        """Stop accepting; existing connections are left to their owners."""


@runtime_checkable
class Transport(Protocol):
    """Moves bytes between neighbours: TCP, SOCKS5, Tor, or an in-memory fake.

    Factories are called as ``factory(settings)`` with the role's
    :class:`anomos.config.Settings`.
    """

    name: ClassVar[str]

    def can_dial(self, address: str) -> bool:
        """Whether this transport can reach ``address`` (``host:port`` or ``x.onion:port``)."""

    def dial(self, address: str, *, timeout: float) -> socket.socket:
        """Open a stream to ``address``; raise :class:`anomos.errors.TransportError`."""

    def listen(self, address: str, handler: ConnectionHandler) -> Listener:
        """Accept connections on ``address`` (``host:port``, port 0 picks one)."""


# --------------------------------------------------------------------------- path policies
class PeerGraphView(Protocol):
    """What a path policy may see of the tracker's weighted neighbour graph."""

    def neighbours(self, peer: Hashable) -> Iterable[Hashable]:
        """The peers adjacent to ``peer``."""

    def load(self, peer: Hashable) -> float:
        """Current load of ``peer`` (open circuits through it, scaled by bandwidth)."""

    def __contains__(self, peer: object) -> bool: ...

    def __len__(self) -> int: ...


@runtime_checkable
class PathPolicy(Protocol):
    """Chooses the route of a circuit over the neighbour graph.

    Factories are called as ``factory(min_relays=..., max_relays=...)``.
    """

    name: ClassVar[str]

    def find_path(
        self, graph: PeerGraphView, start: Hashable, end: Hashable, rng: random.Random
    ) -> list[Hashable] | None:
        """A simple path ``[start, relay, ..., end]`` along graph edges, or ``None``.

        The number of relays should lie within the policy's bounds; returning
        ``None`` tells the tracker to try another source.
        """


# --------------------------------------------------------------------------- cipher suites
@attrs.frozen
class SessionKeys:
    """End-to-end AEAD keys of one circuit; one key per direction."""

    send: bytes = attrs.field(repr=False)
    recv: bytes = attrs.field(repr=False)


@runtime_checkable
class CipherSuite(Protocol):
    """Agrees the end-to-end keys of a circuit between downloader and source.

    The tracker calls :meth:`tracker_material` once per circuit and hands the
    result to both ends (to the source sealed to its key). The downloader sends
    :meth:`initiator_hello`'s bytes in its first cell; the source answers with
    :meth:`responder_accept`'s bytes. Factories are called with no argument.
    """

    name: ClassVar[str]

    def tracker_material(self) -> bytes:
        """Per-circuit secret chosen by the tracker (an authenticator or a key)."""

    def initiator_hello(self, material: bytes) -> tuple[Any, bytes]:
        """Downloader side: (private state, hello bytes for the source)."""

    def responder_accept(self, material: bytes, hello: bytes) -> tuple[SessionKeys, bytes]:
        """Source side: keys and the reply; raise CryptoError on a bad hello."""

    def initiator_finish(self, state: Any, reply: bytes) -> SessionKeys:
        """Downloader side: keys from the reply; raise CryptoError on a bad reply."""


# --------------------------------------------------------------------------- ratio
@runtime_checkable
class RatioPolicy(Protocol):
    """Turns a peer's transfer counters into its share ratio.

    ``uploaded`` and ``relayed`` are the credited totals: what the peer claims,
    as far as its neighbours' receipts confirm it (together they never exceed
    the link bytes its neighbours received from it); ``downloaded`` is the
    peer's own report. Factories are called with no argument.
    """

    name: ClassVar[str]

    def credited_upload(self, uploaded: int, relayed: int) -> int:
        """Bytes counted as given back to the network."""

    def ratio(self, uploaded: int, downloaded: int, relayed: int) -> float:
        """Share ratio shown to the user and used by the tracker."""
