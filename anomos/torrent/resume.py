"""Resume data: skip re-hashing files that have not changed since we last ran.

``resume_dir/<infohash hex>.json`` holds the have-bitfield and, per file, the
``(size, mtime_ns)`` seen when it was saved (after the data was fsynced). On
restart a piece keeps its saved state only if every file it touches still has
the same size and mtime; pieces touching a changed or missing file are
re-hashed. It also keeps which files are wanted and their priorities
(``wanted``: 0/1 per file, ``priority``: -1/0/1 per file; absent in older
files, which then mean every file, normal priority). Resume data that is
unreadable, corrupt or for another torrent is ignored with a warning, and
everything is re-checked: it can cost time, never data.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from anomos.fsutil import atomic_write, private_dir
from anomos.torrent.metainfo import Metainfo
from anomos.torrent.storage import FileStat
from anomos.torrent.wire import pack_bitfield, unpack_bitfield

log = logging.getLogger(__name__)

RESUME_VERSION = 1
#: Resume files larger than this are not read (they would be corrupt anyway).
MAX_RESUME_SIZE = 64 * 1024 * 1024


def resume_path(resume_dir: str | os.PathLike[str], metainfo: Metainfo) -> Path:
    return Path(resume_dir) / f"{metainfo.infohash.hex()}.json"


@attrs.frozen
class ResumeData:
    """What was on disk when we last saved: verified pieces and file stats."""

    have: bytes = attrs.field(repr=False)  # one 0/1 flag per piece
    files: tuple[FileStat, ...]
    #: Per file: wanted, and its priority (-1, 0, 1); None when not saved.
    wanted: tuple[bool, ...] | None = None
    priorities: tuple[int, ...] | None = None


def save(
    resume_dir: str | os.PathLike[str],
    metainfo: Metainfo,
    have: bytes | bytearray,
    files: Sequence[FileStat],
    *,
    wanted: Sequence[bool] | None = None,
    priorities: Sequence[int] | None = None,
) -> None:
    """Write atomically (temporary file, fsync, rename); the data files must be synced first."""
    doc: dict[str, Any] = {
        "version": RESUME_VERSION,
        "infohash": metainfo.infohash.hex(),
        "pieces": len(metainfo.pieces),
        "have": pack_bitfield(have).hex(),
        "files": [list(s) if s is not None else None for s in files],
    }
    if wanted is not None:
        doc["wanted"] = [int(bool(w)) for w in wanted]
    if priorities is not None:
        doc["priority"] = [int(p) for p in priorities]
    path = resume_path(resume_dir, metainfo)
    private_dir(path.parent)  # its file names are the infohashes this peer shares
    atomic_write(path, json.dumps(doc, separators=(",", ":")).encode())


def load(resume_dir: str | os.PathLike[str], metainfo: Metainfo) -> ResumeData | None:
    """Saved resume data, or None (with a warning if it existed but was unusable)."""
    path = resume_path(resume_dir, metainfo)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RESUME_SIZE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("ignoring resume data %s: %s", path, exc.strerror or exc)
        return None
    try:
        return _parse(raw, metainfo)
    except (ValueError, TypeError, KeyError, _Unusable) as exc:
        log.warning("ignoring resume data %s: %s; re-checking everything", path, exc)
        return None


class _Unusable(Exception):
    """A resume file that parses but does not describe this torrent."""


def _parse(raw: bytes, metainfo: Metainfo) -> ResumeData:
    if len(raw) > MAX_RESUME_SIZE:
        raise _Unusable("file too large")
    doc: Any = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("version") != RESUME_VERSION:
        raise _Unusable("unknown format")
    if doc.get("infohash") != metainfo.infohash.hex():
        raise _Unusable("it belongs to another torrent")
    n = len(metainfo.pieces)
    if doc.get("pieces") != n:
        raise _Unusable("wrong piece count")
    have_hex = doc["have"]
    if not isinstance(have_hex, str):
        raise _Unusable("bad bitfield")
    try:
        have = unpack_bitfield(bytes.fromhex(have_hex), n)
    except Exception as exc:
        raise _Unusable(f"bad bitfield ({exc})") from None
    files_raw = doc["files"]
    if not isinstance(files_raw, list) or len(files_raw) != len(metainfo.files):
        raise _Unusable("wrong file count")
    files: list[FileStat] = []
    for entry in files_raw:
        if entry is None:
            files.append(None)
            continue
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not all(type(v) is int and v >= 0 for v in entry)
        ):
            raise _Unusable("bad file entry")
        files.append((entry[0], entry[1]))
    wanted = _per_file(doc.get("wanted"), len(files), (0, 1))
    priorities = _per_file(doc.get("priority"), len(files), (-1, 0, 1))
    return ResumeData(
        have=bytes(have),
        files=tuple(files),
        wanted=None if wanted is None else tuple(map(bool, wanted)),
        priorities=priorities,
    )


def _per_file(raw: Any, nfiles: int, allowed: tuple[int, ...]) -> tuple[int, ...] | None:
    """A saved list of one small int per file, or None when absent."""
    if raw is None:
        return None
    if (
        not isinstance(raw, list)
        or len(raw) != nfiles
        or not all(type(v) is int and v in allowed for v in raw)
    ):
        raise _Unusable("bad file selection")
    return tuple(raw)


def pieces_of_file(metainfo: Metainfo, file_index: int) -> range:
    """The pieces that hold bytes of file ``file_index`` (empty for a zero-length file)."""
    f = metainfo.files[file_index]
    if f.length == 0:
        return range(0)
    pl = metainfo.piece_length
    return range(f.offset // pl, (f.offset + f.length - 1) // pl + 1)


def plan(
    metainfo: Metainfo, resume: ResumeData | None, current: Sequence[FileStat]
) -> tuple[bytearray, list[int]]:
    """``(trusted have flags, pieces to re-hash)`` from saved and current file stats.

    Without resume data every piece touching an existing file is re-hashed.
    With it, only pieces touching a file whose stats changed are, whatever
    their saved state (a file that changed may have gained good data too).
    """
    n = len(metainfo.pieces)
    if resume is None:
        have = bytearray(n)
        changed = [i for i, s in enumerate(current) if s is not None]
    else:
        have = bytearray(resume.have)
        changed = [i for i, s in enumerate(current) if s != resume.files[i]]
    recheck: set[int] = set()
    for fi in changed:
        recheck.update(pieces_of_file(metainfo, fi))
    for index in recheck:
        have[index] = 0
    # A piece whose files are all missing cannot be good: it needs no hashing.
    missing = {i for i, s in enumerate(current) if s is None}
    if missing:
        possible: set[int] = set()
        for fi, f in enumerate(metainfo.files):
            if fi not in missing and not f.pad:
                possible.update(pieces_of_file(metainfo, fi))
        recheck &= possible
    return have, sorted(recheck)
