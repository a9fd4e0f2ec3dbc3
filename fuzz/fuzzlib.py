"""Fuzz targets shared by the atheris harnesses and the property tests.

A :class:`Target` turns arbitrary bytes into one call of a decoder that reads
hostile input, and knows which error class that decoder documents. The rule
checked for every input is the project's: the decoder either accepts, or
raises its documented :mod:`anomos.errors` class with a one-line message.
Anything else (another exception, a multi-line or empty message, a hang, a
runaway allocation) is a finding.

Several decoders only look at their input after a cryptographic check that
random bytes never pass (a MAC, a sealed box, an AEAD tag). Their targets
take a *mode* byte first: one mode feeds the raw bytes, another wraps them in
valid cryptography with the fixed test keys below, so the fuzzer reaches the
parsing behind the check, exactly as a hostile party holding the key (the
other end of a circuit, anyone knowing a box public key) could.

Seeds are valid encodings, built here from code (nothing binary is stored).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import signal
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import nacl.public
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from anomos import bencode
from anomos.errors import AnomosError, CryptoError, MetainfoError, ProtocolError, TrackerError
from anomos.identity import PeerIdentity, x25519_public
from anomos.interfaces import SessionKeys
from anomos.protocol import e2e, onion, request
from anomos.torrent.metainfo import Metainfo

# Decoders still being written may be missing from a checkout: their targets
# are left out (the property tests skip them) instead of breaking the rest.
try:
    from anomos.net import frames
except ImportError:  # pragma: no cover
    frames = None  # type: ignore[assignment]
try:
    from anomos.torrent import wire
except ImportError:  # pragma: no cover
    wire = None  # type: ignore[assignment]
try:
    from anomos.tracker import client as tracker_client
except ImportError:  # pragma: no cover
    tracker_client = None  # type: ignore[assignment]
try:
    from anomos.tracker import server as tracker_server
    from anomos.tracker.limits import LimitSettings
    from anomos.tracker.settings import TrackerSettings
except ImportError:  # pragma: no cover
    tracker_server = None  # type: ignore[assignment]

#: Seconds one input may run before it counts as a hang (generous: inputs take ms).
HANG_SECONDS = float(os.environ.get("ANOMOS_FUZZ_HANG_SECONDS", "10"))


class Finding(AssertionError):
    """A decoder broke its contract on one input."""


class Hang(Finding):
    """One input ran longer than :data:`HANG_SECONDS`."""


def check_message(exc: BaseException) -> None:
    """The project's error contract: a non-empty message on one line."""
    text = str(exc)
    if not text.strip() or "\n" in text or "\r" in text:
        raise Finding(f"{type(exc).__name__} message is not one line: {text!r}") from exc


@contextlib.contextmanager
def no_hang(seconds: float = HANG_SECONDS, what: str = "input") -> Iterator[None]:
    """Raise :class:`Hang` if the block runs longer than ``seconds``.

    A SIGALRM timer, not ``gevent.Timeout``: pure decoding never yields to the
    hub, so only a signal can interrupt it. Outside the main thread (or off
    POSIX) this is a no-op and the test runner's own timeout remains.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "setitimer"
    ):
        yield
        return

    def on_alarm(_signum: int, _frame: Any) -> None:
        raise Hang(f"{what} ran over {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@attrs.frozen
class Target:
    """One decoder under fuzz: ``run(data)`` decodes, ``errors`` is what it may raise."""

    name: str
    run: Callable[[bytes], object]
    errors: tuple[type[BaseException], ...]
    seeds: Callable[[], list[bytes]]
    #: libFuzzer's ``-max_len`` for this target.
    max_len: int = 4096
    doc: str = ""


def check(target: Target, data: bytes) -> object | None:
    """Run ``target`` on ``data``; return the decoded value, or None if refused.

    A documented error with a one-line message is a refusal; any other
    exception propagates (the finding).
    """
    try:
        return target.run(data)
    except target.errors as exc:
        check_message(exc)
        return None


# ----------------------------------------------------------------------------- fixed test keys


def _key(label: str) -> bytes:
    return hashlib.sha256(b"anomos fuzz " + label.encode()).digest()


ONION_PRIVATE = _key("onion")
ONION_PUBLIC = x25519_public(ONION_PRIVATE)
#: Every fuzzed tracking code is peeled at this time, in this epoch.
NOW = 1_700_000_000.0
EPOCH = onion.current_epoch(NOW)
BOX_PRIVATE = nacl.public.PrivateKey(_key("box"))
BOX_PUBLIC = bytes(BOX_PRIVATE.public_key)
TRACKER_KEY = ec.derive_private_key(int.from_bytes(_key("tracker"), "big") >> 8, ec.SECP256R1())
TRACKERS = frozenset({request.tracker_fingerprint(TRACKER_KEY.public_key())})
E2E_KEYS = SessionKeys(send=_key("e2e send"), recv=_key("e2e recv"))


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    """``data`` cut in pieces of ``size`` (0: one piece)."""
    if size <= 0:
        yield data
        return
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _fit(data: bytes, size: int) -> bytes:
    """Truncate or zero-pad to exactly ``size`` bytes."""
    return data[:size] + bytes(max(0, size - len(data)))


# ----------------------------------------------------------------------------- bencode


def bencode_seeds() -> list[bytes]:
    values: list[Any] = [
        0,
        -7,
        2**70,
        b"",
        b"spam",
        [],
        {},
        [1, b"a", [b"b", {b"k": 2}]],
        {b"a": 1, b"b": [b"x" * 40, {b"c": b""}], b"z": {}},
    ]
    return [bencode.encode(v) for v in values] + [metainfo_seeds()[0]]


def _bencode_run(data: bytes) -> object:
    value = bencode.decode(data)
    if bencode.encode(value) != data:
        raise Finding("bencode accepted a non-canonical encoding")
    return value


# ----------------------------------------------------------------------------- metainfo


def metainfo_seeds() -> list[bytes]:
    single = {
        b"length": 40000,
        b"name": b"file.bin",
        b"piece length": 16384,
        b"pieces": b"\x01" * 60,
    }
    multi = {
        b"files": [
            {b"length": 10, b"path": [b"a"]},
            {b"attr": b"p", b"length": 16374, b"path": [b".pad", b"16374"]},
            {b"length": 5, b"path": [b"dir", b"b.txt"]},
        ],
        b"name": b"folder",
        b"piece length": 16384,
        b"pieces": b"\x02" * 40,
        b"private": 1,
    }
    anomos = {
        b"fingerprint": b"ab" * 32,
        b"trackers": [b"https://tracker.example:8443/announce"],
        b"version": 2,
    }
    legacy = {
        b"announce": b"https://tracker.example:8443/announce",
        b"anomos": {**anomos, b"version": 1},
    }
    return [
        bencode.encode({b"info": single}),
        bencode.encode({b"anomos": anomos, b"anomos-info": multi}),
        bencode.encode({b"anomos": anomos, b"anomos-info": single}),
        bencode.encode({**legacy, b"info": multi}),  # the old format, still read
    ]


def _metainfo_run(data: bytes) -> object:
    meta = Metainfo.from_bytes(data)
    again = Metainfo.from_bytes(meta.to_bytes())
    if again != meta:
        raise Finding("metainfo does not survive to_bytes/from_bytes")
    for entry in meta.files:
        if ".." in entry.path or "" in entry.path or any("/" in c for c in entry.path):
            raise Finding(f"metainfo accepted an unsafe path {entry.path!r}")
    return meta


# ----------------------------------------------------------------------------- peer wire

#: Geometry of the torrent the wire target reads messages for.
WIRE_PIECES = 37
WIRE_PIECE_LENGTH = 32 * 1024
WIRE_LAST_PIECE = 5000


def wire_piece_size(index: int) -> int:
    return WIRE_LAST_PIECE if index == WIRE_PIECES - 1 else WIRE_PIECE_LENGTH


def wire_stream() -> bytes:
    """A valid handshake followed by one message of every kind."""
    flags = bytes(i % 2 for i in range(WIRE_PIECES))
    last = WIRE_PIECES - 1
    messages = [
        wire.Handshake(infohash=b"i" * 20, peer_id=b"p" * 20).encode(),
        wire.KEEP_ALIVE.encode(),
        wire.Bitfield(wire.pack_bitfield(flags)).encode(),
        wire.INTERESTED_MSG.encode(),
        wire.UNCHOKE_MSG.encode(),
        wire.encode_have(3),
        wire.encode_request(0, 16384, 16384),
        wire.encode_request(last, 0, WIRE_LAST_PIECE),
        wire.Piece(last, 0, b"d" * WIRE_LAST_PIECE).encode(),
        wire.encode_cancel(1, 0, 16384),
        wire.NOT_INTERESTED_MSG.encode(),
        wire.CHOKE_MSG.encode(),
    ]
    return b"".join(messages)


def wire_seeds() -> list[bytes]:
    stream = wire_stream()
    return [bytes([0]) + stream, bytes([7]) + stream, bytes([1]) + stream[:80]]


def _wire_run(data: bytes) -> object:
    """Byte 0: feed size (0 = all at once); the rest is what a peer sends."""
    if not data:
        return None
    reader = wire.MessageReader(WIRE_PIECES, wire_piece_size)
    out: list[object] = []
    for chunk in _chunks(data[1:], data[0]):
        out += reader.feed(chunk)
    for msg in out:
        if isinstance(msg, wire.Bitfield):
            wire.unpack_bitfield(msg.bits, WIRE_PIECES)
    return out


# ----------------------------------------------------------------------------- link frames


class ChunkSocket:
    """A socket stand-in whose ``recv_into`` returns ``data`` in pieces, then EOF."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self._parts = list(_chunks(data, chunk))
        self._parts.reverse()

    def recv_into(self, buf: memoryview) -> int:
        if not self._parts:
            return 0
        part = self._parts.pop()
        n = min(len(part), len(buf))
        buf[:n] = part[:n]
        if n < len(part):
            self._parts.append(part[n:])
        return n


def frame_stream() -> bytes:
    code = bytes(onion.TRACKING_CODE_SIZE)
    parts = [
        frames.encode_frame(0, frames.Cmd.AUTH_CHALLENGE, b"c" * frames.CHALLENGE_SIZE),
        frames.encode_frame(0, frames.Cmd.AUTH, frames.encode_auth(7, b"k" * 32, b"s" * 64)),
        frames.encode_frame(0, frames.Cmd.AUTH_OK),
        frames.encode_frame(0, frames.Cmd.PADDING, b"\0" * 16),
        frames.encode_frame(0x80000001, frames.Cmd.CREATE, code),
        frames.encode_frame(0x80000001, frames.Cmd.CREATED),
        frames.encode_frame(5, frames.Cmd.BREAK, frames.encode_break(frames.BreakReason.CRYPTO)),
    ]
    return b"".join(parts)


def frame_seeds() -> list[bytes]:
    stream = frame_stream()
    # DATA frames are 2 or 32 KiB; one header plus a few bytes is enough to seed them.
    data = frames.encode_header(3, frames.Cmd.DATA, e2e.CELL_BODY) + b"cell"
    short = frames.encode_header(3, frames.Cmd.DATA, e2e.SHORT_BODY) + b"short"
    return [
        bytes([0]) + stream,
        bytes([5]) + stream,
        bytes([0x80, 5]) + data,
        bytes([0x80, 3]) + short,
    ]


def _frames_run(data: bytes) -> object:
    """Byte 0: bits 0-6 recv size in 97-byte steps (0 = all at once); bit 7 set:
    the rest is one header and a payload pattern cycled to the header's length,
    the frame repeated ``1 + data[1] % 16`` times (so 32 KiB DATA frames and the
    reader's buffer compaction are reachable from short inputs). Otherwise the
    rest is exactly what a neighbour sends.
    """
    if not data:
        return None
    if data[0] & 0x80 and len(data) >= 2 + frames.HEADER_SIZE:
        header = data[2 : 2 + frames.HEADER_SIZE]
        pattern = data[2 + frames.HEADER_SIZE :] or b"\0"
        length = frames.HEADER.unpack(header)[3]
        payload = (pattern * (length // len(pattern) + 1))[:length]
        body = (header + payload) * (1 + data[1] % 16)
    else:
        body = data[1:]
    reader = frames.FrameReader(ChunkSocket(body, (data[0] & 0x7F) * 97))
    out = []
    for circ_id, cmd, payload in reader:
        if cmd == frames.Cmd.AUTH:
            frames.decode_auth(payload)
        elif cmd == frames.Cmd.BREAK:
            frames.describe_break(frames.decode_break(payload))
        out.append((circ_id, cmd, len(payload)))
    return out


# ----------------------------------------------------------------------------- tracking codes


def onion_code(nids: Sequence[int | None], *, epoch: int = EPOCH, key: bytes = b"") -> bytes:
    """A valid code whose first hop is the fuzz onion key (later hops: other keys)."""
    hops = [
        onion.Hop(ONION_PUBLIC if i == 0 else x25519_public(_key(f"hop {i}")), nid)
        for i, nid in enumerate(nids)
    ]
    code, _layers = onion.build_tracking_code(hops, epoch, session_key=key or _key("session"))
    return code


def onion_with_mac(beta: bytes, alpha: bytes = b"") -> bytes:
    """A code with a correct MAC for the fuzz key around an arbitrary routing block.

    What a party that knows the hop's shared secret (the tracker) can build:
    it reaches the slot parsing that a MAC failure hides from random inputs.
    """
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    prefix = struct.pack(">BI", onion.VERSION, EPOCH)
    if len(alpha) != onion.ALPHA_SIZE:
        alpha = x25519_public(_key("alpha"))
    beta = _fit(beta, onion.ROUTING_SIZE)
    private = X25519PrivateKey.from_private_bytes(ONION_PRIVATE)
    try:
        shared = onion._exchange(private, alpha)
    except ValueError:  # a low-order alpha has no MAC key; the raw mode covers it
        alpha = x25519_public(_key("alpha"))
        shared = onion._exchange(private, alpha)
    keys, _ = onion._hop_stream(shared, prefix, b"")
    return prefix + alpha + beta + onion._mac(keys.mu, prefix, alpha, beta)


def onion_seeds() -> list[bytes]:
    return [
        b"\0" + onion_code([None]),
        b"\0" + onion_code([17, None]),
        b"\0" + onion_code([1, 2, 3, 4, 5, 6, 7, None]),
        b"\1" + bytes([onion.FLAG_RELAY]) + b"\0\0\0\x09" + b"g" * 16,
        b"\1" + bytes([onion.FLAG_TERMINAL]),
    ]


def _onion_run(data: bytes) -> object:
    """Mode 0: peel the raw bytes. Mode 1: the bytes are a routing block with a valid MAC."""
    if not data:
        return None
    code = onion_with_mac(data[1:]) if data[0] & 1 else data[1:]
    reader = onion.OnionReader(ONION_PRIVATE, clock=lambda: NOW)
    peeled = reader.peel(code)
    if peeled.forward_code is not None and len(peeled.forward_code) != onion.TRACKING_CODE_SIZE:
        raise Finding("peeled code changed size")
    if (peeled.next_nid is None) != (peeled.forward_code is None):
        raise Finding("terminal flag and forward code disagree")
    return peeled


# ----------------------------------------------------------------------------- sealed requests


def request_plain(**kw: Any) -> bytes:
    fields: dict[str, Any] = {
        "infohash": b"h" * 20,
        "suite": "x25519",
        "material": b"m" * 32,
        "expires": int(NOW) + 600,
    }
    fields.update(kw)
    return request.SourceRequest(**fields).encode()


def request_seeds() -> list[bytes]:
    def trim(plain: bytes) -> bytes:
        return plain.rstrip(b"\0")

    good = request.SourceRequest.decode(request_plain())
    return [
        b"\0" + request.seal_request(good, BOX_PUBLIC, TRACKER_KEY),
        b"\1" + trim(request.signed_plaintext(request_plain(), BOX_PUBLIC, TRACKER_KEY)),
        b"\2" + request_plain(),
        b"\2" + request_plain(infohash=b"H" * 32, suite="classic", material=b""),
        b"\2" + request_plain(material=b"M" * request.MAX_MATERIAL),
    ]


#: Longest body mode 2 signs (the rest of the plaintext holds key and signature).
_MAX_SIGNED_BODY = request.PLAINTEXT_SIZE - request.TRACKER_KEY_SIZE - request.SIGNATURE_SIZE


def _request_run(data: bytes) -> object:
    """Mode 0: open the raw blob. Mode 1: seal the bytes (zero padded) to the fuzz box key.
    Mode 2: sign the bytes as a body with the trusted fuzz tracker key, then seal them."""
    if not data:
        return None
    mode = data[0] % 3
    if mode == 1:
        plain = _fit(data[1:], request.PLAINTEXT_SIZE)
        blob = bytes(nacl.public.SealedBox(BOX_PRIVATE.public_key).encrypt(plain))
    elif mode == 2:
        plain = request.signed_plaintext(data[1 : 1 + _MAX_SIGNED_BODY], BOX_PUBLIC, TRACKER_KEY)
        blob = bytes(nacl.public.SealedBox(BOX_PRIVATE.public_key).encrypt(plain))
    else:
        blob = data[1:]
    req = request.open_request(blob, BOX_PRIVATE, TRACKERS, now=NOW)
    if request.SourceRequest.decode(req.encode()) != req:
        raise Finding("sealed request does not survive encode/decode")
    return req


# ----------------------------------------------------------------------------- end-to-end cells


def e2e_seal_plain(
    plain: bytes, key: bytes = E2E_KEYS.recv, counter: int = 0, *, short: bool = False
) -> bytes:
    """An AEAD record with arbitrary plaintext, as the other (hostile) end can make
    (in a short body with ``short``)."""
    size = (e2e.SHORT_BODY if short else e2e.CELL_BODY) - e2e.TAG_SIZE
    return AESGCM(key).encrypt(counter.to_bytes(12, "big"), _fit(plain, size), None)


def e2e_seeds() -> list[bytes]:
    def trim(body: bytes) -> bytes:
        return body.rstrip(b"\0")

    return [
        b"\0" + trim(e2e.encode_hello(b"r" * request.REQUEST_BLOB_SIZE, b"h" * 32)),
        b"\1" + trim(e2e.encode_reply(b"y" * 64)),
        b"\2" + bytes([e2e.DATA]) + b"\0\5hello",
        b"\2" + bytes([e2e.SENDME]) + b"\0\0",
        b"\2" + bytes([e2e.END]) + b"\0\0",
        b"\x82" + bytes([e2e.DATA]) + b"\7\xe5" + b"a short record claiming 2021 bytes",
    ]


def _e2e_run(data: bytes) -> object:
    """Mode 0: HELLO body, 1: REPLY body (both zero padded to a cell), 2: an AEAD
    record around the bytes as plaintext (in a short body if byte 0 has bit 7 set),
    3: the raw bytes as a record."""
    if not data:
        return None
    mode, rest = data[0] % 4, data[1:]
    if mode == 0:
        return e2e.decode_hello(_fit(rest, e2e.CELL_BODY))
    if mode == 1:
        return e2e.decode_reply(_fit(rest, e2e.CELL_BODY))
    channel = e2e.E2EChannel(E2E_KEYS)
    body = e2e_seal_plain(rest, short=bool(data[0] & 0x80)) if mode == 2 else rest
    kind, payload = channel.open(body)
    if kind not in e2e.RECORD_KINDS or len(payload) > len(body) - e2e.TAG_SIZE - 3:
        raise Finding(f"record of kind {kind} and {len(payload)} bytes accepted")
    return kind, payload


# ----------------------------------------------------------------------------- cipher suites


def cipher_suites() -> list[Any]:
    """One instance of every registered cipher suite (built-ins and plugins)."""
    from anomos.pluginmanager import get_plugins

    registry = get_plugins().cipher_suites
    return [registry.get(name)() for name in sorted(registry.names())]


_SUITES: list[Any] = []


def load_suites() -> None:
    """Load the cipher plugins now (under atheris: inside the instrumented import)."""
    if not _SUITES:
        _SUITES.extend(cipher_suites())


def cipher_seeds() -> list[bytes]:
    seeds = []
    for index, suite in enumerate(cipher_suites()):
        material = suite.tracker_material()
        _state, hello = suite.initiator_hello(material)
        _keys, reply = suite.responder_accept(material, hello)
        seeds.append(bytes([index * 2, 0]) + material + hello)
        seeds.append(bytes([index * 2 + 1, 0]) + material + reply)
    return seeds


#: Material length used unless byte 1 of a cipher input asks for another.
MATERIAL_SIZE = 32


def _cipher_run(data: bytes) -> object:
    """Byte 0: suite and side; byte 1: below 0xF0 a 32-byte material follows,
    else ``byte - 0xF0`` bytes of material; then the hello or reply.

    The initiator side runs a real ``initiator_hello`` first (the material it
    got from the tracker is trusted), then finishes with the fuzzed reply.
    """
    if len(data) < 2:
        return None
    load_suites()
    suite = _SUITES[(data[0] >> 1) % len(_SUITES)]
    size = MATERIAL_SIZE if data[1] < 0xF0 else data[1] - 0xF0
    material, message = data[2 : 2 + size], data[2 + size :]
    if data[0] & 1 == 0:
        keys, reply = suite.responder_accept(material, message)
        if not isinstance(reply, bytes) or keys.send == keys.recv:
            raise Finding("responder gave a bad reply or equal keys")
        return keys
    try:
        state, _hello = suite.initiator_hello(material)
    except CryptoError:
        return None  # a bad material is the tracker's problem, refused here as documented
    return suite.initiator_finish(state, message)


# ----------------------------------------------------------------------------- tracker client


def tracker_reply_seeds() -> list[bytes]:
    layers = [bytes(range(96)), bytes(96)]
    plan = {
        b"first_nid": 3,
        b"layers": layers,
        b"material": b"m" * 32,
        b"request": bytes(request.REQUEST_BLOB_SIZE),
        b"suite": b"x25519",
        b"tracking_code": bytes(onion.TRACKING_CODE_SIZE),
    }
    announce = {
        b"downloaded": 5,
        b"epoch": EPOCH,
        b"interval": 60,
        b"min_interval": 10,
        b"neighbours": [
            {b"address": b"127.0.0.1:6881", b"dial": 1, b"identity": b"i" * 32, b"nid": 1},
            {b"address": b"[::1]:6882", b"dial": 0, b"identity": b"j" * 32, b"nid": 2},
        ],
        b"ratio": b"1.5",
        b"relayed": 7,
        b"uploaded": 6,
    }
    return [
        b"\0" + bencode.encode(announce),
        b"\1" + bencode.encode({b"circuits": [plan]}),
        b"\1" + bencode.encode({b"circuits": []}),
    ]


_CLIENT: list[tracker_client.TrackerClient] = []


def tracker_client_for(reply: Any) -> tracker_client.TrackerClient:
    """A client whose transport returns ``reply`` (a decoded body) to every request."""
    if not _CLIENT:
        _CLIENT.append(
            tracker_client.TrackerClient(
                "https://127.0.0.1:9/announce", "00" * 32, PeerIdentity.generate()
            )
        )
    client = _CLIENT[0]
    client._post = lambda _path, _inner: reply  # type: ignore[method-assign, assignment]
    return client


def _tracker_client_run(data: bytes) -> object:
    """Byte 0: announce (even) or circuits (odd); the rest is the tracker's bencoded reply.

    The HTTP layer hands a decoded dict to the reply parsers; a body that is
    not a bencoded dict is refused before them (see ``TrackerClient._post``).
    """
    if not data:
        return None
    try:
        reply = bencode.decode(data[1:], max_size=tracker_client.MAX_REPLY)
    except bencode.BencodeError:
        return None
    if not isinstance(reply, dict):
        return None
    client = tracker_client_for(reply)
    if data[0] & 1:
        return client.request_circuits(b"h" * 20, tracker_client.MAX_CIRCUITS)
    return client.announce("127.0.0.1:7000", [], 0)


# ----------------------------------------------------------------------------- tracker server

#: The infohash the tracker harness' honest peers seed.
SWARM = hashlib.sha1(b"anomos fuzz swarm").digest()


def fixed_identity(label: str) -> PeerIdentity:
    """A peer identity derived from ``label`` (same keys in every run)."""
    import nacl.signing

    return PeerIdentity(
        signing=nacl.signing.SigningKey(_key(label + " signing")),
        onion_private=_key(label + " onion"),
        box=nacl.public.PrivateKey(_key(label + " box")),
    )


#: Every honest message made here differs: the tracker refuses one it has seen (a replay).
_NONCES = itertools.count(1)


def _nonce() -> bytes:
    return next(_NONCES).to_bytes(8, "big")


def announce_inner(who: PeerIdentity, port: int, *, left: int = 0) -> dict[bytes, Any]:
    """A valid announce message (decoded form) for ``who``."""
    return {
        b"address": f"127.0.0.1:{port}".encode(),
        b"box": who.box_public,
        b"nonce": _nonce(),
        b"onion": who.onion_public,
        b"relayed": 0,
        b"session": b"s" * 8,
        b"stopped": 0,
        b"time": int(NOW),
        b"torrents": [
            {
                b"downloaded": 0,
                b"event": b"started",
                b"infohash": SWARM,
                b"left": left,
                b"uploaded": 0,
            }
        ],
    }


def circuits_inner(count: int = 2) -> dict[bytes, Any]:
    return {b"count": count, b"infohash": SWARM, b"nonce": _nonce(), b"time": int(NOW)}


class TrackerHarness:
    """A tracker (never listening) called through its WSGI entry point.

    Twelve honest peers seed :data:`SWARM`; the fuzzing peer (``FUZZER``)
    signs whatever message it is given, as any peer can. The contract: every
    request gets a bencoded dict, and a refusal is a 4xx with a one-line
    ``failure reason``; a 500 is an internal error caused by input, a finding.
    """

    def __init__(self, state_dir: str) -> None:
        import random

        from anomos.pluginmanager import get_plugins

        self.tracker = tracker_server.Tracker(
            state_dir,
            "127.0.0.1:9",
            get_plugins(),
            TrackerSettings(rate=1e9, burst=1e9, edge_settle=0.0, limits=LimitSettings.unlimited()),
            rng=random.Random(7),
            clock=lambda: NOW,
        )
        self.fuzzer = fixed_identity("fuzzer")
        #: identity public key -> (identity, announce message) of every peer that joined
        self.members: dict[bytes, tuple[PeerIdentity, dict[bytes, Any]]] = {}
        for i in range(12):
            who = fixed_identity(f"honest {i}")
            self.join(who, announce_inner(who, 7000 + i))
        self.settle()

    def join(self, who: PeerIdentity, inner: dict[bytes, Any]) -> tuple[int, dict[bytes, Any]]:
        """Announce ``inner`` for ``who`` and remember it for :meth:`settle`."""
        self.members[who.identity_public] = (who, inner)
        return self.signed(tracker_server.ANNOUNCE_PATH, inner, who)

    def settle(self) -> None:
        """Announce every member again, so both ends of every edge have been told of it
        (the tracker plans circuits over such settled edges only)."""
        for who, inner in list(self.members.values()):
            inner = {**inner, b"nonce": _nonce()}
            status, reply = self.signed(tracker_server.ANNOUNCE_PATH, inner, who)
            if status != 200:
                raise Finding(f"an honest announce was refused: {reply!r}")

    def post(
        self, path: str, body: bytes, *, method: str = "POST", length: str | None = None
    ) -> tuple[int, dict[bytes, Any]]:
        import io

        got: list[tuple[str, list[tuple[str, str]]]] = []
        environ = {
            "PATH_INFO": path,
            "REQUEST_METHOD": method,
            "REMOTE_ADDR": "127.0.0.1",
            "CONTENT_LENGTH": str(len(body)) if length is None else length,
            "wsgi.input": io.BytesIO(body),
        }
        chunks = self.tracker.wsgi(environ, lambda status, headers: got.append((status, headers)))
        status = int(got[0][0].split()[0])
        if ("Content-Type", "application/json") in got[0][1]:
            import json

            return status, {b"json": json.loads(b"".join(chunks))}
        reply = bencode.decode(b"".join(chunks))
        if not isinstance(reply, dict):
            raise Finding(f"tracker answered {status} with a non-dict body")
        if status == 500:
            raise Finding(f"tracker failed internally on {path}: {reply!r}")
        if status != 200:
            reason = reply.get(b"failure reason")
            if not isinstance(reason, bytes):
                raise Finding(f"tracker refusal {status} has no failure reason")
            check_message(Exception(reason.decode("utf-8", "replace")))
        return status, reply

    def signed(
        self, path: str, inner: Any, who: PeerIdentity | None = None
    ) -> tuple[int, dict[bytes, Any]]:
        """Post ``inner`` (a decoded value, or raw message bytes) signed by ``who``."""
        who = who or self.fuzzer
        msg = inner if isinstance(inner, bytes) else bencode.encode(inner)
        # Each input is judged on its own: on the harness' frozen clock the tracker
        # would otherwise refuse every input as a replay once its memory is full.
        self.tracker.recent.clear()
        signed = tracker_client.signed_message(self.tracker.fingerprint, path, msg)
        sig = who.signing.sign(signed).signature
        body = bencode.encode({b"msg": msg, b"peer": who.identity_public, b"sig": sig})
        return self.post(path, body)


_HARNESS: list[TrackerHarness] = []


def tracker_harness() -> TrackerHarness:
    """The process-wide harness (state in a temporary folder removed at exit)."""
    if not _HARNESS:
        import atexit
        import shutil
        import tempfile

        state = tempfile.mkdtemp(prefix="anomos-fuzz-tracker-")
        atexit.register(shutil.rmtree, state, True)
        _HARNESS.append(TrackerHarness(state))
    return _HARNESS[0]


def tracker_server_seeds() -> list[bytes]:
    me = fixed_identity("fuzzer")
    return [
        b"\2" + bencode.encode(announce_inner(me, 6999, left=5)),
        b"\3" + bencode.encode(circuits_inner()),
        b"\0" + bencode.encode({b"msg": b"d1:xi1ee", b"peer": b"p" * 32, b"sig": b"s" * 64}),
    ]


def _tracker_server_run(data: bytes) -> object:
    """Byte 0: bit 0 announce/circuits; bit 1 the rest is a message the fuzzing peer
    signs (else the raw request body); bit 2 omit Content-Length."""
    if not data:
        return None
    harness = tracker_harness()
    path = tracker_server.CIRCUITS_PATH if data[0] & 1 else tracker_server.ANNOUNCE_PATH
    if data[0] & 2:
        return harness.signed(path, data[1:])
    return harness.post(path, data[1:], length="" if data[0] & 4 else None)


# ----------------------------------------------------------------------------- registry

_NEEDS = {
    "wire": wire,
    "frames": frames,
    "tracker_client": tracker_client,
    "tracker_server": tracker_server,
}

TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target(
            "bencode",
            _bencode_run,
            (bencode.BencodeError,),
            bencode_seeds,
            doc="anomos.bencode.decode; accepted inputs must re-encode to themselves",
        ),
        Target(
            "metainfo",
            _metainfo_run,
            (MetainfoError,),
            metainfo_seeds,
            doc="Metainfo.from_bytes; accepted files survive to_bytes and have safe paths",
        ),
        Target(
            "wire",
            _wire_run,
            (ProtocolError,),
            wire_seeds,
            max_len=32768,
            doc="peer-wire handshake and MessageReader.feed in chunks; unpack_bitfield",
        ),
        Target(
            "frames",
            _frames_run,
            (ProtocolError,),
            frame_seeds,
            doc="FrameReader over a chunked socket; decode_auth, decode_break",
        ),
        Target(
            "onion",
            _onion_run,
            (CryptoError,),
            onion_seeds,
            doc="OnionReader.peel, raw and behind a valid MAC",
        ),
        Target(
            "request",
            _request_run,
            (CryptoError,),
            request_seeds,
            doc="open_request, raw and behind a valid sealed box",
        ),
        Target(
            "e2e",
            _e2e_run,
            (ProtocolError,),  # CryptoError is a ProtocolError
            e2e_seeds,
            doc="decode_hello, decode_reply, E2EChannel.open raw and behind a valid AEAD",
        ),
        Target(
            "ciphers",
            _cipher_run,
            (CryptoError,),
            cipher_seeds,
            doc="every registered suite's responder_accept and initiator_finish",
        ),
        Target(
            "tracker_client",
            _tracker_client_run,
            (TrackerError,),
            tracker_reply_seeds,
            doc="TrackerClient.announce / request_circuits reply parsing",
        ),
        Target(
            "tracker_server",
            _tracker_server_run,
            (),
            tracker_server_seeds,
            doc="Tracker.wsgi: raw and signed announce/circuits bodies; never a 500",
        ),
    ]
    if _NEEDS.get(t.name, True) is not None
}

#: Errors that any target may legitimately raise (kept for documentation).
DOCUMENTED = AnomosError


# ----------------------------------------------------------------------------- atheris entry


def write_seeds(target: Target, directory: str) -> int:
    """Write the target's seeds into ``directory`` (created); returns how many."""
    os.makedirs(directory, exist_ok=True)
    seeds = target.seeds()
    for seed in seeds:
        name = hashlib.sha1(seed).hexdigest()
        with open(os.path.join(directory, name), "wb") as f:
            f.write(seed)
    return len(seeds)


def atheris_main(target: Target, argv: list[str] | None = None) -> None:
    """Run ``target`` under atheris; seeds a corpus folder when none is given."""
    import atheris

    argv = list(sys.argv if argv is None else argv)
    if not any(a.startswith("-max_len") for a in argv):
        argv.append(f"-max_len={target.max_len}")
    if not any(a.startswith("-timeout") for a in argv):
        argv.append(f"-timeout={int(HANG_SECONDS)}")
    if not any(a.startswith("-rss_limit_mb") for a in argv):
        argv.append("-rss_limit_mb=2048")
    if not [a for a in argv[1:] if not a.startswith("-")]:
        corpus = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", target.name)
        write_seeds(target, corpus)
        argv.append(corpus)

    def test_one_input(data: bytes) -> None:
        check(target, data)

    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
