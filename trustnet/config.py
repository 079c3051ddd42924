"""Typed configuration: YAML files for setup, environment variables for runtime.

Architecture record, section 8: a service reads one YAML file, then applies
environment overrides; secrets (the API key) come only from the environment.
Invalid configuration is a :class:`ConfigError` whose ``str`` is one line that
names the source (file or environment variable) and the dotted field::

    configs/bad.yaml: listen.port: must be an integer 1..65535, got 'abc'
    environment variable REGISTRY_PORT: listen.port: must be an integer 1..65535, got 'x'

The CLI prints it and exits 2.

The machinery is generic: :func:`load_config` loads any tree of attrs classes
from a YAML file plus a table ``{ENV_VAR: "dotted.field"}``. Field types are
strict (``"8000"`` is not an int, ``true`` is not an int, ``1`` is not a
string); constrained values use the ``NewType`` s below, whose structure hooks
check type and range together. Add a config for another service by declaring
attrs classes with these types, an env table, and calling :func:`load_config`.
"""

import ipaddress
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NewType, TypeVar

import attrs
import cattrs
import yaml
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError
from cattrs.gen import make_dict_structure_fn

__all__ = [
    "ApiKey",
    "ConfigError",
    "DatabaseConfig",
    "Duration",
    "FieldError",
    "HttpConfig",
    "IPHost",
    "LeasesConfig",
    "ListenConfig",
    "ListenPort",
    "LogFormat",
    "LogLevel",
    "LoggingConfig",
    "NonEmptyStr",
    "PeerConfig",
    "Port",
    "PositiveInt",
    "REGISTRY_ENV_VARS",
    "TlsConfig",
    "TtlMultiplier",
    "RegistryConfig",
    "ReplicaId",
    "ReplicationConfig",
    "WsAddress",
    "check_replication",
    "check_tls",
    "replica_addresses",
    "converter",
    "env_value",
    "load_config",
    "load_registry_config",
    "make_converter",
    "parse_duration",
    "read_yaml",
    "redacted",
]

T = TypeVar("T")


# --------------------------------------------------------------------------- errors


class ConfigError(Exception):
    """Invalid configuration. ``str(err)`` is one line: ``source: field: problem``.

    ``source`` is the file path or ``environment variable NAME``; ``field`` is the
    dotted field (``listen.port``, ``replication.peers[1]``) or ``None`` for
    file-level problems (unreadable file, bad YAML, ...).
    """

    def __init__(self, source: str, field: str | None, problem: str) -> None:
        self.source = source
        self.field = field
        self.problem = problem
        super().__init__(source, field, problem)

    def __str__(self) -> str:
        parts = [self.source, self.field, self.problem]
        return ": ".join(p for p in parts if p).replace("\n", " ")


class FieldError(ValueError):
    """Raised by structure hooks; ``path`` is relative to the value being structured."""

    def __init__(self, problem: str, path: tuple[str, ...] = ()) -> None:
        self.problem = problem
        self.path = path
        super().__init__(problem)


def _show(value: Any) -> str:
    """A short rendering of a bad value for an error message, in YAML terms."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- value types

Duration = NewType("Duration", float)
"""Seconds (> 0). Accepts ``"150ms"``, ``"30s"``, ``"5m"``, ``"1h"``, ``"1m30s"`` or a number."""
Port = NewType("Port", int)
"""A TCP port 1..65535."""
ListenPort = NewType("ListenPort", int)
"""A TCP port to bind, 0..65535; 0 means any free port (tests)."""
PositiveInt = NewType("PositiveInt", int)
"""An integer >= 1."""
TtlMultiplier = NewType("TtlMultiplier", int)
"""An integer >= 2: a lease must survive at least one late heartbeat."""
IPHost = NewType("IPHost", str)
"""An IPv6 or IPv4 address to bind, e.g. ``"::"`` (all interfaces) or ``"::1"``."""
LogLevel = NewType("LogLevel", str)
"""debug | info | warn | error | fatal (normalised to lower case)."""
LogFormat = NewType("LogFormat", str)
"""json | text."""
NonEmptyStr = NewType("NonEmptyStr", str)
"""A string that is not empty or only whitespace."""
ApiKey = NewType("ApiKey", str)
"""A secret token: non-empty, no whitespace or control characters."""
ClusterSecret = NewType("ClusterSecret", str)
"""The replicas' shared secret: an ApiKey of at least 16 characters."""
ReplicaId = NewType("ReplicaId", str)
"""A replica id: 1..64 of letters, digits, '-', '_' and '.'."""
WsAddress = NewType("WsAddress", str)
"""A websocket address ``ws://[ipv6]:port`` or ``ws://host:port``."""

LOG_LEVELS = ("debug", "info", "warn", "error", "fatal")
_LOG_LEVEL_ALIASES = {"warning": "warn", "critical": "fatal"}
LOG_FORMATS = ("json", "text")

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h)")
_DURATION_HINT = "a duration such as '150ms', '30s', '5m', '1h' or a number of seconds"


def parse_duration(value: object) -> float:
    """Seconds as a float from ``"150ms"``, ``"30s"``, ``"5m"``, ``"1h"``, ``"1h30m"``,
    ``"2.5"`` or a number. Must be finite and > 0; raises :class:`FieldError`."""
    seconds: float
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise FieldError(f"must be {_DURATION_HINT}, got {_show(value)}")
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            pos, seconds = 0, 0.0
            for m in _DURATION_PART.finditer(text):
                if m.start() != pos:
                    break
                seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
                pos = m.end()
            if pos != len(text) or not text:
                raise FieldError(f"must be {_DURATION_HINT}, got {_show(value)}") from None
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise FieldError(f"must be a duration > 0, got {_show(value)}")
    return seconds


def _int_in(value: object, lo: int, hi: int | None) -> int:
    if type(value) is not int or value < lo or (hi is not None and value > hi):
        bounds = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise FieldError(f"must be an integer {bounds}, got {_show(value)}")
    return value


def _strict(kind: type, name: str) -> Callable[[object, Any], Any]:
    def hook(value: object, _t: Any) -> Any:
        # type(), not isinstance(): True is an int. An int is accepted as a float.
        ok = type(value) is kind or (kind is float and type(value) is int)
        if not ok:
            raise FieldError(f"must be {name}, got {_show(value)}")
        return kind(value)

    return hook


def _ip_host(value: object, _t: Any) -> str:
    if not isinstance(value, str):
        raise FieldError(f"must be an IP address such as '::' or '::1', got {_show(value)}")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        hint = " (without brackets)" if value.startswith("[") else ""
        raise FieldError(
            f"must be an IP address such as '::' or '::1'{hint}, got {_show(value)}"
        ) from None
    return value


def _one_of(choices: tuple[str, ...], aliases: Mapping[str, str] | None = None):
    def hook(value: object, _t: Any) -> str:
        if isinstance(value, str):
            v = value.strip().lower()
            v = (aliases or {}).get(v, v)
            if v in choices:
                return v
        raise FieldError(f"must be one of {'|'.join(choices)}, got {_show(value)}")

    return hook


def _non_empty_str(value: object, _t: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise FieldError(f"must be a non-empty string, got {_show(value)}")
    return value


_REPLICA_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_WS_ADDRESS = re.compile(r"wss?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})")


def replica_id(value: object, _t: Any = None) -> str:
    """A replica id (also the admin API's check of a new member's)."""
    if not isinstance(value, str) or not _REPLICA_ID.fullmatch(value):
        raise FieldError("must be a replica id (1..64 letters, digits, '-', '_', '.'), "
                         f"got {_show(value)}")
    return value


def ws_address(value: object, _t: Any = None) -> str:
    """A websocket address ws://[IPv6]:port or ws://host:port (wss:// over TLS)."""
    m = _WS_ADDRESS.fullmatch(value) if isinstance(value, str) else None
    if m is None or not 1 <= int(m.group(2)) <= 65535:
        raise FieldError(f"must be a websocket address such as 'ws://[::1]:8001', got {_show(value)}")
    if m.group(1).startswith("["):
        try:
            ipaddress.IPv6Address(m.group(1)[1:-1])
        except ValueError:
            raise FieldError(f"has a bad IPv6 address: {_show(value)}") from None
    return value


def _peer(value: object, _t: Any) -> Any:
    """A peer: {id, address}, or "id=ws://..." (the REGISTRY_PEERS form)."""
    if isinstance(value, str):
        ident, sep, address = value.partition("=")
        if not sep:
            raise FieldError(f"must be 'id=ws://[addr]:port', got {_show(value)}")
        value = {"id": ident.strip(), "address": address.strip()}
    if not isinstance(value, Mapping):
        raise FieldError(f"must be a mapping {{id, address}} or 'id=ws://...', got {_show(value)}")
    return _peer_inner(value, PeerConfig)


def _api_key(value: object, _t: Any) -> str:
    if not isinstance(value, str) or not value:
        raise FieldError("must be a non-empty string (unset the variable to run without a key)")
    if any(c.isspace() or not c.isprintable() for c in value):
        # never echo a secret back
        raise FieldError("must not contain whitespace or control characters")
    return value


CLUSTER_SECRET_MIN = 16


def _cluster_secret(value: object, t: Any) -> str:
    value = _api_key(value, t)
    if len(value) < CLUSTER_SECRET_MIN:
        raise FieldError(f"must be at least {CLUSTER_SECRET_MIN} characters "
                         "(e.g. `openssl rand -hex 24`)")
    return value


# --------------------------------------------------------------------------- converter


def _is_attrs(t: Any) -> bool:
    return isinstance(t, type) and attrs.has(t)


def _is_list(t: Any) -> bool:
    return typing.get_origin(t) is list


def _attrs_hook_factory(cls: type, conv: cattrs.Converter):
    inner = make_dict_structure_fn(
        cls, conv, _cattrs_forbid_extra_keys=True, _cattrs_detailed_validation=True
    )

    def structure(value: object, _t: Any) -> Any:
        if value is None:  # a section whose keys are all commented out: defaults
            value = {}
        if not isinstance(value, Mapping):
            raise FieldError(f"must be a mapping, got {_show(value)}")
        return inner(value, cls)

    return structure


def _list_hook_factory(t: Any, conv: cattrs.Converter):
    (item_type,) = typing.get_args(t) or (Any,)

    def structure(value: object, _t: Any) -> list[Any]:
        if not isinstance(value, list):
            raise FieldError(f"must be a list, got {_show(value)}")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(conv.structure(item, item_type))
            except Exception as exc:  # noqa: BLE001 - re-raised with its index
                path, problem = _first_problem(exc)
                raise FieldError(problem, (f"[{i}]", *path)) from exc
        return out

    return structure


def make_converter() -> cattrs.Converter:
    """A converter with strict scalar hooks and the config value types."""
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(int, _strict(int, "an integer"))
    conv.register_structure_hook(float, _strict(float, "a number"))
    conv.register_structure_hook(bool, _strict(bool, "true or false"))
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(Duration, lambda v, _t: parse_duration(v))
    conv.register_structure_hook(Port, lambda v, _t: _int_in(v, 1, 65535))
    conv.register_structure_hook(ListenPort, lambda v, _t: _int_in(v, 0, 65535))
    conv.register_structure_hook(PositiveInt, lambda v, _t: _int_in(v, 1, None))
    conv.register_structure_hook(TtlMultiplier, lambda v, _t: _int_in(v, 2, None))
    conv.register_structure_hook(IPHost, _ip_host)
    conv.register_structure_hook(LogLevel, _one_of(LOG_LEVELS, _LOG_LEVEL_ALIASES))
    conv.register_structure_hook(LogFormat, _one_of(LOG_FORMATS))
    conv.register_structure_hook(NonEmptyStr, _non_empty_str)
    conv.register_structure_hook(ApiKey, _api_key)
    conv.register_structure_hook(ClusterSecret, _cluster_secret)
    conv.register_structure_hook(ReplicaId, replica_id)
    conv.register_structure_hook(WsAddress, ws_address)
    conv.register_structure_hook_factory(_is_list, _list_hook_factory)
    conv.register_structure_hook_factory(_is_attrs, _attrs_hook_factory)
    return conv


converter = make_converter()
"""The shared converter; use it for every config tree."""


# --------------------------------------------------------------------------- error paths


def _allowed_keys(cls: type) -> list[str]:
    return [f.name for f in attrs.fields(cls) if not f.metadata.get("secret")]


def _leaves(exc: BaseException, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str]]:
    """Every leaf problem in a (nested) cattrs error, with its field path."""
    if isinstance(exc, ClassValidationError):
        with_notes, others = exc.group_exceptions()
        # unknown keys first: a typo'd key usually explains the other problems
        for e in others:
            if isinstance(e, ForbiddenExtraKeysError):
                yield from _leaves(e, path)
        for e, note in with_notes:
            yield from _leaves(e, (*path, note.name))
        for e in others:
            if not isinstance(e, ForbiddenExtraKeysError):
                yield from _leaves(e, path)
    elif isinstance(exc, IterableValidationError):
        with_notes, others = exc.group_exceptions()
        for e, note in with_notes:
            yield from _leaves(e, (*path, f"[{note.index}]"))
        for e in others:
            yield from _leaves(e, path)
    elif isinstance(exc, ForbiddenExtraKeysError):
        keys = sorted(map(str, exc.extra_fields))
        allowed = ", ".join(_allowed_keys(exc.cl))
        if len(keys) == 1:
            yield (*path, keys[0]), f"unknown key (allowed here: {allowed})"
        else:
            names = ", ".join(repr(k) for k in keys)
            yield path, f"unknown keys {names} (allowed here: {allowed})"
    elif isinstance(exc, FieldError):
        yield (*path, *exc.path), exc.problem
    elif isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            yield from _leaves(e, path)
    else:
        yield path, f"invalid value: {exc}"


def _first_problem(exc: BaseException) -> tuple[tuple[str, ...], str]:
    for leaf in _leaves(exc, ()):
        return leaf
    return (), str(exc)


def _dotted(path: tuple[str, ...]) -> str:
    out = ""
    for seg in path:
        out += seg if seg.startswith("[") or not out else "." + seg
    return out


# --------------------------------------------------------------------------- loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of keeping the last one."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
            except TypeError:
                continue  # unhashable key: SafeLoader reports it below
            if dup:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Parse a YAML file; every failure is a :class:`ConfigError` naming the file."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(source, None, "cannot read config file: no such file") from None
    except IsADirectoryError:
        raise ConfigError(source, None, "cannot read config file: is a directory") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, None, f"cannot read config file: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise ConfigError(source, None, f"cannot read config file: {exc.strerror or exc}") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = exc.problem or exc.context or "syntax error"
        raise ConfigError(source, None, f"{where}invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, None, f"invalid YAML: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        # A tagged scalar PyYAML cannot convert (`!!float x`, `!!bool x`,
        # `!!timestamp x`) escapes as a plain ValueError, KeyError,
        # AttributeError..., without a position.
        raise ConfigError(source, None, "invalid YAML: a tagged value it cannot convert "
                          f"({type(exc).__name__}: {exc})") from None


def _field(cls: type, dotted: str) -> attrs.Attribute:
    """The attrs field at a dotted path (``"listen.port"``)."""
    *parents, last = dotted.split(".")
    for name in parents:
        cls = attrs.fields_dict(cls)[name].type
    return attrs.fields_dict(cls)[last]


def _base_type(t: Any) -> Any:
    """Strip ``X | None`` and NewTypes down to a builtin type (Duration stays)."""
    args = typing.get_args(t)
    if typing.get_origin(t) in (typing.Union, types.UnionType) and type(None) in args:
        (t,) = [a for a in args if a is not type(None)]
    while t is not Duration and isinstance(t, NewType):
        t = t.__supertype__
    return t


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def env_value(text: str, t: Any) -> Any:
    """Turn an environment string into the raw value the field's hook expects.

    Unparseable text is passed through unchanged so that the hook's message
    (``must be an integer 1..65535, got 'abc'``) describes it.
    """
    base = _base_type(t)
    s = text.strip()
    if base is bool:
        low = s.lower()
        return True if low in _TRUE else False if low in _FALSE else text
    if base is int:
        return int(s) if re.fullmatch(r"[+-]?\d+", s) else text
    if base is float:
        try:
            return float(s)
        except ValueError:
            return text
    if _is_list(base):
        return [part.strip() for part in s.split(",") if part.strip()]
    return text


def _set(obj: T, path: list[str], value: Any) -> T:
    name, *rest = path
    if rest:
        value = _set(getattr(obj, name), rest, value)
    return attrs.evolve(obj, **{name: value})


def _reject_secrets(cls: type, raw: Mapping[Any, Any], path: tuple[str, ...],
                    env_vars: Mapping[str, str], source: str) -> None:
    for f in attrs.fields(cls):
        if f.name not in raw:
            continue
        dotted = _dotted((*path, f.name))
        if f.metadata.get("secret"):
            var = next((v for v, d in env_vars.items() if d == dotted), None)
            where = f"set {var} in the environment" if var else "set it in the environment"
            raise ConfigError(source, dotted, f"secrets are never read from config files; {where}")
        if _is_attrs(f.type) and isinstance(raw[f.name], Mapping):
            _reject_secrets(f.type, raw[f.name], (*path, f.name), env_vars, source)


def load_config(cls: type[T], path: str | os.PathLike[str] | None,
                env: Mapping[str, str], env_vars: Mapping[str, str]) -> T:
    """Load ``cls`` (an attrs class) from a YAML file, then apply env overrides.

    ``path=None`` means no file: every field takes its default. ``env_vars`` maps
    an environment variable to the dotted field it sets; the variables present in
    ``env`` are applied after the file, in table order, each validated like the
    file's value. Fields with ``metadata={"secret": True}`` are rejected in the
    file and may only come from the environment. Raises :class:`ConfigError`.
    """
    if path is None:
        raw: Any = {}
        source = "<defaults>"
    else:
        source = os.fspath(path)
        raw = read_yaml(source)
        if raw is None:  # empty file (or only comments)
            raw = {}
        if not isinstance(raw, Mapping):
            sections = ", ".join(_allowed_keys(cls))
            raise ConfigError(
                source, None, f"top level must be a mapping with sections {sections}; got {_show(raw)}"
            )
        _reject_secrets(cls, raw, (), env_vars, source)
    try:
        config = converter.structure(raw, cls)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a ConfigError
        field_path, problem = _first_problem(exc)
        raise ConfigError(source, _dotted(field_path) or None, problem) from None

    for var, dotted in env_vars.items():
        if var not in env:
            continue
        t = _field(cls, dotted).type
        try:
            value = converter.structure(env_value(env[var], t), t)
        except Exception as exc:  # noqa: BLE001
            sub, problem = _first_problem(exc)
            raise ConfigError(f"environment variable {var}", dotted + _dotted(sub), problem) from None
        config = _set(config, dotted.split("."), value)
    return config


def redacted(config: Any) -> dict[str, Any]:
    """The config as plain data for a "config loaded" log line; secrets masked."""

    def walk(obj: Any) -> Any:
        if not attrs.has(type(obj)):
            return obj
        out = {}
        for f in attrs.fields(type(obj)):
            v = getattr(obj, f.name)
            if f.metadata.get("secret"):
                out[f.name] = None if v is None else "***"
            else:
                out[f.name] = walk(v)
        return out

    return walk(config)


# --------------------------------------------------------------------------- registry


@attrs.frozen
class ListenConfig:
    host: IPHost = IPHost("::")
    port: ListenPort = ListenPort(8000)
    # nodes' actor links (signed heartbeats, link reports) arrive here as websockets
    ws_port: ListenPort = ListenPort(8001)


@attrs.frozen
class DatabaseConfig:
    path: NonEmptyStr = NonEmptyStr("./data/registry.db")


@attrs.frozen
class PeerConfig:
    """One founding replica: its stable id and its websocket address
    (``ws://[addr]:port``, the replica's listen.ws_port: Raft and node links)."""

    id: ReplicaId
    address: WsAddress


@attrs.frozen
class ReplicationConfig:
    """Raft replication of the registry (issue 4).

    ``peers`` lists the founding replicas; it may include this replica (same
    list on every replica, the usual way) or leave it out, in which case this
    replica's address is ``ws://[listen.host]:listen.ws_port``. ``id`` is this
    replica's stable id (never reused). ``join``: this replica is not a
    founder but is added to a running group (``POST /cluster/members``): it
    starts with an empty log and takes the group's members from the leader,
    instead of founding a group of ``peers``. ``interval`` is accepted for
    compatibility with older files and ignored. ``secret`` (environment
    only: ``REGISTRY_CLUSTER_SECRET``, the same on every replica) is how
    replicas know each other: only links that prove it may carry Raft
    messages and forwarded requests (actors.linkauth).
    """

    enabled: bool = False
    id: ReplicaId | None = None
    peers: list[PeerConfig] = attrs.field(factory=list)
    join: bool = False
    tick: Duration = Duration(0.010)
    heartbeat_ticks: PositiveInt = PositiveInt(5)
    election_ticks: PositiveInt = PositiveInt(15)
    snapshot_threshold: PositiveInt = PositiveInt(10_000)
    interval: Duration = Duration(60.0)  # deprecated, ignored
    secret: ClusterSecret | None = attrs.field(default=None, repr=False,
                                               metadata={"secret": True})


@attrs.frozen
class TlsConfig:
    """TLS for the HTTP API (https://) and the websocket port (wss://):
    ``cert_file`` and ``key_file`` (PEM; record section 10: a mounted file
    such as /certs/cert.pem) turn it on, both or neither. ``ca_file``: what
    the other replicas' certificates are checked against when this replica
    dials them (default: the system's trust store)."""

    cert_file: NonEmptyStr | None = None
    key_file: NonEmptyStr | None = None
    ca_file: NonEmptyStr | None = None

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


@attrs.frozen
class LoggingConfig:
    level: LogLevel = LogLevel("info")
    format: LogFormat = LogFormat("json")


@attrs.frozen
class LeasesConfig:
    """A node's lease lives ``heartbeat_interval * ttl_multiplier`` seconds after
    its last heartbeat; the leader checkpoints lease deadlines through the log
    every ``checkpoint_interval``."""

    heartbeat_interval: Duration = Duration(30.0)
    ttl_multiplier: TtlMultiplier = TtlMultiplier(3)
    checkpoint_interval: Duration = Duration(5.0)

    @property
    def ttl(self) -> float:
        """Lease time-to-live in seconds."""
        return self.heartbeat_interval * self.ttl_multiplier


@attrs.frozen
class HttpConfig:
    max_body_bytes: PositiveInt = PositiveInt(65536)
    request_timeout: Duration = Duration(10.0)


@attrs.frozen
class RegistryConfig:
    """Registry service configuration (``configs/registry.yaml``)."""

    listen: ListenConfig = attrs.field(factory=ListenConfig)
    database: DatabaseConfig = attrs.field(factory=DatabaseConfig)
    replication: ReplicationConfig = attrs.field(factory=ReplicationConfig)
    logging: LoggingConfig = attrs.field(factory=LoggingConfig)
    leases: LeasesConfig = attrs.field(factory=LeasesConfig)
    http: HttpConfig = attrs.field(factory=HttpConfig)
    tls: TlsConfig = attrs.field(factory=TlsConfig)
    api_key: ApiKey | None = attrs.field(default=None, repr=False, metadata={"secret": True})


REGISTRY_ENV_VARS: Mapping[str, str] = types.MappingProxyType({
    "REGISTRY_PORT": "listen.port",
    "REGISTRY_WS_PORT": "listen.ws_port",
    "REGISTRY_LISTEN": "listen.host",
    "REGISTRY_DB_PATH": "database.path",
    "REGISTRY_API_KEY": "api_key",
    "LOG_LEVEL": "logging.level",
    "LOG_FORMAT": "logging.format",
    "REGISTRY_HEARTBEAT_INTERVAL": "leases.heartbeat_interval",
    "REGISTRY_REPLICATION": "replication.enabled",
    "REGISTRY_REPLICA_ID": "replication.id",
    "REGISTRY_PEERS": "replication.peers",
    "REGISTRY_REPLICA_JOIN": "replication.join",
    "REGISTRY_CLUSTER_SECRET": "replication.secret",
    "REGISTRY_TLS_CERT": "tls.cert_file",
    "REGISTRY_TLS_KEY": "tls.key_file",
    "REGISTRY_TLS_CA": "tls.ca_file",
})
"""Environment variable -> dotted field of :class:`RegistryConfig`, applied after the file."""


def load_registry_config(path: str | os.PathLike[str] | None, env: Mapping[str, str]) -> RegistryConfig:
    """Load the registry config from ``path`` (``None``: defaults) and ``env``."""
    config = load_config(RegistryConfig, path, env, REGISTRY_ENV_VARS)
    source = os.fspath(path) if path is not None else "<defaults>"

    def source_of(field: str) -> str:
        """Where a field's value came from: its environment variable, else the file."""
        var = next((v for v, f in REGISTRY_ENV_VARS.items() if f == field and v in env), None)
        return f"environment variable {var}" if var is not None else source

    check_tls(config.tls, source_of)
    check_replication(config, source)
    return config


def check_tls(tls: TlsConfig, source_of: Callable[[str], str]) -> None:
    """Both or neither of cert_file and key_file; every file given can be
    read and loads (the key without a pass phrase). `source_of(field)`
    names where a field's value came from."""
    from trustnet.tls import EncryptedKey, client_context, server_context

    if (tls.cert_file is None) != (tls.key_file is None):
        given, missing = (("tls.cert_file", "tls.key_file") if tls.key_file is None
                          else ("tls.key_file", "tls.cert_file"))
        raise ConfigError(source_of(given), missing, f"is required when {given} is set "
                          "(REGISTRY_TLS_CERT and REGISTRY_TLS_KEY go together)")
    if tls.ca_file is not None and not tls.enabled:
        raise ConfigError(source_of("tls.ca_file"), "tls.ca_file", "is only used with "
                          "tls.cert_file and tls.key_file (it checks the other replicas' "
                          "certificates)")
    for field, path in (("tls.cert_file", tls.cert_file), ("tls.key_file", tls.key_file),
                        ("tls.ca_file", tls.ca_file)):
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(source_of(field), field,
                              f"cannot read {path!r}: {exc.strerror or exc}") from None
    if tls.enabled:
        try:
            server_context(tls.cert_file, tls.key_file)  # type: ignore[arg-type]
        except EncryptedKey as exc:
            raise ConfigError(source_of("tls.key_file"), "tls.key_file",
                              f"{tls.key_file!r}: {exc}") from None
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(source_of("tls.cert_file"), "tls.cert_file", (
                f"cannot load the certificate {tls.cert_file!r} with the key "
                f"{tls.key_file!r} (PEM, the key matching the certificate): {exc}")) from None
    if tls.ca_file is not None:
        try:
            client_context(tls.ca_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(source_of("tls.ca_file"), "tls.ca_file",
                              f"cannot load CA certificates from {tls.ca_file!r}: {exc}") from None


def check_replication(config: RegistryConfig, source: str) -> None:
    """Cross-field checks of ``replication`` (only when enabled)."""
    r = config.replication
    if not r.enabled:
        return
    if r.id is None:
        raise ConfigError(source, "replication.id",
                          "is required when replication is enabled (or set REGISTRY_REPLICA_ID)")
    if r.secret is None:
        raise ConfigError(source, "replication.secret",
                          "is required when replication is enabled: set REGISTRY_CLUSTER_SECRET, "
                          "the same on every replica (e.g. `openssl rand -hex 24`)")
    seen: set[str] = set()
    for i, peer in enumerate(r.peers):
        if peer.id in seen:
            raise ConfigError(source, f"replication.peers[{i}].id", f"duplicate replica id {peer.id!r}")
        seen.add(peer.id)
    if len(replica_addresses(config)) < 1:
        raise ConfigError(source, "replication.peers", "needs at least this replica")
    if r.heartbeat_ticks >= r.election_ticks:
        raise ConfigError(source, "replication.heartbeat_ticks",
                          "must be smaller than replication.election_ticks")
    if config.listen.ws_port == 0:
        raise ConfigError(source, "listen.ws_port",
                          "must be a fixed port when replication is enabled (peers dial it)")
    scheme = "wss" if config.tls.enabled else "ws"
    for i, peer in enumerate(r.peers):
        if not peer.address.lower().startswith(scheme + "://"):
            raise ConfigError(source, f"replication.peers[{i}].address",
                              f"must be a {scheme}:// address: the replicas' websocket ports "
                              + ("serve TLS (tls.cert_file is set)" if config.tls.enabled
                                 else "do not serve TLS (tls.cert_file is not set)")
                              + f", got {peer.address!r}")


def replica_addresses(config: RegistryConfig) -> dict[str, str]:
    """Founding replica id -> websocket address, this replica included."""
    r = config.replication
    out = {p.id: p.address for p in r.peers}
    if r.id is not None and r.id not in out:
        host = config.listen.host
        host = "::1" if host == "::" else "127.0.0.1" if host == "0.0.0.0" else host
        scheme = "wss" if config.tls.enabled else "ws"
        out[r.id] = f"{scheme}://[{host}]:{config.listen.ws_port}" if ":" in host \
            else f"{scheme}://{host}:{config.listen.ws_port}"
    return out


_peer_inner = make_dict_structure_fn(PeerConfig, converter, _cattrs_forbid_extra_keys=True,
                                     _cattrs_detailed_validation=True)
converter.register_structure_hook(PeerConfig, _peer)
