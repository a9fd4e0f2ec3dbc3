"""Publishing a local port as a v3 onion service, with v3 client authorization.

The service key is kept in a file (mode 0600), so the ``.onion`` address
survives restarts: a tracker's address is part of every ``.atorrent``.

An ephemeral service (``ADD_ONION``) lives as long as the control connection
that created it, unless published with ``detached=True``.

Client authorization (v3): the service lists the X25519 *public* keys of the
clients allowed to read its descriptor (``client_auth_keys``); everyone else
cannot even learn the service's introduction points. A client installs its
*private* key in its own tor before connecting, with :func:`add_client_auth`
(the ControlPort command ``ONION_CLIENT_AUTH_ADD <address> x25519:<base64>``),
or by hand in the directory named by its torrc's ``ClientOnionAuthDir`` as a
file ``NAME.auth_private`` holding ``<address without .onion>:descriptor:x25519:<base32>``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import queue
import re
import time
from collections.abc import Iterable
from pathlib import Path

import attrs
import stem
import stem.control
import stem.response
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from stem.control import Controller

from anomos.errors import ConfigError, TransportError
from anomos.fsutil import atomic_write

log = logging.getLogger(__name__)

#: Seconds to wait until the descriptor is on at least one HSDir.
PUBLISH_TIMEOUT = 60.0
#: Largest key file we read.
MAX_KEY_FILE = 512

_KEY_RE = re.compile(r"ED25519-V3:([A-Za-z0-9+/]{86}==|[A-Za-z0-9+/]{88})")
_SERVICE_ID_RE = re.compile(r"[a-z2-7]{56}")


# --------------------------------------------------------------------------- client auth keys
@attrs.frozen
class ClientAuthKey:
    """An X25519 key pair for v3 onion-service client authorization."""

    private: bytes = attrs.field(repr=False)
    public: bytes

    @classmethod
    def generate(cls) -> ClientAuthKey:
        return cls.from_private(X25519PrivateKey.generate().private_bytes_raw())

    @classmethod
    def from_private(cls, private: bytes) -> ClientAuthKey:
        if len(private) != 32:
            raise ConfigError("a client authorization key has 32 bytes")
        public = (
            X25519PrivateKey.from_private_bytes(private)
            .public_key()
            .public_bytes(Encoding.Raw, PublicFormat.Raw)
        )
        return cls(private, public)

    @property
    def public_b32(self) -> str:
        """What the service operator passes to ``--onion-client-auth``."""
        return base64.b32encode(self.public).decode().rstrip("=")

    @property
    def private_b32(self) -> str:
        """For a ``.auth_private`` file in ``ClientOnionAuthDir``."""
        return base64.b32encode(self.private).decode().rstrip("=")

    @property
    def private_b64(self) -> str:
        """For ``ONION_CLIENT_AUTH_ADD ... x25519:<this>``."""
        return base64.b64encode(self.private).decode()


def parse_client_auth_public(text: str) -> str:
    """Validate a base32 X25519 public key (52 characters, as tor prints it); return it."""
    cleaned = text.strip().upper()
    if cleaned.startswith("DESCRIPTOR:X25519:"):
        cleaned = cleaned[len("DESCRIPTOR:X25519:") :]
    try:
        raw = base64.b32decode(cleaned + "=" * (-len(cleaned) % 8))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{text[:60]!r} is not a base32 x25519 client authorization key")
    return cleaned


def add_client_auth(
    controller: Controller,
    onion_address: str,
    key: ClientAuthKey,
    *,
    permanent: bool = False,
) -> None:
    """Let this (client) tor read the descriptor of a service that requires client auth."""
    service_id = service_id_of(onion_address)
    command = f"ONION_CLIENT_AUTH_ADD {service_id} x25519:{key.private_b64}"
    if permanent:
        command += " Flags=Permanent"
    try:
        response = controller.msg(command)
    except (stem.ControllerError, stem.SocketError) as exc:
        raise TransportError(f"tor refused the client key for {onion_address}: {exc}") from None
    # 250 OK, 251 replaced an older key, 252 registered and decrypted a cached descriptor
    if response.content()[0][0] not in ("250", "251", "252"):
        raise TransportError(f"tor refused the client key for {onion_address}: {response}")


# --------------------------------------------------------------------------- service keys
def service_id_of(onion_address: str) -> str:
    """``abc...xyz.onion[:port]`` -> the 56-character service id, validated."""
    host = onion_address.rpartition(":")[0] if onion_address.count(":") == 1 else onion_address
    service_id = host.lower().removesuffix(".onion")
    if not _SERVICE_ID_RE.fullmatch(service_id):
        raise ConfigError(f"{onion_address!r} is not a v3 onion address")
    return service_id


def load_key(key_path: Path) -> str | None:
    """The ``ED25519-V3:<base64>`` blob saved at ``key_path``, or None if there is none."""
    try:
        with open(key_path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
            mode = os.fstat(f.fileno()).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read onion service key {key_path}: {exc.strerror}") from None
    text = data.decode("ascii", "replace").strip()
    match = _KEY_RE.fullmatch(text)
    if len(data) > MAX_KEY_FILE or not match or len(base64.b64decode(match.group(1))) != 64:
        raise ConfigError(f"{key_path} is not an onion service key (ED25519-V3:<base64>)")
    if mode & 0o077:
        log.warning("onion service key %s was readable by others; now mode 0600", key_path)
        os.chmod(key_path, 0o600)
    return text


def save_key(key_path: Path, blob: str) -> None:
    """Write the key atomically, readable by its owner only."""
    key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # may be any folder: no chmod
    atomic_write(key_path, (blob + "\n").encode(), mode=0o600)


# --------------------------------------------------------------------------- publish
def publish(
    controller: Controller,
    local_port: int,
    *,
    key_path: Path | None = None,
    client_auth_keys: Iterable[str | ClientAuthKey] = (),
    virtual_port: int | None = None,
    target_host: str = "127.0.0.1",
    detached: bool = False,
    timeout: float = PUBLISH_TIMEOUT,
) -> str:
    """Publish ``target_host:local_port`` as a v3 onion service; return ``xxx.onion``.

    Clients reach it at ``xxx.onion:virtual_port`` (default: ``local_port``).
    With ``key_path``, the service key is created there on first use and reused
    afterwards, so the address never changes. ``client_auth_keys`` (base32
    X25519 public keys) restrict the service to those clients. Returns once the
    descriptor reached an HSDir; raises :class:`TransportError` otherwise.
    """
    key_path = Path(key_path) if key_path is not None else None
    saved = load_key(key_path) if key_path is not None else None
    auth = [
        k.public_b32 if isinstance(k, ClientAuthKey) else parse_client_auth_public(k)
        for k in client_auth_keys
    ]
    flags = []
    if key_path is None:
        flags.append("DiscardPK")
    if detached:
        flags.append("Detach")
    if auth:
        flags.append("V3Auth")
    command = f"ADD_ONION {saved or 'NEW:ED25519-V3'}"
    if flags:
        command += " Flags=" + ",".join(flags)
    command += f" Port={virtual_port or local_port},{target_host}:{local_port}"
    command += "".join(f" ClientAuthV3={k}" for k in auth)

    events: queue.Queue[stem.response.events.HSDescEvent] = queue.Queue()
    listener = events.put
    try:
        controller.add_event_listener(listener, stem.control.EventType.HS_DESC)
        response = controller.msg(command)
        stem.response.convert("ADD_ONION", response)
    except (stem.ControllerError, stem.SocketError) as exc:
        _remove_listener(controller, listener)
        raise TransportError(f"tor refused to publish an onion service: {exc}") from None
    service_id = response.service_id
    try:
        if key_path is not None and saved is None:
            if not response.private_key:
                raise TransportError("tor did not return the new onion service key")
            save_key(key_path, f"{response.private_key_type}:{response.private_key}")
        _await_upload(events, service_id, timeout)
    except BaseException:
        unpublish(controller, service_id)
        raise
    finally:
        _remove_listener(controller, listener)
    log.info("onion service %s.onion published for port %d", service_id, local_port)
    return f"{service_id}.onion"


def _await_upload(
    events: queue.Queue[stem.response.events.HSDescEvent], service_id: str, timeout: float
) -> None:
    """Wait for one UPLOADED of our descriptor (tor omits the address there, so track dirs)."""
    deadline = time.monotonic() + timeout
    ours: set[str] = set()
    failures: list[str] = []
    while True:
        left = deadline - time.monotonic()
        try:
            event = events.get(timeout=max(0.0, left))
        except queue.Empty:
            raise TransportError(
                f"onion service {service_id}.onion was not published within {timeout:g} s"
            ) from None
        fp = event.directory_fingerprint
        if event.action == stem.HSDescAction.UPLOAD and event.address == service_id:
            ours.add(fp)
        elif event.action == stem.HSDescAction.UPLOADED and (
            fp in ours or event.address == service_id
        ):
            return
        elif event.action == stem.HSDescAction.FAILED and fp in ours:
            failures.append(f"{fp} ({event.reason})")
            if len(failures) == len(ours):
                raise TransportError(
                    f"no HSDir accepted onion service {service_id}.onion: {', '.join(failures)}"
                )


def _remove_listener(controller: Controller, listener: object) -> None:
    try:
        controller.remove_event_listener(listener)
    except (stem.ControllerError, stem.SocketError):
        pass


def unpublish(controller: Controller, onion_address: str) -> None:
    """Withdraw an ephemeral onion service; quiet if it or the controller is gone."""
    try:
        controller.remove_ephemeral_hidden_service(onion_address.removesuffix(".onion"))
    except (stem.ControllerError, stem.SocketError) as exc:
        log.debug("could not withdraw %s: %s", onion_address, exc)
