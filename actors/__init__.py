"""A small actor kernel on Trio: mailboxes, refs, tell/ask, OTP supervisors,
a typed wire codec, and transports (websocket, simulated). It knows nothing
of TrustNet."""

from .actor import Actor, ActorSystem, Letter, Mailbox, Ref, Reply, UseMailbox
from .codec import Envelope, message, refusal
from .errors import (
    ActorCrashed,
    ActorError,
    ActorNotFound,
    ActorStopped,
    AskTimeout,
    MailboxFull,
    ProtocolError,
    Refused,
    RemoteError,
    SupervisorGaveUp,
    Unreachable,
)
from .supervisor import ChildSpec, Restart, Strategy, Supervisor, run_root

__all__ = [
    "Actor", "ActorSystem", "Letter", "Mailbox", "Ref", "Reply", "UseMailbox",
    "Envelope", "message", "refusal",
    "ActorCrashed", "ActorError", "ActorNotFound", "ActorStopped", "AskTimeout",
    "MailboxFull", "ProtocolError", "Refused", "RemoteError", "SupervisorGaveUp",
    "Unreachable",
    "ChildSpec", "Restart", "Strategy", "Supervisor", "run_root",
]
