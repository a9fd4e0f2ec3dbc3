"""atheris harness: anomos.protocol.onion.OnionReader.peel.

Run: ``python fuzz/fuzz_onion.py -atheris_runs=100000`` (or add a corpus folder;
without one, fuzz/corpus/onion/ is seeded from valid encodings). See docs/fuzzing.md.
"""

import atheris

with atheris.instrument_imports(include=["anomos", "fuzzlib"]):
    import fuzzlib

if __name__ == "__main__":
    fuzzlib.atheris_main(fuzzlib.TARGETS["onion"])
