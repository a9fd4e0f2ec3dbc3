"""The tracker's long-term TLS identity, and pinning it from the client side.

Peers trust the tracker by the SHA-256 of its public key (in the ``.atorrent``
or given with ``--fingerprint``), not by a certificate authority, so the key
must outlive restarts: it is made once, kept in the state directory with mode
0600, and only the self-signed certificate around it is renewed when it runs
out. Both sides speak TLS 1.3 only.
"""

from __future__ import annotations

import datetime
import logging
import os
import secrets
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from anomos.errors import ConfigError, StorageError, TrackerError
from anomos.fsutil import atomic_write, private_dir
from anomos.protocol.request import tracker_fingerprint

log = logging.getLogger(__name__)

_T = TypeVar("_T")

KEY_FILE = "tracker-key.pem"
CERT_FILE = "tracker-cert.pem"
#: Days a freshly made certificate is valid.
CERT_VALIDITY_DAYS = 3650
#: A certificate expiring within this many days is renewed at start-up.
CERT_RENEW_DAYS = 30
#: Largest PEM file we agree to read.
MAX_PEM_FILE = 64 * 1024


def spki_fingerprint(cert_der: bytes) -> str:
    """Hex SHA-256 of the DER SubjectPublicKeyInfo of a DER certificate."""
    return tracker_fingerprint(x509.load_der_x509_certificate(cert_der).public_key())


def normalise_fingerprint(text: str) -> str:
    """Lower-case hex without separators; ``ConfigError`` unless it is 64 hex digits."""
    clean = text.strip().lower().replace(":", "")
    if len(clean) != 64 or any(c not in "0123456789abcdef" for c in clean):
        raise ConfigError(f"tracker fingerprint {text!r} is not 64 hex digits (SHA-256)")
    return clean


@attrs.frozen
class TrackerIdentity:
    """Paths of the tracker's key and certificate, the key's fingerprint and the key."""

    key_path: Path
    cert_path: Path
    fingerprint: str
    #: The key itself: it also signs the requests the tracker seals to sources.
    private_key: ec.EllipticCurvePrivateKey = attrs.field(repr=False, eq=False)

    @classmethod
    def load_or_create(cls, state_dir: str | os.PathLike[str]) -> TrackerIdentity:
        """The identity kept in ``state_dir``, created (key) or renewed (certificate) as needed."""
        directory = Path(state_dir)
        _config(private_dir, directory)
        key_path = directory / KEY_FILE
        cert_path = directory / CERT_FILE
        key = _load_key(key_path) if key_path.exists() else _create_key(key_path)
        cert = _load_cert(cert_path) if cert_path.exists() else None
        if cert is None or not _cert_is_fresh(cert, key):
            cert = _make_cert(key)
            pem = cert.public_bytes(serialization.Encoding.PEM)
            _config(atomic_write, cert_path, pem, mode=0o644)
            log.info("wrote a new tracker certificate %s", cert_path)
        return cls(key_path, cert_path, tracker_fingerprint(key.public_key()), key)

    def server_context(self) -> ssl.SSLContext:
        """TLS 1.3-only server context with this identity."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(str(self.cert_path), str(self.key_path))
        return ctx


def pinned_context() -> ssl.SSLContext:
    """TLS 1.3-only client context that accepts any certificate: call :func:`check_pin` next.

    The standard library cannot verify a self-signed certificate by its key
    hash, so verification is done explicitly right after the handshake.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class TrackerTrustError(TrackerError):
    """The tracker is not the one configured (or cannot be reached as configured):
    unlike a tracker that is down, retrying will not help."""


def check_pin(sock: ssl.SSLSocket, fingerprint: str) -> None:
    """Raise :class:`TrackerTrustError` unless the peer's public key hashes to ``fingerprint``."""
    der = sock.getpeercert(binary_form=True)
    got = spki_fingerprint(der) if der else "no certificate"
    if not secrets.compare_digest(got, fingerprint.lower()):
        raise TrackerTrustError(f"tracker identity mismatch: expected {fingerprint}, got {got}")


# ---------------------------------------------------------------------------- files


def _create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if not _config(atomic_write, path, pem, mode=0o600, replace=False):
        return _load_key(path)  # another process made it first
    log.info("created a new tracker key %s", path)
    return key


def _read_pem(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_PEM_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read tracker {what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PEM_FILE:
        raise ConfigError(f"tracker {what} {path} is too large to be a PEM file")
    return data


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    data = _read_pem(path, "key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"tracker key {path} is unreadable ({exc}); move it away") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"tracker key {path} is not an ECDSA key; move it away")
    mode = path.stat().st_mode
    if mode & 0o077:
        log.warning("tracker key %s is readable by others (mode %o)", path, mode & 0o777)
    return key


def _load_cert(path: Path) -> x509.Certificate | None:
    """The stored certificate, or ``None`` when it is unusable and should be remade."""
    try:
        return x509.load_pem_x509_certificate(_read_pem(path, "certificate"))
    except ValueError:
        log.warning("tracker certificate %s is unreadable; making a new one", path)
        return None


def _cert_is_fresh(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    same_key = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    renew_at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=CERT_RENEW_DAYS)
    return same_key and cert.not_valid_after_utc > renew_at


def _make_cert(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anomos tracker")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=CERT_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def _config(fn: Callable[..., _T], *args: Any, **kw: Any) -> _T:
    """Call an :mod:`anomos.fsutil` helper; its StorageError is a ConfigError here (exit 2)."""
    try:
        return fn(*args, **kw)
    except StorageError as exc:
        raise ConfigError(str(exc)) from None
