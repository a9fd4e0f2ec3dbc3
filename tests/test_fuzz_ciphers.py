"""Fuzzing every registered cipher suite's responder_accept and initiator_finish.

The suites come from the plugin registry, so a plugin suite is fuzzed like the
built-ins. Hostile hellos, replies and materials are refused with one
CryptoError line; honest ends always agree; a hello or reply changed in
transit is always caught by the initiator.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
import fuzzlib
from fuzzprops import fuzz_settings, hostile

from anomos.errors import CryptoError

TARGET = fuzzlib.TARGETS["ciphers"]
SEEDS = TARGET.seeds()
SUITES = fuzzlib.cipher_suites()
IDS = [suite.name for suite in SUITES]


def flip(data: bytes, draw: st.DataObject) -> bytes:
    out = bytearray(data)
    out[draw.draw(st.integers(0, len(out) - 1))] ^= draw.draw(st.integers(1, 255))
    return bytes(out)


def test_every_registered_suite_is_fuzzed() -> None:
    assert {"x25519", "classic"} <= set(IDS)


@fuzz_settings(3)
@given(hostile(SEEDS, max_size=200))
def test_hostile_hellos_and_replies(data: bytes) -> None:
    with fuzzlib.no_hang():
        fuzzlib.check(TARGET, data)


@pytest.mark.parametrize("suite", SUITES, ids=IDS)
@fuzz_settings(0.5)
@given(material=st.binary(max_size=80), hello=st.binary(max_size=80))
def test_responder_with_any_sizes(suite: Any, material: bytes, hello: bytes) -> None:
    try:
        keys, reply = suite.responder_accept(material, hello)
    except CryptoError as exc:
        fuzzlib.check_message(exc)
    else:
        assert len(keys.send) == len(keys.recv) == 32 and keys.send != keys.recv
        assert isinstance(reply, bytes)


@pytest.mark.parametrize("suite", SUITES, ids=IDS)
@fuzz_settings(0.5)
@given(st.data())
def test_honest_ends_agree_and_tampering_is_caught(suite: Any, data: st.DataObject) -> None:
    material = suite.tracker_material()
    state, hello = suite.initiator_hello(material)
    keys, reply = suite.responder_accept(material, hello)
    mine = suite.initiator_finish(state, reply)
    assert (mine.send, mine.recv) == (keys.recv, keys.send)

    state, hello = suite.initiator_hello(material)
    what = data.draw(st.sampled_from(["hello", "reply", "reply size"]))
    if what == "hello":
        try:
            _keys, reply = suite.responder_accept(material, flip(hello, data))
        except CryptoError:
            return  # refused at the source already
    else:
        _keys, reply = suite.responder_accept(material, hello)
        reply = flip(reply, data) if what == "reply" else reply + b"\0"
    with pytest.raises(CryptoError) as err:
        suite.initiator_finish(state, reply)
    fuzzlib.check_message(err.value)
