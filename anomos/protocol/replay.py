"""Replay caches that outlive the process: one append-only file per cache.

A peer refuses a tracking code or a sealed request it has accepted before;
kept in memory only, that refusal would end with the process, and a restarted
peer (same keys) would accept the same code and request again. So each entry
is written to a file in the peer's state directory, in one unbuffered write,
before the code or request is acted upon (a crash right after loses nothing),
and read back at start-up.

Every record carries the point after which it is useless (the code's epoch,
the request's expiry): loading drops those. A rewrite goes to a temporary
file that replaces the old one (``os.replace``), so a crash leaves the old
file or the new one, never half of one; a torn last record is ignored. Past
twice the live entries (plus slack) the file is rewritten with the live ones
only, so it stays as bounded as the cache it backs. Writes are not synced
one by one: a power cut may lose the last few, a crashed process does not.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import attrs

from anomos.errors import ConfigError, CryptoError, StorageError
from anomos.fsutil import PRIVATE_FILE_MODE, atomic_write

#: Records appended beyond twice the live entries before the file is compacted.
COMPACT_SLACK = 4096
#: Files in a peer's state directory: tracking-code tags (16 bytes, by epoch) and
#: sealed-request digests (SHA-256, by expiry).
CODES_FILE = "replay-codes.bin"
REQUESTS_FILE = "replay-requests.bin"
_UNTIL_SIZE = 8


@attrs.define(eq=False)
class ReplayFile:
    """The on-disk half of a replay cache: records of ``until (u64) | key``."""

    path: Path = attrs.field(converter=Path)
    key_size: int
    _fd: int = attrs.field(default=-1, init=False, repr=False)
    _records: int = attrs.field(default=0, init=False)

    @property
    def record_size(self) -> int:
        return _UNTIL_SIZE + self.key_size

    def load(self, alive: Callable[[int], bool], limit: int) -> list[tuple[int, bytes]]:
        """The entries still ``alive`` (at most the last ``limit``); the file is
        rewritten with exactly those (unless it holds nothing else: a launch then
        spends no fsync on it) and kept open for appending. ``ConfigError`` if it
        cannot be read or written (a peer must not run without it)."""
        try:
            data, existed = self.path.read_bytes(), True
        except FileNotFoundError:
            data, existed = b"", False
        except OSError as exc:
            raise ConfigError(f"cannot read the replay cache {self.path}: {exc.strerror}") from None
        size = self.record_size
        whole = len(data) - len(data) % size  # without a last record torn by a crash
        entries = []
        for at in range(0, whole, size):
            until = int.from_bytes(data[at : at + _UNTIL_SIZE], "big")
            if alive(until):
                entries.append((until, data[at + _UNTIL_SIZE : at + size]))
        entries = entries[-limit:] if limit else []
        try:
            if existed and len(entries) * size == len(data):
                self._open(len(entries))  # all of it is live: the file stays as it is
            else:
                self.rewrite(entries)
        except OSError as exc:
            raise ConfigError(
                f"cannot write the replay cache {self.path}: {exc.strerror}"
            ) from None
        return entries

    def append(self, until: int, key: bytes) -> None:
        """Record one entry; ``CryptoError`` if it cannot be written (refuse, then)."""
        if len(key) != self.key_size:
            raise ValueError(f"replay key is {len(key)} bytes, expected {self.key_size}")
        try:
            os.write(self._fd, until.to_bytes(_UNTIL_SIZE, "big") + key)
        except OSError as exc:
            raise CryptoError(f"replay cache {self.path.name} cannot be written: {exc}") from None
        self._records += 1

    def compact(self, live: int, entries: Callable[[], Iterable[tuple[int, bytes]]]) -> None:
        """Rewrite the file with ``entries()`` once it holds well over ``live`` records."""
        if self._records > 2 * live + COMPACT_SLACK:
            try:
                self.rewrite(entries())
            except OSError as exc:
                raise CryptoError(
                    f"replay cache {self.path.name} cannot be rewritten: {exc}"
                ) from None

    def rewrite(self, entries: Iterable[tuple[int, bytes]]) -> None:
        """Replace the file by one holding ``entries`` only, atomically."""
        data = b"".join(until.to_bytes(_UNTIL_SIZE, "big") + key for until, key in entries)
        try:
            atomic_write(self.path, data, mode=PRIVATE_FILE_MODE)
        except StorageError as exc:
            raise OSError(str(exc)) from None  # the callers name the cache and the phase
        self._open(len(data) // self.record_size)

    def _open(self, records: int) -> None:
        self.close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._records = records

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def peer_replay_files(state_dir: Path | None) -> tuple[ReplayFile | None, ReplayFile | None]:
    """The files backing a peer's two replay caches (codes, requests); None without a
    state directory (the caches then live in memory only)."""
    if state_dir is None:
        return None, None
    return ReplayFile(Path(state_dir) / CODES_FILE, 16), ReplayFile(
        Path(state_dir) / REQUESTS_FILE, 32
    )
