"""The wire codec: typed messages as frozen attrs classes with stable tags.

One cattrs converter encodes every message. A message class is declared with
`@message("some.stable.tag")`; the tag, never the Python class name, is what
travels, so classes can be renamed and moved without breaking peers.

Decoding is strict (unknown tag, missing or extra field, wrong type -> a
ProtocolError) because a link must never crash its receiver.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar, get_args, get_origin

import attrs
import cattrs
import orjson
from cattrs.cols import (
    homogenous_tuple_structure_factory,
    is_any_set,
    is_mapping,
    is_sequence,
    list_structure_factory,
    mapping_structure_factory,
)
from cattrs.v import format_exception as _cattrs_format

from .errors import ProtocolError, Refused, RemoteError

T = TypeVar("T")

TAG_KEY = "$t"
_JSON_TAG = "$json"  # a reply that is plain JSON rather than a message class

_tag_to_cls: dict[str, type] = {}
_cls_to_tag: dict[type, str] = {}
_refusals: dict[str, type[Refused]] = {}
_local: set[type] = set()  # message(..., local=True)
_trusted: set[type] = set()  # message(..., trusted=True)


def message(tag: str, *, local: bool = False,
            trusted: bool = False) -> Callable[[type[T]], type[T]]:
    """Class decorator: a frozen attrs message with the wire tag `tag`.

    `local`: the message only ever goes between actors of one process (a
    local API's request, say). It is refused both ways at the wire: sending
    it is a TypeError, and one that arrives anyway is a ProtocolError, so a
    remote process cannot make an actor do what only its own process may ask.

    `trusted`: the message crosses the wire, but a transport accepts it only
    on a trusted link (the websocket transport: one whose peer proved the
    shared secret, see actors.ws); on any other link it is a ProtocolError.
    For what only the members of a group of processes may tell each other."""

    def wrap(cls: type[T]) -> type[T]:
        if not attrs.has(cls):
            cls = attrs.frozen(cls)
        known = _tag_to_cls.get(tag)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"wire tag {tag!r} already used by {known!r}")
        _tag_to_cls[tag] = cls
        _cls_to_tag[cls] = tag
        if local:
            _local.add(cls)
        if trusted:
            _trusted.add(cls)
        return cls

    return wrap


def refusal(cls: type[Refused]) -> type[Refused]:
    """Register a Refused subclass so it is rebuilt as itself across the wire."""
    _refusals[cls.__name__] = cls
    return cls


def tag_of(cls: type) -> str:
    return _cls_to_tag[cls]


def needs_trust(msg: Any) -> bool:
    """Whether `msg` is declared `message(..., trusted=True)`."""
    return type(msg) in _trusted


def envelope_needs_trust(env: "Envelope") -> bool:
    """Whether `env` may only travel over a trusted connection."""
    return env.trusted or (env.kind in ("ask", "tell") and type(env.body) in _trusted)


def check_trust(envelopes: list["Envelope"], trusted: bool) -> None:
    """ProtocolError if a link that is not trusted carried an ask or tell
    whose message is declared trusted (a reply is checked by the system
    that asked: see ActorSystem._deliver)."""
    if trusted:
        return
    for env in envelopes:
        if envelope_needs_trust(env):
            raise ProtocolError(f"message {_cls_to_tag[type(env.body)]!r} is only accepted "
                                "on a trusted link (a peer that proved the shared secret)")


class WireTypeError(TypeError):
    """A JSON value of the wrong type for a field (its message is shown as is)."""


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string",
               list: "list", dict: "object", type(None): "null"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _require(value: Any, expected: type, name: str) -> None:
    if not isinstance(value, expected):
        raise WireTypeError(f"expected {name}, got {_json_type(value)}")


def _strict(expected: tuple[type, ...], name: str):
    def hook(value: Any, _type: Any) -> Any:
        # bool is an int in Python; on the wire it is not.
        if isinstance(value, bool) and bool not in expected:
            raise WireTypeError(f"expected {name}, got boolean")
        if not isinstance(value, expected):
            raise WireTypeError(f"expected {name}, got {_json_type(value)}")
        return float(value) if name == "number" else value

    return hook


def _is_tuple(t: Any) -> bool:
    return (get_origin(t) or t) is tuple


def _is_collection(t: Any) -> bool:
    return is_sequence(t) or is_any_set(t) or _is_tuple(t)


def _collection_factory(conv: cattrs.Converter):
    """Collections come from JSON lists only.

    cattrs iterates whatever it is given, so by default "ab" would become
    ["a", "b"] and {"a": 1} would become ["a"]; we check for a list first.
    """

    def factory(t: Any) -> Callable[[Any, Any], Any]:
        args = get_args(t)
        if _is_tuple(t) and args and args[-1] is not Ellipsis:  # tuple[int, str]
            hooks = [conv.get_structure_hook(a) for a in args]

            def fixed(value: Any, _type: Any) -> tuple:
                _require(value, list, "list")
                if len(value) != len(args):
                    raise WireTypeError(f"expected {len(args)} items, got {len(value)}")
                return tuple(h(v, a) for h, v, a in zip(hooks, value, args))

            return fixed
        if _is_tuple(t):
            inner = homogenous_tuple_structure_factory(t, conv)
        elif is_any_set(t):
            elem = args[0] if args else Any
            as_list = list_structure_factory(list[elem], conv)  # type: ignore[valid-type]
            build = frozenset if (get_origin(t) or t) is frozenset else set

            def inner(value: Any, _type: Any) -> Any:
                return build(as_list(value, list))
        else:
            inner = list_structure_factory(t, conv)

        def hook(value: Any, type_: Any) -> Any:
            _require(value, list, "list")
            return inner(value, type_)

        return hook

    return factory


def _mapping_factory(conv: cattrs.Converter):
    def factory(t: Any) -> Callable[[Any, Any], Any]:
        inner = mapping_structure_factory(t, conv)

        def hook(value: Any, type_: Any) -> Any:
            _require(value, dict, "object")  # not a list of pairs
            return inner(value, type_)

        return hook

    return factory


def make_converter() -> cattrs.Converter:
    """A converter that refuses what a lenient one would coerce ("5" -> 5)."""
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(str, _strict((str,), "string"))
    conv.register_structure_hook(int, _strict((int,), "integer"))
    conv.register_structure_hook(float, _strict((int, float), "number"))
    conv.register_structure_hook(bool, _strict((bool,), "boolean"))
    conv.register_structure_hook_factory(_is_collection, _collection_factory(conv))
    conv.register_structure_hook_factory(is_mapping, _mapping_factory(conv))
    return conv


converter = make_converter()


def to_wire(msg: Any) -> Any:
    """A message (or plain JSON value) as a JSON-able tagged value."""
    tag = _cls_to_tag.get(type(msg))
    if tag is None:
        if msg is None or isinstance(msg, (bool, int, float, str, list, dict)):
            return {TAG_KEY: _JSON_TAG, "v": msg}
        raise TypeError(f"{type(msg).__name__} is not a wire message (missing @message)")
    if type(msg) in _local:
        raise TypeError(f"{type(msg).__name__} is local to its process and does not cross the wire")
    data = converter.unstructure(msg)
    data[TAG_KEY] = tag
    return data


def from_wire(data: Any) -> Any:
    """The message a tagged value encodes; ProtocolError on anything else."""
    if not isinstance(data, dict):
        raise ProtocolError(f"message must be an object, got {type(data).__name__}")
    data = dict(data)
    tag = data.pop(TAG_KEY, None)
    if tag == _JSON_TAG:
        if set(data) != {"v"}:
            raise ProtocolError("plain JSON value must have exactly the field 'v'")
        return data["v"]
    cls = _tag_to_cls.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message tag {tag!r}")
    if cls in _local:
        raise ProtocolError(f"message {tag!r} is local to its process; not accepted from the network")
    try:
        return converter.structure(data, cls)
    except Exception as exc:  # cattrs raises several kinds; all mean bad input
        raise ProtocolError(f"bad {tag!r} message: {_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        return "; ".join(cattrs.transform_error(exc, format_exception=_format))
    return str(exc) or type(exc).__name__


def _format(exc: BaseException, type_: Any) -> str:
    # Our own type errors say what came instead ("expected integer, got
    # boolean"); cattrs' generic text only says what was expected.
    if isinstance(exc, WireTypeError):
        return str(exc)
    return _cattrs_format(exc, type_)


# ---------------------------------------------------------------- envelopes

KINDS = ("tell", "ask", "reply", "error")


@attrs.frozen
class Envelope:
    """What crosses a link: routing, correlation and one message body.

    sender: "address/name" of the sending actor or "address/" for a
            process-level sender; the receiver routes replies there.
    to:     the name of the target actor at the receiving address.
    cid:    correlation id of an ask and its reply/error; None for a tell.
    """

    sender: str
    to: str
    kind: str
    body: Any
    cid: int | None = None
    # Not on the wire: this envelope needs a trusted connection (a reply to
    # an ask whose message is trusted; asks and tells say so by their type).
    trusted: bool = False


def encode(env: Envelope) -> bytes:
    if env.kind == "error":
        body = env.body  # already a plain dict, see error_body()
    else:
        body = to_wire(env.body)
    return orjson.dumps(
        {"from": env.sender, "to": env.to, "kind": env.kind, "cid": env.cid, "body": body}
    )


def decode(frame: bytes | str) -> Envelope:
    """The Envelope in a frame; ProtocolError for anything malformed."""
    return envelope_from_json(loads(frame))


def loads(frame: bytes | str) -> Any:
    try:
        return orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from None


def envelope_from_json(data: Any) -> Envelope:
    """The Envelope in a parsed frame; ProtocolError for anything malformed."""
    if not isinstance(data, dict):
        raise ProtocolError("frame must be a JSON object")
    if set(data) != {"from", "to", "kind", "cid", "body"}:
        raise ProtocolError(f"envelope fields must be from,to,kind,cid,body; got {sorted(data)}")
    sender, to, kind, cid, body = data["from"], data["to"], data["kind"], data["cid"], data["body"]
    if not isinstance(sender, str) or not isinstance(to, str):
        raise ProtocolError("envelope 'from' and 'to' must be strings")
    if kind not in KINDS:
        raise ProtocolError(f"envelope kind must be one of {KINDS}, got {kind!r}")
    if cid is not None and (not isinstance(cid, int) or isinstance(cid, bool)):
        raise ProtocolError("envelope 'cid' must be an integer or null")
    if kind in ("ask", "reply", "error") and cid is None:
        raise ProtocolError(f"a {kind} needs a correlation id")
    if kind == "error":
        _check_error_body(body)
    else:
        body = from_wire(body)
    return Envelope(sender=sender, to=to, kind=kind, body=body, cid=cid)


def error_body(exc: BaseException) -> dict:
    """An exception boxed for the wire (errors never carry Python objects)."""
    if isinstance(exc, Refused):
        return {"type": type(exc).__name__, "code": exc.code, "message": exc.message,
                "details": exc.details}
    return {"type": type(exc).__name__, "code": "", "message": str(exc), "details": {}}


def _check_error_body(body: Any) -> None:
    if not (isinstance(body, dict) and set(body) == {"type", "code", "message", "details"}
            and all(isinstance(body[k], str) for k in ("type", "code", "message"))
            and isinstance(body["details"], dict)):
        raise ProtocolError("error body must be {type, code, message, details}")


def error_from_body(body: dict) -> Exception:
    """Rebuild a boxed error: a registered Refused as itself, kernel errors by name."""
    from . import errors

    kind, code, text, details = body["type"], body["code"], body["message"], body["details"]
    if kind in _refusals:
        err = _refusals[kind].__new__(_refusals[kind])
        Refused.__init__(err, code, text, details)
        return err
    if kind == "Refused" or code:
        # Only refusals carry a code: an unregistered subclass still comes
        # back as a Refused with its code, never as an opaque RemoteError.
        return Refused(code, text, details)
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, errors.ActorError) and cls not in (
        Refused, RemoteError):
        return cls(text)
    return RemoteError(kind, text)
