"""atheris harness: anomos.tracker.client reply parsing (announce, circuits).

Run: ``python fuzz/fuzz_tracker_client.py -atheris_runs=100000`` (or add a corpus folder;
without one, fuzz/corpus/tracker_client/ is seeded from valid encodings). See docs/fuzzing.md.
"""

import atheris

with atheris.instrument_imports(include=["anomos", "fuzzlib"]):
    import fuzzlib

if __name__ == "__main__":
    fuzzlib.atheris_main(fuzzlib.TARGETS["tracker_client"])
