"""Run every atheris harness in fuzz/ for a fixed time each and summarise.

    .venv/bin/python fuzz/run_all.py --seconds 60          # all harnesses
    .venv/bin/python fuzz/run_all.py --seconds 10 onion e2e

Each harness runs in its own process with its seeded corpus in
fuzz/corpus/NAME/ (kept between runs, so coverage accumulates) and writes any
crashing input to fuzz/artifacts/NAME-crash-<sha1>. Exit status 1 if any
harness found something. See docs/fuzzing.md.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_DONE = re.compile(r"Done (\d+) (?:runs )?in (\d+) second")
_COV = re.compile(r"cov: (\d+) ft: (\d+) corp: (\d+)")


def harnesses() -> dict[str, Path]:
    return {p.stem.removeprefix("fuzz_"): p for p in sorted(HERE.glob("fuzz_*.py"))}


def run_one(name: str, path: Path, seconds: int, extra: list[str]) -> tuple[bool, str]:
    """(clean, one-line summary) for one harness."""
    artifacts = HERE / "artifacts"
    artifacts.mkdir(exist_ok=True)
    corpus = HERE / "corpus" / name
    cmd = [
        sys.executable,
        str(path),
        f"-max_total_time={seconds}",
        f"-artifact_prefix={artifacts}/{name}-",
        "-print_final_stats=1",
        *extra,
        str(corpus),
    ]
    # The harness seeds the corpus itself only when given no folder: do it here.
    sys.path.insert(0, str(HERE))
    import fuzzlib

    fuzzlib.write_seeds(fuzzlib.TARGETS[name], str(corpus))
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
    took = time.monotonic() - start
    log = proc.stdout + proc.stderr
    (artifacts / f"{name}.log").write_text(log)
    runs = _DONE.findall(log)
    cov = _COV.findall(log)
    stats = f"{runs[-1][0]} runs" if runs else "? runs"
    if cov:
        stats += f", cov {cov[-1][0]}, corpus {cov[-1][2]}"
    if proc.returncode == 0:
        return True, f"{name:15} ok      {stats} in {took:.0f} s"
    where = re.findall(r"Test unit written to (\S+)", log)
    reason = next(
        (line.strip() for line in log.splitlines() if "Uncaught Python exception" in line),
        f"exit status {proc.returncode}",
    )
    found = where[-1] if where else f"see {artifacts / (name + '.log')}"
    return False, f"{name:15} FINDING {stats}: {reason} -> {found}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="time per harness")
    parser.add_argument("names", nargs="*", help="harnesses to run (default: all)")
    parser.add_argument("--libfuzzer", action="append", default=[], help="extra -flag=value")
    args = parser.parse_args()
    found = harnesses()
    unknown = [n for n in args.names if n not in found]
    if unknown:
        parser.error(f"unknown harness {', '.join(unknown)}; have {', '.join(found)}")
    clean = True
    for name in args.names or list(found):
        ok, line = run_one(name, found[name], args.seconds, args.libfuzzer)
        print(line, flush=True)
        clean &= ok
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
