"""atheris harness: the tracker's request handling (Tracker.wsgi), raw and signed bodies.

Run: ``python fuzz/fuzz_tracker_server.py -atheris_runs=100000`` (or add a corpus
folder; without one, fuzz/corpus/tracker_server/ is seeded from valid requests).
A 500 answer counts as a crash. See docs/fuzzing.md.
"""

import atheris

with atheris.instrument_imports(include=["anomos", "fuzzlib"]):
    import fuzzlib

    fuzzlib.tracker_harness()  # loads the path and cipher plugins while instrumenting

if __name__ == "__main__":
    fuzzlib.atheris_main(fuzzlib.TARGETS["tracker_server"])
