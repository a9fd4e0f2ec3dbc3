"""anomos magnet links, and fetching a magnet's metadata from a source (BEP 9 style).

An anomos magnet names a torrent by its infohash, its tracker and the
tracker's fingerprint::

    magnet:?xt=urn:anomos:<40 hex infohash>&dn=<name>&tr=<https URL>&x.fp=<64 hex>

The exact topic is ``urn:anomos:``, never ``urn:btih:`` or ``urn:btmh:``:
BitTorrent clients (libtorrent, Transmission, ...) find no infohash they know
and refuse the link, so a pasted link can never put the infohash on the public
DHT with the user's address (docs/protocol.md, docs/threat-model.md).

The metadata (the ``info`` dict, the bytes the infohash covers) comes over a
circuit from a source: :func:`fetch_metadata` asks for it in 16 KiB pieces
(:class:`~anomos.torrent.wire.MetadataRequest`), checks each answer
(:class:`~anomos.torrent.wire.MetadataPiece`: only pieces asked for, one total
size, at most :data:`~anomos.torrent.metainfo.MAX_METAINFO_SIZE`) and the
SHA-1 of the whole before anything uses it.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote

import attrs
import gevent

from anomos.errors import ConfigError, MetainfoError, ProtocolError
from anomos.torrent.metainfo import (
    MAX_COMPONENT_BYTES,
    MAX_METAINFO_SIZE,
    MAX_TRACKERS,
    Metainfo,
    check_tracker_url,
)
from anomos.torrent.wire import (
    KEEP_ALIVE,
    METADATA_PIECE_SIZE,
    PIECE_MESSAGES,
    Handshake,
    MessageReader,
    MetadataPiece,
    MetadataRequest,
    new_peer_id,
)

if TYPE_CHECKING:
    from anomos.torrent.session import Stream

SCHEME = "magnet:?"
#: The exact topic: a URN namespace no BitTorrent client reads (never btih/btmh).
URN = "urn:anomos:"
#: Longest magnet accepted (16 tracker URLs of a usual length fit easily).
MAX_MAGNET_LENGTH = 8192
#: Parameters a magnet may carry, at most this many in all.
MAX_PARAMETERS = 3 + MAX_TRACKERS
#: Metadata piece requests kept in flight to one source.
METADATA_PIPELINE = 16
#: Seconds one source may take to deliver the whole metadata.
METADATA_TIMEOUT = 60.0
#: Bytes asked of the stream per recv.
_RECV_SIZE = 64 * 1024

_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _check_infohash(_obj: Any, _attr: Any, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != 20:
        raise MetainfoError("magnet: the infohash must be 20 bytes")


def _check_trackers(_obj: Any, _attr: Any, value: tuple[str, ...]) -> None:
    if not value:
        raise MetainfoError("magnet: no tracker (tr=https://...)")
    if len(value) > MAX_TRACKERS:
        raise MetainfoError(f"magnet: more than {MAX_TRACKERS} trackers")
    for url in value:
        problem = check_tracker_url(url)
        if problem:
            raise MetainfoError(f"magnet: tr: {problem}")


def _check_fingerprint(_obj: Any, _attr: Any, value: str) -> None:
    if not _HEX64.fullmatch(value):
        raise MetainfoError("magnet: x.fp: not 64 lowercase hex digits (the tracker's SHA-256)")


def _check_name(_obj: Any, _attr: Any, value: str) -> None:
    if len(value.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
        raise MetainfoError(f"magnet: dn: longer than {MAX_COMPONENT_BYTES} bytes")
    if not value.isprintable():
        raise MetainfoError("magnet: dn: contains control characters")


@attrs.frozen
class Magnet:
    """An anomos magnet link: what it takes to find a torrent's sources and metadata."""

    infohash: bytes = attrs.field(validator=_check_infohash)
    #: anomos tracker URLs, in the order to try them (at least one).
    trackers: tuple[str, ...] = attrs.field(validator=_check_trackers)
    #: The tracker identity pin: hex SHA-256 of its public key.
    fingerprint: str = attrs.field(validator=_check_fingerprint)
    #: Display name until the metadata arrives ("" when the link has none).
    name: str = attrs.field(default="", validator=_check_name)

    @classmethod
    def parse(cls, text: str) -> Magnet:
        """Read an anomos magnet link; every problem is one :class:`MetainfoError` line."""
        text = text.strip()
        if len(text) > MAX_MAGNET_LENGTH:
            raise MetainfoError(f"magnet: longer than {MAX_MAGNET_LENGTH} characters")
        if not text.startswith(SCHEME):
            raise MetainfoError("magnet: does not start with magnet:?")
        try:
            params = parse_qsl(
                text[len(SCHEME) :],
                strict_parsing=True,
                encoding="utf-8",
                errors="strict",
                max_num_fields=MAX_PARAMETERS,
            )
        except (ValueError, UnicodeDecodeError) as exc:
            raise MetainfoError(f"magnet: malformed ({exc})") from None
        found: dict[str, list[str]] = {}
        for key, value in params:
            if key not in ("xt", "dn", "tr", "x.fp"):
                raise MetainfoError(f"magnet: unknown parameter {key[:32]!r}")
            found.setdefault(key, []).append(value)
        for key in ("xt", "dn", "x.fp"):
            if len(found.get(key, [])) > 1:
                raise MetainfoError(f"magnet: {key} given more than once")
        (topic,) = found.get("xt") or [""]
        if not topic.startswith(URN):
            if topic.lower().startswith(("urn:btih:", "urn:btmh:")):
                raise MetainfoError(
                    "magnet: a BitTorrent magnet (urn:btih/btmh), not an anomos one (urn:anomos:)"
                )
            raise MetainfoError("magnet: no anomos topic (xt=urn:anomos:<40 hex digits>)")
        hexhash = topic[len(URN) :]
        if not _HEX40.fullmatch(hexhash):
            raise MetainfoError("magnet: xt: the infohash is not 40 lowercase hex digits")
        if "x.fp" not in found:
            raise MetainfoError("magnet: no tracker fingerprint (x.fp=<64 hex digits>)")
        return cls(
            infohash=bytes.fromhex(hexhash),
            trackers=tuple(dict.fromkeys(found.get("tr", []))),
            fingerprint=found["x.fp"][0],
            name=(found.get("dn") or [""])[0],
        )

    @classmethod
    def from_metainfo(cls, metainfo: Metainfo) -> Magnet:
        """The magnet of an .atorrent (which must name its tracker and pin it)."""
        if not metainfo.trackers or metainfo.fingerprint is None:
            raise MetainfoError(
                "magnet: the torrent names no anomos tracker with a fingerprint "
                "(make one with `anomos anonymize`)"
            )
        return cls(
            infohash=metainfo.infohash,
            trackers=metainfo.trackers,
            fingerprint=metainfo.fingerprint,
            name=metainfo.name,
        )

    @property
    def infohash_hex(self) -> str:
        return self.infohash.hex()

    def __str__(self) -> str:
        parts = [f"xt={URN}{self.infohash.hex()}"]
        if self.name:
            parts.append("dn=" + quote(self.name, safe=""))
        parts += ["tr=" + quote(url, safe="") for url in self.trackers]
        parts.append(f"x.fp={self.fingerprint}")
        return SCHEME + "&".join(parts)

    def metainfo(self, info_bytes: bytes) -> Metainfo:
        """The .atorrent from fetched metadata, checked against the infohash first."""
        if hashlib.sha1(info_bytes).digest() != self.infohash:
            raise ProtocolError("metadata does not match the magnet's infohash")
        try:
            return Metainfo.from_info(info_bytes, self.trackers, self.fingerprint)
        except (MetainfoError, ConfigError) as exc:
            raise ProtocolError(f"metadata matches the infohash but is invalid: {exc}") from None


def is_magnet(text: str) -> bool:
    """Whether a command-line argument or RPC ``filename`` is a magnet link."""
    return text.lstrip().lower().startswith("magnet:")


# ----------------------------------------------------------------------------- fetching


class SourceClosed(ProtocolError):
    """The source ended the stream before the whole metadata: unlike a wrong answer
    or silence, this costs the downloader little, and a relay's fault looks the same."""


class _MetadataReader(MessageReader):
    """Peer-wire framing before the torrent is known: piece-dependent messages
    (bitfield, have, ...) are skipped unread, the metadata messages parsed."""

    def __init__(self) -> None:
        super().__init__(0, lambda _index: 0)
        # a bitfield of the largest torrent the metadata limit allows
        self.max_length = max(self.max_length, 1 + (MAX_METAINFO_SIZE // 20 + 7) // 8)

    def _parse(self, msg_id: int, mv: memoryview, at: int, n: int) -> Any:
        if msg_id in PIECE_MESSAGES:
            return KEEP_ALIVE
        return super()._parse(msg_id, mv, at, n)


def fetch_metadata(
    stream: Stream,
    infohash: bytes,
    *,
    timeout: float = METADATA_TIMEOUT,
    progress: Callable[[float], None] | None = None,
) -> bytes:
    """Ask the source at the other end of ``stream`` for the torrent's ``info`` dict.

    Returns the bytes, whose SHA-1 is ``infohash``; raises :class:`ProtocolError`
    naming the fault (a wrong hash, an oversized or inconsistent size, a piece
    out of range or not asked for, silence; :class:`SourceClosed` for an end of the
    stream) so that the caller can drop this source and try another. ``progress``
    hears the share received after each piece. Does not close ``stream``.
    """
    with gevent.Timeout(timeout, ProtocolError(f"no metadata within {timeout:g} s")):
        return _fetch(stream, infohash, progress)


def _fetch(stream: Stream, infohash: bytes, progress: Callable[[float], None] | None) -> bytes:
    reader = _MetadataReader()
    stream.sendall(Handshake(infohash, new_peer_id()).encode() + MetadataRequest(0).encode())
    total: int | None = None
    count = 1
    pieces: dict[int, bytes] = {}
    asked = {0}
    next_piece = 1
    shaken = False
    started = time.monotonic()
    while total is None or len(pieces) < count:
        data = stream.recv(_RECV_SIZE)
        if not data:
            raise SourceClosed("the source closed before sending the metadata")
        requests = []
        for msg in reader.feed(data):
            if not shaken:
                assert isinstance(msg, Handshake)
                if msg.infohash != infohash:
                    raise ProtocolError("the source answered for another torrent")
                shaken = True
                continue
            if not isinstance(msg, MetadataPiece):
                continue
            if msg.piece not in asked:
                raise ProtocolError(f"metadata piece {msg.piece} was not asked for")
            asked.discard(msg.piece)
            if total is None:
                if not 0 < msg.total <= MAX_METAINFO_SIZE:
                    raise ProtocolError(
                        f"metadata of {msg.total} bytes (the limit is {MAX_METAINFO_SIZE})"
                    )
                total = msg.total
                count = -(-total // METADATA_PIECE_SIZE)
            elif msg.total != total:
                raise ProtocolError(f"metadata size changed from {total} to {msg.total} bytes")
            expected = min(METADATA_PIECE_SIZE, total - msg.piece * METADATA_PIECE_SIZE)
            if len(msg.data) != expected:
                raise ProtocolError(
                    f"metadata piece {msg.piece} of {len(msg.data)} bytes (expected {expected})"
                )
            pieces[msg.piece] = msg.data
            if progress is not None:
                progress(len(pieces) / count)
        while total is not None and next_piece < count and len(asked) < METADATA_PIPELINE:
            asked.add(next_piece)
            requests.append(MetadataRequest(next_piece).encode())
            next_piece += 1
        if requests:
            stream.sendall(b"".join(requests))
    info = b"".join(pieces[i] for i in range(count))
    if hashlib.sha1(info).digest() != infohash:
        raise ProtocolError(
            f"metadata of {len(info)} bytes does not match the infohash "
            f"(after {time.monotonic() - started:.1f} s)"
        )
    return info
