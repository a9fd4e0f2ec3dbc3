"""atheris harness: anomos.protocol.e2e: decode_hello, decode_reply, E2EChannel.open.

Run: ``python fuzz/fuzz_e2e.py -atheris_runs=100000`` (or add a corpus folder;
without one, fuzz/corpus/e2e/ is seeded from valid encodings). See docs/fuzzing.md.
"""

import atheris

with atheris.instrument_imports(include=["anomos", "fuzzlib"]):
    import fuzzlib

if __name__ == "__main__":
    fuzzlib.atheris_main(fuzzlib.TARGETS["e2e"])
