"""atheris harness: anomos.net.frames.FrameReader, decode_auth and decode_break.

Run: ``python fuzz/fuzz_frames.py -atheris_runs=100000`` (or add a corpus folder;
without one, fuzz/corpus/frames/ is seeded from valid encodings). See docs/fuzzing.md.
"""

import atheris

with atheris.instrument_imports(include=["anomos", "fuzzlib"]):
    import fuzzlib

if __name__ == "__main__":
    fuzzlib.atheris_main(fuzzlib.TARGETS["frames"])
