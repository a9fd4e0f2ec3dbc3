"""A peer's long-term keys: generation, storage, refusal of corrupt files."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import nacl.signing
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from anomos.errors import ConfigError
from anomos.identity import IDENTITY_FILE, PeerIdentity, fingerprint


def test_generate_has_three_distinct_keys_with_matching_publics() -> None:
    ident = PeerIdentity.generate()
    assert len(ident.identity_public) == len(ident.onion_public) == len(ident.box_public) == 32
    assert len({ident.identity_public, ident.onion_public, ident.box_public}) == 3
    onion = X25519PrivateKey.from_private_bytes(ident.onion_private).public_key()
    assert onion.public_bytes(Encoding.Raw, PublicFormat.Raw) == ident.onion_public
    assert bytes(ident.box.public_key) == ident.box_public
    signed = ident.signing.sign(b"hello")
    assert nacl.signing.VerifyKey(ident.identity_public).verify(signed) == b"hello"
    assert PeerIdentity.generate() != ident


def test_repr_hides_private_keys() -> None:
    ident = PeerIdentity.generate()
    text = repr(ident)
    assert ident.onion_private.hex() not in text
    assert bytes(ident.signing).hex() not in text
    assert bytes(ident.box).hex() not in text


def test_fingerprint_is_hex_sha256() -> None:
    assert fingerprint(b"k" * 32) == hashlib.sha256(b"k" * 32).hexdigest()
    ident = PeerIdentity.generate()
    assert ident.fingerprint == fingerprint(ident.identity_public)


def test_load_or_create_persists_with_mode_0600(tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"  # created on demand
    first = PeerIdentity.load_or_create(state)
    path = state / IDENTITY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = PeerIdentity.load_or_create(state)
    assert second == first
    assert second.onion_public == first.onion_public
    assert [p.name for p in state.iterdir()] == [IDENTITY_FILE]  # no temp file left
    doc = json.loads(path.read_text())
    assert doc["onion"] == first.onion_private.hex()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"version": 99}',
        b'{"version": 1, "signing": "00", "onion": "00", "box": "00"}',
        b"x" * 20000,
    ],
)
def test_corrupt_file_is_refused_and_kept(state_dir: Path, content: bytes) -> None:
    path = state_dir / IDENTITY_FILE
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="corrupt") as info:
        PeerIdentity.load_or_create(state_dir)
    assert "\n" not in str(info.value)
    assert path.read_bytes() == content


def test_json_missing_one_key_names_it(state_dir: Path) -> None:
    doc = json.loads(PeerIdentity.generate().to_json())
    del doc["box"]
    (state_dir / IDENTITY_FILE).write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="'box'"):
        PeerIdentity.load_or_create(state_dir)


def test_write_never_replaces_an_existing_identity(state_dir: Path) -> None:
    """The race where another process created the file after our existence check."""
    theirs = PeerIdentity.load_or_create(state_dir)
    ours = PeerIdentity.generate()
    assert ours._write_new(state_dir / IDENTITY_FILE) is False
    assert PeerIdentity.load_or_create(state_dir) == theirs
    assert len(list(state_dir.iterdir())) == 1
