"""Path policy ``original``: always exactly 2 relays, as the original Anomos (2008-2010) planned.

Its path search could only produce 2 relays (a bug, docs/research.md), so
every relay knew it was next to an end. Kept for comparison only, like the
``classic`` cipher suite: ``anomos lab`` measures what that cost. The
``--relays`` bounds are checked but ignored.
"""

from __future__ import annotations

from typing import Any, ClassVar

from anomos import hookimpl
from anomos.plugins.paths.fixed import FixedPolicy

#: Relays on every circuit of the original Anomos.
ORIGINAL_RELAYS = 2


class OriginalPolicy(FixedPolicy):
    """Exactly 2 relays, uniform choice at each step, whatever the bounds."""

    name: ClassVar[str] = "original"

    def __init__(self, *, min_relays: int = 2, max_relays: int = 4) -> None:
        super().__init__(min_relays=min_relays, max_relays=max_relays)
        self.relays = ORIGINAL_RELAYS


@hookimpl
def anomos_register_path_policies(registry: Any) -> None:
    registry.add(OriginalPolicy.name, OriginalPolicy)
