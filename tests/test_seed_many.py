"""``anomos seed A.atorrent B.atorrent ...``: one peer process seeds several torrents."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from anomos.localnet import LocalNetwork
from anomos.testing import run_anomos
from anomos.torrent.metainfo import make_metainfo

FP = "ab" * 32


def share(folder: Path, name: str, size: int) -> Path:
    path = folder / name
    path.write_bytes(os.urandom(size))
    return path


@pytest.mark.slow
@pytest.mark.integration
def test_one_seeder_process_serves_two_torrents(tmp_path: Path) -> None:
    folder = tmp_path / "share"
    folder.mkdir()
    files = [share(folder, "one.bin", 700_000), share(folder, "two.bin", 900_000)]
    with LocalNetwork(tmp_path / "net") as net:
        net.start_tracker("--relays", "1-2")
        torrents = []
        for f in files:
            out = tmp_path / f"{f.stem}.atorrent"
            make_metainfo(
                f, trackers=[net.tracker_url], fingerprint=net.fingerprint, progress=False
            ).save(out)
            torrents.append(str(out))
        for i in range(3):
            net.start_peer(f"relay{i}", "relay")
        seeder = net.start_peer("seeder", "seed", *torrents, "--data", str(folder))
        time.sleep(4.0)  # let the edges settle (see test_network)
        getters = [
            net.start_peer(
                f"get{i}", "get", t, "--dest", str(tmp_path / f"dest{i}"), "--timeout", "60",
                wait=False,
            )
            for i, t in enumerate(torrents)
        ]  # fmt: skip
        for g in getters:
            assert g.popen.wait(90) == 0, g.log_tail()
        assert seeder.alive()
        log = seeder.log_path.read_text()
    for i, f in enumerate(files):
        assert (tmp_path / f"dest{i}" / f.name).read_bytes() == f.read_bytes()
        assert f"seeding {f.name}" in log


def test_seed_refuses_torrents_of_different_trackers_and_duplicates(tmp_path: Path) -> None:
    folder = tmp_path / "share"
    folder.mkdir()
    f = share(folder, "one.bin", 1000)
    a, b = tmp_path / "a.atorrent", tmp_path / "b.atorrent"
    make_metainfo(
        f, trackers=["https://127.0.0.1:1/announce"], fingerprint=FP, progress=False
    ).save(a)
    make_metainfo(
        f, trackers=["https://127.0.0.2:1/announce"], fingerprint=FP, progress=False
    ).save(b)
    common = ["--data", str(folder), "--state", str(tmp_path / "s")]
    result = run_anomos("seed", str(a), str(b), *common)
    assert result.returncode == 2
    assert "names another tracker" in result.stderr and len(result.stderr.splitlines()) == 1
    result = run_anomos("seed", str(a), str(a), *common)
    assert result.returncode == 2
    assert "the same torrent is given twice" in result.stderr
