"""A linearizability checker for recorded client histories (Wing & Gong, Lowe).

Pure Python: no trio, no I/O, no clock except `time.monotonic` for the optional
timeout. The simulation harness and the real-process tests record what every
client did as `Operation`s (who, which key, what was asked, when it was sent,
when the answer came back, what the answer was) and ask `check(model, history)`
whether some total order of the operations

  * respects real time: an operation that returned before another was called
    comes first, and
  * is a legal sequential execution of `model` (every operation's output is the
    one the sequential specification gives in that order).

Usage::

    history = [Operation(client_id=1, key="n1", input=("register", "fd00::1"),
                         call=0.0, ret=0.8, output=OK), ...]
    result = check(RegistryModel(), history, timeout=10.0)
    assert result.ok, result.explanation

Design (after Porcupine, anishathalye/porcupine, and Lowe 2017):

* P-compositionality. A history is linearizable iff each of its per-object
  sub-histories is (Herlihy & Wing's locality), so `model.partition` splits it,
  by key by default, and each partition is searched on its own, smallest
  first. The first failing partition is therefore the smallest one; it is
  reported with the longest linearizable prefix found and a short explanation.

* Search (Wing & Gong with Lowe's memoization). The operations of a partition
  become call and return entries in one doubly linked list sorted by time
  (calls before returns at equal times, so touching operations count as
  concurrent). Walking the list from the head, a call entry is a candidate to
  linearize next: if the model accepts it in the current state and the pair
  (set of linearized operations, new state) has not been seen before, the
  operation's call and return entries are lifted out of the list, the choice
  is pushed on an explicit stack and the walk restarts at the head. Reaching a
  return entry means that operation had to be linearized before anything
  further and could not be: pop the last choice, unlift it and try the next
  candidate after it. The set of linearized operations is a Python int used
  as a bitset; (bitset, state) pairs go into a set, hence states must be
  hashable. The loop is iterative, so long histories never hit the recursion
  limit. Memory is one (bitset, state) pair per configuration explored.

* Read-only pruning (optional, sound). If the model says an operation is
  read-only (`model.read_only(input, output)`: whenever it is legal it leaves
  the state unchanged, e.g. a get, a failed cas, a 404 delete), then once it
  was a legal candidate at some point of the search and the search still
  failed below it, the whole level fails: any linearization from there could
  have taken the read first. Backtracking then skips the remaining candidates
  of that level. With concurrent reads this removes most of the search (20 to
  100 times fewer steps on crowded single-key histories); the verdicts are the
  same (the tests compare with a brute-force search).

* Unknown outcomes. An operation with `ret=None` or `output=UNKNOWN` (a
  timeout, a crash, a lost connection) may have taken effect at any time after
  its call, or never. Its return is placed at +infinity (as Porcupine and
  Knossos do) and models must accept any step with output UNKNOWN, applying the
  effect the operation would have had. "Never took effect" needs no special
  case: the search succeeds as soon as every operation with a known outcome is
  linearized, which is the same as linearizing the unknown leftovers at the
  very end, where nothing observes them.

* Timeout. `check(..., timeout=s)` gives up after s seconds of wall time and
  answers `ok=None` (unknown: no violation found in what was searched). The
  search stops at the first failing partition, so a violation found before
  the deadline is always a definite `ok=False`.

Models implement the `Model` protocol (`init`, `step`, `partition`,
`describe_operation`; optionally `describe_state` and `read_only`); only
`init` and `step` are required, the rest have defaults (per-key partition,
repr). `KVModel` (put/get/cas registers) and `RegistryModel` (the node
registry, one key per node id) are ready-made; deriving from `BaseModel` gives
the defaults explicitly.
"""

from __future__ import annotations

import abc
import ipaddress
import math
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Protocol

__all__ = [
    "CONFLICT",
    "NOT_FOUND",
    "OK",
    "UNKNOWN",
    "BaseModel",
    "KVModel",
    "Model",
    "Operation",
    "RegistryModel",
    "Result",
    "check",
    "describe_history",
]


class _Unknown:
    """The output of an operation whose outcome the client never learned."""

    _instance: _Unknown | None = None

    def __new__(cls) -> _Unknown:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"

    def __reduce__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Any = _Unknown()

# Outputs used by RegistryModel (and accepted by KVModel for puts).
OK = "ok"
CONFLICT = "conflict"
NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class Operation:
    """One client call as recorded: invoked at `call`, answered at `ret`.

    `ret=None` or `output=UNKNOWN` marks a call whose effect is unknown (timed
    out, crashed, connection lost): it may take effect at any time after `call`,
    or never. Times are any comparable numbers on one clock (seconds of the
    simulated clock, `time.monotonic()` of the recording process, ...).
    """

    client_id: Hashable
    key: Hashable
    input: Any
    call: float
    ret: float | None
    output: Any = UNKNOWN

    def __post_init__(self) -> None:
        if self.call is None or (isinstance(self.call, float) and math.isnan(self.call)):
            raise ValueError(f"operation without a call time: {self!r}")
        if self.ret is not None and self.ret < self.call:
            raise ValueError(f"operation returns before it is called: {self!r}")

    @property
    def unknown(self) -> bool:
        """True when the outcome is unknown (no return or UNKNOWN output)."""
        return self.ret is None or self.output is UNKNOWN

    @property
    def return_time(self) -> float:
        """The return time the checker uses: +inf for an unknown outcome."""
        return math.inf if self.unknown else self.ret  # type: ignore[return-value]


class Model(Protocol):
    """A sequential specification.

    `step(state, input, output)` says whether `output` is a legal answer to
    `input` in `state` and returns the state after it. It is called with
    output UNKNOWN for operations of unknown outcome and must then accept and
    apply the effect the operation would have had. States must be hashable
    and compare by value (they are memoized) and must never be mutated.

    Optional: `describe_state(state) -> str`, and `read_only(input, output) ->
    bool`, True only if the operation never changes the state whenever it is
    legal (enables the read-only pruning; a wrong True gives wrong verdicts).
    """

    def init(self) -> Hashable: ...

    def step(self, state: Any, input: Any, output: Any) -> tuple[bool, Hashable]: ...

    def partition(self, history: Sequence[Operation]) -> list[list[Operation]]: ...

    def describe_operation(self, input: Any, output: Any) -> str: ...


class BaseModel(abc.ABC):
    """Defaults for models: partition by `Operation.key`, repr descriptions.
    A model says only what its state starts as and how an operation moves it."""

    @abc.abstractmethod
    def init(self) -> Hashable: ...

    @abc.abstractmethod
    def step(self, state: Any, input: Any, output: Any) -> tuple[bool, Hashable]: ...

    def partition(self, history: Sequence[Operation]) -> list[list[Operation]]:
        return partition_by_key(history)

    def describe_operation(self, input: Any, output: Any) -> str:
        return f"{input!r} -> {output!r}"

    def describe_state(self, state: Any) -> str:
        return repr(state)

    def read_only(self, input: Any, output: Any) -> bool:
        return False  # safe default: no pruning


def partition_by_key(history: Sequence[Operation]) -> list[list[Operation]]:
    """One sub-history per distinct `Operation.key`, in order of first appearance."""
    parts: dict[Hashable, list[Operation]] = {}
    for op in history:
        parts.setdefault(op.key, []).append(op)
    return list(parts.values())


# ---------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Result:
    """The verdict of `check`.

    ok: True (linearizable), False (not), None (unknown: timed out).
    bad_partition: the smallest failing sub-history (None when ok is not False).
    keys: the distinct keys of that sub-history.
    linearization: the longest linearizable prefix found for it, in order.
    explanation: a few human-readable lines; print it on failure.
    partitions / checked: how many partitions there were / were fully searched.
    """

    ok: bool | None
    bad_partition: tuple[Operation, ...] | None = None
    keys: tuple[Hashable, ...] = ()
    linearization: tuple[Operation, ...] = ()
    explanation: str = ""
    partitions: int = 0
    checked: int = 0
    elapsed: float = 0.0

    @property
    def timed_out(self) -> bool:
        return self.ok is None

    def __bool__(self) -> bool:  # `assert check(...)` fails unless definitely ok
        return self.ok is True

    def __str__(self) -> str:
        return self.explanation


# ---------------------------------------------------------------------- search


class _TimedOut(Exception):
    pass


@dataclass(slots=True)
class _Failure:
    prefix: list[int]  # op indices of the longest linearizable prefix found
    state: Any  # model state after that prefix
    blocker: int  # op whose return was reached without linearizing it


_HEAD = 0
_CHECK_EVERY = 1024  # search iterations between two looks at the clock


def _search(model: Any, ops: Sequence[Operation], deadline: float | None) -> _Failure | None:
    """Lowe's variant of Wing & Gong on one partition; None when linearizable."""
    n = len(ops)
    unknown = [op.unknown for op in ops]
    known_total = n - sum(unknown)
    if known_total == 0:
        return None
    inputs = [op.input for op in ops]
    outputs = [UNKNOWN if op.unknown else op.output for op in ops]
    is_read_only = getattr(model, "read_only", None)
    read_only = ([bool(is_read_only(inputs[i], outputs[i])) for i in range(n)]
                 if is_read_only is not None else [False] * n)

    # Entries: node 0 is the head sentinel, 1..2n the events, 2n+1 the tail.
    # Sorted by time; at equal times calls (kind 0) before returns (kind 1).
    events = sorted([(op.call, 0, i) for i, op in enumerate(ops)]
                    + [(op.return_time, 1, i) for i, op in enumerate(ops)])
    tail = 2 * n + 1
    node_op = [-1] * (tail + 1)
    is_call = [False] * (tail + 1)
    match = [0] * (tail + 1)  # call node -> its return node
    ret_node = [0] * n
    for pos, (_, kind, i) in enumerate(events, start=1):
        node_op[pos] = i
        if kind == 0:
            is_call[pos] = True
        else:
            ret_node[i] = pos
    for pos in range(1, tail):
        if is_call[pos]:
            match[pos] = ret_node[node_op[pos]]
    nxt = list(range(1, tail + 2))
    nxt[tail] = tail
    prv = [0] + list(range(0, tail))

    step = model.step
    state: Any = model.init()
    linearized = 0  # bitset of linearized op indices
    done = 0  # linearized ops with a known outcome
    seen: set[tuple[int, Any]] = set()
    stack: list[tuple[int, Any, bool]] = []  # (call node, state before it, read-only)
    best = _Failure(prefix=[], state=state, blocker=-1)
    iterations = 0
    entry = nxt[_HEAD]

    while done < known_total:
        iterations += 1
        if deadline is not None and iterations % _CHECK_EVERY == 0 and time.monotonic() > deadline:
            raise _TimedOut
        if is_call[entry]:
            i = node_op[entry]
            ok, new_state = step(state, inputs[i], outputs[i])
            if ok:
                new_linearized = linearized | (1 << i)
                memo = (new_linearized, new_state)
                if memo not in seen:
                    seen.add(memo)
                    stack.append((entry, state, read_only[i]))
                    state, linearized = new_state, new_linearized
                    if not unknown[i]:
                        done += 1
                    # lift the call entry and its return entry out of the list
                    nxt[prv[entry]] = nxt[entry]
                    prv[nxt[entry]] = prv[entry]
                    r = match[entry]
                    nxt[prv[r]] = nxt[r]
                    prv[nxt[r]] = prv[r]
                    entry = nxt[_HEAD]
                    continue
            entry = nxt[entry]
        else:
            # A return entry (the tail cannot be reached while a known op is
            # pending: its return entry comes first). Dead end: backtrack.
            if best.blocker < 0 or len(stack) > len(best.prefix):
                best = _Failure(prefix=[node_op[e] for e, _, _ in stack], state=state,
                                blocker=node_op[entry])
            pure = True
            while pure:
                if not stack:
                    return best
                entry, state, pure = stack.pop()  # pure: it was read-only
                i = node_op[entry]
                linearized &= ~(1 << i)
                if not unknown[i]:
                    done -= 1
                # unlift in the reverse order of the lift
                r = match[entry]
                nxt[prv[r]] = r
                prv[nxt[r]] = r
                nxt[prv[entry]] = entry
                prv[nxt[entry]] = entry
                # A read-only operation that was a legal candidate here and
                # still failed proves that this whole level fails: any
                # linearization from here could have taken it first (it
                # changes no state, and everything that must precede it is
                # already linearized). So keep backtracking.
            entry = nxt[entry]
    return None


# ---------------------------------------------------------------------- check


def check(model: Model, history: Iterable[Operation], timeout: float | None = None) -> Result:
    """Is `history` linearizable with respect to `model`?

    Partitions are searched smallest first; the first failing one (hence a
    smallest one) is reported. With `timeout` (seconds of wall time), an
    unfinished search answers `ok=None`.
    """
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    history = list(history)
    for op in history:
        if not isinstance(op, Operation):
            raise TypeError(f"not an Operation: {op!r}")
    partition = getattr(model, "partition", None) or partition_by_key
    parts = [list(p) for p in partition(history) if p]
    parts.sort(key=len)  # stable: ties keep the model's order
    checked = 0
    for part in parts:
        try:
            if deadline is not None and time.monotonic() > deadline:
                raise _TimedOut
            failure = _search(model, part, deadline)
        except _TimedOut:
            elapsed = time.monotonic() - started
            return Result(
                ok=None, partitions=len(parts), checked=checked, elapsed=elapsed,
                explanation=(f"unknown: timed out after {elapsed:.3f}s with {checked} of "
                             f"{len(parts)} partitions checked (no violation found so far), "
                             f"while searching a partition of {len(part)} operations on "
                             f"{_keys(part)!r}"))
        checked += 1
        if failure is not None:
            elapsed = time.monotonic() - started
            return Result(
                ok=False, bad_partition=tuple(part), keys=_keys(part),
                linearization=tuple(part[i] for i in failure.prefix),
                explanation=_explain(model, part, failure),
                partitions=len(parts), checked=checked, elapsed=elapsed)
    elapsed = time.monotonic() - started
    return Result(ok=True, partitions=len(parts), checked=checked, elapsed=elapsed,
                  explanation=(f"linearizable: {len(history)} operations in "
                               f"{len(parts)} partitions ({elapsed:.3f}s)"))


def _keys(part: Sequence[Operation]) -> tuple[Hashable, ...]:
    return tuple(dict.fromkeys(op.key for op in part))


def _fmt_time(t: float | None) -> str:
    if t is None or t == math.inf:
        return "inf"
    if isinstance(t, float):
        return f"{t:.6f}".rstrip("0").rstrip(".")
    return str(t)


def _describe_op(model: Any, op: Operation) -> str:
    describe: Callable[[Any, Any], str] = getattr(
        model, "describe_operation", lambda i, o: f"{i!r} -> {o!r}")
    output = UNKNOWN if op.unknown else op.output
    return (f"[{_fmt_time(op.call)}, {_fmt_time(None if op.unknown else op.ret)}] "
            f"client {op.client_id}: {describe(op.input, output)}")


def describe_history(model: Any, ops: Sequence[Operation]) -> str:
    """One line per operation, sorted by call time."""
    return "\n".join("  " + _describe_op(model, op)
                     for op in sorted(ops, key=lambda o: (o.call, o.return_time)))


def _explain(model: Any, part: Sequence[Operation], failure: _Failure,
             show: int = 12) -> str:
    describe_state: Callable[[Any], str] = getattr(model, "describe_state", repr)
    lines = [f"NOT linearizable: partition {_keys(part)!r} "
             f"({len(part)} operations) has no legal order."]
    prefix = failure.prefix
    if prefix:
        lines.append(f"Longest linearizable prefix ({len(prefix)} of {len(part)}):")
        if len(prefix) > show:
            lines.append(f"  ... {len(prefix) - show} earlier operations")
        lines.extend("  " + _describe_op(model, part[i]) for i in prefix[-show:])
    else:
        lines.append("Not even the first operation can be linearized.")
    lines.append(f"State after it: {describe_state(failure.state)}")
    if failure.blocker >= 0:
        blocker = part[failure.blocker]
        ok, _ = model.step(failure.state, blocker.input,
                           UNKNOWN if blocker.unknown else blocker.output)
        why = ("it is illegal in that state" if not ok
               else "it is legal there, but every order continuing from it fails later")
        lines.append(f"Next must come this operation (it returned before the rest "
                     f"could be ordered), and {why}:")
        lines.append("  " + _describe_op(model, blocker))
        done = set(prefix)
        rivals = [op for i, op in enumerate(part)
                  if i not in done and i != failure.blocker and op.call <= blocker.return_time]
        if rivals:
            lines.append(f"Other operations that could come next ({len(rivals)}):")
            lines.append(describe_history(model, rivals[:show]))
            if len(rivals) > show:
                lines.append(f"  ... and {len(rivals) - show} more")
    if len(part) <= 2 * show:
        lines.append("Whole partition:")
        lines.append(describe_history(model, part))
    return "\n".join(lines)


# ---------------------------------------------------------------------- KVModel


class KVModel(BaseModel):
    """Independent registers, one per key (partitioned by key).

    Inputs and outputs:
      ("put", v)       -> anything (OK, None, ...); the value becomes v
      ("get",)         -> the current value (`initial` when never written)
      ("cas", old, new) -> True (value was old, now new) / False (unchanged)
      ("delete",)      -> anything; the value becomes `initial`
    Values must be hashable.
    """

    def __init__(self, initial: Hashable = None):
        self.initial = initial

    def init(self) -> Hashable:
        return self.initial

    def step(self, state: Any, input: Any, output: Any) -> tuple[bool, Hashable]:
        op = input[0]
        if op == "get":
            return (output is UNKNOWN or output == state), state
        if op == "put":
            return True, input[1]
        if op == "cas":
            _, expected, new = input
            hit = state == expected
            if output is UNKNOWN:
                return True, new if hit else state
            return bool(output) == hit, new if hit else state
        if op == "delete":
            return True, self.initial
        raise ValueError(f"KVModel: unknown input {input!r}")

    def read_only(self, input: Any, output: Any) -> bool:
        return input[0] == "get" or (input[0] == "cas" and output is False)

    def describe_operation(self, input: Any, output: Any) -> str:
        op = input[0]
        args = ", ".join(repr(a) for a in input[1:])
        if op in ("put", "delete") and output is not UNKNOWN:
            return f"{op}({args})"
        return f"{op}({args}) -> {output!r}"


# ---------------------------------------------------------------------- RegistryModel


@lru_cache(maxsize=4096)
def _norm_ipv6(value: str) -> str:
    try:
        return str(ipaddress.IPv6Address(value))
    except (ipaddress.AddressValueError, ValueError):
        return value


def _ipv6_of(value: Any) -> str | None:
    """A get's output as an ipv6 string, or None for "not registered"."""
    if value is None or value == NOT_FOUND:
        return None
    if isinstance(value, Mapping):
        addr = value.get("ipv6", value.get("ipv6_addr"))
        if addr is None:
            raise ValueError(f"RegistryModel: a node without ipv6: {value!r}")
        return _norm_ipv6(str(addr))
    if isinstance(value, str):
        return _norm_ipv6(value)
    raise ValueError(f"RegistryModel: cannot read a get output {value!r}")


class RegistryModel(BaseModel):
    """The node registry as a key-value store: key = node id, value = its ipv6.

    Record each client call as `Operation(client, node_id, input, call, ret,
    output)` with these inputs and outputs:

      ("register", ipv6, ...)  -> OK | CONFLICT (409: the ipv6 is held by
                                  another node); extra fields are ignored
      ("delete",)              -> OK | NOT_FOUND
      ("get",)                 -> the node (its ipv6 string, or a mapping with
                                  "ipv6"/"ipv6_addr") | NOT_FOUND (or None)
      ("heartbeat",)           -> OK | NOT_FOUND (leases are not modeled)
      ("expire",)              -> OK (the node was registered and is removed)
                                  | NOT_FOUND (it was not registered)
                                  | None (removed if present, either way)

    Any of them may have `ret=None` / `output=UNKNOWN`. A server-initiated
    expiry whose time is only roughly known can be recorded as ("expire",)
    from a pseudo-client with `ret=None` and `call` = the earliest time it
    could have happened. Only linearizable reads (`consistency=stale` reads
    are not) belong in a history, which starts from an empty registry.

    Cross-key conflicts. A 409 on register(A, X) says something about another
    key: some node B != A holds X. Two modes:

    * exact (default): keys are not blindly split per node. Nodes are grouped
      into the connected components of "registered (or tried to register) the
      same ipv6" (union-find), and each component is one partition whose state
      is the set of (node, ipv6) pairs in it. Since B can only hold X by
      registering X, the holder of X is always in A's component, so conflicts
      are checked exactly while the partitions stay as small as the workload
      allows (usually one node each). A CONFLICT with no holder, or an OK
      while another node holds the ipv6, is a violation.
    * `exact_conflicts=False`: strictly one partition per node; a CONFLICT
      answer is read as "no change" and never checked, nor is an OK checked
      against other nodes' addresses. Cheaper and also valid for histories that
      do not start from an empty registry, but blind to wrong 409s.

    `partition` rewrites each operation's input to `(node_id, input)` so that
    `step` knows which node it concerns; `Result.bad_partition` shows these.
    """

    def __init__(self, exact_conflicts: bool = True):
        self.exact_conflicts = exact_conflicts

    # -- partitioning

    def partition(self, history: Sequence[Operation]) -> list[list[Operation]]:
        parent: dict[Hashable, Hashable] = {}

        def find(x: Hashable) -> Hashable:
            root = x
            while parent[root] != root:
                root = parent[root]
            while parent[x] != root:
                parent[x], x = root, parent[x]
            return root

        for op in history:
            parent.setdefault(op.key, op.key)
        if self.exact_conflicts:
            holder_of: dict[str, Hashable] = {}
            for op in history:
                if op.input and op.input[0] == "register":
                    ipv6 = _norm_ipv6(str(op.input[1]))
                    other = holder_of.setdefault(ipv6, op.key)
                    a, b = find(op.key), find(other)
                    if a != b:
                        parent[a] = b
        parts: dict[Hashable, list[Operation]] = {}
        for op in history:
            parts.setdefault(find(op.key), []).append(replace(op, input=(op.key, op.input)))
        return list(parts.values())

    # -- sequential specification

    def init(self) -> Hashable:
        return frozenset()

    def step(self, state: Any, input: Any, output: Any) -> tuple[bool, Hashable]:
        node, (op, *args) = input
        current = None
        other_holders: set[str] = set()
        for holder, addr in state:
            if holder == node:
                current = addr
            else:
                other_holders.add(addr)
        unknown = output is UNKNOWN

        if op == "register":
            ipv6 = _norm_ipv6(str(args[0]))
            taken = self.exact_conflicts and ipv6 in other_holders
            registered = state - {(node, current)} | {(node, ipv6)}
            if unknown:
                return True, state if taken else registered
            if output == OK:
                return not taken, registered
            if output == CONFLICT:
                return (taken or not self.exact_conflicts), state
            raise ValueError(f"RegistryModel: register answered {output!r}")

        if op in ("delete", "expire"):
            removed = state - {(node, current)} if current is not None else state
            if unknown or (op == "expire" and output is None):
                return True, removed
            if output == OK:
                return current is not None, removed
            if output == NOT_FOUND:
                return current is None, state
            raise ValueError(f"RegistryModel: {op} answered {output!r}")

        if op == "get":
            if unknown:
                return True, state
            return _ipv6_of(output) == current, state

        if op == "heartbeat":
            if unknown:
                return True, state
            if output == OK:
                return current is not None, state
            if output == NOT_FOUND:
                return current is None, state
            raise ValueError(f"RegistryModel: heartbeat answered {output!r}")

        raise ValueError(f"RegistryModel: unknown input {input!r}")

    def read_only(self, input: Any, output: Any) -> bool:
        _, (op, *_) = input
        return (op in ("get", "heartbeat")
                or (op == "register" and output == CONFLICT)
                or (op in ("delete", "expire") and output == NOT_FOUND))

    def describe_operation(self, input: Any, output: Any) -> str:
        node, (op, *args) = input
        shown = "" if not args else repr(args[0]) + (", ..." if len(args) > 1 else "")
        return f"{op}({node!r}{', ' + shown if shown else ''}) -> {output!r}"

    def describe_state(self, state: Any) -> str:
        if not state:
            return "{} (no node registered)"
        return "{" + ", ".join(f"{n!r}: {a!r}" for n, a in sorted(state, key=repr)) + "}"
