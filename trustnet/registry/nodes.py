"""What the registry needs to serve nodes: checking their signed statements,
scoring their reputation, and choosing peer candidates. Pure code: the
RegistryActor owns one of each and supplies the clock."""

from __future__ import annotations

import random
from typing import Any, Container, Iterable

import attrs
import orjson

from actors.codec import refusal
from actors.errors import Refused
from trustnet.identity import IdentityError, ReplayGuard

from . import messages as m
from . import validate
from .commands import Invalid
from .validate import BadRequest


@refusal
class BadStatement(Refused):
    """A statement that is malformed, stale, replayed or wrongly signed."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__("bad_statement", message, details)


class StatementGate:
    """Verifies statements; a (node, nonce) is accepted once."""

    def __init__(self, max_skew: float = 60.0):
        self.guard = ReplayGuard(max_skew)

    @staticmethod
    def parse(text: str) -> dict[str, Any]:
        try:
            stmt = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise BadStatement(f"statement is not JSON: {exc}") from None
        if not isinstance(stmt, dict) or not isinstance(stmt.get("node_id"), str) \
                or not isinstance(stmt.get("body"), dict):
            raise BadStatement("statement must be an object with node_id and body")
        return stmt

    def check(self, stmt: dict[str, Any], public_key: str, purpose: str, now: float) -> dict:
        try:
            return self.guard.check(stmt, public_key, purpose, now)
        except IdentityError as exc:
            raise BadStatement(str(exc), {"node_id": stmt.get("node_id")}) from None

    # check() in three steps, for a batch whose signatures are verified in a
    # worker thread: precheck each, verify_all, then admit each.

    def precheck(self, stmt: dict[str, Any], purpose: str, now: float) -> None:
        try:
            self.guard.precheck(stmt, purpose, now)
        except IdentityError as exc:
            raise BadStatement(str(exc), {"node_id": stmt.get("node_id")}) from None

    @staticmethod
    def verify_all(checks: list[tuple[dict[str, Any], str]]) -> list[bool]:
        """Signature checks of (prechecked statement, key) pairs; no shared state."""
        return [ReplayGuard.signature_ok(stmt, key) for stmt, key in checks]

    def admit(self, stmt: dict[str, Any], verified: bool, now: float) -> dict:
        try:
            if not verified:
                raise ReplayGuard.forged(stmt)
            return self.guard.admit(stmt, now)
        except IdentityError as exc:
            raise BadStatement(str(exc), {"node_id": stmt.get("node_id")}) from None


def register_request(stmt: dict[str, Any]) -> m.Register:
    """The Register a signed registration asks for (its key signs it, see the actor)."""
    body = stmt["body"]
    try:
        unknown = sorted(set(body) - {"ipv6", "port", "domain", "public_key"})
        if unknown:
            raise BadRequest("unknown_field", f"unknown field(s) {', '.join(unknown)}")
        key = body.get("public_key")
        if not isinstance(key, str):
            raise BadRequest("invalid_type", "public_key must be a string")
        return m.Register(node_id=validate.name(stmt["node_id"], "node_id"),
                          ipv6=validate.ipv6(body.get("ipv6")),
                          port=validate.port(body.get("port", m.DEFAULT_PORT)),
                          domain=validate.name(body.get("domain", m.DEFAULT_DOMAIN), "domain"),
                          public_key=key)
    except BadRequest as exc:
        raise Invalid(exc.message) from None


# ------------------------------------------------------------------ reputation

HEARTBEAT_WEIGHT = 0.6
LINK_WEIGHT = 0.4
LATE_FACTOR = 1.5  # a heartbeat more than 1.5 intervals after the last one is late


@attrs.define
class Track:
    on_time: int = 0
    late: int = 0
    links_opened: int = 0
    links_closed: int = 0
    links_failed: int = 0


class ReputationBook:
    """Reputation in [0, 1] from heartbeat punctuality and peers' link reports.

    Both parts are Laplace-smoothed success rates, so a new node starts at 0.5
    and one bad event does not sink a long good record.
    """

    def __init__(self, heartbeat_interval: float):
        self.interval = heartbeat_interval
        self.tracks: dict[str, Track] = {}
        self.dirty: set[str] = set()

    def _track(self, node_id: str) -> Track:
        self.dirty.add(node_id)
        return self.tracks.setdefault(node_id, Track())

    def heartbeat(self, node_id: str, now: float, last: float | None) -> None:
        track = self._track(node_id)
        if last is None or now - last <= LATE_FACTOR * self.interval:
            track.on_time += 1
        else:
            track.late += 1

    def link_report(self, peer: str, state: str) -> None:
        track = self._track(peer)
        if state == "open":
            track.links_opened += 1
        elif state == "failed":
            track.links_failed += 1
        else:
            track.links_closed += 1

    def forget(self, node_id: str) -> None:
        self.tracks.pop(node_id, None)
        self.dirty.discard(node_id)

    def score(self, node_id: str) -> float:
        return self.breakdown(node_id)["reputation"]

    def breakdown(self, node_id: str) -> dict[str, Any]:
        t = self.tracks.get(node_id, Track())
        heartbeat = (t.on_time + 1) / (t.on_time + t.late + 2)
        links = (t.links_opened + 1) / (t.links_opened + t.links_failed + 2)
        return {
            "node_id": node_id,
            "reputation": round(HEARTBEAT_WEIGHT * heartbeat + LINK_WEIGHT * links, 4),
            "heartbeats": {"on_time": t.on_time, "late": t.late, "score": round(heartbeat, 4),
                           "weight": HEARTBEAT_WEIGHT,
                           "rule": f"late when more than {LATE_FACTOR} intervals after the last"},
            "links": {"opened": t.links_opened, "closed": t.links_closed,
                      "failed": t.links_failed, "score": round(links, 4),
                      "weight": LINK_WEIGHT,
                      "rule": "peers' reports: opened counts for, failed handshakes against"},
        }

    def take_dirty(self) -> list[tuple[str, float]]:
        out = [(n, self.score(n)) for n in sorted(self.dirty)]
        self.dirty.clear()
        return out


def candidates(me: dict, nodes: Iterable[dict], live: Container[str], limit: int,
               rng: random.Random) -> list[dict]:
    """Peers for `me`: live nodes only, same domain first, then by reputation;
    ties shuffled so every node does not pile onto the same few peers."""
    pool = [n for n in nodes if n["id"] != me["id"] and n["id"] in live]
    rng.shuffle(pool)
    pool.sort(key=lambda n: (n["domain"] != me["domain"], -round(n["reputation"], 1)))
    return [{k: n[k] for k in ("id", "ipv6", "port", "domain", "public_key", "reputation")}
            for n in pool[:limit]]
