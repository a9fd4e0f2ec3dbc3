"""Which entry-point groups the installed distributions declare, read without importlib.metadata.

gevent (five scans for its plugin events while monkey-patching) and pluggy (our
third-party plugins) both ask :mod:`importlib.metadata` for entry points; each
ask imports it and parses every distribution's metadata: about 0.3 CPU-s of a
launch of ``anomos get`` here, for entry points that usually do not exist. The
``entry_points.txt`` files say as much for a directory listing and a few small
reads, so :func:`patch_all` and the plugin manager call the full machinery only
when a distribution declares such a group. Imports only ``os`` and ``sys``: it
runs before gevent patches anything.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

_DIST_SUFFIXES = (".dist-info", ".egg-info", ".egg")


def entry_point_groups(path: Iterable[str] | None = None) -> dict[str, set[str]] | None:
    """Distribution (as its metadata folder names it) -> the entry-point groups it declares,
    for every distribution on ``path`` (``sys.path``) that declares any.

    None when unsure (a zip or egg file on the path: only importlib.metadata looks inside).
    """
    found: dict[str, set[str]] = {}
    for entry in sys.path if path is None else path:
        folder = entry or "."
        try:
            with os.scandir(folder) as listing:
                infos = [e.name for e in listing if e.name.endswith(_DIST_SUFFIXES)]
        except NotADirectoryError:
            return None
        except OSError:  # a path entry that does not exist
            continue
        for name in infos:
            meta = os.path.join(folder, name, "EGG-INFO") if name.endswith(".egg") else None
            file = os.path.join(meta or os.path.join(folder, name), "entry_points.txt")
            try:
                with open(file, encoding="utf-8") as f:
                    groups = {
                        line.strip()[1:-1]
                        for line in f
                        if line.lstrip().startswith("[") and line.rstrip().endswith("]")
                    }
            except (OSError, UnicodeDecodeError):  # none, or a metadata *file* (old egg-info)
                continue
            if groups:
                dist = name.rsplit(".", 1)[0].split("-", 1)[0].lower()
                found.setdefault(dist, set()).update(groups)
    return found


#: The last scan of ``sys.path``, keyed by each entry's modification time (a
#: distribution installed or removed there changes its folder's).
_last_scan: tuple[tuple[tuple[str, int], ...], dict[str, set[str]] | None] | None = None


def _path_state() -> tuple[tuple[str, int], ...]:
    state = []
    for entry in sys.path:
        try:
            state.append((entry, os.stat(entry or ".").st_mtime_ns))
        except OSError:
            state.append((entry, -1))
    return tuple(state)


def _sys_path_groups() -> dict[str, set[str]] | None:
    """:func:`entry_point_groups` of ``sys.path``, read once while no folder on it changes
    (gevent's patching and the plugin manager both ask at every launch)."""
    global _last_scan
    state = _path_state()
    if _last_scan is None or _last_scan[0] != state:
        _last_scan = (state, entry_point_groups())
    return _last_scan[1]


def declared(group: str, *, prefix: bool = False, ignore: Iterable[str] = ()) -> bool:
    """Whether a distribution on ``sys.path`` (other than those in ``ignore``) may declare
    entry points in ``group`` (with ``prefix``: in any group whose name starts so)."""
    found = _sys_path_groups()
    if found is None:
        return True
    skip = {name.lower() for name in ignore}
    return any(
        (declared.startswith(group) if prefix else declared == group)
        for dist, groups in found.items()
        if dist not in skip
        for declared in groups
    )


def patch_all() -> None:
    """``gevent.monkey.patch_all()``; without its entry-point scans when no distribution
    but gevent itself subscribes to its patch events (gevent's own subscriber only
    warns about patching signal without os, which ``patch_all`` never does).

    The events still reach subscribers registered in code (``zope.event``).
    """
    import gevent.events
    from gevent import monkey

    if declared("gevent.plugins.", prefix=True, ignore=("gevent",)):
        monkey.patch_all()
        return
    scan = gevent.events.notify_and_call_entry_points
    gevent.events.notify_and_call_entry_points = gevent.events.notify
    try:
        monkey.patch_all()
    finally:
        gevent.events.notify_and_call_entry_points = scan
