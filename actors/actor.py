"""Actors, mailboxes, refs and the ActorSystem that routes between them.

An actor is a Trio task that takes letters from a bounded mailbox one at a
time. A Ref names an actor by (address, name) and resolves it at every call,
so a ref stays valid while a supervisor restarts the actor behind it, and a
ref to an actor in another process looks and works the same.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, NoReturn

import trio

from . import codec
from .codec import Envelope
from .groups import collapsed
from .errors import (
    ActorCrashed,
    ActorError,
    ActorNotFound,
    ActorStopped,
    AskTimeout,
    MailboxFull,
    Refused,
    Unreachable,
)
from .transport import Transport

log = logging.getLogger("actors")

DEFAULT_MAILBOX = 1000
DEFAULT_ASK_TIMEOUT = 5.0
STOP_HOOK_TIMEOUT = 5.0


# ------------------------------------------------------------------ replies

class Reply:
    """The answer slot of one local ask: set once, awaited once."""

    __slots__ = ("_event", "_value", "_error")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def set(self, value: Any) -> None:
        if not self._event.is_set():
            self._value = value
            self._event.set()

    def fail(self, error: BaseException) -> None:
        if not self._event.is_set():
            self._error = error
            self._event.set()

    async def wait(self) -> Any:
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._value


class RemoteReply:
    """The answer slot of an ask that came over a link: answers go back as envelopes."""

    __slots__ = ("_system", "_to", "_cid", "_trusted", "done")

    def __init__(self, system: ActorSystem, to: str, cid: int, trusted: bool = False):
        # trusted: the ask's message was, so its answer goes back only over
        # a trusted connection too (see actors.ws, "Trust")
        self._system, self._to, self._cid, self._trusted = system, to, cid, trusted
        self.done = False

    def set(self, value: Any) -> None:
        if not self.done:
            self.done = True
            self._system._send_back(self._to, Envelope(self._system.address + "/", "", "reply",
                                                       value, self._cid, self._trusted))

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            self._system._send_back(self._to, Envelope(self._system.address + "/", "", "error",
                                                       codec.error_body(error), self._cid,
                                                       self._trusted))


class Letter:
    """A message in a mailbox and, for an ask, where its answer goes.

    `sender`: the link it came over (the sending process's address, as the
    transport's link_address names it), None when it was sent in this
    process. The transport has checked that the link's peer is that
    address; an actor may check that a message naming a peer came from it."""

    __slots__ = ("msg", "reply", "dropped", "sender")

    def __init__(self, msg: Any, reply: Reply | RemoteReply | None = None,
                 sender: str | None = None):
        self.msg = msg
        self.reply = reply
        self.sender = sender
        self.dropped: BaseException | None = None  # why it left the mailbox unread

    def answer(self, value: Any) -> None:
        if self.reply is not None:
            self.reply.set(value)

    def fail(self, error: BaseException) -> None:
        if self.reply is not None:
            self.reply.fail(error)


# ---------------------------------------------------------------- mailboxes

class Mailbox:
    """A bounded queue of letters that outlives restarts of its actor."""

    def __init__(self, name: str, size: int = DEFAULT_MAILBOX):
        self.name = name
        self.size = size
        self._send, self._recv = trio.open_memory_channel[Letter](size)
        self.closed = False
        # Letters sent and not yet taken, counted from before a send starts:
        # a letter handed straight to a waiting actor is in no buffer, and a
        # sender blocked on a full mailbox has not sent yet; both count here.
        self.pending = 0
        self.serving: Actor | None = None  # the instance taking letters, if any

    async def put(self, letter: Letter) -> None:
        if self.closed:
            raise ActorStopped(f"actor {self.name!r} is stopped")
        self.pending += 1
        try:
            await self._send.send(letter)
        except BaseException as exc:
            self.pending -= 1
            if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
                raise ActorStopped(f"actor {self.name!r} stopped") from None
            raise
        # A sender blocked on a full mailbox is let in by fail_pending (trio
        # moves a waiting sender's letter into the buffer as a slot frees up),
        # only to have its letter dropped: tell it, or it thinks it delivered.
        if letter.dropped is not None:
            raise letter.dropped

    def put_nowait(self, letter: Letter) -> None:
        if self.closed:
            raise ActorStopped(f"actor {self.name!r} is stopped")
        try:
            self._send.send_nowait(letter)
        except trio.WouldBlock:
            raise MailboxFull(f"mailbox of {self.name!r} is full ({self.size} letters)") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ActorStopped(f"actor {self.name!r} stopped") from None
        self.pending += 1

    async def get(self) -> Letter:
        letter = await self._recv.receive()
        self.pending -= 1
        return letter

    def get_nowait(self) -> Letter:
        """The next letter or trio.WouldBlock (used to drain batches)."""
        letter = self._recv.receive_nowait()
        self.pending -= 1
        return letter

    def idle_actor(self) -> Actor | None:
        """The actor serving this mailbox if it waits for a letter and none
        is on its way: an ask answered now is answered in mailbox order."""
        actor = self.serving
        if actor is None or self.pending or actor._busy or actor._stopping:
            return None
        return actor

    def fail_pending(self, error_for: Callable[[], BaseException]) -> int:
        """Fail every queued ask and drop queued tells; returns how many letters."""
        n = 0
        while True:
            try:
                letter = self._recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return n
            self.pending -= 1
            letter.dropped = error_for()
            letter.fail(letter.dropped)
            n += 1

    def close(self) -> None:
        """No more letters: queued asks fail, blocked senders get ActorStopped."""
        self.closed = True
        self.fail_pending(lambda: ActorStopped(f"actor {self.name!r} stopped"))
        self._recv.close()


# --------------------------------------------------------------------- refs

class UseMailbox(Exception):
    """Raised by Actor.answer_now: this message goes through the mailbox."""


class _Crash:
    """A letter that crashes the actor taking it with `error` (an inline
    answer that raised)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


class _CrashedInline(Exception):
    """An inline answer raised: `reply` fails once the actor has crashed."""

    def __init__(self, reply: Reply):
        self.reply = reply

    async def wait(self, name: str, timeout: float) -> NoReturn:
        """Raise the crash's ActorCrashed once the actor's task has crashed
        (so what the caller sends next reaches the restarted instance)."""
        with trio.move_on_after(timeout):
            await self.reply.wait()
        raise ActorCrashed(f"actor {name!r} crashed")


class Ref:
    """The address of an actor: local or in another process."""

    __slots__ = ("system", "name", "address")

    def __init__(self, system: ActorSystem, name: str, address: str | None = None):
        self.system = system
        self.name = name
        self.address = address or system.address

    @property
    def is_local(self) -> bool:
        return self.address == self.system.address

    @property
    def path(self) -> str:
        return f"{self.address}/{self.name}"

    def __repr__(self) -> str:
        return f"Ref({self.path})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ref) and (self.address, self.name) == (other.address, other.name)

    def __hash__(self) -> int:
        return hash((self.address, self.name))

    async def tell(self, msg: Any) -> None:
        """Send without a reply, waiting while the mailbox (or link) is full.

        Raises ActorNotFound/ActorStopped when nobody will read it, and
        ActorStopped/ActorCrashed when the letter was dropped while this call
        still waited (the mailbox closed, or the actor crashed).
        """
        if self.is_local:
            await self.system.mailbox_of(self.name).put(Letter(msg))
        else:
            await self.system._send_remote(self.address, Envelope(
                self.system.address + "/", self.name, "tell", msg))

    def tell_nowait(self, msg: Any) -> None:
        """Send without a reply; raise MailboxFull instead of waiting."""
        if self.is_local:
            self.system.mailbox_of(self.name).put_nowait(Letter(msg))
        else:
            self.system._send_remote_nowait(self.address, Envelope(
                self.system.address + "/", self.name, "tell", msg))

    async def ask(self, msg: Any, timeout: float = DEFAULT_ASK_TIMEOUT) -> Any:
        """Send and wait for the answer.

        Raises AskTimeout after `timeout` seconds, ActorCrashed when the actor
        crashed before answering, ActorStopped/ActorNotFound/Unreachable when
        there is nobody to answer, or the Refused the actor raised.
        """
        if self.is_local:
            return await self.system._ask_local(self.name, msg, timeout)
        return await self.system._ask_remote(self.address, self.name, msg, timeout)


# ------------------------------------------------------------------- actors

class Actor:
    """Subclass and implement `receive`; its return value answers an ask.

    Raise a Refused to answer an ask with an expected error without crashing.
    Any other exception crashes the actor: its supervisor decides what next.
    `self.nursery` runs the actor's helper tasks; they end with the actor.

    Answering in the caller's task: an ask of a type listed in `inline` that
    finds the actor idle (waiting for a letter, none on its way) is answered
    by `answer_now` at once, instead of going through the mailbox: in the
    asking task, or for a remote ask in the task reading its link. It is the
    same as a letter taken and answered right then: letters are handled one
    at a time and in order either way. What it saves is two task switches,
    which under load in a Trio HTTP server cost far more than the handler
    (~0.2 ms a request here, see bench/README).
    `answer_now` must not await; it raises UseMailbox to decline a message.
    An exception other than Refused crashes the actor as it would in its
    own task.
    """

    system: ActorSystem
    ref: Ref
    nursery: trio.Nursery
    inline: tuple[type, ...] = ()
    # Class defaults, so stop() works even before run() and subclasses need
    # not call super().__init__().
    _stopping = False
    _busy = False
    _loop_scope: trio.CancelScope | None = None

    async def on_start(self) -> None:
        """Runs before the first letter is taken; helper tasks start here."""

    async def receive(self, msg: Any) -> Any:
        raise Refused("unhandled_message",
                      f"{type(self).__name__} does not handle {type(msg).__name__}")

    def answer_now(self, msg: Any) -> Any:
        """The answer to an `inline` message, without awaiting (see the class)."""
        raise UseMailbox()

    def _answer_inline(self, msg: Any) -> Any:
        self._busy = True
        try:
            return self.answer_now(msg)
        except (Refused, UseMailbox):
            raise
        except Exception as exc:
            # Crash the actor's own task with it, as a letter that raised
            # would: its supervisor sees the error and decides. The mailbox
            # is empty (we were idle), so the crash letter goes in first;
            # its ask fails with the crash, and only then does our caller
            # hear of it (so what it sends next reaches the new instance).
            crash = Letter(_Crash(exc), Reply())
            self.system.mailbox_of(self.ref.name).put_nowait(crash)
            raise _CrashedInline(crash.reply) from exc
        finally:
            self._busy = False

    async def handle(self, letter: Letter) -> None:
        """Deal with one letter. Override to answer later (see Letter.reply):
        asks kept unanswered fail when this instance ends (crash or stop)."""
        try:
            result = await self.receive(letter.msg)
        except Refused as refusal:
            if letter.reply is None:
                log.warning("tell refused", extra={"actor": self.ref.name, "error": str(refusal)})
            letter.fail(refusal)
        else:
            letter.answer(result)

    async def on_stop(self) -> None:
        """Runs on an orderly stop (not after a crash, nor when on_start did
        not complete), bounded in time."""

    def stop(self) -> None:
        """End this actor normally once the current letter is handled.

        A flag, not a cancel, while a letter is in hand: cancelling would cut
        the handler short at its next await and fail its ask as a crash.
        """
        self._stopping = True
        if not self._busy and self._loop_scope is not None:
            self._loop_scope.cancel()  # idle in mailbox.get() (or in on_start)

    async def run(self, system: ActorSystem, mailbox: Mailbox,
                  *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.system = system
        self.ref = Ref(system, mailbox.name)
        self._loop_scope = trio.CancelScope()
        self._open: list[Letter] = []  # asks taken and not answered yet
        self._open_limit = 64
        name = mailbox.name
        started = False
        try:
            with collapsed():
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    await self.on_start()
                    started = True
                    task_status.started()
                    with self._loop_scope:
                        await self._take_letters(mailbox)
                    nursery.cancel_scope.cancel()  # helpers end with the actor
        except trio.Cancelled:
            # Stopped from outside (a supervisor, a nursery): orderly. on_stop
            # pairs with a completed on_start only, as OTP's terminate/init.
            self._fail_open(lambda: ActorStopped(f"actor {name!r} stopped before it answered"))
            if started:
                await self._run_stop_hook(name)
            raise
        except BaseException as exc:
            # A crash. The asks it took and those queued before it fail at
            # once, in the same step, so a caller that saw ActorCrashed and
            # sends again reaches the restarted instance.
            # The type only: the message may be internal and this text can
            # travel to other processes; the supervisor logs it all. (Taken
            # now: `exc` is unbound once this except block ends.)
            kind = type(exc).__name__

            def crashed() -> ActorCrashed:
                return ActorCrashed(f"actor {name!r} crashed ({kind})")
            self._fail_open(crashed)
            mailbox.fail_pending(crashed)
            raise
        self._fail_open(lambda: ActorStopped(f"actor {name!r} stopped before it answered"))
        await self._run_stop_hook(name)

    async def _take_letters(self, mailbox: Mailbox) -> None:
        mailbox.serving = self
        try:
            await self._serve_letters(mailbox)
        finally:
            mailbox.serving = None

    async def _serve_letters(self, mailbox: Mailbox) -> None:
        while not self._stopping:
            self._busy = False
            try:
                letter = await mailbox.get()
            except trio.ClosedResourceError:
                return  # the mailbox was closed under us: nobody can reach us
            self._busy = True
            if type(letter.msg) is _Crash:
                self._open.append(letter)  # fails with the crash, as the others
                raise letter.msg.error
            if letter.reply is None:
                await self.handle(letter)
                continue
            self._open.append(letter)
            await self.handle(letter)
            if letter.reply.done:
                self._open.pop()
            elif len(self._open) > self._open_limit:
                # handle() kept it to answer later; prune the answered ones now
                # and then (amortised: the limit grows with what stays open).
                self._open = [kept for kept in self._open if not kept.reply.done]  # type: ignore[union-attr]
                self._open_limit = max(64, 2 * len(self._open))

    def _fail_open(self, error_for: Callable[[], BaseException]) -> None:
        for letter in self._open:
            letter.fail(error_for())  # a no-op for those answered meanwhile
        self._open = []

    async def _run_stop_hook(self, name: str) -> None:
        with trio.move_on_after(STOP_HOOK_TIMEOUT) as scope:
            scope.shield = True
            try:
                await self.on_stop()
            except Exception:
                log.exception("on_stop failed", extra={"actor": name})


# ------------------------------------------------------------------- system

class ActorSystem:
    """The actors of one process, and the transport to other processes."""

    def __init__(self, address: str = "local", transport: Transport | None = None):
        self.transport = transport
        self.address = transport.address if transport is not None else address
        self._mailboxes: dict[str, Mailbox] = {}
        # cid -> (the link asked, the answer slot, whether the ask needs trust)
        self._pending: dict[int, tuple[str, Reply, bool]] = {}
        self._cids = itertools.count(1)

    # -- local registry
    def ref(self, name: str, address: str | None = None) -> Ref:
        return Ref(self, name, address)

    def open_mailbox(self, name: str, size: int = DEFAULT_MAILBOX) -> Mailbox:
        """The mailbox registered under `name`, created if needed (restarts reuse it)."""
        box = self._mailboxes.get(name)
        if box is None or box.closed:
            box = self._mailboxes[name] = Mailbox(name, size)
        return box

    def close_mailbox(self, name: str) -> None:
        box = self._mailboxes.pop(name, None)
        if box is not None:
            box.close()

    def mailbox_of(self, name: str) -> Mailbox:
        box = self._mailboxes.get(name)
        if box is None:
            raise ActorNotFound(f"no actor named {name!r} at {self.address}")
        return box

    async def spawn(self, nursery: trio.Nursery, actor: Actor, name: str,
                    mailbox_size: int = DEFAULT_MAILBOX) -> Ref:
        """Start an unsupervised actor in `nursery` (tests, leaf helpers).

        A crash fails its asks and then reaches `nursery`; nothing restarts it.
        """
        if name in self._mailboxes:
            raise ValueError(f"an actor named {name!r} is already running at {self.address}")
        box = self.open_mailbox(name, mailbox_size)

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await actor.run(self, box, task_status=task_status)
            finally:
                self.close_mailbox(name)

        with collapsed():
            await nursery.start(run)
        return self.ref(name)

    async def _ask_local(self, name: str, msg: Any, timeout: float) -> Any:
        try:
            return await self._answer_inline(name, msg, timeout)
        except UseMailbox:
            pass
        reply = Reply()
        # move_on_after, not fail_after: a TooSlowError the answer carries must
        # not pass for our own timeout.
        with trio.move_on_after(timeout):
            await self.mailbox_of(name).put(Letter(msg, reply))
            return await reply.wait()
        raise AskTimeout(f"ask {type(msg).__name__} to {name!r} at {self.address} "
                         f"got no reply within {timeout}s")

    # -- remote
    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the transport (if any) until cancelled."""
        if self.transport is None:
            task_status.started()
            await trio.sleep_forever()
        await self.transport.serve(self._deliver, self._link_down, task_status=task_status)

    def _require_transport(self, address: str) -> Transport:
        if self.transport is None:
            raise Unreachable(f"{address} is remote and this system has no transport")
        return self.transport

    async def _send_remote(self, address: str, env: Envelope) -> None:
        await self._require_transport(address).send(address, env)

    def _send_remote_nowait(self, address: str, env: Envelope) -> None:
        self._require_transport(address).send_nowait(address, env)

    async def _ask_remote(self, address: str, name: str, msg: Any, timeout: float) -> Any:
        cid = next(self._cids)
        reply = Reply()
        # Filed under the link's name: only that link may answer it.
        self._pending[cid] = (self._require_transport(address).link_address(address), reply,
                              codec.needs_trust(msg))
        try:
            sent = False
            with trio.move_on_after(timeout):
                await self._send_remote(address, Envelope(self.address + "/", name, "ask", msg, cid))
                sent = True
                return await reply.wait()
            raise AskTimeout(f"ask {type(msg).__name__} to {address}/{name} "
                             f"got no reply within {timeout}s"
                             + ("" if sent else self._no_link(address)))
        finally:
            self._pending.pop(cid, None)

    def _no_link(self, address: str) -> str:
        """Why an ask never left: the transport's last failed dial, if it knows one."""
        link_error = getattr(self.transport, "link_error", None)
        why = link_error(address) if link_error is not None else None
        return f": no link to {address} came up ({why})" if why else ": no link to it came up"

    def _send_back(self, sender: str, env: Envelope) -> None:
        address = sender.rsplit("/", 1)[0]
        try:
            self._send_remote_nowait(address, env)
        except Exception as exc:  # the asker will time out; say why here
            log.warning("reply not sent", extra={"to": address, "error": str(exc)})

    async def _deliver(self, env: Envelope, peer: str, trusted: bool = False) -> None:
        """Route one inbound envelope that the link to `peer` carried (called
        by the transport; `trusted`: over a connection that proved the
        shared secret)."""
        if env.kind in ("reply", "error"):
            pending = self._pending.get(env.cid)  # type: ignore[arg-type]
            if pending is None:
                return  # a late answer to an ask that timed out
            asked, reply, needs_trust = pending
            if asked != peer or (needs_trust and not trusted):
                # Correlation ids are a counter: anyone could guess one. Only
                # the process that was asked may answer, and a trusted ask
                # only over a trusted connection.
                log.warning("reply from a peer that was not asked, dropped",
                            extra={"peer": peer, "asked": asked, "cid": env.cid,
                                   "trusted": trusted})
                return
            if env.kind == "reply":
                reply.set(env.body)
            else:
                reply.fail(codec.error_from_body(env.body))
            return
        reply = (RemoteReply(self, env.sender, env.cid, codec.needs_trust(env.body))  # type: ignore[arg-type]
                 if env.kind == "ask" else None)
        if reply is not None and await self._answered_inline(env.to, env.body, reply):
            return
        letter = Letter(env.body, reply, peer)
        try:
            await self.mailbox_of(env.to).put(letter)
        except (ActorNotFound, ActorStopped, ActorCrashed) as exc:
            if reply is None:
                log.warning("tell dropped", extra={"to": env.to, "error": str(exc)})
            letter.fail(exc)

    async def _answer_inline(self, name: str, msg: Any, timeout: float) -> Any:
        """The answer of actor `name` to `msg` given now, in this task, if
        the actor is idle and lists the type (see Actor); UseMailbox if not."""
        box = self._mailboxes.get(name)
        actor = box.idle_actor() if box is not None else None
        if actor is None or not isinstance(msg, actor.inline):
            raise UseMailbox()
        await trio.lowlevel.checkpoint_if_cancelled()  # still a cancel point
        try:
            return actor._answer_inline(msg)
        except _CrashedInline as crashed:
            await crashed.wait(name, timeout)

    async def _answered_inline(self, name: str, msg: Any, reply: RemoteReply) -> bool:
        """Answer a remote ask in the link's task if the actor would answer
        it inline; False: it goes through the mailbox."""
        try:
            reply.set(await self._answer_inline(name, msg, DEFAULT_ASK_TIMEOUT))
        except UseMailbox:
            return False
        except ActorError as exc:  # refused, or crashed (or stopped meanwhile)
            reply.fail(exc)
        return True

    def _link_down(self, address: str) -> None:
        """Fail at once the asks waiting on a lost link (their outcome is unknown)."""
        for cid, (addr, reply, _) in list(self._pending.items()):
            if addr == address:
                reply.fail(Unreachable(f"link to {address} lost before the answer came"))

