"""Errors of the actor kernel. Every one names what failed and why."""

from __future__ import annotations


class ActorError(Exception):
    """Base of all kernel errors."""


class ProtocolError(ActorError):
    """Bytes from a link could not be decoded into a known, well-typed message."""


class AskTimeout(ActorError, TimeoutError):
    """An ask got no reply within its timeout."""


class ActorCrashed(ActorError):
    """The actor crashed before it answered this ask."""


class ActorStopped(ActorError):
    """The actor is not running and will not be restarted."""


class ActorNotFound(ActorError):
    """No actor is registered under that name (locally or at the remote address)."""


class MailboxFull(ActorError):
    """The mailbox is full and the caller asked not to wait."""


class Unreachable(ActorError):
    """The transport could not deliver to the address (no link, link lost)."""


class SupervisorGaveUp(ActorError):
    """A supervisor exceeded its restart intensity and stopped all its children."""


class Refused(ActorError):
    """An expected, typed refusal from an actor's handler.

    Raising it (or a subclass) inside `receive` answers the ask with this
    error and does NOT crash the actor. `code` is a stable machine-readable
    string; `details` must be JSON-able so it survives the wire.
    """

    def __init__(self, code: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


class RemoteError(ActorError):
    """A remote actor failed an ask with an error that is not a Refused."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
