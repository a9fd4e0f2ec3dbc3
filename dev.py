#!/usr/bin/env python3
"""One-command set-up for anomos: needs only python3.

    python3 dev.py demo     # the main job: an anonymous transfer on loopback
    python3 dev.py test     # lint, type check and the whole test suite

Both create ``.venv`` on first use and install anomos into it. ``test`` also
installs the Debian packages in APT_PACKAGES when they are missing and we are
root (the Tor, network-namespace, WAN, NAT, UPnP, transmission-remote and browser
tests need them); extra arguments go to ``anomos demo`` or to ``pytest``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
#: Debian package -> the program that shows it is installed.
APT_PACKAGES = {
    "tor": "tor",
    "iproute2": "ip",
    "iptables": "iptables",
    "transmission-cli": "transmission-remote",
    "chromium": "chromium",
    "chromium-driver": "chromedriver",
    "nftables": "nft",
    "miniupnpd-nftables": "miniupnpd",
    "gcc": "gcc",
}


def sh(*cmd: str | Path, **kw: object) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kw)  # type: ignore[call-overload]


def ensure_venv(extras: str) -> None:
    """Create .venv and (re)install anomos when setup.cfg changed."""
    stamp_text = (ROOT / "setup.cfg").read_bytes() + extras.encode()
    stamp = VENV / f".installed-{hashlib.sha256(stamp_text).hexdigest()[:16]}"
    if stamp.exists():
        return
    if not (BIN / "python").exists():
        print("+ creating .venv", flush=True)
        venv.create(VENV, with_pip=True)
    sh(BIN / "python", "-m", "pip", "install", "-q", "--upgrade", "pip")
    target = f".[{extras}]" if extras else "."
    sh(BIN / "python", "-m", "pip", "install", "-q", "-e", target)
    for old in VENV.glob(".installed-*"):
        old.unlink()
    stamp.touch()


def ensure_apt_packages() -> None:
    """The Debian packages the tests need (root only; otherwise those tests skip)."""
    missing = [p for p, exe in APT_PACKAGES.items() if not shutil.which(exe)]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(
            f"note: {', '.join(missing)} missing and cannot be installed here; "
            "the tests that need them will be skipped",
            flush=True,
        )
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sh("apt-get", "update", "-qq", env=env)
    sh("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing, env=env)


def demo(args: list[str]) -> int:
    ensure_venv("")
    return subprocess.call([str(BIN / "anomos"), "demo", *args], cwd=ROOT)


def test(args: list[str]) -> int:
    ensure_venv("test")
    ensure_apt_packages()
    sh(BIN / "ruff", "check", "anomos", "tests", "plugins-contrib", "dev.py")
    sh(BIN / "ruff", "format", "--check", "anomos", "tests", "plugins-contrib", "dev.py")
    sh(BIN / "mypy")
    return subprocess.call([str(BIN / "python"), "-m", "pytest", *args], cwd=ROOT)


def main() -> int:
    commands = {"demo": demo, "test": test}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(__doc__)
        return 2
    try:
        return commands[sys.argv[1]](sys.argv[2:])
    except subprocess.CalledProcessError as exc:
        return exc.returncode or 1


if __name__ == "__main__":
    sys.exit(main())
