"""Tracking codes: constant size, correct routing, refusal of anything altered."""

from __future__ import annotations

import hashlib
import itertools
import re
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from anomos.errors import CryptoError, ProtocolError
from anomos.identity import x25519_public
from anomos.protocol import onion
from anomos.protocol.onion import (
    EPOCH_SECONDS,
    MAX_HOPS,
    TRACKING_CODE_SIZE,
    Hop,
    LayerKeys,
    OnionReader,
    build_tracking_code,
    current_epoch,
)

EPOCH = 4_000_000
NOW = EPOCH * EPOCH_SECONDS + 1.0
DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def hop_key(i: int) -> bytes:
    """The private onion key of test hop ``i`` (also used by the documented vectors)."""
    return hashlib.sha256(b"anomos-vector-hop-%d" % i).digest()


def path(n: int, first_nid: int = 100) -> list[Hop]:
    return [Hop(x25519_public(hop_key(i)), first_nid + i if i < n - 1 else None) for i in range(n)]


def reader(i: int, now: float = NOW, **kw: int) -> OnionReader:
    return OnionReader(hop_key(i), clock=lambda: now, **kw)


def walk(code: bytes, n: int) -> list[bytes]:
    """The code as each of the ``n`` hops receives it."""
    seen = [code]
    for i in range(n - 1):
        forward = reader(i).peel(seen[-1]).forward_code
        assert forward is not None
        seen.append(forward)
    return seen


@pytest.mark.parametrize("n", range(1, MAX_HOPS + 1))
def test_every_hop_learns_its_next_nid_and_keys_and_size_never_changes(n: int) -> None:
    hops = path(n)
    code, layers = build_tracking_code(hops, EPOCH)
    assert len(layers) == n
    assert len(set(layers)) == n
    alphas = set()
    for i in range(n):
        assert len(code) == TRACKING_CODE_SIZE
        alphas.add(code[5:37])
        peeled = reader(i).peel(code)
        assert peeled.layer == layers[i]
        assert peeled.next_nid == hops[i].next_nid
        if i < n - 1:
            assert peeled.next_nid == 100 + i
            assert peeled.forward_code is not None
            code = peeled.forward_code
        else:
            assert peeled.next_nid is None and peeled.forward_code is None
    assert len(alphas) == n  # the X25519 element is blinded at every hop


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=MAX_HOPS - 1))
def test_any_nids_round_trip(nids: list[int]) -> None:
    n = len(nids) + 1
    hops = [Hop(x25519_public(hop_key(i)), nid) for i, nid in enumerate([*nids, None])]
    code, _ = build_tracking_code(hops, EPOCH)
    for i in range(n):
        peeled = reader(i).peel(code)
        assert peeled.next_nid == hops[i].next_nid
        code = peeled.forward_code or b""


def test_all_path_lengths_give_the_same_size() -> None:
    sizes = {len(build_tracking_code(path(n), EPOCH)[0]) for n in range(1, MAX_HOPS + 1)}
    assert sizes == {TRACKING_CODE_SIZE}


def test_consecutive_hops_see_unrelated_codes() -> None:
    seen = walk(build_tracking_code(path(4), EPOCH)[0], 4)
    for a, b in itertools.pairwise(seen):
        same = sum(x == y for x, y in zip(a[5:], b[5:], strict=True))
        assert same < 20  # only chance coincidences (about 1 in 256 bytes)


@pytest.mark.parametrize("at", [0, 1, 2])
def test_every_flipped_bit_is_refused_at_the_hop_that_sees_it(at: int) -> None:
    code = walk(build_tracking_code(path(3), EPOCH)[0], 3)[at]
    hop = reader(at)
    for bit in range(TRACKING_CODE_SIZE * 8):
        bad = bytearray(code)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CryptoError):
            hop.peel(bytes(bad))
    assert hop.peel(code).layer  # the untouched code still passes


def test_refusals_name_their_reason() -> None:
    code, _ = build_tracking_code(path(2), EPOCH)
    hop = reader(0)
    cases = {
        "bytes, expected": code[:-1],
        "unknown version": b"\x01" + code[1:],  # version 1 (blinded Sphinx) is gone
        "neither the current": struct.pack(">BI", onion.VERSION, EPOCH - 2) + code[5:],
        "MAC failed": code[:-1] + bytes([code[-1] ^ 1]),
        "low-order": code[:5] + bytes(32) + code[37:],
    }
    for reason, bad in cases.items():
        with pytest.raises(CryptoError, match=reason) as info:
            hop.peel(bad)
        assert "\n" not in str(info.value)
    assert isinstance(CryptoError("x"), ProtocolError)


def test_replay_is_refused() -> None:
    code, _ = build_tracking_code(path(2), EPOCH)
    hop = reader(0)
    hop.peel(code)
    with pytest.raises(CryptoError, match="replayed"):
        hop.peel(code)


def test_code_for_another_hop_is_refused() -> None:
    code, _ = build_tracking_code(path(3), EPOCH)
    for wrong in (1, 2, 7):
        with pytest.raises(CryptoError, match="not for this key"):
            reader(wrong).peel(code)


def test_epochs_current_and_previous_accepted_others_refused() -> None:
    for epoch, ok in [(EPOCH, True), (EPOCH - 1, True), (EPOCH - 2, False), (EPOCH + 1, False)]:
        code, _ = build_tracking_code(path(1), epoch)
        if ok:
            assert reader(0).peel(code).next_nid is None
        else:
            with pytest.raises(CryptoError, match="epoch"):
                reader(0).peel(code)


def test_current_epoch_follows_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    assert current_epoch(NOW) == EPOCH
    assert current_epoch(NOW + EPOCH_SECONDS) == EPOCH + 1
    monkeypatch.setattr(onion, "EPOCH_SECONDS", 10)
    assert current_epoch(25.0) == 2


def test_replay_cache_is_bounded_and_expires_with_its_epoch() -> None:
    now = [NOW]
    hop = OnionReader(hop_key(0), clock=lambda: now[0], replay_limit=5)
    for _ in range(5):
        hop.peel(build_tracking_code(path(1), EPOCH)[0])
    with pytest.raises(CryptoError, match="full"):
        hop.peel(build_tracking_code(path(1), EPOCH)[0])
    assert hop.cached_tags() == 5
    # The previous epoch has its own bound; the old one still counts until it expires.
    now[0] += EPOCH_SECONDS
    hop.peel(build_tracking_code(path(1), EPOCH + 1)[0])
    assert hop.cached_tags() == 6
    now[0] += EPOCH_SECONDS
    hop.peel(build_tracking_code(path(1), EPOCH + 2)[0])
    assert hop.cached_tags() == 2  # EPOCH's tags were dropped


def test_build_refuses_bad_paths() -> None:
    with pytest.raises(ValueError, match=r"1\.\.8 hops"):
        build_tracking_code([], EPOCH)
    with pytest.raises(ValueError, match=r"1\.\.8 hops"):
        build_tracking_code(path(MAX_HOPS + 1), EPOCH)
    relays_only = [Hop(x25519_public(hop_key(0)), 5)]
    with pytest.raises(ValueError, match="next_nid None"):
        build_tracking_code(relays_only, EPOCH)
    early_end = [Hop(x25519_public(hop_key(0)), None), *path(1)]
    with pytest.raises(ValueError, match="next_nid None"):
        build_tracking_code(early_end, EPOCH)
    with pytest.raises(ValueError, match="invalid onion key"):
        build_tracking_code([Hop(bytes(32), None)], EPOCH)
    with pytest.raises(ValueError):
        Hop(b"short", None)
    with pytest.raises(ValueError):
        Hop(bytes(32), 2**32)


def test_layer_keys_serialise() -> None:
    _, layers = build_tracking_code(path(2), EPOCH)
    assert LayerKeys.from_bytes(layers[0].to_bytes()) == layers[0]
    with pytest.raises(ProtocolError):
        LayerKeys.from_bytes(bytes(95))


def vectors_from_doc() -> list[tuple[int, int, str, str]]:
    text = DOC.read_text()
    block = re.search(r"```text tracking-code-vectors\n(.*?)```", text, re.S)
    assert block, "docs/protocol.md lost its tracking-code-vectors block"
    rows = []
    for line in block.group(1).splitlines():
        m = re.fullmatch(r"hops=(\d) epoch=(\d+) code=([0-9a-f]{64}) layers=([0-9a-f]{64})", line)
        if m:
            rows.append((int(m[1]), int(m[2]), m[3], m[4]))
    return rows


def vector(n: int, epoch: int) -> tuple[str, str]:
    session = hashlib.sha256(b"anomos-vector-session").digest()
    code, layers = build_tracking_code(path(n), epoch, session_key=session)
    joined = b"".join(k.to_bytes() for k in layers)
    return hashlib.sha256(code).hexdigest(), hashlib.sha256(joined).hexdigest()


def test_documented_vectors_match() -> None:
    rows = vectors_from_doc()
    assert len(rows) >= 3
    for n, epoch, code_hash, layers_hash in rows:
        assert vector(n, epoch) == (code_hash, layers_hash), f"vector hops={n}"


def test_documented_intermediate_values_match() -> None:
    text = DOC.read_text()
    session = hashlib.sha256(b"anomos-vector-session").digest()
    assert f"x (session)      {session.hex()}" in text
    for i in range(3):
        assert f"hop {i} public     {x25519_public(hop_key(i)).hex()}" in text
    x0 = hashlib.sha256(b"anomos-onion-v3 hop" + session + b"\0").digest()
    alpha0 = x25519_public(x0)
    assert f"x_0              {x0.hex()}" in text
    assert f"alpha_0          {alpha0.hex()}" in text
    shared = X25519PrivateKey.from_private_bytes(hop_key(0)).exchange(
        X25519PublicKey.from_public_bytes(alpha0)
    )
    assert f"s_0              {shared.hex()}" in text
    m = re.search(r"1-hop code\s+((?:[0-9a-f]{2,64}\s+)+)", text)
    assert m, "docs/protocol.md lost its 1-hop code"
    code, _ = build_tracking_code(path(1), EPOCH, session_key=session)
    assert "".join(m.group(1).split()) == code.hex()
    # The 1-hop code re-derived from the text of the spec, not from onion.py.
    prefix, beta, gamma = code[:5], code[37:461], code[461:]
    assert prefix == b"\x03" + EPOCH.to_bytes(4, "big") and code[5:37] == alpha0
    k = hashlib.blake2b(prefix, key=shared, person=b"anomos-onion-v3", digest_size=32).digest()
    stream = Cipher(algorithms.AES(k), modes.CTR(bytes(16))).encryptor().update(bytes(621))
    mu, routing = stream[0:32], stream[144:621]
    assert gamma == hashlib.blake2b(prefix + alpha0 + beta, key=mu, digest_size=16).digest()
    opened = bytes(a ^ b for a, b in zip(beta + bytes(53), routing, strict=True))
    assert opened[:53] == b"\x02" + bytes(52)  # the terminal's slot
