"""atheris harness: anomos.torrent.metainfo.Metainfo.from_bytes.

Run: ``python fuzz/fuzz_metainfo.py -atheris_runs=100000`` (or add a corpus folder;
without one, fuzz/corpus/metainfo/ is seeded from valid encodings). See docs/fuzzing.md.
"""

import atheris

with atheris.instrument_imports(include=["anomos", "fuzzlib"]):
    import fuzzlib

if __name__ == "__main__":
    fuzzlib.atheris_main(fuzzlib.TARGETS["metainfo"])
