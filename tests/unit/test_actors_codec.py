"""The wire codec: tagged messages, strict decoding, envelopes, boxed errors.

Every way a frame can be wrong must surface as a ProtocolError (a link closes
or the sender gets a clear error), never as another exception in the
receiver. A seeded mutation fuzzer checks that over thousands of frames.
"""

from __future__ import annotations

import random
from typing import Any

import attrs
import orjson
import pytest

from actors import errors
from actors.codec import (
    Envelope,
    decode,
    encode,
    error_body,
    error_from_body,
    from_wire,
    message,
    refusal,
    tag_of,
    to_wire,
)
from actors.errors import ProtocolError, Refused, RemoteError


@message("test.codec.inner")
class Inner:
    label: str
    weight: float = 1.0


@message("test.codec.everything")
class Everything:
    n: int
    s: str
    f: float
    flag: bool
    names: list[str]
    scores: dict[str, int]
    pair: tuple[int, ...]
    inner: Inner
    maybe: int | None = None
    inners: list[Inner] = attrs.field(factory=list)


@message("test.codec.ping")
class Ping:
    seq: int


SAMPLE = Everything(n=7, s="seven", f=0.5, flag=True, names=["a", "b"], scores={"x": 1},
                    pair=(1, 2), inner=Inner("in"), maybe=None,
                    inners=[Inner("i1", 2.0), Inner("i2")])


@refusal
class NoSuchThing(Refused):
    pass


class NotRegistered(Refused):
    pass


# ------------------------------------------------------------------ messages

def test_message_classes_are_frozen_attrs_with_stable_tags():
    assert attrs.has(Ping) and tag_of(Ping) == "test.codec.ping"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        Ping(1).seq = 2  # type: ignore[misc]


def test_a_tag_cannot_name_two_classes():
    with pytest.raises(ValueError, match="test.codec.ping"):
        @message("test.codec.ping")
        class Other:
            x: int


@pytest.mark.parametrize("msg", [
    SAMPLE, Ping(0), Ping(-2**63), Inner("x", 3), Everything(**{**attrs.asdict(SAMPLE, recurse=False),
                                                         "maybe": 5, "names": [], "pair": ()}),
    None, True, 0, 1.5, "text", [1, "two", None], {"k": [1, {"n": None}]},
])
def test_round_trip_of_messages_and_plain_json(msg: Any):
    wire = orjson.loads(orjson.dumps(to_wire(msg)))
    assert from_wire(wire) == msg
    assert type(from_wire(wire)) is type(msg)


@pytest.mark.parametrize("kind,cid", [("tell", None), ("ask", 1), ("reply", 2**40)])
def test_envelope_round_trip(kind: str, cid: int | None):
    env = Envelope("ws://[::1]:9001/alice", "bob", kind, SAMPLE, cid)
    assert decode(encode(env)) == env
    assert decode(encode(env).decode()) == env  # str frames too


def test_float_field_accepts_an_integer_as_a_float():
    wire = to_wire(Inner("x", 2.0))
    wire["weight"] = 2
    decoded = from_wire(wire)
    assert decoded.weight == 2.0 and isinstance(decoded.weight, float)


def test_encode_refuses_objects_that_are_not_messages():
    class Plain:
        pass
    with pytest.raises(TypeError, match="Plain"):
        to_wire(Plain())


@message("test.codec.local_only", local=True)
class LocalOnly:
    what: str


def test_a_local_message_does_not_cross_the_wire_either_way():
    """A local API's request: its own process may ask it, the network may not."""
    with pytest.raises(TypeError, match="local to its process"):
        to_wire(LocalOnly("x"))
    with pytest.raises(ProtocolError, match="local to its process"):
        from_wire({"$t": "test.codec.local_only", "what": "x"})
    frame = orjson.dumps({"from": "ws://[::1]:1/", "to": "a", "kind": "ask", "cid": 1,
                          "body": {"$t": "test.codec.local_only", "what": "x"}})
    with pytest.raises(ProtocolError, match="local to its process"):
        decode(frame)


# ----------------------------------------------------------- strict decoding

def wire_of(msg: Any, **changes: Any) -> dict:
    data = to_wire(msg)
    for key, value in changes.items():
        if value is DELETE:
            del data[key]
        else:
            data[key] = value
    return data


DELETE = object()


@pytest.mark.parametrize("data,fragment", [
    (wire_of(Ping(1), seq="1"), "integer"),            # str for int
    (wire_of(Ping(1), seq=True), "bool"),              # bool for int
    (wire_of(Ping(1), seq=1.0), "integer"),            # float for int
    (wire_of(Ping(1), seq=None), "integer"),           # null for int
    (wire_of(SAMPLE, s=5), "string"),                  # int for str
    (wire_of(SAMPLE, flag=1), "boolean"),              # int for bool
    (wire_of(SAMPLE, f="0.5"), "number"),              # str for float
    (wire_of(SAMPLE, f=False), "bool"),                # bool for float
    (wire_of(SAMPLE, names="ab"), "list"),             # a string is not a list of strings
    (wire_of(SAMPLE, names={"a": 1}), "list"),         # nor is an object
    (wire_of(SAMPLE, names=[1]), "string"),
    (wire_of(SAMPLE, scores=[["x", 1]]), "object"),    # pairs are not an object
    (wire_of(SAMPLE, scores={"x": "1"}), "integer"),
    (wire_of(SAMPLE, pair="12"), "list"),
    (wire_of(SAMPLE, pair={"1": 2}), "list"),
    (wire_of(SAMPLE, maybe="3"), ""),
    (wire_of(SAMPLE, inner="in"), ""),
    (wire_of(SAMPLE, inner={"label": "x", "weight": 1, "extra": 1}), "extra"),
    (wire_of(SAMPLE, inners=[{"label": 3}]), "string"),
    (wire_of(Ping(1), seq=DELETE), "seq"),             # missing field
    (wire_of(Ping(1), extra=1), "extra"),              # extra field
    ({"$t": "test.codec.nope", "seq": 1}, "unknown message tag"),
    ({"seq": 1}, "unknown message tag"),
    ({"$t": 5, "seq": 1}, "unknown message tag"),
    ({"$t": "$json"}, "'v'"),
    ({"$t": "$json", "v": 1, "w": 2}, "'v'"),
    ([1, 2], "object"),
    ("ping", "object"),
])
def test_from_wire_refuses_badly_typed_messages(data: Any, fragment: str):
    with pytest.raises(ProtocolError) as info:
        from_wire(data)
    assert fragment in str(info.value)


def frame(**fields: Any) -> bytes:
    base = {"from": "a/x", "to": "y", "kind": "ask", "cid": 1, "body": to_wire(Ping(1))}
    for key, value in fields.items():
        if value is DELETE:
            del base[key]
        else:
            base[key] = value
    return orjson.dumps(base)


@pytest.mark.parametrize("raw", [
    b"", b"not json", b"{", b"\xff\xfe", "\ud800", b"[1, 2]", b"null", b"42", b'"str"',
    b"[" * 5000,
    frame(cid=DELETE), frame(extra=1), frame(kind="shout"), frame(kind=None),
    frame(to=5), frame(**{"from": None}), frame(cid="1"), frame(cid=True), frame(cid=1.5),
    frame(cid=None), frame(kind="reply", cid=None),
    frame(body={"$t": "test.codec.ping", "seq": "1"}), frame(body=None),
    frame(kind="error", body={"type": "X"}),
    frame(kind="error", body={"type": 1, "code": "", "message": "", "details": {}}),
    frame(kind="error", body={"type": "X", "code": "", "message": "", "details": []}),
    frame(kind="error", body="boom"),
])
def test_decode_refuses_malformed_frames(raw: Any):
    with pytest.raises(ProtocolError):
        decode(raw)


def test_decode_refuses_input_that_is_not_bytes_or_text():
    for raw in (None, 42, ["x"], object()):
        with pytest.raises(ProtocolError):
            decode(raw)  # type: ignore[arg-type]


# --------------------------------------------------------------------- fuzz

def _random_json(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(9 if depth < 3 else 7)
    if choice == 7:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(3))]
    if choice == 8:
        return {rng.choice(["a", "$t", "v", "label", "seq", "type"]): _random_json(rng, depth + 1)
                for _ in range(rng.randrange(3))}
    return [
        None, True, False,
        rng.choice([0, 1, -1, 2**31, 2**63 - 1, -2**63, 2**64 - 1]),
        rng.choice([0.0, -1.5, 1e308, 3.14]),
        rng.choice(["", "x", "seq", "$t", "$json", "test.codec.ping", "ü\u0000", "ask"]),
        rng.choice(["test.codec.everything", "test.codec.inner", "reply", "error", "tell"]),
    ][choice]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every (container, key) location in a JSON tree."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            found.append((node, key))
            found.extend(_paths(value))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.append((node, i))
            found.extend(_paths(value))
    return found


def _mutate_tree(rng: random.Random, tree: Any) -> Any:
    locations = _paths(tree)
    container, key = rng.choice(locations)
    op = rng.randrange(6)
    if op == 0:
        container[key] = _random_json(rng)  # replace a value
    elif op == 1 and isinstance(container, dict):
        del container[key]  # drop a field
    elif op == 2 and isinstance(container, dict):
        container[rng.choice(["extra", "$t", "v", "cid", "weight"])] = _random_json(rng)
    elif op == 3:
        value = container[key]  # change a value's type, keeping its content
        container[key] = (str(value) if not isinstance(value, str)
                          else (int(value) if value.isdigit() else [value]))
    elif op == 4 and isinstance(container, list):
        container.append(_random_json(rng))
    else:
        value = container[key]  # wrap it
        container[key] = rng.choice([[value], {"v": value}])
    return tree


def _mutate_bytes(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(4)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif op == 1:
            data.insert(pos, rng.choice(b'{}[]",:0123456789truefalsnl\\ \xc3'))
        elif op == 2 and data:
            del data[min(pos, len(data) - 1)]
        else:
            data = data[:pos]
    return bytes(data)


def _covers(out: Any, sent: Any) -> bool:
    """`out` holds everything `sent` held, with the same JSON types (an
    integer may come back as a float; fields left out may come back with
    their defaults)."""
    if isinstance(sent, dict):
        return isinstance(out, dict) and all(k in out and _covers(out[k], v)
                                             for k, v in sent.items())
    if isinstance(sent, list):
        return (isinstance(out, list) and len(out) == len(sent)
                and all(_covers(o, s) for o, s in zip(out, sent)))
    same_type = type(out) is type(sent) or (type(out) is float and type(sent) is int)
    return same_type and out == sent


VALID_FRAMES = [
    encode(Envelope("ws://[::1]:1/a", "b", "tell", SAMPLE)),
    encode(Envelope("ws://[::1]:1/a", "b", "ask", Ping(3), 9)),
    encode(Envelope("ws://[::1]:1/", "", "reply", {"k": [1, 2]}, 9)),
    encode(Envelope("ws://[::1]:1/", "", "error", error_body(NoSuchThing("c", "m", {"x": 1})), 4)),
]


def test_fuzzed_frames_only_ever_raise_protocolError():
    rng = random.Random(20240601)
    decoded = refused = 0
    for i in range(6000):
        raw = rng.choice(VALID_FRAMES)
        if i % 3 == 0:
            raw = _mutate_bytes(rng, raw)
        else:
            tree = orjson.loads(raw)
            for _ in range(rng.randrange(1, 4)):
                tree = _mutate_tree(rng, tree)
            raw = orjson.dumps(tree)
        try:
            env = decode(raw)
        except ProtocolError:
            refused += 1
            continue
        except Exception as exc:  # pragma: no cover - the point of the test
            pytest.fail(f"mutation {i} raised {type(exc).__name__}: {exc}\nframe: {raw!r}")
        decoded += 1
        # What decodes is well-typed: it encodes again to the same envelope ...
        again = encode(env)
        assert decode(again) == env
        # ... and nothing was coerced on the way in ("5" -> 5, "ab" -> ["a", "b"]).
        sent, kept = orjson.loads(raw)["body"], orjson.loads(again)["body"]
        assert _covers(kept, sent), f"mutation {i} was coerced: {sent!r} -> {kept!r}"
    assert refused > 3000 and decoded > 100  # the fuzzer exercises both outcomes


# --------------------------------------------------------------- boxed errors

def _through_wire(exc: BaseException) -> Exception:
    env = decode(encode(Envelope("ws://[::1]:1/", "", "error", error_body(exc), 1)))
    return error_from_body(env.body)


def test_registered_refusal_comes_back_as_itself():
    back = _through_wire(NoSuchThing("not_found", "no node n1", {"id": "n1"}))
    assert type(back) is NoSuchThing
    assert (back.code, back.message, back.details) == ("not_found", "no node n1", {"id": "n1"})
    assert str(back) == "no node n1"


def test_plain_refused_comes_back_as_refused():
    back = _through_wire(Refused("busy", "try later"))
    assert type(back) is Refused and back.code == "busy" and back.message == "try later"


@pytest.mark.parametrize("cls", [errors.AskTimeout, errors.ActorCrashed, errors.ActorStopped,
                                 errors.ActorNotFound, errors.MailboxFull, errors.Unreachable,
                                 errors.SupervisorGaveUp, errors.ProtocolError])
def test_kernel_errors_come_back_by_name(cls: type):
    back = _through_wire(cls("what happened"))
    assert type(back) is cls and str(back) == "what happened"


def test_unregistered_refusal_keeps_its_code():
    # The receiver may not have imported the sender's Refused subclass; the
    # code is what it acts on, so it must survive.
    back = _through_wire(NotRegistered("name_taken", "bound to another key", {"n": 1}))
    assert type(back) is Refused
    assert (back.code, back.message, back.details) == ("name_taken", "bound to another key", {"n": 1})


@pytest.mark.parametrize("exc", [ValueError("bad value"), KeyError("k"),
                                 RemoteError("Inner", "nested")])
def test_other_errors_come_back_as_remoteError(exc: BaseException):
    back = _through_wire(exc)
    assert type(back) is RemoteError
    assert back.kind == type(exc).__name__
    assert type(exc).__name__ in str(back)


@pytest.mark.parametrize("kind", ["ActorError", "annotations", "Exception", "__builtins__"])
def test_error_names_that_are_not_kernel_errors_become_remoteError(kind: str):
    back = error_from_body({"type": kind, "code": "", "message": "m", "details": {}})
    assert isinstance(back, (RemoteError, errors.ActorError))
    assert not type(back) is Exception
