"""The Tor tests inside a network namespace of their own, where the machine allows it.

A fresh namespace has nothing but its own loopback: the private Tor network,
the tracker and the peers of those tests cannot reach (or be reached from) any
other interface, and nothing else on the machine sees their ports. The outer
run skips every test marked ``tor`` (see conftest.py) and runs exactly those
tests here, in a child pytest under ``unshare --net``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import INSIDE_TOR_NETNS, tor_netns_unavailable

pytestmark = [pytest.mark.slow, pytest.mark.netns]

#: The child run holds every Tor test: several private Tor networks in a row.
TIMEOUT = 1800


@pytest.mark.timeout(TIMEOUT + 60)
def test_the_tor_tests_pass_in_their_own_network_namespace(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    reason = tor_netns_unavailable()
    if reason is not None:
        pytest.skip(f"the Tor tests run in this namespace instead: {reason}")
    tor_tests = [i.nodeid for i in request.session.items if i.get_closest_marker("tor")]
    if not tor_tests:
        pytest.skip("no test marked tor was selected")
    links = tmp_path / "links.txt"
    script = f'ip link set lo up && ip -o link show > "{links}" && exec "$@"'
    argv = [
        "unshare", "--net", "--", "sh", "-c", script, "sh",
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tor_tests,
    ]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, **{INSIDE_TOR_NETNS: "1"})
    result = subprocess.run(
        argv, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    # Every Tor test ran and passed in there (none skipped for want of tor).
    assert f"{len(tor_tests)} passed" in result.stdout, result.stdout[-3000:]
    # The namespace had one interface: its own loopback.
    interfaces = links.read_text().splitlines()
    assert len(interfaces) == 1 and ": lo:" in interfaces[0], interfaces
