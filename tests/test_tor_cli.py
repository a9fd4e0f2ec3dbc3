"""``anomos testnet tor`` as a real process: it comes up, and SIGTERM leaves no tor behind."""

from __future__ import annotations

import os
import signal
import subprocess

import gevent
import psutil
import pytest
from conftest_tor import skip_without_tor

from anomos.testing import anomos_cmd, run_anomos

READY_TIMEOUT = 200.0


def test_testnet_help_and_refusal_of_a_too_small_network(tmp_path):
    result = run_anomos("testnet", "tor", "--help")
    assert result.returncode == 0, result.stderr
    assert "--dir" in result.stdout and "SIGTERM" in result.stdout
    result = run_anomos(
        "testnet", "tor", "--dir", str(tmp_path), "--relays", "0", "--authorities", "2"
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "anomos: error: a private Tor network needs at least 1 authority and 3 routers in all "
        "(circuits have three hops)"
    ]


@pytest.mark.tor
@pytest.mark.slow
@pytest.mark.integration
@skip_without_tor
def test_sigterm_stops_every_tor(tmp_path):
    # the verified shape (3 authorities, 2 relays): a 1-authority network sometimes
    # failed to bootstrap its client in time on a loaded machine
    argv = anomos_cmd("testnet", "tor", "--dir", str(tmp_path / "net"), "--timeout", "180")
    env = dict(os.environ, ANOMOS_PROGRESS="0")
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    lines: list[str] = []
    try:
        with gevent.Timeout(READY_TIMEOUT):
            while not (lines and lines[-1].startswith("ready")):
                line = proc.stdout.readline()
                assert line, f"testnet exited early: {proc.wait()} {proc.stderr.read()}"
                lines.append(line.strip())
        assert lines[0].startswith("socks: 127.0.0.1:")
        assert any(line.startswith("client control: 127.0.0.1:") for line in lines)
        assert any(line.startswith("service control: 127.0.0.1:") for line in lines)
        tors = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "tor"]
        assert len(tors) == 7  # 3 authorities, 2 relays, client, onion service
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        _gone, alive = psutil.wait_procs(tors, timeout=10)
        assert alive == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.tor
@pytest.mark.slow
@pytest.mark.integration
@skip_without_tor
def test_sigterm_during_startup_stops_every_tor(tmp_path):
    argv = anomos_cmd("testnet", "tor", "--dir", str(tmp_path / "net"))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        tors: list[psutil.Process] = []
        with gevent.Timeout(READY_TIMEOUT):
            while not tors:  # the authorities and relays are up, the network is not ready
                gevent.sleep(0.1)
                tors = [p for p in psutil.Process(proc.pid).children() if p.name() == "tor"]
        gevent.sleep(0.5)
        tors = [p for p in psutil.Process(proc.pid).children() if p.name() == "tor"]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "interrupted before the Tor network was ready" in err
        assert "ready" not in out
        _gone, alive = psutil.wait_procs(tors, timeout=10)
        assert alive == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
