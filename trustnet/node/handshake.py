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
HELLO_PURPOSE = "trustnet-link-hello"
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


# The transport-level identity in a TLS node's hellos (actors.ws
# `hello_identity` / `check_identity`): the dialler signs both addresses and
# the time, so the connection itself (not only the link handshake carried
# over it) is known to come from the node the registry lists at that
# address. The acceptor's key is pinned by TLS; the hello is then only
# readable by the acceptor, and naming it (`to`) keeps the acceptor from
# passing it on to a third node within the time window.


def _hello_bytes(node_id: str, address: str, to: str, to_key: str, ts: float) -> bytes:
    return orjson.dumps({"purpose": HELLO_PURPOSE, "node": node_id, "from": address, "to": to,
                         "to_key": to_key, "ts": ts}, option=orjson.OPT_SORT_KEYS)


def hello_identity(identity: NodeIdentity, node_id: str, address: str, to: str, to_key: str,
                   now: float) -> dict:
    """What a node's hello to `to` carries: {"node", "ts", "sig"}, the
    signature also covering `to_key`, the key pinned for `to`: a hello
    relayed to another holder of that address checks out for no one else."""
    return {"node": node_id, "ts": now,
            "sig": identity.sign(_hello_bytes(node_id, address, to, to_key, now))}


def hello_node(ident: object) -> str:
    """The node a hello's identity names; ValueError if it is not one."""
    if not (isinstance(ident, dict) and set(ident) == {"node", "ts", "sig"}
            and isinstance(ident["node"], str) and ident["node"]):
        raise ValueError('a hello to this node must carry {"node", "ts", "sig"}: '
                         "the dialler's signed identity")
    return ident["node"]


def check_hello_identity(public_key: str | None, ident: dict, address: str, to: str,
                         to_key: str, now: float, max_skew: float) -> None:
    """ValueError unless `ident` (hello_node checked it) is its node's
    signature, under `public_key`, over `address` -> `to` (whose key is
    `to_key`) at a time within `max_skew` of `now`."""
    ts = ident["ts"]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or abs(now - ts) > max_skew:
        raise ValueError(f"the hello's time {ts!r} is not within {max_skew:g}s of ours")
    if not public_key or not isinstance(ident["sig"], str) or not verify(
            public_key, _hello_bytes(ident["node"], address, to, to_key, ts), ident["sig"]):
        raise ValueError(f"the hello is not signed by the key the registry lists for "
                         f"{ident['node']!r}")
