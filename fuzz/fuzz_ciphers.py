"""atheris harness: every registered cipher suite's responder_accept and initiator_finish.

Run: ``python fuzz/fuzz_ciphers.py -atheris_runs=100000`` (or add a corpus folder;
without one, fuzz/corpus/ciphers/ is seeded from valid encodings). See docs/fuzzing.md.
"""

import atheris

with atheris.instrument_imports(include=["anomos", "fuzzlib"]):
    import fuzzlib

    fuzzlib.load_suites()

if __name__ == "__main__":
    fuzzlib.atheris_main(fuzzlib.TARGETS["ciphers"])
