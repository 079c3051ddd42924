"""The registry side of the node protocol (trustnet.registry.node_protocol).

A real RegistryActor over SQLite in an ActorSystem, asked directly (as a
node's actor link does) and through the HTTP facade's test client; plus the
pure parts of trustnet.registry.nodes: StatementGate, register_request,
ReputationBook and candidates.

The actor's clock is the wall clock plus an offset the test can jump, and
statements are signed at that clock, so freshness checks see what the test
means them to see.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import random
import time
from typing import Any, AsyncIterator, Callable

import orjson
import pytest
import trio

from actors import ActorSystem, Letter, Refused, Reply
from trustnet.identity import NodeIdentity, b64, session_key, session_mac, session_share
from trustnet.node.heartbeat import HeartbeatSession
from trustnet.registry import messages as m
from trustnet.registry.actor import RegistryActor
from trustnet.registry.commands import Invalid
from trustnet.registry.http import create_app
from trustnet.registry.node_protocol import (
    Candidates,
    LinkReport,
    OpenSession,
    SessionHeartbeat,
    SignedHeartbeat,
    SignedRegister,
)
from trustnet.registry.nodes import (
    HEARTBEAT_WEIGHT,
    LINK_WEIGHT,
    BadStatement,
    ReputationBook,
    StatementGate,
    candidates,
    register_request,
)
from trustnet.registry.state import RegistryState

KEY = "admin-key"
INTERVAL = 10.0  # heartbeat interval: a heartbeat > 15 s after the last is late
TTL = 3600.0


class Clock:
    """Unix time plus an offset the test jumps (no real waiting): time that
    passes, so monotonic time jumps with it (a jump of the system clock
    alone is a step of it, which the registry undoes)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return trio.current_time() + self.offset

    def jump(self, seconds: float) -> None:
        self.offset += seconds


class Node:
    """A node's identity and the statements it would send."""

    def __init__(self, node_id: str, ipv6: str, clock: Clock, *, port: int = 9000,
                 domain: str = "default", identity: NodeIdentity | None = None):
        self.id, self.ipv6, self.port, self.domain = node_id, ipv6, port, domain
        self.clock = clock
        self.identity = identity or NodeIdentity.generate()

    def statement(self, purpose: str, body: dict[str, Any], *, node_id: str | None = None,
                  ts_offset: float = 0.0, signer: NodeIdentity | None = None) -> str:
        stmt = (signer or self.identity).statement(purpose, node_id or self.id, body,
                                                   now=self.clock() + ts_offset)
        return orjson.dumps(stmt).decode()

    def register(self, **overrides: Any) -> SignedRegister:
        body = {"ipv6": self.ipv6, "port": self.port, "domain": self.domain,
                "public_key": self.identity.public_key}
        return SignedRegister(self.statement("register", {**body, **overrides}))

    def heartbeat(self, **kw: Any) -> SignedHeartbeat:
        return SignedHeartbeat(self.statement("heartbeat", {}, **kw))

    def open_session(self, share: str | None = None, **kw: Any) -> tuple[OpenSession, Any, str]:
        """An OpenSession statement, the private half of its key share, the share."""
        private, mine = session_share()
        share = mine if share is None else share
        return OpenSession(self.statement("session", {"share": share}, **kw)), private, share

    async def session(self, env: "Env") -> HeartbeatSession:
        msg, private, share = self.open_session()
        answer = await env.ask(msg)
        key = session_key(private, answer["share"], self.id, share, answer["share"])
        return HeartbeatSession(answer["session"], key)

    def link(self, peer: str, state: str, rtt_ms: float | None = None, **kw: Any) -> LinkReport:
        return LinkReport(self.statement("link", {"peer": peer, "state": state,
                                                  "rtt_ms": rtt_ms}, **kw))


def beat_at(session: HeartbeatSession, counter: int) -> SessionHeartbeat:
    """The session's heartbeat with this counter (it goes on from there)."""
    session.counter = counter - 1
    return session.next()


async def ask_together(env: "Env", letters: dict[str, Any],
                       pick: Callable[[Any], Any] = lambda answer: answer) -> dict[str, Any]:
    """Ask all at once, into the mailbox together (one batch; an ask sent
    alone to the idle actor would be answered inline): pick(answer) or the
    refusal's code, by key."""
    box = env.system.mailbox_of("registry")
    replies = {key: Reply() for key in letters}
    for key, msg in letters.items():
        box.put_nowait(Letter(msg, replies[key]))
    results: dict[str, Any] = {}
    for key, reply in replies.items():
        try:
            results[key] = pick(await reply.wait())
        except Refused as exc:
            results[key] = exc.code
    return results


class Env:
    def __init__(self, state: RegistryState, actor: RegistryActor, system: ActorSystem,
                 clock: Clock):
        self.state, self.actor, self.system, self.clock = state, actor, system, clock
        self.ref = system.ref("registry")

    async def ask(self, msg: Any) -> Any:
        return await self.ref.ask(msg, timeout=30)

    async def refusal(self, msg: Any) -> Refused:
        with pytest.raises(Refused) as info:
            await self.ask(msg)
        return info.value

    def node(self, node_id: str, i: int, **kw: Any) -> Node:
        return Node(node_id, f"fd10:1234::{i:x}", self.clock, **kw)

    async def registered(self, node_id: str, i: int, **kw: Any) -> Node:
        node = self.node(node_id, i, **kw)
        answer = await self.ask(node.register())
        assert answer["node"]["public_key"] == node.identity.public_key
        return node

    def client(self, api_key: str | None = KEY):
        return create_app(self.ref, api_key=api_key).test_client()


@contextlib.asynccontextmanager
async def running(tmp_path, *, ttl: float = TTL, sweep_interval: float | None = None
                  ) -> AsyncIterator[Env]:
    state = RegistryState.open(str(tmp_path / "registry.db"))
    clock = Clock()
    system = ActorSystem()
    actor = RegistryActor(state, ttl=ttl, checkpoint_interval=3600.0,
                          sweep_interval=sweep_interval, heartbeat_interval=INTERVAL,
                          clock=clock, monotonic=clock.monotonic)
    try:
        async with trio.open_nursery() as nursery:
            await system.spawn(nursery, actor, "registry", mailbox_size=1000)
            yield Env(state, actor, system, clock)
            nursery.cancel_scope.cancel()
    finally:
        state.close()


@pytest.fixture
async def env(tmp_path):
    async with running(tmp_path) as env:
        yield env


async def call(client, method: str, path: str, body: Any = None, *,
               key: str | None = KEY) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    kwargs: dict[str, Any] = {"headers": headers}
    if body is not None:
        data = orjson.dumps(body)
        kwargs["data"] = data
        headers["Content-Length"] = str(len(data))
    response = await client.open(path, method=method, **kwargs)
    return response.status_code, orjson.loads(await response.get_data())


def error_code(body: Any) -> str:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    return body["error"]["code"]


# ------------------------------------------------------------------ names bound to keys


async def test_signed_register_binds_the_key_and_lists_it(env):
    node = env.node("n1", 1, port=9123, domain="lab")
    answer = await env.ask(node.register())
    assert answer["created"] is True
    assert answer["heartbeat_interval"] == INTERVAL and answer["ttl"] == TTL
    assert answer["node"]["id"] == "n1" and answer["node"]["public_key"] == node.identity.public_key
    assert answer["node"]["ipv6"] == "fd10:1234::1" and answer["node"]["port"] == 9123
    assert answer["node"]["domain"] == "lab"
    assert env.state.public_key_of("n1") == node.identity.public_key

    status, body = await call(env.client(), "GET", "/nodes/n1")
    assert status == 200 and body["public_key"] == node.identity.public_key
    status, body = await call(env.client(), "GET", "/nodes")
    assert [n["public_key"] for n in body["nodes"]] == [node.identity.public_key]

    # The same key registers again (a restart, a new address): an update.
    again = await env.ask(node.register(ipv6="fd10:1234::99"))
    assert again["created"] is False and again["node"]["ipv6"] == "fd10:1234::99"


async def test_a_signed_register_must_be_signed_by_the_key_it_presents(env):
    node = env.node("n1", 1)
    other = NodeIdentity.generate()
    body = {"ipv6": node.ipv6, "port": 9000, "domain": "default",
            "public_key": node.identity.public_key}
    forged = SignedRegister(node.statement("register", body, signer=other))
    refusal = await env.refusal(forged)
    assert refusal.code == "bad_statement"
    assert env.state.public_key_of("n1") is None


async def test_another_key_for_a_bound_name_is_name_taken(env):
    await env.registered("n1", 1)
    thief = env.node("n1", 2)  # same name, its own (valid) key and address
    refusal = await env.refusal(thief.register())
    assert refusal.code == "name_taken"
    assert "n1" in refusal.message
    # Also from the same address.
    refusal = await env.refusal(env.node("n1", 1).register())
    assert refusal.code == "name_taken"


async def test_unsigned_http_register_of_a_bound_name_is_409(env):
    owner = await env.registered("n1", 1)
    client = env.client()
    status, body = await call(client, "POST", "/nodes", {"id": "n1", "ipv6": "fd10:1234::1"})
    assert status == 409 and error_code(body) == "name_taken"
    status, body = await call(client, "GET", "/nodes/n1")
    assert body["public_key"] == owner.identity.public_key
    # A name nobody bound still registers over HTTP as before.
    status, body = await call(client, "POST", "/nodes", {"id": "open", "ipv6": "fd10:1234::7"})
    assert status == 201 and body["public_key"] is None


async def test_the_binding_outlives_the_lease(tmp_path):
    async with running(tmp_path, ttl=30.0, sweep_interval=3600.0) as env:
        owner = await env.registered("n1", 1)
        env.clock.jump(31)
        assert env.actor.expire_due() == ["n1"]
        refusal = await env.refusal(env.node("n1", 1).register())
        assert refusal.code == "name_taken"
        assert (await env.ask(owner.register()))["created"] is True


# ------------------------------------------------------------------ heartbeats


async def test_signed_heartbeat_renews_the_lease(env):
    node = await env.registered("n1", 1)
    first = env.actor.leases.deadline("n1")
    env.clock.jump(5)
    answer = await env.ask(node.heartbeat())
    assert set(answer) == {"node_id", "lease_deadline", "ttl"}
    assert answer["node_id"] == "n1" and answer["ttl"] == TTL
    assert answer["lease_deadline"] > first
    assert env.actor.leases.deadline("n1") == answer["lease_deadline"]


async def test_a_replayed_statement_is_bad_statement(env):
    node = await env.registered("n1", 1)
    beat = node.heartbeat()
    await env.ask(beat)
    refusal = await env.refusal(beat)
    assert refusal.code == "bad_statement" and "replay" in refusal.message
    register = node.register()
    await env.ask(register)
    assert (await env.refusal(register)).code == "bad_statement"


async def test_a_statement_signed_by_another_key_is_bad_statement(env):
    await env.registered("n1", 1)
    impostor = env.node("n1", 1)  # claims the name, holds another key
    refusal = await env.refusal(impostor.heartbeat())
    assert refusal.code == "bad_statement"
    assert "does not verify" in refusal.message


async def test_a_tampered_statement_is_bad_statement(env):
    node = await env.registered("n1", 1)
    stmt = orjson.loads(node.statement("heartbeat", {}))
    stmt["ts"] += 1  # no longer the signed bytes
    refusal = await env.refusal(SignedHeartbeat(orjson.dumps(stmt).decode()))
    assert refusal.code == "bad_statement"


@pytest.mark.parametrize("offset", [-120.0, 120.0])
async def test_a_stale_or_future_timestamp_is_bad_statement(env, offset):
    node = await env.registered("n1", 1)
    refusal = await env.refusal(node.heartbeat(ts_offset=offset))
    assert refusal.code == "bad_statement" and "timestamp" in refusal.message


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"node_id": "n1"}',
                                  '{"node_id": 5, "body": {}}'])
async def test_a_malformed_statement_is_bad_statement(env, text):
    await env.registered("n1", 1)
    assert (await env.refusal(SignedHeartbeat(text))).code == "bad_statement"
    assert (await env.refusal(SignedRegister(text))).code == "bad_statement"
    assert (await env.refusal(LinkReport(text))).code == "bad_statement"


async def test_a_statement_for_another_purpose_is_bad_statement(env):
    node = await env.registered("n1", 1)
    link_stmt = node.statement("link", {"peer": "x", "state": "open", "rtt_ms": None})
    refusal = await env.refusal(SignedHeartbeat(link_stmt))
    assert refusal.code == "bad_statement" and "expected 'heartbeat'" in refusal.message


async def test_heartbeat_of_a_name_with_no_key_is_bad_statement(env):
    await env.ask(m.Register(node_id="open", ipv6="fd10:1234::5"))
    stray = env.node("open", 5)
    refusal = await env.refusal(stray.heartbeat())
    assert refusal.code == "bad_statement" and "no key" in refusal.message


async def test_heartbeat_after_the_lease_ran_out_is_not_found(tmp_path):
    async with running(tmp_path, ttl=30.0, sweep_interval=3600.0) as env:
        node = await env.registered("n1", 1)
        env.clock.jump(31)
        refusal = await env.refusal(node.heartbeat())
        assert refusal.code == "not_found"
        await env.ask(node.register())  # what the node does next
        await env.ask(node.heartbeat())


# ------------------------------------------------------------------ heartbeat sessions


async def test_a_session_opens_with_a_signed_statement_and_renews_by_mac(env):
    node = await env.registered("n1", 1)
    first = env.actor.leases.deadline("n1")
    env.clock.jump(5)
    msg, private, share = node.open_session()
    answer = await env.ask(msg)
    assert set(answer) == {"node_id", "lease_deadline", "ttl", "session", "share"}
    assert answer["lease_deadline"] > first  # the opening renews like a signed heartbeat
    beats = HeartbeatSession(answer["session"], session_key(private, answer["share"], "n1",
                                                            share, answer["share"]))
    for _ in range(3):
        env.clock.jump(5)
        renewed = await env.ask(beats.next())
        assert set(renewed) == {"node_id", "lease_deadline", "ttl"}
        assert renewed["node_id"] == "n1"
        assert env.actor.leases.deadline("n1") == renewed["lease_deadline"]
    assert renewed["lease_deadline"] > answer["lease_deadline"]
    # through the HTTP facade the node shows the heartbeat
    status, body = await call(env.client(), "GET", "/nodes/n1")
    assert status == 200 and body["lease_deadline"] == renewed["lease_deadline"]


async def test_a_forged_or_replayed_session_heartbeat_is_bad_session(env):
    node = await env.registered("n1", 1)
    beats = await node.session(env)
    good = beats.next()
    await env.ask(good)
    assert (await env.refusal(good)).code == "bad_session"  # the same again: a replay
    assert (await env.refusal(beat_at(beats, 1))).code == "bad_session"  # an old counter
    forged = SessionHeartbeat(beats.id, 7, bytes(16).hex())
    refusal = await env.refusal(forged)
    assert refusal.code == "bad_session" and "does not verify" in refusal.message
    wrong_key = beat_at(HeartbeatSession(beats.id, bytes(32)), 8)
    assert (await env.refusal(wrong_key)).code == "bad_session"
    for counter in (0, -1):
        msg = SessionHeartbeat(beats.id, counter, session_mac(beats.key, beats.id, counter))
        assert (await env.refusal(msg)).code == "bad_session"
    # A forged high counter did not move the session on: the owner goes on.
    await env.ask(beat_at(beats, 2))
    await env.ask(beats.next())


async def test_an_unknown_session_is_no_session(env):
    await env.registered("n1", 1)
    msg = SessionHeartbeat("0" * 24, 1, bytes(16).hex())
    assert (await env.refusal(msg)).code == "no_session"


@pytest.mark.parametrize("case", ["purpose", "replay", "other_key", "short_share", "not_b64",
                                  "low_order", "extra_field", "no_key"])
async def test_a_bad_session_opening_is_bad_statement(env, case):
    node = await env.registered("n1", 1)
    if case == "purpose":
        msg = OpenSession(node.statement("heartbeat", {"share": session_share()[1]}))
    elif case == "replay":
        msg = node.open_session()[0]
        await env.ask(msg)
    elif case == "other_key":
        msg = OpenSession(node.statement("session", {"share": session_share()[1]},
                                         signer=NodeIdentity.generate()))
    elif case == "short_share":
        msg = node.open_session(share=b64(bytes(31)))[0]
    elif case == "not_b64":
        msg = node.open_session(share="%%%")[0]
    elif case == "low_order":  # the all-zero point gives an all-zero secret
        msg = node.open_session(share=b64(bytes(32)))[0]
    elif case == "extra_field":
        msg = OpenSession(node.statement("session", {"share": session_share()[1], "x": 1}))
    else:
        await env.ask(m.Register(node_id="open", ipv6="fd10:1234::5"))
        msg = env.node("open", 5).open_session()[0]
    assert (await env.refusal(msg)).code == "bad_statement"
    assert len(env.actor.sessions) == (1 if case == "replay" else 0)


async def test_a_new_session_closes_the_old_one(env):
    node = await env.registered("n1", 1)
    old = await node.session(env)
    new = await node.session(env)
    assert (await env.refusal(old.next())).code == "no_session"
    await env.ask(new.next())
    assert len(env.actor.sessions) == 1


async def test_a_session_dies_with_its_lease_and_after_a_release(tmp_path):
    async with running(tmp_path, ttl=30.0, sweep_interval=3600.0) as env:
        node = await env.registered("n1", 1)
        beats = await node.session(env)
        env.clock.jump(31)
        assert env.actor.expire_due() == ["n1"]
        assert (await env.refusal(beats.next())).code == "no_session"
        await env.ask(node.register())
        beats = await node.session(env)
        await env.ask(beats.next())
        # The name is released and taken by another key: the old session is refused.
        status, _ = await call(env.client(), "DELETE", "/nodes/n1/identity")
        assert status == 200
        await env.ask(env.node("n1", 2).register())
        assert (await env.refusal(beats.next())).code == "no_session"


async def test_a_session_heartbeat_after_the_lease_ran_out_is_not_found(tmp_path):
    async with running(tmp_path, ttl=30.0, sweep_interval=3600.0) as env:
        node = await env.registered("n1", 1)
        beats = await node.session(env)
        env.clock.jump(31)  # not swept yet: the heartbeat finds the lapsed lease
        assert (await env.refusal(beats.next())).code == "not_found"


async def test_unsigned_heartbeat_of_a_bound_node_is_signature_required(env):
    await env.registered("n1", 1)
    refusal = await env.refusal(m.Heartbeat("n1"))
    assert refusal.code == "signature_required"
    status, body = await call(env.client(), "POST", "/nodes/n1/heartbeat")
    assert status == 403 and error_code(body) == "signature_required"
    status, body = await call(env.client(), "POST", "/nodes/n1/heartbeat", {})
    assert status == 403 and error_code(body) == "signature_required"


async def test_http_heartbeat_with_a_statement(env):
    node = await env.registered("n1", 1)
    client = env.client()
    text = node.statement("heartbeat", {})
    status, body = await call(client, "POST", "/nodes/n1/heartbeat", {"statement": text})
    assert status == 200, body
    assert body["node_id"] == "n1" and body["ttl"] == TTL
    assert body["lease_deadline"] == env.actor.leases.deadline("n1")
    # The same statement again: a replay.
    status, body = await call(client, "POST", "/nodes/n1/heartbeat", {"statement": text})
    assert status == 403 and error_code(body) == "bad_statement"
    # Signed by another key.
    forged = node.statement("heartbeat", {}, signer=NodeIdentity.generate())
    status, body = await call(client, "POST", "/nodes/n1/heartbeat", {"statement": forged})
    assert status == 403 and error_code(body) == "bad_statement"
    # Not a string, an unknown field.
    status, body = await call(client, "POST", "/nodes/n1/heartbeat", {"statement": {"a": 1}})
    assert status == 400 and error_code(body) == "invalid_type"
    status, body = await call(client, "POST", "/nodes/n1/heartbeat",
                              {"statement": text, "extra": 1})
    assert status == 400 and error_code(body) == "unknown_field"
    # The API key guards it like every write.
    fresh = node.statement("heartbeat", {})
    status, body = await call(client, "POST", "/nodes/n1/heartbeat", {"statement": fresh},
                              key=None)
    assert status == 401


async def test_http_heartbeat_statement_must_be_for_the_node_in_the_path(env):
    await env.registered("n1", 1)
    other = await env.registered("n2", 2)
    before = env.actor.leases.deadline("n2")
    env.clock.jump(5)
    text = other.statement("heartbeat", {})
    status, body = await call(env.client(), "POST", "/nodes/n1/heartbeat", {"statement": text})
    assert status == 400 and error_code(body) == "invalid_value", body
    assert env.actor.leases.deadline("n2") == before
    # The same statement at its own path works (the rejected post did not use it up).
    status, body = await call(env.client(), "POST", "/nodes/n2/heartbeat", {"statement": text})
    assert status == 200, body


# ------------------------------------------------------------------ admin release


async def test_admin_release_then_a_new_key_may_claim_the_name(env):
    await env.registered("n1", 1)
    client = env.client()
    status, body = await call(client, "DELETE", "/nodes/n1/identity", key=None)
    assert status == 401 and error_code(body) == "unauthorized"
    status, body = await call(client, "DELETE", "/nodes/n1/identity", key="wrong")
    assert status == 403 and error_code(body) == "forbidden"
    assert env.state.public_key_of("n1") is not None

    status, body = await call(client, "DELETE", "/nodes/n1/identity")
    assert status == 200 and body == {"node_id": "n1", "released": True}
    assert env.state.public_key_of("n1") is None
    status, body = await call(client, "GET", "/nodes/n1")
    assert status == 200 and body["public_key"] is None  # still registered, no key

    newcomer = env.node("n1", 3)
    answer = await env.ask(newcomer.register())
    assert answer["node"]["public_key"] == newcomer.identity.public_key
    status, body = await call(client, "GET", "/nodes/n1")
    assert body["public_key"] == newcomer.identity.public_key and body["ipv6"] == "fd10:1234::3"
    await env.ask(newcomer.heartbeat())

    # The old key is now the stranger.
    assert (await env.refusal(env.node("n1", 1).register())).code == "name_taken"
    # A name bound to no key cannot be released.
    status, body = await call(client, "DELETE", "/nodes/ghost/identity")
    assert status == 404 and error_code(body) == "not_found"


# ------------------------------------------------------------------ link reports, reputation


async def peer_rows(env: Env) -> set[frozenset[str]]:
    return {frozenset((p["node_a"], p["node_b"])) for p in await env.ask(m.ListPeers())}


async def test_link_reports_add_and_remove_peer_rows(env):
    a = await env.registered("a", 1)
    await env.registered("b", 2)
    await env.registered("c", 3)
    assert await env.ask(a.link("b", "open", 1.5)) == {"ok": True, "recorded": True}
    assert await env.ask(a.link("c", "open")) == {"ok": True, "recorded": True}
    assert await peer_rows(env) == {frozenset("ab"), frozenset("ac")}
    status, body = await call(env.client(), "GET", "/peers?node=b")
    assert status == 200 and [(p["node_a"], p["node_b"]) for p in body["peers"]] == [("a", "b")]

    assert await env.ask(a.link("b", "closed", 2.0)) == {"ok": True, "recorded": True}
    assert await peer_rows(env) == {frozenset("ac")}
    # Closing a link the registry never saw (or twice) is fine, only noted.
    assert await env.ask(a.link("b", "closed")) == {"ok": True, "recorded": False}
    assert await env.ask(a.link("c", "failed")) == {"ok": True, "recorded": True}
    assert await peer_rows(env) == set()
    # A link to a node that is not registered is not recorded.
    assert await env.ask(a.link("ghost", "open")) == {"ok": True, "recorded": False}
    assert "ghost" not in env.actor.reputation.tracks


async def test_link_reports_must_be_signed_by_the_reporter(env):
    a = await env.registered("a", 1)
    await env.registered("b", 2)
    forged = a.link("b", "open", signer=NodeIdentity.generate())
    assert (await env.refusal(forged)).code == "bad_statement"
    replay = a.link("b", "open")
    await env.ask(replay)
    assert (await env.refusal(replay)).code == "bad_statement"
    # A node without a key (registered over plain HTTP) cannot report.
    await env.ask(m.Register(node_id="open", ipv6="fd10:1234::9"))
    assert (await env.refusal(env.node("open", 9).link("a", "open"))).code == "bad_statement"


@pytest.mark.parametrize("body", [{"peer": "b", "state": "half-open"}, {"state": "open"},
                                  {"peer": 7, "state": "open"}])
async def test_malformed_link_reports_are_bad_statement(env, body):
    a = await env.registered("a", 1)
    await env.registered("b", 2)
    refusal = await env.refusal(LinkReport(a.statement("link", body)))
    assert refusal.code == "bad_statement"
    assert await peer_rows(env) == set()


async def test_a_node_cannot_report_a_link_to_itself(env):
    a = await env.registered("a", 1)
    before = env.actor.reputation.breakdown("a")
    refusal = await env.refusal(a.link("a", "open"))
    assert refusal.code == "bad_statement"
    assert env.actor.reputation.breakdown("a") == before


async def test_a_bad_report_in_a_batch_fails_only_itself(env):
    a = await env.registered("a", 1)
    await env.registered("b", 2)
    results = await ask_together(env, {
        "bad": a.link("b", "open", signer=NodeIdentity.generate()),
        "good": a.link("b", "open")})
    assert results == {"bad": "bad_statement", "good": {"ok": True, "recorded": True}}


async def test_a_batch_of_signed_heartbeats_fails_only_its_bad_ones(env, monkeypatch):
    """Queued together, signed heartbeats are checked as one batch whose
    signatures are verified in a worker thread: each answer is still its own."""
    import trustnet.registry.actor as registry_actor

    threads: list[int] = []
    real = registry_actor.trio.to_thread.run_sync

    async def counting(fn, *args, **kw):
        threads.append(len(args[0]))
        return await real(fn, *args, **kw)

    monkeypatch.setattr(registry_actor.trio.to_thread, "run_sync", counting)
    nodes = [await env.registered(f"n{k}", k + 1) for k in range(8)]
    replayed = nodes[1].heartbeat()
    letters = {f"ok{k}": node.heartbeat() for k, node in enumerate(nodes)}
    letters |= {
        "forged": nodes[2].heartbeat(signer=NodeIdentity.generate()),
        "replay1": replayed, "replay2": replayed,
        "stale": nodes[3].heartbeat(ts_offset=-3600),
        "unbound": env.node("ghost", 99).heartbeat(),
        "garbage": SignedHeartbeat("{not json"),
    }
    results = await ask_together(env, letters, lambda answer: answer["node_id"])
    assert {k: results[k] for k in letters if k.startswith("ok")} == {
        f"ok{k}": f"n{k}" for k in range(8)}
    assert sorted([results["replay1"], results["replay2"]]) == ["bad_statement", "n1"]
    assert {k: results[k] for k in ("forged", "stale", "unbound", "garbage")} == {
        "forged": "bad_statement", "stale": "bad_statement", "unbound": "bad_statement",
        "garbage": "bad_statement"}
    assert threads and max(threads) > 1  # verified together, in a worker thread


async def test_a_batch_of_session_heartbeats_fails_only_its_bad_ones(env, monkeypatch):
    """Session heartbeats queued together are answered as one batch; a
    forged, replayed or unknown one fails alone."""
    nodes = [await env.registered(f"n{k}", k + 1) for k in range(6)]
    beats = [await node.session(env) for node in nodes]
    replayed = beats[1].next()
    letters = {f"ok{k}": b.next() for k, b in enumerate(beats) if k != 1}
    letters |= {
        "replay1": replayed, "replay2": replayed,
        "forged": SessionHeartbeat(beats[2].id, 99, bytes(16).hex()),
        "unknown": SessionHeartbeat("f" * 24, 1, bytes(16).hex()),
    }
    seen: list[int] = []
    real = env.actor._session_heartbeats

    def watched(batch):
        seen.append(len(batch))
        real(batch)

    monkeypatch.setattr(env.actor, "_session_heartbeats", watched)
    results = await ask_together(env, letters, lambda answer: answer["node_id"])
    assert {k: results[k] for k in letters if k.startswith("ok")} == {
        f"ok{k}": f"n{k}" for k in (0, 2, 3, 4, 5)}
    assert sorted([results["replay1"], results["replay2"]]) == ["bad_session", "n1"]
    assert results["forged"] == "bad_session" and results["unknown"] == "no_session"
    assert max(seen) == len(letters)


async def test_link_reports_feed_the_peers_reputation(env):
    reporters = [await env.registered(f"r{i}", i + 10) for i in range(4)]
    await env.registered("good", 1)
    await env.registered("bad", 2)
    start = (await env.ask(m.ReputationOf("good")))["links"]["score"]
    assert start == 0.5
    for r in reporters:
        await env.ask(r.link("good", "open"))
        await env.ask(r.link("bad", "failed"))
    good = await env.ask(m.ReputationOf("good"))
    bad = await env.ask(m.ReputationOf("bad"))
    assert good["links"]["opened"] == 4 and good["links"]["failed"] == 0
    assert bad["links"]["failed"] == 4 and bad["links"]["opened"] == 0
    assert good["links"]["score"] > start > bad["links"]["score"]
    assert good["reputation"] > bad["reputation"]
    # A closed link is neither for nor against.
    await env.ask(reporters[0].link("good", "closed"))
    after = await env.ask(m.ReputationOf("good"))
    assert after["links"]["closed"] == 1 and after["links"]["score"] == good["links"]["score"]


async def test_reputation_endpoint_shape(env):
    a = await env.registered("a", 1)
    await env.registered("b", 2)
    await env.ask(a.heartbeat())
    await env.ask(a.link("b", "open"))
    client = env.client()
    status, body = await call(client, "GET", "/nodes/b/reputation")
    assert status == 200
    assert set(body) == {"node_id", "reputation", "heartbeats", "links", "stored"}
    assert body["node_id"] == "b"
    assert set(body["heartbeats"]) == {"on_time", "late", "score", "weight", "rule"}
    assert set(body["links"]) == {"opened", "closed", "failed", "score", "weight", "rule"}
    for value in (body["reputation"], body["stored"], body["heartbeats"]["score"],
                  body["links"]["score"]):
        assert isinstance(value, float) and 0.0 <= value <= 1.0
    assert body["heartbeats"]["weight"] + body["links"]["weight"] == pytest.approx(1.0)
    assert body["reputation"] == pytest.approx(
        body["heartbeats"]["weight"] * body["heartbeats"]["score"]
        + body["links"]["weight"] * body["links"]["score"], abs=1e-3)
    assert body["links"]["opened"] == 1

    status, body = await call(client, "GET", "/nodes/ghost/reputation")
    assert status == 404 and error_code(body) == "not_found"
    status, body = await call(client, "GET", "/nodes/a/reputation?x=1")
    assert status == 400


async def test_reputation_reaches_the_stored_row_at_checkpoint(env):
    a = await env.registered("a", 1)
    for _ in range(5):
        await env.ask(a.heartbeat())
    live = await env.ask(m.ReputationOf("a"))
    assert live["stored"] == 0.5 and live["reputation"] > 0.5  # not checkpointed yet
    await env.actor._checkpoint()
    stored = await env.ask(m.ReputationOf("a"))
    assert stored["stored"] == live["reputation"]
    assert (await env.ask(m.GetNode("a")))["reputation"] == live["reputation"]


async def test_late_heartbeats_lower_the_heartbeat_score(env):
    node = await env.registered("n1", 1)
    for _ in range(3):
        env.clock.jump(INTERVAL)  # on time
        await env.ask(node.heartbeat())
    punctual = await env.ask(m.ReputationOf("n1"))
    assert punctual["heartbeats"]["on_time"] == 3 and punctual["heartbeats"]["late"] == 0
    scores = [punctual["heartbeats"]["score"]]
    for _ in range(3):
        env.clock.jump(2 * INTERVAL)  # more than 1.5 intervals after the last
        await env.ask(node.heartbeat())
        scores.append((await env.ask(m.ReputationOf("n1")))["heartbeats"]["score"])
    late = await env.ask(m.ReputationOf("n1"))
    assert late["heartbeats"]["late"] == 3
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    assert late["reputation"] < punctual["reputation"]
    assert 0.0 <= late["reputation"] <= 1.0


# ------------------------------------------------------------------ candidates


async def test_candidates_exclude_self_and_dead_nodes(tmp_path):
    async with running(tmp_path, ttl=100.0, sweep_interval=3600.0) as env:
        a = await env.registered("a", 1)
        b = await env.registered("b", 2)
        await env.registered("c", 3)
        await env.registered("d", 4)
        answer = await env.ask(Candidates("a"))
        assert sorted(p["id"] for p in answer["peers"]) == ["b", "c", "d"]
        for peer in answer["peers"]:
            assert set(peer) == {"id", "ipv6", "port", "domain", "public_key", "reputation"}
            assert peer["public_key"] == env.state.public_key_of(peer["id"])

        env.clock.jump(80)
        await env.ask(a.heartbeat())
        await env.ask(b.heartbeat())
        env.clock.jump(30)  # c's and d's leases ran out; the sweep has not run yet
        assert [p["id"] for p in (await env.ask(Candidates("a")))["peers"]] == ["b"]
        assert env.actor.expire_due() == ["c", "d"]
        assert [p["id"] for p in (await env.ask(Candidates("a")))["peers"]] == ["b"]
        assert [p["id"] for p in (await env.ask(Candidates("b")))["peers"]] == ["a"]
        assert (await env.refusal(Candidates("c"))).code == "not_found"


async def test_candidates_same_domain_first_and_limit(env):
    await env.registered("me", 1, domain="lab")
    for i, name in enumerate(["lab1", "lab2"]):
        await env.registered(name, 10 + i, domain="lab")
    for i, name in enumerate(["out1", "out2", "out3"]):
        await env.registered(name, 20 + i)

    peers = (await env.ask(Candidates("me", 20)))["peers"]
    assert len(peers) == 5
    assert {p["id"] for p in peers[:2]} == {"lab1", "lab2"}
    assert {p["domain"] for p in peers[2:]} == {"default"}

    peers = (await env.ask(Candidates("me", 3)))["peers"]
    assert len(peers) == 3 and {p["id"] for p in peers[:2]} == {"lab1", "lab2"}
    peers = (await env.ask(Candidates("me", 1)))["peers"]
    assert len(peers) == 1 and peers[0]["domain"] == "lab"
    peers = (await env.ask(Candidates("me", 0)))["peers"]  # at least one
    assert len(peers) == 1
    # A node of the big domain gets its own domain first too.
    peers = (await env.ask(Candidates("out1", 2)))["peers"]
    assert {p["id"] for p in peers} == {"out2", "out3"}


# ------------------------------------------------------------------ pure: StatementGate


def signed(identity: NodeIdentity, purpose: str = "heartbeat", node_id: str = "n1",
           body: dict | None = None, now: float = 1000.0) -> dict:
    return identity.statement(purpose, node_id, body or {}, now=now)


def test_gate_parse():
    gate = StatementGate()
    stmt = signed(NodeIdentity.generate())
    assert gate.parse(orjson.dumps(stmt).decode()) == stmt
    for text in ["", "nope", "[]", '"x"', '{"node_id": "n1"}', '{"body": {}}',
                 '{"node_id": "n1", "body": []}']:
        with pytest.raises(BadStatement) as info:
            gate.parse(text)
        assert info.value.code == "bad_statement"


def test_gate_check_accepts_once_and_refuses_the_rest():
    me, other = NodeIdentity.generate(), NodeIdentity.generate()
    gate = StatementGate(max_skew=60.0)
    stmt = signed(me, body={"x": 1})
    assert gate.check(stmt, me.public_key, "heartbeat", 1000.0) == {"x": 1}

    def refused(stmt: dict, key: str = me.public_key, purpose: str = "heartbeat",
                now: float = 1000.0) -> str:
        with pytest.raises(BadStatement) as info:
            gate.check(stmt, key, purpose, now)
        assert info.value.code == "bad_statement"
        return info.value.message

    assert "replay" in refused(stmt)
    assert "verify" in refused(signed(me), key=other.public_key)
    assert "verify" in refused(signed(other), key=me.public_key)
    assert "expected" in refused(signed(me, "link"))
    assert "timestamp" in refused(signed(me, now=900.0))
    assert "timestamp" in refused(signed(me, now=1100.0))
    assert "exactly" in refused({**signed(me), "extra": 1})
    tampered = signed(me)
    tampered["body"] = {"changed": True}
    assert "verify" in refused(tampered)
    assert "nonce" in refused({**signed(me), "nonce": "short"})
    assert "verify" in refused(signed(me), key="not a key")
    # Within the allowed skew it is fine, either side.
    assert gate.check(signed(me, now=1059.0), me.public_key, "heartbeat", 1000.0) == {}
    assert gate.check(signed(me, now=941.0), me.public_key, "heartbeat", 1000.0) == {}


def test_gate_replay_guard_is_per_node():
    me = NodeIdentity.generate()
    gate = StatementGate()
    a = signed(me, node_id="a")
    b = dict(signed(me, node_id="b"), nonce=a["nonce"])
    b["sig"] = me.sign(orjson.dumps({k: v for k, v in b.items() if k != "sig"},
                                    option=orjson.OPT_SORT_KEYS))
    gate.check(a, me.public_key, "heartbeat", 1000.0)
    gate.check(b, me.public_key, "heartbeat", 1000.0)  # same nonce, other node: fine


def test_register_request():
    key = NodeIdentity.generate().public_key
    stmt = {"node_id": "n1", "body": {"ipv6": "FD10:1234:0::1", "public_key": key}}
    request = register_request(stmt)
    assert request == m.Register(node_id="n1", ipv6="fd10:1234::1", port=9000,
                                 domain="default", public_key=key)
    bad_bodies = [
        {"ipv6": "fd10:1234::1"},                                    # no key
        {"ipv6": "fd10:1234::1", "public_key": 5},
        {"ipv6": "10.0.0.1", "public_key": key},
        {"ipv6": "fd10:1234::1", "public_key": key, "port": 0},
        {"ipv6": "fd10:1234::1", "public_key": key, "domain": "no spaces"},
        {"ipv6": "fd10:1234::1", "public_key": key, "extra": 1},
    ]
    for body in bad_bodies:
        with pytest.raises(Invalid) as info:
            register_request({"node_id": "n1", "body": body})
        assert info.value.code == "invalid", body
    with pytest.raises(Invalid):
        register_request({"node_id": "bad name", "body": {"ipv6": "fd10:1234::1",
                                                          "public_key": key}})


# ------------------------------------------------------------------ pure: ReputationBook


def test_reputation_book_starts_neutral_and_stays_in_bounds():
    book = ReputationBook(heartbeat_interval=10.0)
    assert book.score("new") == 0.5
    assert book.breakdown("new")["heartbeats"]["on_time"] == 0
    rng = random.Random(7)
    t, last = 0.0, None
    for _ in range(500):
        t += rng.choice([5.0, 10.0, 14.0, 16.0, 60.0])
        book.heartbeat("x", t, last)
        last = t
        book.link_report("x", rng.choice(["open", "closed", "failed"]))
        assert 0.0 <= book.score("x") <= 1.0
    all_good = ReputationBook(10.0)
    all_bad = ReputationBook(10.0)
    for i in range(1000):
        all_good.heartbeat("g", i * 10.0, (i - 1) * 10.0 if i else None)
        all_good.link_report("g", "open")
        all_bad.heartbeat("b", i * 100.0, (i - 1) * 100.0 if i else None)
        all_bad.link_report("b", "failed")
    assert 0.99 < all_good.score("g") <= 1.0
    assert 0.0 <= all_bad.score("b") < 0.01


def test_reputation_book_heartbeat_punctuality():
    book = ReputationBook(heartbeat_interval=10.0)
    book.heartbeat("n", 100.0, None)          # the first: on time
    book.heartbeat("n", 115.0, 100.0)         # exactly 1.5 intervals: on time
    assert book.breakdown("n")["heartbeats"]["late"] == 0
    before = book.score("n")
    book.heartbeat("n", 131.0, 115.0)         # 1.6 intervals: late
    after = book.breakdown("n")
    assert after["heartbeats"] == {**after["heartbeats"], "on_time": 2, "late": 1}
    assert after["reputation"] < before
    assert after["heartbeats"]["score"] == round(3 / 5, 4)


def test_reputation_book_links_and_weights():
    book = ReputationBook(10.0)
    book.link_report("p", "open")
    book.link_report("p", "open")
    book.link_report("p", "failed")
    book.link_report("p", "closed")
    b = book.breakdown("p")
    assert (b["links"]["opened"], b["links"]["failed"], b["links"]["closed"]) == (2, 1, 1)
    assert b["links"]["score"] == round(3 / 5, 4)
    assert b["reputation"] == round(HEARTBEAT_WEIGHT * 0.5 + LINK_WEIGHT * 3 / 5, 4)
    assert HEARTBEAT_WEIGHT + LINK_WEIGHT == pytest.approx(1.0)


def test_reputation_book_dirty_and_forget():
    book = ReputationBook(10.0)
    book.heartbeat("a", 1.0, None)
    book.link_report("b", "failed")
    dirty = book.take_dirty()
    assert [n for n, _ in dirty] == ["a", "b"]
    assert dict(dirty) == {"a": book.score("a"), "b": book.score("b")}
    assert book.take_dirty() == []
    book.heartbeat("a", 2.0, 1.0)
    book.forget("a")
    assert book.take_dirty() == [] and book.score("a") == 0.5


# ------------------------------------------------------------------ pure: candidates


def row(node_id: str, domain: str = "default", reputation: float = 0.5) -> dict:
    return {"id": node_id, "ipv6": "fd10:1234::1", "port": 9000, "domain": domain,
            "public_key": f"key-{node_id}", "reputation": reputation, "extra": "dropped"}


def test_candidates_pure_order_and_filter():
    me = row("me", "lab")
    nodes = [me, row("l1", "lab", 0.2), row("l2", "lab", 0.9), row("o1", "x", 1.0),
             row("o2", "x", 0.1), row("dead", "lab", 1.0)]
    live = {"me", "l1", "l2", "o1", "o2"}
    out = candidates(me, nodes, live, 10, random.Random(1))
    assert [n["id"] for n in out] == ["l2", "l1", "o1", "o2"]
    assert all(set(n) == {"id", "ipv6", "port", "domain", "public_key", "reputation"} for n in out)
    assert [n["id"] for n in candidates(me, nodes, live, 2, random.Random(1))] == ["l2", "l1"]
    assert candidates(me, nodes, set(), 10, random.Random(1)) == []


def test_candidates_pure_ties_are_shuffled_reproducibly():
    me = row("me")
    nodes = [me] + [row(f"n{i}") for i in range(20)]
    live = {n["id"] for n in nodes}
    firsts = {candidates(me, nodes, live, 1, random.Random(seed))[0]["id"] for seed in range(30)}
    assert len(firsts) > 5  # not every node piles onto the same peer
    assert (candidates(me, nodes, live, 5, random.Random(3))
            == candidates(me, nodes, live, 5, random.Random(3)))
    # Reputations within 0.05 of each other are one tier (rounded to 0.1).
    close = [me, row("a", reputation=0.81), row("b", reputation=0.79), row("low", reputation=0.3)]
    for seed in range(10):
        out = [n["id"] for n in candidates(me, close, {"me", "a", "b", "low"}, 3,
                                           random.Random(seed))]
        assert out[2] == "low" and set(out[:2]) == {"a", "b"}


# ------------------------------------------------------------------ OpenAPI


async def test_openapi_lists_the_node_protocol_routes(env):
    status, doc = await call(env.client(), "GET", "/openapi.json")
    assert status == 200
    paths = doc["paths"]
    reputation = paths["/nodes/{node_id}/reputation"]["get"]
    assert {"200", "404"} <= set(reputation["responses"])
    props = reputation["responses"]["200"]["content"]["application/json"]["schema"]["properties"]
    assert {"reputation", "stored", "heartbeats", "links"} <= set(props)
    release = paths["/nodes/{node_id}/identity"]["delete"]
    assert release["security"] == [{"bearer": []}]
    assert {"200", "401", "403", "404"} <= set(release["responses"])
    heartbeat = paths["/nodes/{node_id}/heartbeat"]["post"]
    schema = heartbeat["requestBody"]["content"]["application/json"]["schema"]
    assert "statement" in schema["properties"] and heartbeat["requestBody"]["required"] is False
    assert "403" in heartbeat["responses"]
    assert "409" in paths["/nodes"]["post"]["responses"]
    assert "public_key" in doc["components"]["schemas"]["Node"]["properties"]


# ------------------------------------------------------------------ the node side of refusals


def test_a_node_process_gets_the_registrys_refusals_as_refused():
    """In a process that loads only the node (as `trustnet node` does), the
    registry's refusals decode as Refused with their codes, not RemoteError:
    "not_found" makes a node register again, "name_taken" makes it exit."""
    script = """
import trustnet.node.service
from actors import Refused, codec
for kind, code in [("NotFound", "not_found"), ("Conflict", "name_taken"),
                   ("Invalid", "invalid"), ("BadStatement", "bad_statement")]:
    err = codec.error_from_body({"type": kind, "code": code, "message": "m", "details": {}})
    assert isinstance(err, Refused) and err.code == code, (kind, type(err))
import sys
assert "trustnet.registry.state" not in sys.modules  # no database code in a node
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# ------------------------------------------------------------------ fuzz

_ODD = [None, True, 0, -1, 2**64 - 1, -(2**63), 1.5, 1e308, "", "x" * 500, "fd10:1234::1", "10.0.0.1", [], {},
        ["fd10:1234::1"], {"peer": "n1"}, "open", "closed", "n1", "nöde", "\u0000", 65536]


def _mutated_statement(rng: random.Random, nodes: list[Node]) -> Any:
    """A node-protocol message built from a valid one by random damage: odd
    body values (signed, so they reach the code behind the signature check),
    wrong names or purposes, a foreign signer, or damaged text."""
    node = rng.choice(nodes)
    kind = rng.randrange(6)
    if kind == 5:
        return Candidates(rng.choice(["n1", "n2", "ghost", "", "x" * 100]),
                          rng.choice([0, 1, 20, -5, 10**6]))
    purpose, body, wrap = [
        ("register", {"ipv6": node.ipv6, "port": node.port, "domain": node.domain,
                      "public_key": node.identity.public_key}, SignedRegister),
        ("heartbeat", {}, SignedHeartbeat),
        ("session", {"share": session_share()[1]}, OpenSession),
        ("link", {"peer": rng.choice(["n1", "n2", "n3"]), "state": "open"}, LinkReport),
        ("link", {"peer": "n2", "state": "closed", "rtt_ms": 3.5}, LinkReport),
    ][kind]
    for _ in range(rng.randrange(3)):
        op = rng.randrange(3)
        if op == 0 and body:
            body.pop(rng.choice(sorted(body)))
        elif op == 1 and body:
            body[rng.choice(sorted(body))] = rng.choice(_ODD)
        else:
            body[rng.choice(["extra", "ipv6", "peer", "share", "state"])] = rng.choice(_ODD)
    text = node.statement(rng.choice([purpose] * 4 + ["register", "link", "x"]), body,
                          node_id=rng.choice([None, None, None, "n2", "ghost", "bad id"]),
                          ts_offset=rng.choice([0.0, 0.0, 0.0, -3600.0, 3600.0]),
                          signer=rng.choice([None] * 5 + [NodeIdentity.generate()]))
    if rng.random() < 0.2:  # damage the text itself
        at = rng.randrange(len(text) + 1)
        text = rng.choice([text[:at], text[:at] + rng.choice("{}[]\",:x\\") + text[at:],
                           text.replace('"', "'", 1), orjson.dumps(rng.choice(_ODD)).decode(),
                           text.replace('"body":{', '"body":{"n":1' + "0" * 30 + ",", 1)])
    return wrap(text)


@pytest.mark.parametrize("seed", range(6))
async def test_random_node_protocol_messages_are_answered_or_refused(env, seed):
    """Whatever a node sends, the actor answers it or refuses it with a
    Refused (a clear error for the node); it never crashes on it (a crash
    fails the ask with another error, and the test's nursery), and session
    heartbeats with odd counters and MACs do the same."""
    rng = random.Random(seed)
    nodes = [await env.registered(f"n{i}", i) for i in (1, 2, 3)]
    session = await nodes[0].session(env)
    refusals: set[str] = set()
    answered = 0
    for _ in range(150):
        if rng.random() < 0.15:
            msg: Any = SessionHeartbeat(
                rng.choice([session.id, "", "nope", "x" * 300]),
                rng.choice([session.counter + 1, 0, -1, 2**70, session.counter]),
                rng.choice([session.next().mac, "", "zz", "0" * 64]))
        else:
            msg = _mutated_statement(rng, nodes)
        try:
            await env.ask(msg)
            answered += 1
        except Refused as refusal:
            refusals.add(refusal.code)
    assert answered and refusals, (answered, refusals)
    # Still serving, and what it stored is readable.
    status, body = await call(env.client(), "GET", "/nodes?limit=1000")
    assert status == 200
    for node in body["nodes"]:
        assert (await call(env.client(), "GET", f"/nodes/{node['id']}"))[1] == node
