"""Cells: per-hop layers and end-to-end records, as they travel a circuit."""

from __future__ import annotations

import hashlib
import itertools
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from anomos.errors import CryptoError, ProtocolError
from anomos.identity import x25519_public
from anomos.interfaces import SessionKeys
from anomos.protocol.e2e import (
    CELL_BODY,
    DATA,
    END,
    MAX_RECORD_DATA,
    SENDME,
    E2EChannel,
    decode_hello,
    decode_reply,
    encode_hello,
    encode_reply,
)
from anomos.protocol.layers import OnionLayer, add_all, remove_all
from anomos.protocol.onion import EPOCH_SECONDS, Hop, OnionReader, build_tracking_code


def pair() -> tuple[E2EChannel, E2EChannel]:
    a, b = os.urandom(32), os.urandom(32)
    return E2EChannel(SessionKeys(send=a, recv=b)), E2EChannel(SessionKeys(send=b, recv=a))


# ----------------------------------------------------------------------------- records


def test_round_trip_every_kind_and_size() -> None:
    down, src = pair()
    for kind, data in [
        (DATA, os.urandom(MAX_RECORD_DATA)),
        (DATA, b"short"),  # after a full record: padding must be zero again
        (SENDME, b""),
        (DATA, memoryview(b"view")),
        (END, b"bye"),
    ]:
        body = down.seal(kind, data)
        assert len(body) == CELL_BODY
        assert src.open(body) == (kind, bytes(data))
    assert down.sent == src.received == 5


def test_padding_is_zero_inside_the_aead() -> None:
    key_a, key_b = os.urandom(32), os.urandom(32)
    chan = E2EChannel(SessionKeys(send=key_a, recv=key_b))
    chan.seal(DATA, b"\xff" * MAX_RECORD_DATA)
    body = chan.seal(DATA, b"abc")
    plain = AESGCM(key_a).decrypt((1).to_bytes(12, "big"), body, None)
    assert plain[:6] == b"\x01\x00\x03abc"
    assert not any(plain[6:])


def test_tampered_record_refused_and_channel_closed() -> None:
    down, src = pair()
    first, second = down.seal(DATA, b"one"), down.seal(DATA, b"two")
    for pos in (0, 1000, CELL_BODY - 1):
        bad = bytearray(first)
        bad[pos] ^= 0x80
        fresh_src = E2EChannel(src.keys)
        with pytest.raises(CryptoError, match="failed authentication"):
            fresh_src.open(bytes(bad))
        with pytest.raises(CryptoError, match="closed"):
            fresh_src.open(first)  # even the genuine record: the stream is broken
    assert src.open(first) == (DATA, b"one")
    assert src.open(second) == (DATA, b"two")


def test_reordered_replayed_and_truncated_records_refused() -> None:
    down, src = pair()
    first, second = down.seal(DATA, b"one"), down.seal(DATA, b"two")
    with pytest.raises(CryptoError, match="tampered, reordered or replayed"):
        src.open(second)
    down, src = pair()
    first = down.seal(DATA, b"one")
    src.open(first)
    with pytest.raises(CryptoError):
        src.open(first)
    with pytest.raises(CryptoError, match="bytes, expected"):
        pair()[1].open(first[:-1])


def test_directions_use_different_keys() -> None:
    down, src = pair()
    assert down.keys.send != down.keys.recv
    from_down = down.seal(DATA, b"same")
    from_src = src.seal(DATA, b"same")
    assert from_down != from_src  # same counter, same data, other key
    with pytest.raises(CryptoError):
        down.open(from_down)  # a reflected record is refused
    with pytest.raises(CryptoError, match="differ per direction"):
        E2EChannel(SessionKeys(send=b"k" * 32, recv=b"k" * 32))


def test_seal_refuses_bad_arguments() -> None:
    down, _ = pair()
    with pytest.raises(ValueError, match="kind"):
        down.seal(9, b"")
    with pytest.raises(ValueError, match="at most"):
        down.seal(DATA, bytes(MAX_RECORD_DATA + 1))


# ----------------------------------------------------------------------------- first cells


def test_hello_and_reply_round_trip_at_cell_size() -> None:
    blob, hello = os.urandom(512), os.urandom(32)
    body = encode_hello(blob, hello)
    assert len(body) == CELL_BODY
    assert decode_hello(body) == (blob, hello, b"")
    reply = encode_reply(b"r" * 64)
    assert len(reply) == CELL_BODY
    assert decode_reply(reply) == b"r" * 64
    assert decode_hello(encode_hello(b"", b"")) == (b"", b"", b"")


def test_malformed_first_cells_refused() -> None:
    hello = encode_hello(b"blob", b"hi")
    cases = {
        "bytes, expected": hello[:-1],
        "expected a HELLO": encode_reply(b"x"),
        "unknown version": hello[:1] + b"\x09" + hello[2:],
        "longer than the cell": hello[:2] + b"\xff\xff" + hello[4:],
        "non-zero padding": hello[:-1] + b"\x01",
    }
    for reason, body in cases.items():
        with pytest.raises(ProtocolError, match=reason):
            decode_hello(body)
    with pytest.raises(ProtocolError, match="expected a REPLY"):
        decode_reply(hello)
    with pytest.raises(ValueError):
        encode_reply(bytes(CELL_BODY))


# ----------------------------------------------------------------------------- layers


def hop_key(i: int) -> bytes:
    return hashlib.sha256(b"e2e-test-hop-%d" % i).digest()


def test_cells_through_a_layered_circuit() -> None:
    """Downloader -> 3 relays -> source and back, with keys from a real tracking code."""
    n = 4  # three relays and the source
    hops = [Hop(x25519_public(hop_key(i)), 7 + i if i < n - 1 else None) for i in range(n)]
    epoch = 1234
    code, layers = build_tracking_code(hops, epoch)
    hop_layers = []
    for i in range(n):
        peeled = OnionReader(hop_key(i), clock=lambda: epoch * EPOCH_SECONDS).peel(code)
        hop_layers.append(peeled.layer)
        code = peeled.forward_code or b""
    assert hop_layers == list(layers)

    down_fwd = [OnionLayer.forward(k) for k in reversed(layers)]  # source's layer first
    down_back = [OnionLayer.backward(k) for k in layers]
    hop_fwd = [OnionLayer.forward(k) for k in hop_layers]
    hop_back = [OnionLayer.backward(k) for k in hop_layers]
    down, src = pair()

    for round_ in range(3):  # several cells: the streams carry on across cells
        record = down.seal(DATA, b"piece %d" % round_ * 100)
        cell = add_all(down_fwd, record)
        seen = []  # what each hop receives on its incoming link
        for i in range(n):
            seen.append(cell)
            cell = remove_all([hop_fwd[i]], cell)
        assert cell == record
        assert src.open(cell) == (DATA, b"piece %d" % round_ * 100)
        blocks = [{c[j : j + 16] for j in range(0, CELL_BODY - 16, 16)} for c in seen]
        for a, b in itertools.pairwise(blocks):
            assert not a & b, "two consecutive relays saw the same bytes"

        answer = src.seal(DATA, b"back %d" % round_)
        cell = answer
        back_seen = []
        for i in reversed(range(n)):
            cell = add_all([hop_back[i]], cell)
            back_seen.append(cell)
        assert len(set(back_seen)) == n and answer not in back_seen
        assert down.open(remove_all(down_back, cell)) == (DATA, b"back %d" % round_)
