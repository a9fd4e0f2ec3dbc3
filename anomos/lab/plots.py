"""The lab's PNG figures (matplotlib, the ``lab`` extra: ``pip install anomos[lab]``).

- ``lab-compromise.png``: compromise against c per policy, per circuit and
  users ever compromised, with 95 % confidence bands over seeds;
- ``lab-over-time.png``: share of downloaders compromised over the simulated
  days, at one c, with bands (the CDF of the time to first compromise);
- ``lab-predecessor.png``: share of followed downloaders the predecessor
  attack has named after each round, at the same c.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anomos.errors import ConfigError

#: The c of the over-time and predecessor figures: the one closest to this.
FOCUS_C = 0.1
FILES = ("lab-compromise.png", "lab-over-time.png", "lab-predecessor.png")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "--plots needs matplotlib: pip install 'anomos[lab]' (or matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def focus_index(colluding: list[float]) -> int:
    return min(range(len(colluding)), key=lambda i: (abs(colluding[i] - FOCUS_C), i))


def _band(ax: Any, xs: list[float], stats: list[dict[str, Any]], label: str, scale: float) -> None:
    pts = [(x, s) for x, s in zip(xs, stats, strict=True) if s["mean"] is not None]
    if not pts:
        return
    x = [p[0] for p in pts]
    mean = [p[1]["mean"] * scale for p in pts]
    low = [(p[1]["mean"] - p[1]["ci95"]) * scale for p in pts]
    high = [(p[1]["mean"] + p[1]["ci95"]) * scale for p in pts]
    (line,) = ax.plot(x, mean, marker="o" if len(x) < 20 else None, label=label)
    ax.fill_between(x, low, high, alpha=0.2, color=line.get_color())


def write_plots(report: dict[str, Any], folder: Path) -> list[Path]:
    """Write the three figures of ``report`` into ``folder``; their paths."""
    plt = _pyplot()
    if not folder.is_dir():
        raise ConfigError(f"--plots {folder}: no such folder")
    exp = report["experiment"]
    cs = list(exp["colluding"])
    focus = focus_index(cs)
    caption = (
        f"{exp['peers']:,} peers, {exp['days']:g} days, adversary {exp['adversary']}, "
        f"{exp['seeds']} seeds (95 % CI)"
    )
    paths = [folder / name for name in FILES]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, r in report["policies"].items():
        _band(left, cs, r["circuit_compromise"], label, 100)
        _band(right, cs, r["users_compromised"], label, 100)
    left.set(xlabel="colluding fraction c", ylabel="circuits compromised (%)",
             title="per circuit")  # fmt: skip
    right.set(xlabel="colluding fraction c", ylabel="downloaders ever compromised (%)",
              title=f"per downloader, {exp['days']:g} days")  # fmt: skip
    _save(plt, fig, (left, right), caption, paths[0])

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, r in report["policies"].items():
        curve = r["compromised_over_time"][focus]
        _band(ax, [(h + 1) / 24 for h in range(len(curve))], curve, label, 100)
    ax.set(xlabel="simulated days", ylabel="downloaders compromised (%)",
           title=f"time to first compromise, c = {cs[focus]:g}")  # fmt: skip
    _save(plt, fig, (ax,), caption, paths[1])

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rounds = exp["rounds"]
    for label, r in report["policies"].items():
        pooled = [x for per_seed in r["pred_rounds"][focus] for x in per_seed]
        if not pooled:
            continue
        xs = list(range(rounds + 1))
        named = sorted(x for x in pooled if x is not None)
        ys, j = [], 0
        for x in xs:
            while j < len(named) and named[j] <= x:
                j += 1
            ys.append(100 * j / len(pooled))
        ax.step(xs, ys, where="post", label=label)
    ax.set(xlabel="rounds (circuits re-planned to one source)", ylabel="downloaders named (%)",
           title=f"predecessor attack, c = {cs[focus]:g}")  # fmt: skip
    _save(plt, fig, (ax,), caption, paths[2])
    return paths


def _save(plt: Any, fig: Any, axes: tuple[Any, ...], caption: str, path: Path) -> None:
    """Grid and legend on each of ``axes``, the caption on top; written to ``path``."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
