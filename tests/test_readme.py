"""The README's shell examples run as pasted."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

README = Path(__file__).resolve().parent.parent / "README.md"


def shell_block(heading: str) -> str:
    """The first ```sh block after ``heading`` in README.md."""
    text = README.read_text()
    match = re.search(re.escape(heading) + r"\n.*?```sh\n(.*?)```", text, re.S)
    assert match, f"no sh block after {heading!r} in README.md"
    return match.group(1)


def venv_here(workdir: Path) -> None:
    """``.venv`` in ``workdir`` standing for the checkout's (this interpreter's) venv."""
    bin_dir = Path(sys.executable).parent
    if shutil.which("anomos", path=str(bin_dir)) is None:
        pytest.skip(f"no anomos script next to {sys.executable}")
    venv = workdir / ".venv"
    if (bin_dir / "activate").exists():
        venv.symlink_to(bin_dir.parent)
    else:
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "activate").write_text(f'PATH="{bin_dir}:$PATH"\n')


def test_a_network_by_hand_runs_as_pasted(tmp_path: Path) -> None:
    """It failed as written: anomos not on PATH, tracker.json read before it existed,
    no file to share, six background jobs left running."""
    script = shell_block("### A network by hand")
    venv_here(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # anomos only through the README's own steps
    env["ANOMOS_PROGRESS"] = "0"
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the README's network did not finish in 300 s:\n{out[-2000:]}\n{err[-2000:]}")
    finally:
        try:
            os.killpg(proc.pid, 0)
            leftover = True
        except ProcessLookupError:
            leftover = False
        if leftover:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert "downloaded intact" in out, out[-2000:] + err[-3000:]
    assert (tmp_path / "downloads" / "song.ogg").read_bytes() == (
        tmp_path / "song.ogg"
    ).read_bytes()
    assert not leftover, "the README left background processes running"
    assert "Traceback" not in err, err[-3000:]
