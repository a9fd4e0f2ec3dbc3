"""Progress bars for every long operation (hashing, checking, transferring)."""

from __future__ import annotations

import os
import sys
from typing import Any, Protocol


class ProgressBar(Protocol):
    """What callers use of a tqdm bar."""

    n: float

    def update(self, n: float = 1) -> Any: ...

    def close(self) -> None: ...

    def __enter__(self) -> ProgressBar: ...

    def __exit__(self, *exc: object) -> Any: ...


class QuietBar:
    """A hidden bar: counts, shows nothing, and spares the launch tqdm's import (which
    reads its version through importlib.metadata: a tenth of a CPU-second)."""

    def __init__(self) -> None:
        self.n: float = 0

    def update(self, n: float = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass

    def __enter__(self) -> QuietBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def bar(
    total: int, desc: str, *, unit: str = "B", enabled: bool | None = None, **kw: Any
) -> ProgressBar:
    """A byte-scaled tqdm bar on standard error.

    Shown on a terminal; ``ANOMOS_PROGRESS=1`` forces it, ``=0`` hides it.
    """
    env = os.environ.get("ANOMOS_PROGRESS")
    if enabled is None:
        enabled = sys.stderr.isatty() if env is None else env == "1"
    if not enabled:
        return QuietBar()
    from tqdm import tqdm

    shown: ProgressBar = tqdm(  # (tqdm's stubs: its __exit__ takes three arguments)
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024,
        file=sys.stderr,
        dynamic_ncols=True,
        **kw,
    )  # type: ignore[assignment]
    return shown
