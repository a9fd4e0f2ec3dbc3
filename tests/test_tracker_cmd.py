"""``anomos tracker`` as a real process: tracker.json, a working API, a clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from anomos.identity import PeerIdentity
from anomos.testing import anomos_cmd, loopback_host, run_anomos
from anomos.tracker.client import TrackerClient
from anomos.tracker.server import REACH_RECHECK_INTERVAL


@pytest.mark.slow
@pytest.mark.integration
def test_tracker_command_serves_and_stops_on_sigterm(tmp_path):
    state = tmp_path / "state"
    env = dict(os.environ, ANOMOS_PROGRESS="0")
    proc = subprocess.Popen(
        anomos_cmd("tracker", "--state", str(state), "--listen", "127.0.0.1:0", "--relays", "1-3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        info_path = state / "tracker.json"
        while not info_path.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "tracker.json never appeared"
            time.sleep(0.1)
        info = json.loads(info_path.read_text())
        assert info["url"].startswith("https://127.0.0.1:") and info["url"].endswith("/announce")
        assert len(info["fingerprint"]) == 64
        host = loopback_host()
        client = TrackerClient(
            info["url"], info["fingerprint"], PeerIdentity.generate(), source_host=host
        )
        reply = client.announce(f"{host}:7000", [], 0)
        assert reply.neighbours == ()
        # Reachability probing is on by default: asked back soon to hear the verdict.
        assert reply.reachable == "checking" and reply.interval == REACH_RECHECK_INTERVAL
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"tracker: {info['url']}" in out
    assert f"fingerprint: {info['fingerprint']}" in out
    assert "tracker stopped" in out


@pytest.mark.slow
@pytest.mark.integration
def test_tracker_command_refuses_bad_ranges(tmp_path):
    result = run_anomos(
        "tracker", "--state", str(tmp_path), "--listen", "127.0.0.1:0", "--relays", "4-2"
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "anomos: error: --relays '4-2' needs 0 <= MIN <= MAX"
    result = run_anomos(
        "tracker", "--state", str(tmp_path), "--listen", "127.0.0.1:0", "--relays", "0-2"
    )
    assert result.returncode == 2
    assert "relays 0-2: need 1 <= MIN <= MAX <= 7" in result.stderr
