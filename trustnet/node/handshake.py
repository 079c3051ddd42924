"""The peer-link challenge–response (pure: no I/O, no clock).

Each side sends a random challenge; the other signs the canonical bytes of
``{purpose: "trustnet-peer-link", challenge, signer, dialler, acceptor}`` with
its Ed25519 key. Binding both names and the role into the signed bytes means a
signature made for one link (or for the other direction) proves nothing on
another. Each side verifies against the public key the registry lists for the
other's name.
"""

from __future__ import annotations

import random

import orjson

from trustnet.identity import NodeIdentity, verify

PURPOSE = "trustnet-peer-link"
CHALLENGE_BYTES = 16


def new_challenge(rng: random.Random) -> str:
    return rng.getrandbits(CHALLENGE_BYTES * 8).to_bytes(CHALLENGE_BYTES, "big").hex()


def proof_bytes(challenge: str, signer: str, dialler: str, acceptor: str) -> bytes:
    return orjson.dumps({"purpose": PURPOSE, "challenge": challenge, "signer": signer,
                         "dialler": dialler, "acceptor": acceptor},
                        option=orjson.OPT_SORT_KEYS)


def sign_challenge(identity: NodeIdentity, challenge: str, signer: str,
                   dialler: str, acceptor: str) -> str:
    return identity.sign(proof_bytes(challenge, signer, dialler, acceptor))


def check_proof(public_key: str | None, signature: str, challenge: str, signer: str,
                dialler: str, acceptor: str) -> bool:
    """True when `signature` is `signer`'s (under `public_key`) over this link's challenge."""
    if not public_key or not isinstance(signature, str):
        return False
    if not (isinstance(challenge, str) and len(challenge) == 2 * CHALLENGE_BYTES):
        return False
    return verify(public_key, proof_bytes(challenge, signer, dialler, acceptor), signature)
