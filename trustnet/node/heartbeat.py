"""HeartbeatActor: registers the node, renews its lease, fails fast (record §12).

- At start it registers (SignedRegister over the actor link to the registry),
  retrying with backoff for at most `startup_timeout`; then the node exits 1.
- It renews every heartbeat interval, at a phase drawn from a random
  generator seeded by the node id (nodes started together do not heartbeat
  together), through a heartbeat session (trustnet.registry.sessions): a
  signed OpenSession first, then SessionHeartbeats carrying a counter and a
  MAC. "no_session" / "bad_session" (the registry restarted, leadership
  moved, the lease lapsed) -> open a new session at once.
- A missed heartbeat is logged at info and retried after a third of the
  interval; the third miss in a row and every one after it at error.
- "not_found" (the lease expired) -> register again, then have the mesh
  report its open links again (the registry dropped them with the lease).
- No answer -> the next registry replica, if registry.ws lists several (any
  replica forwards to the leader, where leases and sessions live).
- No answer for `unreachable_timeout` -> fatal: the node exits 1.
- "name_taken" / "bad_statement" at registration -> fatal (another key holds
  the name; an administrator must release it).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import orjson
import trio

from actors import Actor, ActorError, Refused
from trustnet.identity import IdentityError, session_key, session_mac, session_share
from trustnet.registry.node_protocol import OpenSession, SessionHeartbeat, SignedRegister

from .context import REPLICA_REFUSALS, NodeContext, NodeFatal
from .mesh import MESH_ACTOR
from .messages import HeartbeatStatus, ReportLinks

log = logging.getLogger("trustnet.node.heartbeat")

FATAL_REFUSALS = ("name_taken", "bad_statement", "ipv6_taken", "invalid")
SESSION_REFUSALS = ("no_session", "bad_session")


class HeartbeatSession:
    """The node's end of a heartbeat session: its id, key and last counter."""

    def __init__(self, session_id: str, key: bytes):
        self.id = session_id
        self.key = key
        self.counter = 0

    def next(self) -> SessionHeartbeat:
        self.counter += 1
        return SessionHeartbeat(self.id, self.counter, session_mac(self.key, self.id, self.counter))


class HeartbeatActor(Actor):
    def __init__(self, node: NodeContext):
        self.node = node
        self.p = node.params
        self.interval = self.p.heartbeat_interval
        self.registered = False
        self.misses = 0
        self.last_ok: float | None = None
        self.lease_deadline: float | None = None
        self.session: HeartbeatSession | None = None
        self.sessions_opened = 0
        self.rng = random.Random(f"heartbeat:{self.p.node_id}")

    # ------------------------------------------------------------ lifecycle

    async def on_start(self) -> None:
        self.node.actors["heartbeat"] = self
        await self._register_at_start()
        self.nursery.start_soon(self._beat)

    async def receive(self, msg: Any) -> Any:
        if isinstance(msg, HeartbeatStatus):
            age = None if self.last_ok is None else trio.current_time() - self.last_ok
            return {"registered": self.registered, "misses": self.misses,
                    "last_ok_age": age, "interval": self.interval,
                    "lease_deadline": self.lease_deadline,
                    "session": self.session is not None,
                    "sessions_opened": self.sessions_opened}
        return await super().receive(msg)

    # ------------------------------------------------------------ registry calls

    def _statement(self, purpose: str, body: dict[str, Any]) -> str:
        stmt = self.node.identity.statement(purpose, self.p.node_id, body)
        return orjson.dumps(stmt).decode()

    async def _register(self) -> None:
        body = {"ipv6": self.p.ipv6, "port": self.p.port, "domain": self.p.domain,
                "public_key": self.node.identity.public_key}
        answer = await self.node.registry.ask(SignedRegister(self._statement("register", body)),
                                              timeout=self.p.request_timeout)
        told = answer.get("heartbeat_interval") if isinstance(answer, dict) else None
        if isinstance(told, (int, float)) and not isinstance(told, bool) and told > 0:
            self.interval = min(self.p.heartbeat_interval, float(told))
        self.registered = True
        self.last_ok = trio.current_time()
        log.info("node registered", extra={"node_id": self.p.node_id, "ipv6_addr": self.p.ipv6,
                                           "port": self.p.port, "interval": self.interval})

    async def _heartbeat(self) -> None:
        if self.session is None:
            answer = await self._open_session()
        else:
            try:
                answer = await self.node.registry.ask(self.session.next(),
                                                      timeout=self.p.request_timeout)
            except Refused as exc:
                if exc.code not in SESSION_REFUSALS:
                    raise
                log.info("heartbeat session refused, opening a new one",
                         extra={"node_id": self.p.node_id, "code": exc.code})
                self.session = None
                answer = await self._open_session()
        if isinstance(answer, dict):
            self.lease_deadline = answer.get("lease_deadline")

    async def _open_session(self) -> dict:
        """A signed OpenSession (it renews the lease too); keeps the session."""
        private, share = session_share()
        answer = await self.node.registry.ask(
            OpenSession(self._statement("session", {"share": share})),
            timeout=self.p.request_timeout)
        try:
            theirs = answer["share"]
            key = session_key(private, theirs, self.p.node_id, share, theirs)
            self.session = HeartbeatSession(answer["session"], key)
        except (KeyError, TypeError, IdentityError) as exc:
            # The lease was renewed; the next beat tries a new session.
            log.warning("registry answered a session opening without a usable session",
                        extra={"node_id": self.p.node_id, "error": str(exc)})
            return answer if isinstance(answer, dict) else {}
        self.sessions_opened += 1
        return answer

    def _refused_fatally(self, exc: Refused) -> None:
        if exc.code in FATAL_REFUSALS:
            reason = f"registry refused node {self.p.node_id!r}: {exc.code}: {exc.message}"
            self.node.fatal(reason, error_code=exc.code)
            raise NodeFatal(reason)

    async def _register_at_start(self) -> None:
        start = trio.current_time()
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._register()
                return
            except Refused as exc:
                self._refused_fatally(exc)
                error = f"{exc.code}: {exc.message}"
                if exc.code in REPLICA_REFUSALS:
                    self.node.next_registry(error)
            except ActorError as exc:
                error = f"{type(exc).__name__}: {exc}"
                self.node.next_registry(error)
            waited = trio.current_time() - start
            if waited >= self.p.startup_timeout:
                reason = (f"registry at {self.node.registry_address} unreachable for "
                          f"{waited:.0f}s at start-up (startup_timeout "
                          f"{self.p.startup_timeout:g}s); exiting")
                self.node.fatal(reason, error=error, attempts=attempt)
                raise NodeFatal(reason)
            delay = min(self.rng.uniform(0.5, 1.0) * 2 ** min(attempt - 1, 5),
                        self.p.startup_timeout - waited)
            log.warning("registry not reachable yet, retrying",
                        extra={"registry": self.node.registry_address, "error": error,
                               "attempt": attempt, "retry_after_seconds": round(delay, 3)})
            await trio.sleep(max(delay, 0.0))

    # ------------------------------------------------------------ the loop

    async def _beat(self) -> None:
        await trio.sleep(self.rng.uniform(0, self.interval))  # this node's phase
        while True:
            delay = self.interval
            try:
                if self.registered:
                    await self._heartbeat()
                else:
                    await self._register()
                    self._report_links_again()
                if self.misses:
                    log.info("heartbeat recovered", extra={"misses": self.misses})
                self.misses = 0
                self.last_ok = trio.current_time()
            except Refused as exc:
                if exc.code == "not_found":
                    log.warning("registry does not know this node (lease expired), "
                                "registering again", extra={"node_id": self.p.node_id})
                    self.registered = False
                    delay = 0.0
                else:
                    self._refused_fatally(exc)
                    delay = self._missed(f"{exc.code}: {exc.message}")
                    if exc.code in REPLICA_REFUSALS:
                        self.node.next_registry(f"{exc.code}: {exc.message}")
            except ActorError as exc:
                delay = self._missed(f"{type(exc).__name__}: {exc}")
                self.node.next_registry(f"{type(exc).__name__}: {exc}")
            if self.node.fatal_reason is not None:
                await trio.sleep_forever()  # the service is shutting the node down
            await trio.sleep(delay)

    def _report_links_again(self) -> None:
        # The lapsed lease took this node's rows of the registry's peers
        # table with it; the links themselves may well have survived.
        try:
            self.node.system.ref(MESH_ACTOR).tell_nowait(ReportLinks())
        except ActorError as exc:
            log.debug("mesh not told to report its links", extra={"error": str(exc)})

    def _missed(self, error: str) -> float:
        self.misses += 1
        now = trio.current_time()
        silent = now - (self.last_ok if self.last_ok is not None else now)
        retry = max(self.interval / 3, 0.1)
        extra = {"registry": self.node.registry_address, "error": error, "misses": self.misses,
                 "retry_after_seconds": round(retry, 3)}
        if silent >= self.p.unreachable_timeout:
            self.node.fatal(f"registry at {self.node.registry_address} unreachable for "
                            f"{silent:.0f}s (unreachable_timeout "
                            f"{self.p.unreachable_timeout:g}s); exiting", **extra)
            return 0.0
        log.log(logging.ERROR if self.misses >= 3 else logging.INFO, "heartbeat missed", extra=extra)
        return retry
