"""What ``anomos lab`` runs: one checked, frozen description, from TOML or flags."""

from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import Any

import attrs

from anomos.config import read_toml as read_toml_file
from anomos.errors import ConfigError
from anomos.tracker.graph import MAX_RELAYS
from anomos.tracker.simulate import MAX_NEIGHBOURS, MAX_SEED, MIN_PEERS

#: Bounds that keep one experiment meaningful and finite.
MAX_PEERS = 200_000
MAX_DAYS = 365.0
MAX_DOWNLOADS_PER_DAY = 100.0
MAX_CIRCUITS_PER_DOWNLOAD = 16
MAX_SEEDS = 30
MAX_FRACTIONS = 12
MAX_TARGETS = 10_000
MAX_ROUNDS = 10_000
MAX_JOBS = 64
#: Largest TOML file read (an experiment is a few lines).
MAX_CONFIG_BYTES = 64 * 1024


class Adversary(enum.Enum):
    """How the colluding peers are placed (docs/research.md, "Adversaries")."""

    #: a random share of the peers present from the start
    RANDOM = "random"
    #: new peers that all join at ``sybil_hours``
    SYBIL = "sybil"
    #: the peers the policy itself uses most as relays during a warm-up
    CAPACITY = "capacity"


def _fractions(value: Any) -> tuple[float, ...]:
    if isinstance(value, str):
        try:
            value = [float(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"colluding {value!r}: need fractions like 0.01,0.05,0.1") from None
    return tuple(sorted({float(v) for v in value}))


@attrs.frozen
class PolicySpec:
    """A policy to compare: a registered name, optionally with its own relay bounds."""

    name: str
    min_relays: int
    max_relays: int
    #: how the policy was named: ``guard`` or ``guard:2-3``
    label: str

    @classmethod
    def parse(cls, text: str, min_relays: int, max_relays: int) -> PolicySpec:
        """``NAME`` (the experiment's relay bounds) or ``NAME:MIN-MAX``."""
        name, sep, bounds = text.partition(":")
        if sep:
            min_relays, max_relays = _range(bounds, f"policy {text!r}")
        if not 1 <= min_relays <= max_relays <= MAX_RELAYS:
            raise ConfigError(f"policy {text!r}: need 1 <= MIN <= MAX <= {MAX_RELAYS} relays")
        return cls(name, min_relays, max_relays, text)


@attrs.frozen
class Experiment:
    """One experiment: network, churn, demand, policies, adversary and seeds."""

    peers: int = 1000
    min_neighbours: int = 4
    max_neighbours: int = 6
    min_relays: int = 2
    max_relays: int = 4
    #: policy names (empty: every registered one)
    policies: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    #: colluding fractions c; colluder sets are nested (the set for c is in the set for c' > c)
    colluding: tuple[float, ...] = attrs.field(default=(0.01, 0.05, 0.1, 0.2), converter=_fractions)
    adversary: Adversary = attrs.field(default=Adversary.RANDOM, converter=Adversary)
    #: simulated hour at which the sybil group joins
    sybil_hours: float = 24.0
    days: float = 7.0
    downloads_per_day: float = 1.0
    #: circuits a download asks for (a peer keeps 4 sources, DEFAULT_SOURCES)
    circuits_per_download: int = 4
    #: mean online session and offline gap of an honest peer, hours; 0: no churn
    session_hours: float = 0.0
    offline_hours: float = 8.0
    #: downloaders the predecessor attack follows, and its rounds at most
    targets: int = 100
    rounds: int = 200
    seed: int = 1
    seeds: int = 3
    #: processes running (policy, seed) pairs at once; 1: in this process
    jobs: int = 1

    def check(self) -> None:
        """Refuse meaningless or endless experiments with one line naming the value."""
        if not MIN_PEERS <= self.peers <= MAX_PEERS:
            raise ConfigError(f"peers {self.peers}: need {MIN_PEERS} <= N <= {MAX_PEERS:,}")
        if not 1 <= self.min_neighbours <= self.max_neighbours <= MAX_NEIGHBOURS:
            raise ConfigError(
                f"neighbours {self.min_neighbours}-{self.max_neighbours}: "
                f"need 1 <= MIN <= MAX <= {MAX_NEIGHBOURS}"
            )
        if not 1 <= self.min_relays <= self.max_relays <= MAX_RELAYS:
            raise ConfigError(
                f"relays {self.min_relays}-{self.max_relays}: need 1 <= MIN <= MAX <= {MAX_RELAYS}"
            )
        if not self.colluding or len(self.colluding) > MAX_FRACTIONS:
            raise ConfigError(f"colluding: need 1 to {MAX_FRACTIONS} fractions")
        if not all(0 < c < 1 for c in self.colluding):
            raise ConfigError(f"colluding {list(self.colluding)}: need 0 < c < 1")
        if max(self.colluding) * self.peers > self.peers - 2:
            raise ConfigError("colluding: leave at least 2 honest peers")
        checks = (
            ("days", self.days, 0.0, MAX_DAYS),
            ("downloads-per-day", self.downloads_per_day, 0.0, MAX_DOWNLOADS_PER_DAY),
            ("session-hours", self.session_hours, 0.0, MAX_DAYS * 24),
            ("offline-hours", self.offline_hours, 0.0, MAX_DAYS * 24),
            ("sybil-hours", self.sybil_hours, 0.0, MAX_DAYS * 24),
        )
        for name, value, low, high in checks:
            if not (math.isfinite(value) and low <= value <= high):
                raise ConfigError(f"{name} {value:g}: need {low:g} <= X <= {high:g}")
        if self.days <= 0 or self.downloads_per_day <= 0:
            raise ConfigError("days and downloads-per-day must be above 0")
        ints = (
            ("circuits-per-download", self.circuits_per_download, MAX_CIRCUITS_PER_DOWNLOAD),
            ("targets", self.targets, MAX_TARGETS),
            ("rounds", self.rounds, MAX_ROUNDS),
            ("seeds", self.seeds, MAX_SEEDS),
            ("jobs", self.jobs, MAX_JOBS),
        )
        for name, number, high in ints:
            if not 1 <= number <= high:
                raise ConfigError(f"{name} {number}: need 1 <= N <= {high:,}")
        if not 0 <= self.seed <= MAX_SEED - MAX_SEEDS:
            raise ConfigError(f"seed {self.seed}: need 0 <= N < 2**63-{MAX_SEEDS}")

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]

    def policy_specs(self, registered: list[str]) -> list[PolicySpec]:
        """The policies to compare (every registered one when none was named)."""
        names = self.policies or tuple(registered)
        specs = [PolicySpec.parse(text, self.min_relays, self.max_relays) for text in names]
        return list({spec.label: spec for spec in specs}.values())

    def as_json(self) -> dict[str, Any]:
        """Every setting but ``jobs``, which changes how long a run takes, never its figures."""
        return attrs.asdict(
            self,
            filter=lambda a, _: a.name != "jobs",
            value_serializer=lambda _, __, v: v.value if isinstance(v, enum.Enum) else v,
        )


#: TOML keys (dashes or underscores) -> Experiment field.
FIELDS = {f.name for f in attrs.fields(Experiment)}


def from_mapping(values: dict[str, Any], base: Experiment | None = None) -> Experiment:
    """An experiment from ``values`` (TOML or flags) over ``base``; unknown keys refused."""
    changes: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in ("neighbours", "relays"):
            low, high = _range(value, key)
            changes[f"min_{name}"], changes[f"max_{name}"] = low, high
        elif name in FIELDS:
            changes[name] = _typed(name, value)
        else:
            raise ConfigError(f"unknown experiment setting {key!r}")
    try:
        experiment = attrs.evolve(base or Experiment(), **changes)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"experiment: {exc}") from None
    experiment.check()
    return experiment


def _typed(name: str, value: Any) -> Any:
    """``value`` if it has the setting's type (a TOML file may hold anything)."""
    default = getattr(Experiment(), name)
    key = name.replace("_", "-")
    if isinstance(default, bool | Adversary | tuple) or name == "colluding":
        if isinstance(default, tuple) and not isinstance(value, list | tuple | str):
            raise ConfigError(f"experiment: {key} {value!r} is not a list")
        if name == "policies":
            value = [value] if isinstance(value, str) else value  # (one name, not its letters)
            if not all(isinstance(v, str) for v in value):
                raise ConfigError(f"experiment: policies {value!r} are not names")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"experiment: {key} {value!r} is not a number")
    if isinstance(default, int) and not isinstance(value, int):
        raise ConfigError(f"experiment: {key} {value!r} is not a whole number")
    return value


def _range(value: Any, key: str) -> tuple[int, int]:
    """``MIN-MAX`` (a string, or a list of two whole numbers in a TOML file)."""
    try:
        if isinstance(value, list):
            low, high = (int(v) for v in value)
        elif isinstance(value, str):
            low_s, _, high_s = value.partition("-")
            low, high = int(low_s), int(high_s or low_s)
        else:
            raise ValueError(value)
    except (TypeError, ValueError):  # (TypeError: a list holding a table, ...)
        raise ConfigError(f"{key} {str(value)[:100]!r}: need MIN-MAX") from None
    return low, high


def load(path: Path) -> Experiment:
    """The experiment a TOML file describes (top-level keys, or an ``[experiment]`` table)."""
    return from_mapping(read_toml(path))


def read_toml(path: Path) -> dict[str, Any]:
    """The settings a TOML experiment file holds, unchecked (bounded in size)."""
    try:
        data = read_toml_file(path, "experiment", MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise ConfigError(f"cannot read experiment {path}: no such file") from None
    table = data.get("experiment", data)
    if not isinstance(table, dict):
        raise ConfigError(f"experiment {path}: [experiment] is not a table")
    return table


#: ``anomos lab --preset NAME``: experiments worth a name.
PRESETS: dict[str, dict[str, Any]] = {
    # the speed target: 10,000 peers, 7 days, 3 policies, 3 seeds
    "bench": {
        "peers": 10_000,
        "days": 7.0,
        "policies": ["weighted", "guard", "original"],
        "seeds": 3,
        "downloads_per_day": 0.25,
        "jobs": 2,
    },
    # docs/research.md's table
    "research": {
        "peers": 1000,
        "days": 7.0,
        "policies": ["original", "fixed", "random-walk", "weighted", "guard", "guard:2-3"],
        "downloads_per_day": 0.5,
        "seeds": 5,
        "targets": 30,
        "rounds": 60,
        "jobs": 2,
    },
}
