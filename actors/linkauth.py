"""Proof that both ends of a link hold a shared secret (the members of a group
of processes, e.g. the replicas of one registry).

A dialler that has the secret puts a proof in its hello: an HMAC-SHA256 of
its address, the address it dials, the time and a fresh nonce. An acceptor
with the same secret checks it against its own address (the time within
PROOF_SKEW of its clock, the nonce not seen before in that window) and
answers with a welcome: an HMAC of both addresses and the dialler's nonce,
which nobody without the secret can make for a nonce they never saw. Each
side trusts the connection once it checked the other's proof, and only a
trusted connection may carry messages declared `trusted` (actors.codec).
A proof names the acceptor, so a process that a member dialled (anyone can
make a member dial back: ask it something and hang up) cannot replay the
proof it got to another member.

A connection without a proof is not an error (other processes use the same
port); a wrong proof or welcome is: the secret differs, which an operator
must hear about. This authenticates the connection when it opens, not each
frame: an attacker who can inject into a TCP stream between members is out
of scope (as for the rest of the links).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Any, Callable

from .errors import ProtocolError

PROOF_SKEW = 120.0  # seconds a hello's time may differ from ours (clocks of one group)
_LABEL = "actors-link-v1"
_NONCE_HEX = 32


def _mac(secret: bytes, *parts: str) -> str:
    return hmac.new(secret, "\n".join((_LABEL, *parts)).encode(), hashlib.sha256).hexdigest()


def hello_proof(secret: bytes, address: str, to: str, *, now: float | None = None,
                nonce: str | None = None) -> dict[str, Any]:
    """The proof a dialler at `address` puts in its hello to `to`."""
    stamp = int(time.time() if now is None else now)
    nonce = nonce or secrets.token_hex(_NONCE_HEX // 2)
    return {"time": stamp, "nonce": nonce,
            "mac": _mac(secret, "hello", address, to, str(stamp), nonce)}


def welcome_frame(secret: bytes, dialler: str, acceptor: str, nonce: str) -> dict[str, Any]:
    """The acceptor's answer to a hello whose proof it checked."""
    return {"welcome": 1, "mac": _mac(secret, "welcome", dialler, acceptor, nonce)}


def check_welcome(secret: bytes, dialler: str, acceptor: str, nonce: str, data: Any) -> None:
    """ProtocolError unless `data` is the welcome for our hello's `nonce`."""
    if not isinstance(data, dict) or set(data) != {"welcome", "mac"} or data["welcome"] != 1:
        raise ProtocolError('the welcome must be {"welcome": 1, "mac": "..."}')
    if not _same(data["mac"], _mac(secret, "welcome", dialler, acceptor, nonce)):
        raise ProtocolError("the peer's welcome does not match our shared secret")


def _same(mac: Any, expected: str) -> bool:
    # compare_digest on str raises TypeError for non-ASCII text: compare bytes.
    return isinstance(mac, str) and hmac.compare_digest(mac.encode(), expected.encode())


class ProofChecker:
    """An acceptor's check of hello proofs, with the nonces it has seen."""

    def __init__(self, secret: bytes, address: str, *, skew: float = PROOF_SKEW,
                 clock: Callable[[], float] = time.time):
        self.secret = secret
        self.address = address  # ours: a proof must name it
        self.skew = skew
        self.clock = clock
        self._seen: dict[str, float] = {}  # nonce -> its hello's time

    def check(self, address: str, proof: Any) -> str:
        """The proof's nonce if `proof` proves the secret for `address`;
        ProtocolError if not (malformed, wrong, too old, or replayed)."""
        if (not isinstance(proof, dict) or set(proof) != {"time", "nonce", "mac"}
                or type(proof["time"]) is not int or not isinstance(proof["nonce"], str)
                or not isinstance(proof["mac"], str) or len(proof["nonce"]) != _NONCE_HEX):
            raise ProtocolError('the hello proof must be {"time": int, "nonce": hex, "mac": hex}')
        stamp, nonce = proof["time"], proof["nonce"]
        expected = _mac(self.secret, "hello", address, self.address, str(stamp), nonce)
        if not _same(proof["mac"], expected):
            raise ProtocolError(f"the hello proof does not match our shared secret and our "
                                f"address {self.address} (a peer must dial us there)")
        now = self.clock()
        if abs(now - stamp) > self.skew:
            raise ProtocolError(f"the hello proof is {now - stamp:+.0f}s off our clock "
                                f"(at most {self.skew:.0f}s)")
        self._forget(now)
        if nonce in self._seen:
            raise ProtocolError("the hello proof was used before (a replay)")
        self._seen[nonce] = stamp
        return nonce

    def _forget(self, now: float) -> None:
        # A nonce older than the window is refused by its time anyway.
        if len(self._seen) > 256:
            for nonce in [n for n, stamp in self._seen.items() if now - stamp > self.skew]:
                del self._seen[nonce]
