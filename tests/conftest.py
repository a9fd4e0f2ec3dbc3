from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gevent import monkey

monkey.patch_all()

pytest.register_assert_rewrite("conftest_daemon")  # (its asserts say what failed)

pytest_plugins = ["anomos.testing"]

#: Set in the pytest run that test_tor_netns.py starts inside a fresh network namespace.
INSIDE_TOR_NETNS = "ANOMOS_INSIDE_TOR_NETNS"


def tor_netns_unavailable() -> str | None:
    """Why the Tor tests cannot get a network namespace of their own here, or None."""
    if os.environ.get(INSIDE_TOR_NETNS):
        return "already inside the Tor tests' network namespace"
    if os.geteuid() != 0:
        return "needs root to create a network namespace"
    for tool in ("unshare", "ip", "tor"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    probe = subprocess.run(
        ["unshare", "--net", "ip", "link", "set", "lo", "up"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"unshare --net failed: {probe.stderr.strip()}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Where the machine allows it, tests marked ``tor`` run in a network namespace of
    their own (tests/test_tor_netns.py), not here."""
    if tor_netns_unavailable() is not None:
        return
    skip = pytest.mark.skip(reason="runs in its own network namespace (test_tor_netns.py)")
    for item in items:
        if item.get_closest_marker("tor") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path, Path]]:
    """A tracker, 3 relays and a seeder of one file: (LocalNetwork, .atorrent, the file),
    for the tests that drive `anomos daemon` (tests/conftest_daemon.py)."""
    from conftest_daemon import seeded_network

    with seeded_network(tmp_path_factory.mktemp("daemonnet")) as seeded:
        yield seeded
