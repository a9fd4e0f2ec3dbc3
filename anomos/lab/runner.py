"""Run every (policy, seed) of an experiment, in this process or in ``jobs`` worker processes.

A worker (``python -m anomos.lab.worker``) reads one job as JSON on standard
input and writes the run's figures as JSON; it loads the plugins as the
``anomos`` command does, so third-party policies run there too. Results are
folded in (policy, seed) order whatever order they finish in, so the report
does not depend on ``jobs``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from anomos.errors import AnomosError
from anomos.lab.experiment import Experiment, PolicySpec
from anomos.lab.report import aggregate
from anomos.lab.run import run_one
from anomos.pluginmanager import Plugins


def run_job(plugins: Plugins, exp: Experiment, spec: PolicySpec, seed: int) -> dict[str, Any]:
    policy = plugins.path_policy(spec.name, min_relays=spec.min_relays, max_relays=spec.max_relays)
    return run_one(exp, policy, seed)


def _in_worker(exp: Experiment, spec: PolicySpec, seed: int) -> dict[str, Any]:
    job = {"experiment": exp.as_json(), "policy": spec.label, "seed": seed}
    result = subprocess.run(
        [sys.executable, "-m", "anomos.lab.worker"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise AnomosError(f"lab worker for {spec.label} seed {seed} failed: {last}")
    figures: dict[str, Any] = json.loads(result.stdout)
    return figures


def run_experiment(
    plugins: Plugins, exp: Experiment, on_run: Callable[[], object] | None = None
) -> dict[str, Any]:
    """The aggregated report of ``exp`` (see :func:`anomos.lab.report.aggregate`)."""
    exp.check()
    specs = exp.policy_specs(plugins.path_policies.names())
    for spec in specs:  # refuse an unknown policy before running anything
        plugins.path_policy(spec.name, min_relays=spec.min_relays, max_relays=spec.max_relays)
    jobs = [(spec, seed) for spec in specs for seed in exp.seed_list]

    def one(job: tuple[PolicySpec, int]) -> dict[str, Any]:
        spec, seed = job
        if exp.jobs == 1:
            figures = run_job(plugins, exp, spec, seed)
        else:
            figures = _in_worker(exp, spec, seed)
        if on_run is not None:
            on_run()
        return figures

    if exp.jobs == 1:
        results = [one(job) for job in jobs]
    else:
        with ThreadPoolExecutor(max_workers=exp.jobs) as pool:
            results = list(pool.map(one, jobs))
    runs: dict[str, list[dict[str, Any]]] = {spec.label: [] for spec in specs}
    for (spec, _), figures in zip(jobs, results, strict=True):
        runs[spec.label].append(figures)
    report = aggregate(runs, exp)
    report["owners"] = {spec.label: plugins.path_policies.owner(spec.name) for spec in specs}
    return report
