"""Raft wire messages: frozen attrs classes with stable `raft.*` wire tags.

Every message names its `term`, its sender `from_id` and its receiver `to_id`,
so the core can route and judge a message without looking at the envelope.

Bytes are not JSON: fields typed `bytes` (entry data, snapshot chunks) travel
as base64 strings. The hooks doing that are registered for these classes only
(see `_bytes_as_base64`), so the shared converter keeps its strict behaviour
for everyone else.

(No `from __future__ import annotations` here on purpose: cattrs reads the
field types at class-creation time.)
"""

import base64
import binascii

import attrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from actors.codec import converter, message

ENTRY_KINDS = ("normal", "conf", "empty")


def _b64encode(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _b64decode(value, _type) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"expected base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"bad base64: {exc}") from None


def _bytes_as_base64(cls, *fields: str):
    """Register strict (un)structure hooks for `cls` that base64 its bytes fields."""
    hooks = {f: override(struct_hook=_b64decode, unstruct_hook=_b64encode) for f in fields}
    converter.register_unstructure_hook(cls, make_dict_unstructure_fn(cls, converter, **hooks))
    converter.register_structure_hook(
        cls, make_dict_structure_fn(cls, converter, _cattrs_forbid_extra_keys=True, **hooks)
    )
    return cls


# ---------------------------------------------------------------- log entries


@message("raft.entry")
@attrs.frozen
class Entry:
    """One log entry. kind: "normal" (a command), "conf" (a membership change,
    see `ConfChange`), "empty" (the no-op a new leader appends)."""

    index: int
    term: int
    kind: str
    data: bytes = b""


_bytes_as_base64(Entry, "data")


@message("raft.conf_change")
@attrs.frozen
class ConfChange:
    """The payload of a "conf" entry: add or remove one voter, or "set" the
    whole voter list (only the bootstrap entry at index 1 does that)."""

    op: str  # "add" | "remove" | "set"
    node_id: str = ""
    voters: list[str] = attrs.field(factory=list)


# ---------------------------------------------------------------- elections


@message("raft.vote_request")
@attrs.frozen
class VoteRequest:
    """RequestVote, or a pre-vote when `pre_vote` (then `term` is the term the
    sender *would* campaign in; nobody changes term because of it).
    `transfer` marks a campaign started by TimeoutNow: receivers then ignore
    their leader lease."""

    term: int
    from_id: str
    to_id: str
    last_log_index: int
    last_log_term: int
    pre_vote: bool = False
    transfer: bool = False


@message("raft.vote_response")
@attrs.frozen
class VoteResponse:
    term: int
    from_id: str
    to_id: str
    granted: bool
    pre_vote: bool = False


@message("raft.timeout_now")
@attrs.frozen
class TimeoutNow:
    """Leadership transfer: the receiver campaigns at once (thesis §3.10)."""

    term: int
    from_id: str
    to_id: str


# ---------------------------------------------------------------- replication


@message("raft.append")
@attrs.frozen
class AppendEntries:
    term: int
    from_id: str
    to_id: str
    prev_index: int
    prev_term: int
    entries: list[Entry]
    commit: int


@message("raft.append_response")
@attrs.frozen
class AppendResponse:
    """Success: the follower's log matches the leader's up to `index`.
    Reject: `index` is the rejected prev_index; (hint_index, hint_term) is the
    follower's last entry that may still match, for a fast back-off."""

    term: int
    from_id: str
    to_id: str
    success: bool
    index: int
    hint_index: int = 0
    hint_term: int = 0


@message("raft.heartbeat")
@attrs.frozen
class Heartbeat:
    """`commit` is min(leader commit, follower match) so a follower never
    commits past what it is known to share with the leader. `ctx` is the
    ReadIndex round this heartbeat confirms (0: none)."""

    term: int
    from_id: str
    to_id: str
    commit: int
    ctx: int = 0


@message("raft.heartbeat_response")
@attrs.frozen
class HeartbeatResponse:
    term: int
    from_id: str
    to_id: str
    ctx: int = 0


# ---------------------------------------------------------------- snapshots


@message("raft.install_snapshot")
@attrs.frozen
class InstallSnapshot:
    """One chunk of the snapshot (last_index, last_term) starting at byte
    `offset`; `done` on the last chunk. `voters` is the configuration the
    snapshot contains."""

    term: int
    from_id: str
    to_id: str
    last_index: int
    last_term: int
    voters: list[str]
    offset: int
    data: bytes
    done: bool


_bytes_as_base64(InstallSnapshot, "data")


@message("raft.install_snapshot_response")
@attrs.frozen
class InstallSnapshotResponse:
    """`offset` is the next byte the follower expects; `done` when the whole
    snapshot was received and the follower's log now reaches `last_index`."""

    term: int
    from_id: str
    to_id: str
    last_index: int
    offset: int
    done: bool = False


RaftMessage = (
    VoteRequest | VoteResponse | TimeoutNow | AppendEntries | AppendResponse
    | Heartbeat | HeartbeatResponse | InstallSnapshot | InstallSnapshotResponse
)

ALL_MESSAGES = (
    VoteRequest, VoteResponse, TimeoutNow, AppendEntries, AppendResponse,
    Heartbeat, HeartbeatResponse, InstallSnapshot, InstallSnapshotResponse,
)
