"""What the ActorSystem needs from a network between processes.

Two implementations share this interface: the websocket transport
(`actors.ws`) for real processes and the simulated network (`actors.simnet`)
for deterministic tests. The system never knows which one it runs on.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Protocol

import trio

from .codec import Envelope

# Called by the transport for every decoded inbound envelope, with the
# address of the link that carried it (as link_address names it) and whether
# that connection is trusted (its peer proved the shared secret, see
# actors.linkauth). It may await (a full mailbox pushes back on the link that
# delivered the envelope).
Deliver = Callable[[Envelope, str, bool], Awaitable[None]]
# Called by the transport when the link to an address is lost, so pending
# asks to it fail at once instead of waiting for their timeouts.
LinkDown = Callable[[str], None]


class Transport(Protocol):
    # The address peers use to reach this process, e.g. "ws://[::1]:9001".
    address: str

    async def serve(
        self,
        deliver: Deliver,
        link_down: LinkDown,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and dial links until cancelled; call task_status.started() when
        the listener is bound. Inbound envelopes go to `deliver`."""
        ...

    def link_address(self, address: str) -> str:
        """The name of the link to `address`: what `deliver` and `link_down`
        are given for it (e.g. the address in a canonical form)."""
        ...

    async def send(self, address: str, envelope: Envelope) -> None:
        """Queue `envelope` for `address`, dialling a link if there is none.

        Raises actors.errors.Unreachable when the address cannot be reached
        now. Delivery is best effort (a link may fail after the send)."""
        ...

    def send_nowait(self, address: str, envelope: Envelope) -> None:
        """Like send, but raise actors.errors.MailboxFull instead of waiting
        when the link's queue is full (used for replies and tell_nowait)."""
        ...
