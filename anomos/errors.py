"""Errors that reach the user as one clear line, never as a traceback.

Every error raised because of bad input from outside (files, arguments, the
network) is an :class:`AnomosError`; the CLI prints ``anomos: error: <message>``
and exits with status 2.
"""


class AnomosError(Exception):
    """Base class: the message is a single line naming the problem."""


class ConfigError(AnomosError):
    """A bad command-line argument, option value or setting."""


class PluginError(AnomosError):
    """A plugin is broken: duplicate name, unknown hook, failed import."""


class MetainfoError(AnomosError):
    """A malformed .torrent / .atorrent file."""


class StorageError(AnomosError):
    """The data on disk cannot be read or written as the torrent requires."""


class ProtocolError(AnomosError):
    """A peer, neighbour or tracker sent something the protocol forbids."""


class CryptoError(ProtocolError):
    """Authentication failed: tampered, replayed or wrongly keyed data."""


class TrackerError(AnomosError):
    """The tracker refused a request, or could not be reached or trusted."""


class TransportError(AnomosError):
    """A transport cannot listen or dial (e.g. Tor is unavailable)."""
