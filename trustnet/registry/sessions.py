"""Heartbeat sessions: one signed key agreement per node, then MAC'd heartbeats.

Verifying an Ed25519 signature costs ~110 µs here, which capped one registry
at ~5,000 signed heartbeats/s. A node instead opens a session with a signed
"session" statement carrying an X25519 key share (trustnet.identity); the
registry answers with its own share and both derive a session key. Each
heartbeat then carries (session id, counter, MAC): a dict lookup and one
HMAC (~2 µs). A counter is accepted only above the last accepted one, so a
captured heartbeat cannot be replayed.

Sessions live in memory on the replica that keeps the leases (the leader, if
replicated): a restarted registry or a new leader knows none, answers
"no_session", and the node opens a new one with a fresh signed statement.
A session is tied to the key that signed its opening; once the name is bound
to another key (released and taken), the old session is refused.
One session per node: opening a new one closes the node's previous one.
"""

from __future__ import annotations

import os

import attrs

from actors.codec import refusal
from actors.errors import Refused
from trustnet.identity import IdentityError, session_key, session_mac_ok, session_share

MAX_COUNTER = 2**63 - 1


@refusal
class NoSession(Refused):
    """The session is unknown here (registry restarted, another leader, or
    the node's lease lapsed): open a new one."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__("no_session", message, details)


@refusal
class BadSession(Refused):
    """A session heartbeat whose MAC does not verify or whose counter was
    already used: forged or replayed. The session stays open for its owner."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__("bad_session", message, details)


@attrs.define
class Session:
    node_id: str
    public_key: str  # the node key that signed the opening statement
    key: bytes = attrs.field(repr=False)
    counter: int = 0  # the last accepted heartbeat's


class SessionTable:
    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}
        self._of_node: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def open(self, node_id: str, public_key: str, node_share: str) -> tuple[str, str]:
        """A new session for `node_id`, whose opening statement `public_key`
        signed and which offered `node_share`: (session id, our key share).
        IdentityError if the share is not a usable X25519 public key."""
        if not isinstance(node_share, str):
            raise IdentityError("the session statement's body needs a 'share' string")
        private, share = session_share()
        key = session_key(private, node_share, node_id, node_share, share)
        self.drop(node_id)
        session_id = os.urandom(12).hex()
        self._by_id[session_id] = Session(node_id, public_key, key)
        self._of_node[node_id] = session_id
        return session_id, share

    def check(self, session_id: str, counter: int, mac: str) -> Session:
        """The session a heartbeat belongs to, once its MAC verifies and its
        counter is new (then recorded). NoSession or BadSession otherwise."""
        session = self._by_id.get(session_id)
        if session is None:
            raise NoSession("no such heartbeat session here: open a new one",
                            {"session": session_id})
        if isinstance(counter, bool) or not isinstance(counter, int) \
                or not 0 < counter <= MAX_COUNTER:
            raise BadSession("a session heartbeat's counter is a positive integer",
                             {"node_id": session.node_id})
        if not session_mac_ok(session.key, session_id, counter, mac):
            raise BadSession(f"session heartbeat MAC of {session.node_id!r} does not verify",
                             {"node_id": session.node_id})
        if counter <= session.counter:
            raise BadSession(f"session heartbeat counter {counter} of {session.node_id!r} "
                             f"was already used (replay)", {"node_id": session.node_id})
        session.counter = counter
        return session

    def drop(self, node_id: str) -> None:
        session_id = self._of_node.pop(node_id, None)
        if session_id is not None:
            del self._by_id[session_id]

    def clear(self) -> None:
        self._by_id.clear()
        self._of_node.clear()
