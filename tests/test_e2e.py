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
    MAX_SHORT_DATA,
    SENDME,
    SHORT_BODY,
    TAG_SIZE,
    E2EChannel,
    body_size,
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
    cases = [
        (DATA, os.urandom(MAX_RECORD_DATA), CELL_BODY),
        (DATA, b"short", SHORT_BODY),  # after a full record: padding must be zero again
        (SENDME, b"", SHORT_BODY),
        (DATA, memoryview(b"view"), SHORT_BODY),
        (DATA, os.urandom(MAX_SHORT_DATA), SHORT_BODY),  # the most a short cell holds
        (DATA, os.urandom(MAX_SHORT_DATA + 1), CELL_BODY),  # one byte more: a full cell
        (END, b"bye", SHORT_BODY),
    ]
    for kind, data, size in cases:
        body = down.seal(kind, data)
        assert len(body) == size == body_size(len(data))
        assert src.open(body) == (kind, bytes(data))
    assert down.sent == src.received == len(cases)
    assert MAX_SHORT_DATA == 2021 and SHORT_BODY + 8 == 2048


def test_seal_into_and_seal_mutable_give_the_same_sizes() -> None:
    down, src = pair()
    buffer = bytearray(CELL_BODY + 16)
    assert down.seal_into(SENDME, b"", buffer) == SHORT_BODY
    assert src.open(buffer[:SHORT_BODY]) == (SENDME, b"")
    assert down.seal_into(DATA, bytes(MAX_RECORD_DATA), buffer) == CELL_BODY
    assert src.open(buffer[:CELL_BODY]) == (DATA, bytes(MAX_RECORD_DATA))
    short = down.seal_mutable(DATA, b"x")
    assert isinstance(short, bytearray) and len(short) == SHORT_BODY
    assert src.open(short) == (DATA, b"x")
    assert src.open(down.seal_mutable(DATA, bytes(4000))) == (DATA, bytes(4000))


def test_padding_is_zero_inside_the_aead() -> None:
    key_a, key_b = os.urandom(32), os.urandom(32)
    chan = E2EChannel(SessionKeys(send=key_a, recv=key_b))
    chan.seal(DATA, b"\xff" * MAX_RECORD_DATA)
    for n, data in enumerate((b"abc", b"\xff" * 3000), start=1):
        body = chan.seal(DATA, data)
        plain = AESGCM(key_a).decrypt(n.to_bytes(12, "big"), body, None)
        assert plain[:3] == bytes([DATA]) + len(data).to_bytes(2, "big")
        assert plain[3 : 3 + len(data)] == data
        assert not any(plain[3 + len(data) :])
    short = chan.seal(DATA, b"abc")  # after 3000 bytes of 0xff in the shared buffer
    plain = AESGCM(key_a).decrypt((3).to_bytes(12, "big"), short, None)
    assert plain == b"\x01\x00\x03abc" + bytes(SHORT_BODY - TAG_SIZE - 6)


@pytest.mark.parametrize("size", [SHORT_BODY, CELL_BODY])
def test_a_record_padded_or_cut_to_the_other_size_is_refused(size: int) -> None:
    """The size is under the AEAD: a cell padded to full or cut to short never opens."""
    down, src = pair()
    body = down.seal(DATA, bytes(10 if size == SHORT_BODY else 5000))
    assert len(body) == size
    other = body + bytes(CELL_BODY - SHORT_BODY) if size == SHORT_BODY else body[:SHORT_BODY]
    with pytest.raises(CryptoError, match="failed authentication"):
        src.open(other)
    for bad in (SHORT_BODY - 1, SHORT_BODY + 1, CELL_BODY - 1, CELL_BODY + 1):
        with pytest.raises(CryptoError, match=f"record is {bad} bytes, expected 2040 or 32760"):
            pair()[1].open(bytes(bad))


def test_a_short_record_claiming_more_data_than_it_holds_is_refused() -> None:
    """A hostile end seals a short body whose length field says more than fits."""
    a, b = os.urandom(32), os.urandom(32)
    src = E2EChannel(SessionKeys(send=b, recv=a))
    plain = bytearray(SHORT_BODY - TAG_SIZE)
    plain[:3] = bytes([DATA]) + (MAX_SHORT_DATA + 1).to_bytes(2, "big")
    body = AESGCM(a).encrypt(bytes(12), bytes(plain), None)
    with pytest.raises(CryptoError, match="bad kind 1 or length 2022"):
        src.open(body)


def test_tampered_record_refused_and_channel_closed() -> None:
    down, src = pair()
    first, second = down.seal(DATA, b"one"), down.seal(DATA, b"two")
    big = down.seal(DATA, bytes(5000))
    for record, pos in ((first, 0), (first, 1000), (first, SHORT_BODY - 1), (big, CELL_BODY - 1)):
        bad = bytearray(record)
        bad[pos] ^= 0x80
        fresh_src = E2EChannel(src.keys)
        with pytest.raises(CryptoError, match="failed authentication"):
            fresh_src.open(bytes(bad))
        with pytest.raises(CryptoError, match="closed"):
            fresh_src.open(first)  # even the genuine record: the stream is broken
    assert src.open(first) == (DATA, b"one")
    assert src.open(second) == (DATA, b"two")
    assert src.open(big) == (DATA, bytes(5000))


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

    for round_ in range(4):  # several cells, both sizes: the streams carry on across cells
        record = down.seal(DATA, b"piece %d" % round_ * (100 if round_ % 2 else 500))
        cell = add_all(down_fwd, record)
        seen = []  # what each hop receives on its incoming link
        for i in range(n):
            seen.append(cell)
            cell = remove_all([hop_fwd[i]], cell)
        assert cell == record
        assert src.open(cell) == (DATA, b"piece %d" % round_ * (100 if round_ % 2 else 500))
        assert len(record) == (SHORT_BODY if round_ % 2 else CELL_BODY)
        blocks = [{c[j : j + 16] for j in range(0, len(c) - 16, 16)} for c in seen]
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
