"""``python -m anomos.lab.worker``: one (policy, seed) run of ``anomos lab`` in its own process.

Reads ``{"experiment": {...}, "policy": LABEL, "seed": N}`` on standard
input and writes the run's figures as JSON on standard output.
"""

from __future__ import annotations

import json
import sys

from anomos.lab.experiment import PolicySpec, from_mapping
from anomos.lab.runner import run_job
from anomos.pluginmanager import get_plugins


def main() -> int:
    job = json.loads(sys.stdin.read())
    exp = from_mapping(job["experiment"])
    spec = PolicySpec.parse(job["policy"], exp.min_relays, exp.max_relays)
    figures = run_job(get_plugins(), exp, spec, int(job["seed"]))
    sys.stdout.write(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
