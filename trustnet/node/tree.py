"""The node's supervision tree.

    node (one_for_one)
    ├── heartbeat            HeartbeatActor: registered before anything else starts
    └── mesh-sup (one_for_all)
        ├── links            Supervisor of PeerLinkActors (temporary children)
        └── mesh             MeshActor
"""

from __future__ import annotations

import trio

from actors import ChildSpec, Restart, Strategy, Supervisor, run_root

from actors.groups import collapsed

from .context import NodeContext, NodeFatal
from .heartbeat import HeartbeatActor
from .mesh import MESH_ACTOR, MeshActor

HEARTBEAT_ACTOR = "heartbeat"


def node_supervisor(node: NodeContext) -> Supervisor:
    system = node.system

    def mesh_sup() -> Supervisor:
        sup: Supervisor
        sup = Supervisor(system, "mesh-sup", [
            ChildSpec("links", lambda: Supervisor(system, "links", [], intensity=1000, period=1.0)),
            ChildSpec(MESH_ACTOR, lambda: MeshActor(node, sup.child("links")),  # type: ignore[arg-type]
                      mailbox_size=10_000),
        ], strategy=Strategy.ONE_FOR_ALL, intensity=5, period=60.0)
        return sup

    return Supervisor(system, "node", [
        ChildSpec(HEARTBEAT_ACTOR, lambda: HeartbeatActor(node), Restart.PERMANENT),
        ChildSpec("mesh-sup", mesh_sup, Restart.PERMANENT),
    ], intensity=3, period=60.0)


async def run_node(node: NodeContext, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                   ) -> int:
    """Run the tree until cancelled (0), a supervisor gives up (1) or a fatal error (1).

    The system's transport must already be serving. Raises NodeFatal when the
    node cannot start (registry unreachable, name refused)."""
    try:
        with collapsed():
            return await _run(node, task_status)
    except NodeFatal:
        return 1


async def _run(node: NodeContext, task_status: trio.TaskStatus[None]) -> int:
    root = node_supervisor(node)
    code = 0
    async with trio.open_nursery() as nursery:
        async def supervise(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            nonlocal code
            code = await run_root(root, task_status=task_status)
            nursery.cancel_scope.cancel()

        async def watch_fatal() -> None:
            nonlocal code
            await node.fatal_event.wait()
            code = 1
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_fatal)
        await nursery.start(supervise)
        task_status.started()
    return code
