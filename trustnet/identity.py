"""Node identity: an Ed25519 key pair, signed statements, replay protection.

A node's name is bound to its public key at first registration; from then on
what it says about itself (registration, heartbeats, link reports) must be a
statement signed by that key. A statement carries a timestamp and a random
nonce, and the verifier keeps the nonces it saw within the allowed clock
skew, so a captured statement cannot be replayed.

Heartbeats, the one statement a node makes every interval, go cheaper: a
signed "session" statement carries an X25519 key share, the registry answers
with its own, and both derive a session key (session_key). Each heartbeat
then carries a counter and a MAC under that key (session_mac): one hash for
the registry instead of an Ed25519 verification. Only the holders of the
signing key's share can compute the key, so the MAC authenticates the node as
the signature did; the counter only goes up, so a captured heartbeat cannot
be replayed.
"""

from __future__ import annotations

import base64
import hmac
import os
import secrets
import time
from pathlib import Path
from typing import Any

import orjson
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_FILE = "node.key"
MAX_SKEW = 60.0  # seconds a statement's timestamp may differ from the verifier's clock


class IdentityError(Exception):
    """A key file that cannot be used, or a statement that does not verify."""


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"not base64url: {exc}") from None


def public_key_from_text(text: str) -> Ed25519PublicKey:
    raw = unb64(text)
    if len(raw) != 32:
        raise IdentityError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


class NodeIdentity:
    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        self.public_key = b64(private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, data_dir: str | os.PathLike[str]) -> NodeIdentity:
        """The key in `data_dir/node.key`, created (mode 0600) on first start."""
        path = Path(data_dir) / KEY_FILE
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (OSError, ValueError) as exc:
                raise IdentityError(f"{path}: cannot read the node key: {exc}") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise IdentityError(f"{path}: not an Ed25519 private key")
            return cls(key)
        identity = cls.generate()
        pem = identity._key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created with 0600 from the start: never readable by others, even briefly.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return identity

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """For what must sign with it directly (the node's self-signed TLS
        certificate, trustnet.tls.peer_server_context)."""
        return self._key

    def sign(self, data: bytes) -> str:
        return b64(self._key.sign(data))

    def statement(self, purpose: str, node_id: str, body: dict[str, Any],
                  now: float | None = None) -> dict[str, Any]:
        """A signed statement: {purpose, node_id, ts, nonce, body, sig}."""
        stmt = {"purpose": purpose, "node_id": node_id,
                "ts": time.time() if now is None else now,
                "nonce": secrets.token_hex(12), "body": body}
        stmt["sig"] = self.sign(canonical(stmt))
        return stmt


def canonical(stmt: dict[str, Any]) -> bytes:
    """The bytes a statement's signature covers (everything but the signature)."""
    return orjson.dumps({k: v for k, v in stmt.items() if k != "sig"},
                        option=orjson.OPT_SORT_KEYS)


def verify(public_key: str, data: bytes, signature: str) -> bool:
    """Whether `signature` (base64url) is `public_key`'s Ed25519 signature of `data`.

    Checked by libsodium (PyNaCl) rather than `cryptography`, which signs:
    the same RFC 8032 signatures, verified in 40 us here against 62-66 us,
    and a registry checks one per signed heartbeat (bench/heartbeats.py).
    Like `cryptography`'s, the call releases the GIL, so a worker thread
    verifies while the event loop goes on."""
    try:
        key, sig = unb64(public_key), unb64(signature)
        if len(key) != 32 or len(sig) != 64:
            return False
        crypto_sign_open(sig + data, key)
    except (BadSignatureError, IdentityError, ValueError, TypeError):
        return False
    return True


# ------------------------------------------------------------ heartbeat sessions

SESSION_INFO = b"trustnet heartbeat session v1"
MAC_BYTES = 16  # HMAC-SHA256 truncated to 128 bits (RFC 2104 section 5 allows it)


def session_share() -> tuple[X25519PrivateKey, str]:
    """A fresh X25519 key share: the private half and the public half as base64url."""
    private = X25519PrivateKey.generate()
    return private, b64(private.public_key().public_bytes(serialization.Encoding.Raw,
                                                           serialization.PublicFormat.Raw))


def session_key(private: X25519PrivateKey, peer_share: str, node_id: str,
                node_share: str, registry_share: str) -> bytes:
    """The 32-byte session key both ends derive: HKDF-SHA256 over the X25519
    secret, bound to the node and to both shares (a key derived for one
    node or one exchange is useless for another). IdentityError if the
    peer's share is not an X25519 public key or gives a degenerate secret."""
    raw = unb64(peer_share)
    if len(raw) != 32:
        raise IdentityError(f"an X25519 key share is 32 bytes, got {len(raw)}")
    try:
        secret = private.exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError as exc:  # an all-zero secret: a low-order point
        raise IdentityError(f"unusable X25519 key share: {exc}") from None
    info = b"|".join((SESSION_INFO, node_id.encode(), node_share.encode(),
                      registry_share.encode()))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def session_mac(key: bytes, session: str, counter: int) -> str:
    """The MAC of heartbeat `counter` of `session`, as hex."""
    return hmac.digest(key, f"{session}:{counter}".encode(), "sha256")[:MAC_BYTES].hex()


def session_mac_ok(key: bytes, session: str, counter: int, mac: str) -> bool:
    return isinstance(mac, str) and hmac.compare_digest(session_mac(key, session, counter), mac)


class ReplayGuard:
    """Accepts each (node, nonce) once within the skew window, and nothing older."""

    def __init__(self, max_skew: float = MAX_SKEW):
        self.max_skew = max_skew
        self._seen: dict[tuple[str, str], float] = {}
        self._next_prune = 0.0

    def check(self, stmt: dict[str, Any], public_key: str, purpose: str,
              now: float | None = None) -> dict[str, Any]:
        """The statement's body if it is genuine, fresh and new; else IdentityError.

        The same as precheck(), then signature_ok() (the costly part, which
        touches no state: a batch may run in a worker thread), then admit()."""
        now = time.time() if now is None else now
        self.precheck(stmt, purpose, now)
        if not self.signature_ok(stmt, public_key):
            raise self.forged(stmt)
        return self.admit(stmt, now)

    def precheck(self, stmt: dict[str, Any], purpose: str, now: float) -> None:
        """Shape, purpose, timestamp and nonce; IdentityError if any is wrong."""
        if set(stmt) != {"purpose", "node_id", "ts", "nonce", "body", "sig"}:
            raise IdentityError("a statement has exactly purpose, node_id, ts, nonce, body, sig")
        if stmt["purpose"] != purpose:
            raise IdentityError(f"statement is for {stmt['purpose']!r}, expected {purpose!r}")
        ts, nonce = stmt["ts"], stmt["nonce"]
        if not isinstance(ts, (int, float)) or isinstance(ts, bool) or abs(now - ts) > self.max_skew:
            raise IdentityError(f"statement timestamp is not within {self.max_skew:.0f}s of now")
        if not isinstance(nonce, str) or not 8 <= len(nonce) <= 64:
            raise IdentityError("statement nonce must be a string of 8..64 characters")

    @staticmethod
    def signature_ok(stmt: dict[str, Any], public_key: str) -> bool:
        """Whether `public_key` signed the (prechecked) statement."""
        return isinstance(stmt["sig"], str) and verify(public_key, canonical(stmt), stmt["sig"])

    @staticmethod
    def forged(stmt: dict[str, Any]) -> IdentityError:
        return IdentityError(f"signature of {stmt['node_id']!r} does not verify "
                             "with its registered key")

    def admit(self, stmt: dict[str, Any], now: float) -> dict[str, Any]:
        """Record a prechecked, verified statement's nonce; IdentityError if it
        was seen before (a replay). Its body."""
        key = (str(stmt["node_id"]), stmt["nonce"])
        if key in self._seen:
            raise IdentityError("statement was already used (replay)")
        self._seen[key] = stmt["ts"]
        self._prune(now)
        return stmt["body"]

    def _prune(self, now: float) -> None:
        if now < self._next_prune:
            return
        self._next_prune = now + self.max_skew
        horizon = now - 2 * self.max_skew
        self._seen = {k: t for k, t in self._seen.items() if t >= horizon}
