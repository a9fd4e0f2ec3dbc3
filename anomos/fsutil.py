"""The file-system guarantees of anomos, each in one place.

- :func:`atomic_write`: a file is either its old or its new content, never a
  mix, even after a crash (temporary file in the same folder, mode set, fsync,
  rename, fsync of the folder).
- :func:`private_dir`: state directories are the owner's alone (0700, tightened
  when found looser: their file names are the infohashes a user shares).
- :func:`lock_state_dir`: one process per state directory.
- :func:`open_beneath`: files created under a download folder are created
  relative to a descriptor of that folder, refusing a symlink at every
  component, so a link planted after the start cannot send a write elsewhere.
- :func:`check_writable` and :func:`check_room`: what cannot work fails at
  once with one line, before anything is asked of the network.

Every failure is a :class:`~anomos.errors.StorageError` (or ``ConfigError``
for a state directory in use) with one line naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

import attrs

from anomos.errors import ConfigError, StorageError

log = logging.getLogger(__name__)

#: Mode of state directories (peer and tracker): keys, resume data, databases.
PRIVATE_DIR_MODE = 0o700
#: Mode of files only their owner should read (keys, databases, resume data).
PRIVATE_FILE_MODE = 0o600
#: Name of the lock file inside a state directory.
LOCK_FILE = "lock"

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


# ---------------------------------------------------------------------------- atomic write


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or link in ``directory`` durable (best effort: some file systems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    mode: int = PRIVATE_FILE_MODE,
    replace: bool = True,
) -> bool:
    """Write ``data`` to ``path`` so that it holds the old or the new bytes, never a mix.

    A temporary file in the same folder gets ``mode`` (whatever the umask),
    the data and an fsync; then it is renamed over ``path`` and the folder is
    fsynced. With ``replace=False`` an existing ``path`` is kept (a key must
    never be silently replaced) and the result is False.
    """
    target = Path(path)
    directory = target.parent
    tmp = directory / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # unlike rename, refuses to replace
            except FileExistsError:
                return False
            except OSError:
                if target.exists():
                    return False
                os.replace(tmp, target)  # a file system without hard links
        fsync_dir(directory)
        return True
    except OSError as exc:
        raise StorageError(f"cannot write {target}: {_reason(exc)}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# ---------------------------------------------------------------------------- state directories


def private_dir(directory: str | os.PathLike[str]) -> Path:
    """Create ``directory`` (and parents) mode 0700, or tighten it to 0700 if it exists."""
    path = Path(directory)
    try:
        path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        st = os.stat(path)
        if st.st_mode & 0o077:
            os.chmod(path, PRIVATE_DIR_MODE)
            log.info("state directory %s was mode %o; now 0700", path, st.st_mode & 0o777)
    except OSError as exc:
        raise StorageError(f"cannot create state directory {path}: {_reason(exc)}") from None
    return path


def private_file(path: str | os.PathLike[str]) -> None:
    """Create ``path`` empty with mode 0600 if missing; tighten it to 0600 if looser."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | _CLOEXEC, PRIVATE_FILE_MODE)
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, PRIVATE_FILE_MODE)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(f"cannot create {path}: {_reason(exc)}") from None


@attrs.define(eq=False)
class StateLock:
    """An exclusive ``flock`` on ``DIR/lock``, held until :meth:`release` or process exit."""

    directory: Path
    _fd: int | None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlock (closing the descriptor drops the flock); idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def lock_state_dir(directory: str | os.PathLike[str]) -> StateLock:
    """Create ``directory`` private (see :func:`private_dir`) and lock it for this process.

    A second process on the same directory gets a one-line ``ConfigError``
    naming the directory and the holder's pid. The kernel drops the lock when
    the holder exits, however it exits: a stale lock file never blocks.
    """
    path = private_dir(directory)
    lock_path = path / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | _CLOEXEC, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot open {lock_path}: {_reason(exc)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ConfigError(
                f"state directory {path} is in use by another anomos process (pid {holder})"
            ) from None
        raise StorageError(f"cannot lock {lock_path}: {_reason(exc)}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StateLock(path, fd)


# ---------------------------------------------------------------------------- under a folder


def open_dir(path: str | os.PathLike[str], *, create: bool = False) -> int:
    """A descriptor of the folder ``path`` (itself may be a symlink: the user named it)."""
    try:
        if create:
            os.makedirs(path, exist_ok=True)
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    except OSError as exc:
        raise StorageError(f"cannot open folder {path}: {_reason(exc)}") from None


def open_beneath(
    root_fd: int,
    parts: Sequence[str],
    flags: int,
    mode: int = 0o644,
    *,
    make_dirs: bool = False,
    shown: str | os.PathLike[str] = "",
) -> int:
    """Open ``parts`` (relative path components) under the folder ``root_fd``.

    Each folder is opened with ``O_DIRECTORY | O_NOFOLLOW`` relative to the
    previous one, the file with ``O_NOFOLLOW``: a symlink anywhere on the
    way is refused, whenever it was planted. Missing folders are created with
    ``make_dirs``. ``shown`` names the path in errors; ``OSError`` other than
    a refused symlink is raised as is (callers know what they were doing).
    """
    if not parts:
        raise ValueError("open_beneath needs at least one path component")
    fd = root_fd
    opened: list[int] = []
    try:
        for name in parts[:-1]:
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not make_dirs:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=fd)
                fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            opened.append(fd)
        return os.open(parts[-1], flags | os.O_NOFOLLOW | _CLOEXEC, mode, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _has_symlink(root_fd, parts):
            raise StorageError(
                f"{shown or '/'.join(parts)}: a symlink in the path; refusing to follow it"
            ) from None
        raise
    finally:
        for d in opened:
            os.close(d)


def _has_symlink(root_fd: int, parts: Sequence[str]) -> bool:
    """Whether a component of ``parts`` under ``root_fd`` is a symlink (for the error message)."""
    fd = root_fd
    opened: list[int] = []
    try:
        for i, name in enumerate(parts):
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                return False
            if stat.S_ISLNK(st.st_mode):
                return True
            if i < len(parts) - 1:
                try:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError:
                    return False
                opened.append(fd)
        return False
    finally:
        for d in opened:
            os.close(d)


# ---------------------------------------------------------------------------- preflight


def check_writable(directory: str | os.PathLike[str]) -> None:
    """Refuse a folder we cannot create files in (read-only mount, permissions), at once.

    Tries for real (creates and removes a hidden file): permission bits say
    nothing to root, and a read-only mount is only found by writing.
    """
    probe = Path(directory) / f".anomos-probe.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot write into {directory}: {_reason(exc)}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def free_bytes(directory: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged writer may still use on the file system of ``directory``."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def check_room(directory: str | os.PathLike[str], need: int) -> None:
    """Refuse at once when ``need`` more bytes cannot fit in ``directory``'s file system."""
    try:
        free = free_bytes(directory)
    except OSError as exc:
        raise StorageError(f"cannot check free space in {directory}: {_reason(exc)}") from None
    if need > free:
        raise StorageError(
            f"not enough space in {directory}: {need:,} bytes still to write, {free:,} free"
        )


def move_entries(source: Path, target: Path, names: Sequence[str]) -> None:
    """Move the files or folders ``names`` from ``source`` into ``target`` (one file
    system: each move is a rename, whole or not at all); missing ones are skipped."""
    for name in names:
        try:
            os.replace(source / name, target / name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StorageError(f"cannot move {source / name} to {target}: {_reason(exc)}") from None
    fsync_dir(source)
    fsync_dir(target)
