"""atheris harness: anomos.bencode.decode.

Run: ``python fuzz/fuzz_bencode.py -atheris_runs=100000`` (or add a corpus folder;
without one, fuzz/corpus/bencode/ is seeded from valid encodings). See docs/fuzzing.md.
"""

import atheris

with atheris.instrument_imports(include=["anomos", "fuzzlib"]):
    import fuzzlib

if __name__ == "__main__":
    fuzzlib.atheris_main(fuzzlib.TARGETS["bencode"])
