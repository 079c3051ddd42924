"""One registry replica: its Raft log, its registry state, its ConsensusActor.

    spec = ReplicaSpec(id="r1", addresses={"r1": "ws://[::1]:7001", ...},
                       voters=("r1", "r2", "r3"), registry_path="data/registry.db",
                       raft_path="data/raft.db")
    async with trio.open_nursery() as nursery:
        replica = await nursery.start(run_replica, transport, spec)
        await replica.consensus.ask(Propose(cmd, request_id))

`run_replica` owns the files it opened (closes them when cancelled); pass
`storage`/`state` to keep them across restarts instead (the simulation keeps
a MemoryStorage "disk" that way). Replica ids are stable and never reused:
SqliteRaftStorage refuses a log written by another id.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import attrs
import trio

from actors import ActorSystem, Ref
from actors.transport import Transport
from trustnet.registry.state import RegistryState

from .actor import NAME, ConsensusActor, ConsensusConfig, Observer
from .core import MemoryStorage
from .storage import SqliteRaftStorage


@attrs.frozen
class ReplicaSpec:
    id: str
    addresses: dict[str, str]  # replica id -> actor-system address (this one included)
    registry_path: str
    raft_path: str | None = None  # None: the log lives in memory (tests only)
    voters: tuple[str, ...] = ()  # founding members; () for a replica added later
    config: ConsensusConfig = ConsensusConfig()


@attrs.define
class Replica:
    system: ActorSystem
    actor: ConsensusActor

    @property
    def consensus(self) -> Ref:
        return self.system.ref(NAME)


def open_stores(spec: ReplicaSpec) -> tuple[Any, RegistryState]:
    """Open (or create) the Raft log and the registry of `spec`."""
    # The Raft log (synchronous=FULL) is the durable record; the registry is
    # rebuilt from it past whatever a power cut took back.
    state = RegistryState.open(spec.registry_path, fsync_each_commit=False)
    try:
        storage = (MemoryStorage() if spec.raft_path is None
                   else SqliteRaftStorage(spec.raft_path, node_id=spec.id))
    except BaseException:
        state.close()
        raise
    if state.applied_index > storage.last_index():
        # The registry applied entries its log no longer has: the log was
        # lost or is another's. Raft would hand out those indices again and
        # this registry would skip them as applied, so refuse to start.
        applied, last = state.applied_index, storage.last_index()
        state.close()
        getattr(storage, "close", lambda: None)()
        raise ValueError(
            f"the registry database {spec.registry_path} has applied the log up to index "
            f"{applied}, but the Raft log {spec.raft_path or '(in memory)'} ends at {last}: "
            "the log was lost or belongs to another replica. Restore both files from the "
            "same backup, or remove the registry database so that it is rebuilt from the log")
    return storage, state


async def run_replica(transport: Transport, spec: ReplicaSpec, *,
                      storage: Any = None, state: RegistryState | None = None,
                      rng: random.Random | None = None, observer: Observer | None = None,
                      mailbox_size: int = 10_000,
                      task_status: trio.TaskStatus[Replica] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve one replica on `transport` until cancelled; started() hands back
    the Replica (its system, to spawn the RegistryActor beside it)."""
    if (storage is None) != (state is None):
        raise ValueError("pass both storage and state, or neither")
    with contextlib.ExitStack() as owned:
        if storage is None:
            storage, state = open_stores(spec)
            owned.callback(state.close)
            if hasattr(storage, "close"):
                owned.callback(storage.close)
        system = ActorSystem(transport=transport)
        actor = ConsensusActor(spec.id, voters=spec.voters, addresses=spec.addresses,
                               storage=storage, state=state, config=spec.config,
                               rng=rng, observer=observer)
        async with trio.open_nursery() as nursery:
            await nursery.start(system.serve)
            await system.spawn(nursery, actor, NAME, mailbox_size)
            task_status.started(Replica(system, actor))
            await trio.sleep_forever()
