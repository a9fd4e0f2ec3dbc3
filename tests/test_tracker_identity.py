"""The tracker's TLS identity: kept across restarts, TLS 1.3 only, pinned by SPKI hash."""

from __future__ import annotations

import hashlib
import socket
import ssl
import stat

import gevent
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from anomos.errors import ConfigError, TrackerError
from anomos.tracker import identity as identity_mod
from anomos.tracker.identity import (
    TrackerIdentity,
    check_pin,
    normalise_fingerprint,
    pinned_context,
)


def spki_hash(cert_path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def test_created_once_private_and_stable(tmp_path):
    ident = TrackerIdentity.load_or_create(tmp_path / "s")
    assert stat.S_IMODE(ident.key_path.stat().st_mode) == 0o600
    assert ident.fingerprint == spki_hash(ident.cert_path)
    again = TrackerIdentity.load_or_create(tmp_path / "s")
    assert again.fingerprint == ident.fingerprint
    assert TrackerIdentity.load_or_create(tmp_path / "other").fingerprint != ident.fingerprint


def test_expiring_certificate_is_renewed_with_the_same_key(tmp_path, monkeypatch):
    monkeypatch.setattr(identity_mod, "CERT_VALIDITY_DAYS", 2)  # inside the renewal window
    first = TrackerIdentity.load_or_create(tmp_path)
    old_cert = first.cert_path.read_bytes()
    monkeypatch.setattr(identity_mod, "CERT_VALIDITY_DAYS", 3650)
    second = TrackerIdentity.load_or_create(tmp_path)
    assert second.cert_path.read_bytes() != old_cert
    assert second.fingerprint == first.fingerprint
    # A fresh certificate is left alone.
    assert TrackerIdentity.load_or_create(tmp_path).cert_path.read_bytes() == (
        second.cert_path.read_bytes()
    )


def test_corrupt_key_is_refused_not_replaced(tmp_path):
    TrackerIdentity.load_or_create(tmp_path)
    (tmp_path / identity_mod.KEY_FILE).write_bytes(b"junk")
    with pytest.raises(ConfigError, match=r"tracker key .* is unreadable"):
        TrackerIdentity.load_or_create(tmp_path)
    assert (tmp_path / identity_mod.KEY_FILE).read_bytes() == b"junk"


def serve_once(ident: TrackerIdentity):
    """A TLS listener doing one handshake; returns (port, greenlet)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def run():
        conn, _ = listener.accept()
        try:
            tls = ident.server_context().wrap_socket(conn, server_side=True)
            tls.recv(1)
        except (ssl.SSLError, OSError):
            pass
        finally:
            conn.close()
            listener.close()

    return listener.getsockname()[1], gevent.spawn(run)


def test_pin_check_and_tls13_only(tmp_path):
    ident = TrackerIdentity.load_or_create(tmp_path / "t")
    port, g = serve_once(ident)
    with socket.create_connection(("127.0.0.1", port)) as raw:
        tls = pinned_context().wrap_socket(raw)
        assert tls.version() == "TLSv1.3"
        check_pin(tls, ident.fingerprint)
        wrong = "ab" * 32
        with pytest.raises(TrackerError) as err:
            check_pin(tls, wrong)
        assert str(err.value) == (
            f"tracker identity mismatch: expected {wrong}, got {ident.fingerprint}"
        )
        tls.close()
    g.join(5)

    port, g = serve_once(ident)
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", port)) as raw, pytest.raises(ssl.SSLError):
        old.wrap_socket(raw)
    g.join(5)


def test_fingerprint_format():
    fp = "AB:" * 31 + "AB"
    assert normalise_fingerprint(fp) == "ab" * 32
    with pytest.raises(ConfigError, match="not 64 hex digits"):
        normalise_fingerprint("zz" * 32)
