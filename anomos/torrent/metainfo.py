"""``.atorrent`` metainfo: parse, validate, make and anonymize.

An ``.atorrent`` is a bencoded dictionary of two keys: ``anomos`` =
``{version, trackers, fingerprint}`` and ``anomos-info``, a BitTorrent v1
``info`` dict (BEP 3) byte-identical to what libtorrent (v1 only) or mktorrent
make for the same files, so the infohash is the plain torrent's. There is no
``info`` key, so BitTorrent clients refuse the file rather than announce its
infohash to the public DHT. Version-1 files (``info`` at the top) are still
read. See docs/metainfo.md.

Every metainfo file is hostile input: sizes, counts, nesting and paths are
bounded and checked (no path traversal), and every problem is a
:class:`~anomos.errors.MetainfoError` with one line naming the field.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import gevent
from fastbencode import Bencached

from anomos import bencode
from anomos.errors import ConfigError, MetainfoError, StorageError
from anomos.fsutil import atomic_write
from anomos.progress import bar

#: The BitTorrent request block; every piece length is a multiple of it.
BLOCK_SIZE = 16 * 1024
MIN_PIECE_LENGTH = BLOCK_SIZE
#: Largest piece accepted (a whole piece is held in memory to be hashed).
MAX_PIECE_LENGTH = 64 * 1024 * 1024
#: Largest metainfo file read or written.
MAX_METAINFO_SIZE = 8 * 1024 * 1024
#: Largest content (1 PiB): keeps offsets well inside 64-bit arithmetic everywhere.
MAX_TOTAL_LENGTH = 1 << 50
MAX_FILES = 200_000
MAX_PATH_COMPONENTS = 64
MAX_COMPONENT_BYTES = 255
MAX_TRACKERS = 16
MAX_URL_LENGTH = 2048
#: Tracker URL schemes accepted in anomos keys (the tracker API is HTTPS only).
TRACKER_SCHEMES: tuple[str, ...] = ("https",)
#: Version of the ``anomos`` key this code writes: the info dict sits under
#: :data:`INFO_KEY`, so BitTorrent clients find no torrent in the file.
ANOMOS_VERSION = 2
#: Where a version-2 .atorrent keeps the ``info`` dict, byte for byte.
INFO_KEY = b"anomos-info"
#: The first format (``info`` at the top, as in a .torrent): still read, never written,
#: since BitTorrent clients open it as a public torrent (docs/metainfo.md).
LEGACY_VERSION = 1
#: Bytes read per call while hashing (the hub gets a turn after each).
HASH_CHUNK = 1024 * 1024
PIECE_HASH_SIZE = 20

#: libtorrent's automatic piece size (create_torrent with piece_size=0, v1):
#: the piece length is 16 KiB doubled once for every threshold the total
#: size exceeds, i.e. about 16 KiB * sqrt(total / 2.5 MiB), at most 16 MiB.
AUTO_PIECE_THRESHOLDS: tuple[int, ...] = (
    2_684_355,
    10_737_418,
    42_949_673,
    171_798_692,
    687_194_767,
    2_748_779_069,
    10_995_116_278,
    43_980_465_111,
    175_921_860_444,
    703_687_441_777,
)

_HEX64 = re.compile(r"[0-9a-f]{64}")


@attrs.frozen
class FileEntry:
    """One file of a torrent.

    ``path`` is relative to the download root and includes the torrent name:
    ``(name,)`` for a single-file torrent, ``(name, dir, ..., file)`` for a
    multi-file one (as libtorrent's ``file_path``). ``offset`` is where the
    file starts in the torrent's byte stream. ``pad`` marks a BEP 47 padding
    file (zeros, never written to disk by well-behaved storage).
    """

    path: tuple[str, ...]
    length: int
    offset: int
    pad: bool = False


@attrs.frozen
class Metainfo:
    """A validated metainfo file; build it with :meth:`from_bytes` or :func:`make_metainfo`."""

    name: str
    piece_length: int
    pieces: tuple[bytes, ...] = attrs.field(repr=False)
    files: tuple[FileEntry, ...] = attrs.field(repr=False)
    total_length: int
    #: SHA-1 of the bencoded ``info`` dict exactly as in the file.
    infohash: bytes
    multi_file: bool
    private: bool
    #: anomos tracker URLs, in the order to try them; empty for a plain .torrent.
    trackers: tuple[str, ...]
    #: The tracker identity pin: hex SHA-256 of its public key.
    fingerprint: str | None
    #: The ``info`` dict exactly as encoded in the file (the infohash covers these bytes).
    info_bytes: bytes = attrs.field(repr=False)
    #: A version-1 .atorrent (``info`` at the top), which BitTorrent clients open too;
    #: not part of equality: the same torrent in either layout.
    legacy: bool = attrs.field(default=False, eq=False)

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_bytes(cls, data: bytes) -> Metainfo:
        """Parse and validate a .torrent or .atorrent; raises MetainfoError."""
        if len(data) > MAX_METAINFO_SIZE:
            raise MetainfoError(
                f"metainfo: {len(data)} bytes is over the limit of {MAX_METAINFO_SIZE}"
            )
        try:
            top = bencode.decode(data, max_size=MAX_METAINFO_SIZE)
        except bencode.BencodeError as exc:
            raise MetainfoError(f"metainfo: truncated or corrupt file ({exc})") from None
        if not isinstance(top, dict):
            raise MetainfoError("metainfo: not a bencoded dictionary")
        anomos = top.get(b"anomos")
        if INFO_KEY in top:
            if b"info" in top:
                raise MetainfoError("metainfo: has both info and anomos-info")
            if anomos is None:
                raise MetainfoError("metainfo: anomos-info without the anomos key")
        info = top.get(INFO_KEY, top.get(b"info"))
        if not isinstance(info, dict):
            raise MetainfoError("metainfo: info: missing or not a dictionary")
        # The decoder is strict (canonical bencode), so re-encoding gives back
        # the bytes of the file: the infohash is the one every client computes.
        info_bytes = bencode.encode(info)
        parsed = _parse_info(info)
        trackers: tuple[str, ...] = ()
        fingerprint: str | None = None
        legacy = INFO_KEY not in top
        if anomos is not None:
            version = LEGACY_VERSION if legacy else ANOMOS_VERSION
            trackers, fingerprint = _parse_anomos(anomos, version)
        return cls(
            **parsed,
            infohash=hashlib.sha1(info_bytes).digest(),
            trackers=trackers,
            fingerprint=fingerprint,
            info_bytes=info_bytes,
            legacy=legacy and anomos is not None,
        )

    @classmethod
    def from_info(
        cls, info_bytes: bytes, trackers: Sequence[str], fingerprint: str | None
    ) -> Metainfo:
        """The .atorrent of a bencoded ``info`` dict (metadata fetched for a magnet)."""
        if len(info_bytes) > MAX_METAINFO_SIZE:
            raise MetainfoError(f"metainfo: info: over the limit of {MAX_METAINFO_SIZE} bytes")
        return cls.from_bytes(_metainfo_bytes(Bencached(info_bytes), tuple(trackers), fingerprint))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Metainfo:
        """Read and validate a metainfo file; raises MetainfoError."""
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_METAINFO_SIZE + 1)
        except OSError as exc:
            raise MetainfoError(f"cannot read {os.fspath(path)}: {exc.strerror or exc}") from None
        if len(data) > MAX_METAINFO_SIZE:
            raise MetainfoError(
                f"{os.fspath(path)}: metainfo is over the limit of {MAX_METAINFO_SIZE} bytes"
            )
        try:
            return cls.from_bytes(data)
        except MetainfoError as exc:
            raise MetainfoError(f"{os.fspath(path)}: {exc}") from None

    # ------------------------------------------------------------------ writing
    def to_bytes(self) -> bytes:
        """The .atorrent (always the current format): ``info`` verbatim plus the anomos key.

        Without trackers, a plain .torrent (``info`` only).
        """
        return _metainfo_bytes(Bencached(self.info_bytes), self.trackers, self.fingerprint)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (see :func:`anomos.fsutil.atomic_write`), readable by all."""
        atomic_write(path, self.to_bytes(), mode=0o644)

    # ------------------------------------------------------------------ helpers
    @property
    def info(self) -> dict[bytes, Any]:
        """A fresh decoded copy of the ``info`` dict."""
        info: dict[bytes, Any] = bencode.decode(self.info_bytes, max_size=MAX_METAINFO_SIZE)
        return info

    @property
    def infohash_hex(self) -> str:
        return self.infohash.hex()

    @property
    def piece_count(self) -> int:
        return len(self.pieces)

    @property
    def is_anomos(self) -> bool:
        """True when the file names anomos trackers (an .atorrent, not a plain .torrent)."""
        return bool(self.trackers)

    def piece_size(self, index: int) -> int:
        """Length of piece ``index``: ``piece_length`` except for a shorter last piece."""
        if not 0 <= index < len(self.pieces):
            raise IndexError(f"piece {index} out of range 0..{len(self.pieces) - 1}")
        if index < len(self.pieces) - 1:
            return self.piece_length
        return self.total_length - self.piece_length * index


# ----------------------------------------------------------------------------- validation


def _field_int(value: Any, field: str, *, low: int, high: int) -> int:
    if type(value) is not int:
        raise MetainfoError(f"metainfo: {field}: not an integer")
    if not low <= value <= high:
        raise MetainfoError(f"metainfo: {field}: {value} is outside {low}..{high}")
    return value


def _field_text(value: Any, field: str) -> str:
    if not isinstance(value, bytes):
        raise MetainfoError(f"metainfo: {field}: not a string")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise MetainfoError(f"metainfo: {field}: not valid UTF-8") from None


def check_component(component: str) -> str | None:
    """Why ``component`` is unsafe as one file-name component, or None if it is safe."""
    if component in ("", ".", ".."):
        return f"{component!r} is not allowed"
    if "/" in component or "\\" in component:
        return f"{component!r} contains a path separator"
    if "\x00" in component:
        return f"{component!r} contains NUL"
    if len(component.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES:
        return f"longer than {MAX_COMPONENT_BYTES} bytes"
    return None


def _component(value: Any, field: str) -> str:
    text = _field_text(value, field)
    problem = check_component(text)
    if problem:
        raise MetainfoError(f"metainfo: {field}: {problem}")
    return text


def _parse_info(info: dict[bytes, Any]) -> dict[str, Any]:
    name = _component(info.get(b"name"), "info.name")
    piece_length = _field_int(
        info.get(b"piece length"), "info.piece length", low=1, high=MAX_PIECE_LENGTH
    )
    if piece_length % BLOCK_SIZE:
        raise MetainfoError(
            f"metainfo: info.piece length: {piece_length} is not a multiple of {BLOCK_SIZE}"
        )
    private_raw = info.get(b"private", 0)
    if type(private_raw) is not int:
        raise MetainfoError("metainfo: info.private: not an integer")

    has_length, has_files = b"length" in info, b"files" in info
    if has_length and has_files:
        raise MetainfoError("metainfo: info: has both length and files")
    if not has_length and not has_files:
        if b"file tree" in info:
            raise MetainfoError("metainfo: info: v2-only torrents (BEP 52) are not supported")
        raise MetainfoError("metainfo: info: missing length or files")

    files: list[FileEntry] = []
    total = 0
    if has_length:
        length = _field_int(info[b"length"], "info.length", low=0, high=MAX_TOTAL_LENGTH)
        files.append(FileEntry(path=(name,), length=length, offset=0))
        total = length
    else:
        raw_files = info[b"files"]
        if not isinstance(raw_files, list) or not raw_files:
            raise MetainfoError("metainfo: info.files: not a non-empty list")
        if len(raw_files) > MAX_FILES:
            raise MetainfoError(f"metainfo: info.files: more than {MAX_FILES} files")
        seen_files: set[tuple[str, ...]] = set()
        seen_dirs: set[tuple[str, ...]] = set()
        for i, entry in enumerate(raw_files):
            where = f"info.files[{i}]"
            if not isinstance(entry, dict):
                raise MetainfoError(f"metainfo: {where}: not a dictionary")
            length = _field_int(
                entry.get(b"length"), f"{where}.length", low=0, high=MAX_TOTAL_LENGTH
            )
            raw_path = entry.get(b"path")
            if not isinstance(raw_path, list) or not raw_path:
                raise MetainfoError(f"metainfo: {where}.path: not a non-empty list")
            if len(raw_path) > MAX_PATH_COMPONENTS:
                raise MetainfoError(
                    f"metainfo: {where}.path: more than {MAX_PATH_COMPONENTS} components"
                )
            path = tuple(_component(c, f"{where}.path[{j}]") for j, c in enumerate(raw_path))
            attr = entry.get(b"attr", b"")
            pad = isinstance(attr, bytes) and b"p" in attr
            if path in seen_files or path in seen_dirs:
                raise MetainfoError(f"metainfo: {where}.path: {_shown(path)} appears twice")
            for k in range(1, len(path)):
                prefix = path[:k]
                if prefix in seen_files:
                    raise MetainfoError(
                        f"metainfo: {where}.path: {_shown(path)} is inside file {_shown(prefix)}"
                    )
                seen_dirs.add(prefix)
            seen_files.add(path)
            files.append(FileEntry(path=(name, *path), length=length, offset=total, pad=pad))
            total += length
            if total > MAX_TOTAL_LENGTH:
                raise MetainfoError(
                    f"metainfo: info.files: total length is over {MAX_TOTAL_LENGTH}"
                )
    if total == 0:
        raise MetainfoError("metainfo: info: total length is 0")

    pieces_raw = info.get(b"pieces")
    if not isinstance(pieces_raw, bytes):
        raise MetainfoError("metainfo: info.pieces: missing or not a string")
    if len(pieces_raw) % PIECE_HASH_SIZE:
        raise MetainfoError(
            f"metainfo: info.pieces: length {len(pieces_raw)} is not a multiple of 20"
        )
    expected = -(-total // piece_length)
    if len(pieces_raw) // PIECE_HASH_SIZE != expected:
        raise MetainfoError(
            f"metainfo: info.pieces: {len(pieces_raw) // PIECE_HASH_SIZE} hashes, but "
            f"{total} bytes in pieces of {piece_length} need {expected}"
        )
    pieces = tuple(
        pieces_raw[k : k + PIECE_HASH_SIZE] for k in range(0, len(pieces_raw), PIECE_HASH_SIZE)
    )
    return {
        "name": name,
        "piece_length": piece_length,
        "pieces": pieces,
        "files": tuple(files),
        "total_length": total,
        "multi_file": has_files,
        "private": private_raw == 1,
    }


def _parse_anomos(anomos: Any, expected: int) -> tuple[tuple[str, ...], str | None]:
    """The trackers and fingerprint; ``expected`` is the version the file's layout implies."""
    if not isinstance(anomos, dict):
        raise MetainfoError("metainfo: anomos: not a dictionary")
    version = _field_int(anomos.get(b"version"), "anomos.version", low=0, high=1 << 31)
    if version not in (LEGACY_VERSION, ANOMOS_VERSION):
        raise MetainfoError(
            f"metainfo: anomos.version: {version} is not supported (this program reads "
            f"{LEGACY_VERSION} and {ANOMOS_VERSION})"
        )
    if version != expected:
        where = "anomos-info" if expected == ANOMOS_VERSION else "info"
        raise MetainfoError(f"metainfo: anomos.version: {version} does not match the {where} key")
    raw = anomos.get(b"trackers")
    if not isinstance(raw, list) or not raw:
        raise MetainfoError("metainfo: anomos.trackers: not a non-empty list")
    if len(raw) > MAX_TRACKERS:
        raise MetainfoError(f"metainfo: anomos.trackers: more than {MAX_TRACKERS} trackers")
    trackers = []
    for i, url in enumerate(raw):
        field = f"anomos.trackers[{i}]"
        problem = check_tracker_url(_field_text(url, field))
        if problem:
            raise MetainfoError(f"metainfo: {field}: {problem}")
        trackers.append(url.decode())
    fingerprint = None
    if b"fingerprint" in anomos:
        text = _field_text(anomos[b"fingerprint"], "anomos.fingerprint")
        if not _HEX64.fullmatch(text):
            raise MetainfoError(
                "metainfo: anomos.fingerprint: not 64 lowercase hex digits (SHA-256)"
            )
        fingerprint = text
    return tuple(trackers), fingerprint


def check_tracker_url(url: str) -> str | None:
    """Why ``url`` is not an acceptable anomos tracker URL, or None if it is."""
    if len(url) > MAX_URL_LENGTH:
        return f"URL longer than {MAX_URL_LENGTH} characters"
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        return "URL contains spaces or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"malformed URL {url!r}: {exc}"
    if parts.scheme.lower() not in TRACKER_SCHEMES:
        return f"URL {url!r} must start with {' or '.join(s + '://' for s in TRACKER_SCHEMES)}"
    if not parts.hostname:
        return f"URL {url!r} has no host"
    if parts.username is not None or parts.password is not None:
        return f"URL {url!r} must not carry a user name or password"
    if port == 0:
        return f"URL {url!r} has port 0"
    return None


def normalize_trackers(trackers: Iterable[str]) -> tuple[str, ...]:
    """Validate tracker URLs given as arguments; drops repeats, keeps the order."""
    out: list[str] = []
    for url in trackers:
        url = url.strip()
        problem = check_tracker_url(url)
        if problem:
            raise ConfigError(f"tracker: {problem}")
        if url not in out:
            out.append(url)
    if not out:
        raise ConfigError("at least one tracker URL is needed (--tracker https://...)")
    if len(out) > MAX_TRACKERS:
        raise ConfigError(f"at most {MAX_TRACKERS} trackers")
    return tuple(out)


def normalize_fingerprint(fingerprint: str | None) -> str | None:
    """``AB:CD:...`` or ``abcd...`` (SHA-256, hex) -> 64 lowercase hex digits."""
    if fingerprint is None:
        return None
    text = fingerprint.strip().lower().replace(":", "")
    if text.startswith("sha256/") or text.startswith("sha256:"):
        text = text[7:]
    if not _HEX64.fullmatch(text):
        raise ConfigError(
            f"fingerprint {fingerprint!r} is not a SHA-256 in hex (64 hex digits, colons allowed)"
        )
    return text


# ----------------------------------------------------------------------------- making


def auto_piece_length(total_length: int) -> int:
    """libtorrent's automatic piece length for ``total_length`` bytes."""
    steps = sum(1 for threshold in AUTO_PIECE_THRESHOLDS if total_length > threshold)
    return MIN_PIECE_LENGTH << steps


def check_piece_length(piece_length: int) -> int:
    """A piece length to make torrents with: a power of two in 16 KiB..64 MiB."""
    if (
        type(piece_length) is not int
        or not MIN_PIECE_LENGTH <= piece_length <= MAX_PIECE_LENGTH
        or piece_length & (piece_length - 1)
    ):
        raise ConfigError(
            f"piece size {piece_length} must be a power of two from {MIN_PIECE_LENGTH} "
            f"(16 KiB) to {MAX_PIECE_LENGTH} (64 MiB)"
        )
    return piece_length


@attrs.frozen
class _Source:
    """A file to hash: where it is on disk, and its path inside the torrent."""

    disk: Path
    rel: tuple[str, ...]
    length: int


def _rel_component(name: str, where: Path) -> str:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise StorageError(f"file name is not valid UTF-8: {os.fsdecode(where)!r}") from None
    problem = check_component(name)
    if problem:
        raise StorageError(f"cannot share {where}: file name {problem}")
    return name


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _collect_files(root: Path) -> list[_Source]:
    """Every regular file under ``root``, sorted by path as bytes (mktorrent's order)."""
    root_real = os.path.realpath(root)
    found: list[_Source] = []
    stack: list[tuple[Path, tuple[str, ...]]] = [(root, ())]
    while stack:
        directory, rel = stack.pop()
        if len(rel) >= MAX_PATH_COMPONENTS:
            raise StorageError(f"{directory}: folders nested deeper than {MAX_PATH_COMPONENTS}")
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            raise StorageError(f"cannot list {directory}: {exc.strerror or exc}") from None
        for entry in entries:
            disk = Path(entry.path)
            name = _rel_component(entry.name, disk)
            try:
                if entry.is_symlink():
                    target = os.path.realpath(disk)
                    if not _within(target, root_real):
                        raise StorageError(f"symlink {disk} points outside the shared folder")
                    st = os.stat(disk)
                    if stat.S_ISDIR(st.st_mode):
                        raise StorageError(f"symlinked folder {disk} is not supported")
                else:
                    st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                raise StorageError(f"{disk}: dangling symlink or vanished file") from None
            except OSError as exc:
                raise StorageError(f"cannot read {disk}: {exc.strerror or exc}") from None
            if stat.S_ISDIR(st.st_mode):
                stack.append((disk, (*rel, name)))
            elif stat.S_ISREG(st.st_mode):
                found.append(_Source(disk=disk, rel=(*rel, name), length=st.st_size))
                if len(found) > MAX_FILES:
                    raise StorageError(f"{root}: more than {MAX_FILES} files")
            else:
                raise StorageError(f"{disk} is not a regular file")
    found.sort(key=lambda s: "/".join(s.rel).encode("utf-8"))
    return found


def _open_file(path: Path) -> Any:
    """Open a file to hash (a seam for tests)."""
    return open(path, "rb")


def _hash_pieces(
    sources: Sequence[_Source], piece_length: int, total: int, desc: str, progress: bool
) -> bytes:
    """SHA-1 of every piece across the files in order, reading in bounded chunks."""
    digests = bytearray()
    h = hashlib.sha1()
    room = piece_length
    buf = bytearray(min(HASH_CHUNK, piece_length))
    view = memoryview(buf)
    with bar(total, desc, enabled=None if progress else False) as progress_bar:
        for src in sources:
            left = src.length
            try:
                with _open_file(src.disk) as f:
                    while left:
                        want = min(left, room, len(buf))
                        got = f.readinto(view[:want])
                        if not got:
                            raise StorageError(f"{src.disk} shrank while hashing")
                        h.update(view[:got])
                        left -= got
                        room -= got
                        if room == 0:
                            digests += h.digest()
                            h = hashlib.sha1()
                            room = piece_length
                        progress_bar.update(got)
                        gevent.sleep(0)
                    if f.read(1):
                        raise StorageError(f"{src.disk} grew while hashing")
            except OSError as exc:
                raise StorageError(f"cannot read {src.disk}: {exc.strerror or exc}") from None
    if room != piece_length:
        digests += h.digest()
    return bytes(digests)


def make_metainfo(
    path: str | os.PathLike[str],
    *,
    trackers: Iterable[str],
    piece_length: int | None = None,
    fingerprint: str | None = None,
    private: bool = False,
    progress: bool = True,
) -> Metainfo:
    """Hash a file or folder into a new .atorrent (not written; see :meth:`Metainfo.save`).

    The ``info`` dict is what libtorrent (v1 only, files in sorted order) and
    mktorrent make for the same files and piece length.
    """
    tracker_urls = normalize_trackers(trackers)
    fp = normalize_fingerprint(fingerprint)
    if piece_length is not None:
        check_piece_length(piece_length)
    root = Path(os.path.abspath(path))
    name = _rel_component(root.name, root)
    try:
        st = os.stat(root)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        sources = _collect_files(root)
        if not sources:
            raise StorageError(f"{path}: folder has no files to share")
    elif stat.S_ISREG(st.st_mode):
        sources = [_Source(disk=root, rel=(), length=st.st_size)]
    else:
        raise StorageError(f"{path} is not a regular file or folder")
    total = sum(s.length for s in sources)
    if total == 0:
        raise StorageError(f"{path}: nothing to share, every file is empty")
    if total > MAX_TOTAL_LENGTH:
        raise StorageError(f"{path}: more than {MAX_TOTAL_LENGTH} bytes")
    if piece_length is None:
        piece_length = auto_piece_length(total)
    count = -(-total // piece_length)
    if count * PIECE_HASH_SIZE > MAX_METAINFO_SIZE - 1024 * 1024:
        raise ConfigError(
            f"{count} pieces of {piece_length} bytes would make the metainfo too large; "
            "use a larger --piece-size"
        )
    pieces = _hash_pieces(sources, piece_length, total, f"hashing {name}", progress)

    info: dict[bytes, Any] = {b"name": name.encode(), b"piece length": piece_length}
    info[b"pieces"] = pieces
    if stat.S_ISDIR(st.st_mode):
        info[b"files"] = [
            {b"length": s.length, b"path": [c.encode() for c in s.rel]} for s in sources
        ]
    else:
        info[b"length"] = total
    if private:
        info[b"private"] = 1
    data = _metainfo_bytes(info, tracker_urls, fp)
    return Metainfo.from_bytes(data)


def _metainfo_bytes(info: Any, trackers: tuple[str, ...], fp: str | None) -> bytes:
    """An .atorrent: the anomos key and the info dict under :data:`INFO_KEY`, nothing else.

    No ``info`` and no ``announce``: a BitTorrent client refuses the file
    instead of publishing its infohash on the public DHT. The info dict is
    kept byte for byte, so the infohash is the plain torrent's.
    """
    if not trackers:
        return bencode.encode({b"info": info})
    anomos: dict[bytes, Any] = {
        b"version": ANOMOS_VERSION,
        b"trackers": [url.encode() for url in trackers],
    }
    if fp is not None:
        anomos[b"fingerprint"] = fp.encode()
    data = bencode.encode({b"anomos": anomos, INFO_KEY: info})
    if len(data) > MAX_METAINFO_SIZE:
        raise ConfigError(
            f"the metainfo would be {len(data)} bytes, over the limit of {MAX_METAINFO_SIZE}"
        )
    return data


def anonymize(data: bytes, *, trackers: Iterable[str], fingerprint: str | None) -> Metainfo:
    """Turn a plain .torrent into an .atorrent with the same infohash.

    ``info`` is kept byte for byte; everything outside it (announce,
    announce-list, url-list, httpseeds, nodes, comment, created by, creation
    date, ...) is dropped, since any of it could name a person or let a
    client reach peers without the anomos tracker. Then the anomos keys are added.
    """
    tracker_urls = normalize_trackers(trackers)
    fp = normalize_fingerprint(fingerprint)
    plain = Metainfo.from_bytes(data)
    return attrs.evolve(plain, trackers=tracker_urls, fingerprint=fp, legacy=False)


def _shown(path: tuple[str, ...]) -> str:
    """A path for a one-line error: control characters escaped, never a raw newline."""
    text = "/".join(path)
    return text if text.isprintable() else repr(text)[1:-1]
