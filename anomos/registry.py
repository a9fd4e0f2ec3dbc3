"""Named registries filled by the ``anomos_register_*`` hooks.

A plugin adds a factory under a unique name; the core looks it up by the name
the user configured. Duplicate names are refused so two plugins never silently
shadow each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from anomos.errors import ConfigError, PluginError

T = TypeVar("T")


class Registry(Generic[T]):
    """Factories of one kind (transport, path policy, ...) keyed by name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._owners: dict[str, str] = {}

    def add(self, name: str, factory: T, *, owner: str | None = None) -> None:
        """Register ``factory`` as ``name``; a second plugin using the name is an error."""
        owner = owner or getattr(factory, "__module__", None) or "?"
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise PluginError(f"invalid {self.kind} name {name!r} from {owner}")
        if name in self._items:
            raise PluginError(
                f"{self.kind} {name!r} registered twice ({self._owners[name]} and {owner})"
            )
        self._items[name] = factory
        self._owners[name] = owner

    def get(self, name: str) -> T:
        """The factory registered as ``name``; a clear error lists the known names."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise ConfigError(f"unknown {self.kind} {name!r} (available: {known})") from None

    def owner(self, name: str) -> str:
        return self._owners[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
