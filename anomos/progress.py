"""Progress bars for every long operation (hashing, checking, transferring)."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm import tqdm


def bar(total: int, desc: str, *, unit: str = "B", enabled: bool | None = None, **kw: Any) -> tqdm:
    """A byte-scaled tqdm bar on standard error.

    Shown on a terminal; ``ANOMOS_PROGRESS=1`` forces it, ``=0`` hides it.
    """
    env = os.environ.get("ANOMOS_PROGRESS")
    if enabled is None:
        enabled = sys.stderr.isatty() if env is None else env == "1"
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        **kw,
    )
