"""Pieces on disk: the torrent's byte stream mapped onto its files.

Data layout is standard BitTorrent: a single-file torrent is
``data_root/name``, a multi-file one ``data_root/name/<path...>``. Files and
folders are created lazily and sparsely, on the first write that touches them:
a file left out of the download (see the session's ``set_wanted``) is never
created, unless it shares a piece with a wanted file, and then it holds only
the bytes of that boundary piece (sparse elsewhere).
A piece reaches the disk only after its SHA-1 matched (:meth:`Storage.write_piece`
hashes it itself), and existing user data is never truncated or overwritten by
anything but verified pieces.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import logging
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Iterator
from pathlib import Path

import gevent

from anomos.errors import StorageError
from anomos.fsutil import open_beneath, open_dir
from anomos.torrent.metainfo import Metainfo

log = logging.getLogger(__name__)

#: Pieces up to this size are read whole by read_block and kept for the next blocks.
READ_CACHE_PIECE = 4 * 1024 * 1024
#: File descriptors kept open at once; older ones are fsynced (if written) and closed.
MAX_OPEN_FILES = 64

#: ``progress(done, total)``, called after each piece checked.
Progress = Callable[[int, int], None]
#: ``(size, mtime_ns)`` of a file on disk, or None when it is missing.
FileStat = tuple[int, int] | None


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class Storage:
    """Reads and writes the pieces of one torrent under ``data_root``.

    Raises :class:`StorageError` (one line) when a file cannot be used: a path
    escaping ``data_root`` (through ``..`` or a symlink), a folder where a
    file belongs, or an existing file *larger* than the torrent says (which is
    someone else's data: it is refused, never truncated).
    """

    def __init__(self, metainfo: Metainfo, data_root: str | os.PathLike[str]) -> None:
        self.metainfo = metainfo
        self.root = Path(os.path.realpath(data_root))
        self.piece_length = metainfo.piece_length
        self.num_pieces = len(metainfo.pieces)
        #: Pieces hashed by :meth:`check_piece` (resume tests count re-hashing with it).
        self.checks = 0
        #: Pieces found bad on disk after they were verified (a disk fault, an edited
        #: file): never served until written again.
        self.missing: set[int] = set()
        files = metainfo.files
        self.paths: tuple[Path, ...] = tuple(self._safe_path(f.path) for f in files)
        # Spans are looked up by bisecting the start offsets of non-empty files.
        self._span_files = [i for i, f in enumerate(files) if f.length > 0]
        self._span_starts = [files[i].offset for i in self._span_files]
        self._fds: OrderedDict[int, tuple[int, bool]] = OrderedDict()
        #: The download folder, opened once: files are created relative to it (see _create).
        self._root_fd: int | None = open_dir(self.root) if self.root.is_dir() else None
        self._dirty: set[int] = set()
        self._closed = False
        # The last piece read whole by read_block (-1: none).
        self._cached_index = -1
        self._cached: bytes | None = None
        for i, f in enumerate(files):
            if f.pad:
                continue
            try:
                st = os.stat(self.paths[i])
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StorageError(f"cannot use {self.paths[i]}: {exc.strerror or exc}") from None
            if not stat.S_ISREG(st.st_mode):
                raise StorageError(f"{self.paths[i]} exists and is not a regular file")
            if st.st_size > f.length:
                raise StorageError(
                    f"{self.paths[i]} is {st.st_size} bytes, larger than the torrent's "
                    f"{f.length}; refusing to touch it"
                )

    # ------------------------------------------------------------------ layout
    def _safe_path(self, parts: tuple[str, ...]) -> Path:
        """``data_root/parts``, refused unless it resolves inside ``data_root``."""
        for part in parts:
            if part in ("", ".", "..") or "/" in part or "\\" in part or "\0" in part:
                raise StorageError(f"unsafe file name {part!r} in the torrent")
        path = self.root.joinpath(*parts)
        real = os.path.realpath(path)
        if not _within(real, str(self.root)) or real == str(self.root):
            raise StorageError(f"{path} resolves outside {self.root}")
        return path

    def spans(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """``(file index, offset in file, length)`` covering the byte range, in order."""
        files = self.metainfo.files
        k = bisect.bisect_right(self._span_starts, offset) - 1
        while length > 0:
            if k < 0 or k >= len(self._span_files):
                raise StorageError(f"byte range {offset}+{length} lies outside the torrent")
            fi = self._span_files[k]
            f = files[fi]
            at = offset - f.offset
            n = min(length, f.length - at)
            yield fi, at, n
            offset += n
            length -= n
            k += 1

    def piece_files(self, index: int) -> set[int]:
        """Indices of the files piece ``index`` touches."""
        start = index * self.piece_length
        return {fi for fi, _, _ in self.spans(start, self.metainfo.piece_size(index))}

    # ------------------------------------------------------------------ file handles
    def _fd(self, fi: int, *, write: bool) -> int | None:
        """An open descriptor for file ``fi``; None when reading a missing file."""
        entry = self._fds.get(fi)
        if entry is not None and (entry[1] or not write):
            self._fds.move_to_end(fi)
            return entry[0]
        if self._closed:
            raise StorageError(f"storage of {self.metainfo.name} is closed")
        path = self.paths[fi]
        if write:
            fd = self._create(fi, os.O_RDWR)
        else:
            # Re-check at open time: a symlink may have appeared since we started.
            real = os.path.realpath(path)
            if not _within(real, str(self.root)):
                raise StorageError(f"{path} resolves outside {self.root}")
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                return None
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.EISDIR):
                    return None
                raise StorageError(f"cannot open {path}: {exc.strerror or exc}") from None
        if entry is not None:
            self._drop_fd(fi)
        self._fds[fi] = (fd, write)
        while len(self._fds) > MAX_OPEN_FILES:
            self._drop_fd(next(iter(self._fds)))
        return fd

    def _create(self, fi: int, flags: int) -> int:
        """Open (creating it and its folders if needed) file ``fi`` for writing.

        Relative to a descriptor of the download folder taken once, with no
        symlink followed on any component: a link planted under the folder
        after we started cannot make us create or write a file outside it.
        """
        path = self.paths[fi]
        if self._root_fd is None:
            self._root_fd = open_dir(self.root, create=True)
        try:
            return open_beneath(
                self._root_fd,
                self.metainfo.files[fi].path,
                flags | os.O_CREAT,
                0o644,
                make_dirs=True,
                shown=path,
            )
        except OSError as exc:
            raise StorageError(f"cannot create {path}: {exc.strerror or exc}") from None

    def _drop_fd(self, fi: int) -> None:
        fd, _ = self._fds.pop(fi)
        try:
            if fi in self._dirty:
                self._dirty.discard(fi)
                os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ data
    def _read(self, offset: int, length: int) -> bytes | None:
        """The bytes at ``offset``; None if a file is missing or too short."""
        files = self.metainfo.files
        parts: list[bytes] = []
        for fi, at, n in self.spans(offset, length):
            if files[fi].pad:
                parts.append(bytes(n))
                continue
            fd = self._fd(fi, write=False)
            if fd is None:
                return None
            try:
                data = os.pread(fd, n, at)
            except OSError as exc:
                raise StorageError(f"cannot read {self.paths[fi]}: {exc.strerror or exc}") from None
            if len(data) != n:
                return None
            parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def mark_missing(self, index: int) -> None:
        """Piece ``index`` went bad on disk: never serve it (nor a cached copy) until it is
        written again."""
        self.missing.add(index)
        if self._cached_index == index:
            self._cached_index, self._cached = -1, None

    def read_block(self, index: int, begin: int, length: int) -> bytes:
        """Bytes ``begin:begin+length`` of piece ``index``, which must be on disk.

        Peers ask for a piece block by block, in order: the whole piece is read
        at once (when at most :data:`READ_CACHE_PIECE` bytes) and the next
        blocks are served from it, one system call per piece instead of one
        per 16 KiB.
        """
        size = self.metainfo.piece_size(index)
        if begin < 0 or length < 0 or begin + length > size:
            raise StorageError(f"block {index}:{begin}+{length} lies outside the piece")
        if index in self.missing:
            raise StorageError(f"piece {index} of {self.metainfo.name} went bad on disk")
        if size <= READ_CACHE_PIECE:
            if self._cached_index != index:
                self._cached = self._read(index * self.piece_length, size)
                self._cached_index = index if self._cached is not None else -1
            data = self._cached
            if data is not None:
                return data if length == size else data[begin : begin + length]
        else:
            data = self._read(index * self.piece_length + begin, length)
        if data is None:
            raise StorageError(f"piece {index} of {self.metainfo.name} is missing from disk")
        return data

    def write_piece(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        """Write a whole piece if its SHA-1 matches; False (nothing written) otherwise."""
        if len(data) != self.metainfo.piece_size(index):
            return False
        if hashlib.sha1(data).digest() != self.metainfo.pieces[index]:
            return False
        if self._cached_index == index:
            self._cached_index, self._cached = -1, None
        self.missing.discard(index)
        files = self.metainfo.files
        view = memoryview(data)
        pos = 0
        for fi, at, n in self.spans(index * self.piece_length, len(data)):
            if not files[fi].pad:
                fd = self._fd(fi, write=True)
                assert fd is not None
                chunk = view[pos : pos + n]
                try:
                    while chunk:
                        written = os.pwrite(fd, chunk, at)
                        chunk = chunk[written:]
                        at += written
                except OSError as exc:
                    raise StorageError(
                        f"cannot write {self.paths[fi]}: {exc.strerror or exc}"
                    ) from None
                self._dirty.add(fi)
            pos += n
        return True

    def check_piece(self, index: int) -> bool:
        """Whether the bytes on disk for piece ``index`` match its hash."""
        self.checks += 1
        data = self._read(index * self.piece_length, self.metainfo.piece_size(index))
        return data is not None and hashlib.sha1(data).digest() == self.metainfo.pieces[index]

    def check_pieces(self, indices: Iterable[int], progress: Progress | None = None) -> list[int]:
        """The subset of ``indices`` whose data on disk is good."""
        todo = list(indices)
        good = []
        for done, index in enumerate(todo, 1):
            if self.check_piece(index):
                good.append(index)
            if progress is not None:
                progress(done, len(todo))
        return good

    def check_all(self, progress: Progress | None = None) -> bytearray:
        """Hash everything on disk: one 0/1 flag per piece."""
        have = bytearray(self.num_pieces)
        for index in self.check_pieces(range(self.num_pieces), progress):
            have[index] = 1
        return have

    # ------------------------------------------------------------------ files
    def file_stats(self) -> list[FileStat]:
        """``(size, mtime_ns)`` of each file as it is now (None when missing)."""
        out: list[FileStat] = []
        for i, f in enumerate(self.metainfo.files):
            if f.pad:
                out.append((f.length, 0))
                continue
            try:
                st = os.stat(self.paths[i])
            except OSError:
                out.append(None)
                continue
            out.append((st.st_size, st.st_mtime_ns))
        return out

    def finish(self, skip: Container[int] = ()) -> None:
        """After the last piece: create the empty files (but those in ``skip``, files
        left out) and flush everything to disk."""
        for i, f in enumerate(self.metainfo.files):
            if f.length == 0 and not f.pad and i not in skip:
                os.close(self._create(i, os.O_WRONLY))
        self.sync()

    def sync(self) -> None:
        """fsync every file written since the last sync (before resume data is saved).

        In a thread: the fsync of what a download wrote in the last seconds took
        up to 0.84 s (10 MB/s, `anomos bench --wan`), and in the event loop it
        stopped every connection's reads, requests and SENDMEs that long.
        """
        dirty = list(self._dirty)
        self._dirty.difference_update(dirty)  # a write from now on marks its file again
        for n, fi in enumerate(dirty):
            entry = self._fds.get(fi)
            if entry is None:
                continue  # closed since, and fsynced then (_drop_fd)
            fd = os.dup(entry[0])  # still open if the file is closed meanwhile
            try:
                gevent.get_hub().threadpool.apply(os.fsync, (fd,))
            except BaseException as exc:
                self._dirty.update(dirty[n:])  # not known to be on disk
                if isinstance(exc, OSError):
                    raise StorageError(
                        f"cannot flush {self.paths[fi]}: {exc.strerror or exc}"
                    ) from None
                raise
            finally:
                os.close(fd)

    def close(self) -> None:
        """Flush and close every file; idempotent."""
        if self._closed:
            return
        try:
            self.sync()
        finally:
            self._closed = True
            self._cached_index, self._cached = -1, None
            for fi in list(self._fds):
                try:
                    self._drop_fd(fi)
                except OSError as exc:
                    log.warning("closing %s: %s", self.paths[fi], exc.strerror or exc)
            if self._root_fd is not None:
                os.close(self._root_fd)
                self._root_fd = None
