"""trustnet.config: defaults, the example file, every error class, env overrides."""

from pathlib import Path

import attrs
import pytest

from trustnet.config import (
    REGISTRY_ENV_VARS,
    ConfigError,
    Duration,
    NonEmptyStr,
    PositiveInt,
    RegistryConfig,
    load_config,
    load_registry_config,
    parse_duration,
    redacted,
)
from trustnet.config import FieldError, PeerConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs" / "registry.yaml"

SECRET = "0123456789abcdef0123"  # a valid REGISTRY_CLUSTER_SECRET


def write(tmp_path: Path, text: str, name: str = "registry.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ConfigError:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_registry_config(str(p), env or {})
    return info.value


# --------------------------------------------------------------------------- defaults


def test_no_file_gives_all_defaults():
    c = load_registry_config(None, {})
    assert c.listen.host == "::"
    assert c.listen.port == 8000
    assert c.database.path == "./data/registry.db"
    assert c.replication.enabled is False
    assert c.replication.peers == []
    assert c.replication.interval == 60.0
    assert (c.logging.level, c.logging.format) == ("info", "json")
    assert c.leases.heartbeat_interval == 30.0
    assert c.leases.ttl_multiplier == 3
    assert c.leases.ttl == 90.0
    assert c.leases.checkpoint_interval == 5.0
    assert c.http.max_body_bytes == 65536
    assert c.http.request_timeout == 10.0
    assert c.api_key is None


@pytest.mark.parametrize("text", ["", "# only a comment\n", "listen:\n"])
def test_empty_file_or_empty_section_gives_defaults(tmp_path, text):
    assert load_registry_config(str(write(tmp_path, text)), {}) == RegistryConfig()


def test_partial_section_keeps_other_defaults(tmp_path):
    c = load_registry_config(str(write(tmp_path, "listen: {port: 9001}\n")), {})
    assert c.listen.port == 9001
    assert c.listen.host == "::"
    assert c.database == RegistryConfig().database


def test_example_config_loads():
    c = load_registry_config(str(EXAMPLE), {})
    assert c.listen.host == "::"
    assert c.listen.port == 8000
    assert c.database.path == "./data/registry.db"
    assert c.leases.heartbeat_interval == 30.0
    assert c.leases.ttl_multiplier == 3
    assert c.leases.checkpoint_interval == 5.0


def test_full_file_values(tmp_path):
    p = write(tmp_path, """
listen: {host: "::1", port: 0}
database: {path: /var/lib/trustnet/r.db}
replication: {enabled: true, id: r1, peers: [{id: r1, address: "ws://[fd10:1234:ffff::1]:8001"}, "r2=ws://tnr.bucoto.com:8001"], interval: 5m, tick: 20ms, election_ticks: 20}
logging: {level: debug, format: text}
leases: {heartbeat_interval: 150ms, ttl_multiplier: 4, checkpoint_interval: 2}
http: {max_body_bytes: 1024, request_timeout: 1.5}
""")
    c = load_registry_config(p, {"REGISTRY_CLUSTER_SECRET": SECRET})  # a Path works as a str
    assert c.listen.host == "::1" and c.listen.port == 0
    assert c.database.path == "/var/lib/trustnet/r.db"
    assert c.replication.enabled is True
    assert [(p.id, p.address) for p in c.replication.peers] == [
        ("r1", "ws://[fd10:1234:ffff::1]:8001"), ("r2", "ws://tnr.bucoto.com:8001")]
    assert c.replication.interval == 300.0
    assert c.replication.tick == pytest.approx(0.02) and c.replication.election_ticks == 20
    assert (c.logging.level, c.logging.format) == ("debug", "text")
    assert c.leases.heartbeat_interval == pytest.approx(0.15)
    assert c.leases.ttl == pytest.approx(0.6)
    assert c.leases.checkpoint_interval == 2.0
    assert c.http.max_body_bytes == 1024
    assert c.http.request_timeout == 1.5


def test_ipv4_listen_host_is_accepted(tmp_path):
    assert load_registry_config(str(write(tmp_path, "listen: {host: 0.0.0.0}\n")), {}).listen.host == "0.0.0.0"


def test_log_level_is_case_insensitive_and_warning_is_warn(tmp_path):
    c = load_registry_config(str(write(tmp_path, "logging: {level: WARNING}\n")), {})
    assert c.logging.level == "warn"


# --------------------------------------------------------------------------- file errors


def test_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_registry_config(str(p), {})
    msg = str(info.value)
    assert msg.startswith(f"{p}: ")
    assert "no such file" in msg
    assert "\n" not in msg


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_registry_config(str(tmp_path), {})


def test_unreadable_path(tmp_path):
    # a path through a regular file: an OSError other than "not found" (works as root too)
    p = write(tmp_path, "listen: {}\n") / "registry.yaml"
    with pytest.raises(ConfigError) as info:
        load_registry_config(str(p), {})
    assert str(info.value).startswith(f"{p}: cannot read config file: ")
    assert info.value.field is None


def test_permission_denied(tmp_path, monkeypatch):
    p = write(tmp_path, "listen: {}\n")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(ConfigError) as info:
        load_registry_config(str(p), {})
    assert str(info.value) == f"{p}: cannot read config file: Permission denied"


def test_not_utf8(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"listen: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_registry_config(str(p), {})


def test_bad_yaml_names_the_line(tmp_path):
    e = error(tmp_path, "listen:\n  host: '::'\n  port: [8000\n")
    msg = str(e)
    assert msg.startswith(str(tmp_path / "registry.yaml") + ": line ")
    assert "invalid YAML" in msg
    assert e.field is None
    assert "\n" not in msg


def test_bad_yaml_line_number_is_right(tmp_path):
    e = error(tmp_path, "listen:\n  port: 1\n bad\n")
    assert "line 3," in str(e)


def test_duplicate_key_is_an_error(tmp_path):
    e = error(tmp_path, "listen:\n  port: 1\n  port: 2\n")
    assert "line 3" in str(e) and "duplicate key 'port'" in str(e)


@pytest.mark.parametrize("value", ["!!float x", "!!int 1x", "!!bool maybe", "!!timestamp soon"])
def test_a_tagged_value_yaml_cannot_convert_is_a_config_error(tmp_path, value):
    """PyYAML raises plain ValueError, KeyError, AttributeError for these
    (found by fuzzing the example configs): still one ConfigError line."""
    e = error(tmp_path, f"listen:\n  port: {value}\n")
    msg = str(e)
    assert msg.startswith(str(tmp_path / "registry.yaml") + ": invalid YAML: a tagged value")
    assert "\n" not in msg


@pytest.mark.parametrize("text, shown", [("- a\n- b\n", "a list"), ("just text\n", "'just text'"), ("42\n", "42")])
def test_top_level_not_a_mapping(tmp_path, text, shown):
    msg = str(error(tmp_path, text))
    assert "top level must be a mapping" in msg
    assert "listen" in msg  # names the sections it expects
    assert msg.endswith(shown)


def test_unknown_top_level_key_lists_allowed(tmp_path):
    e = error(tmp_path, "listen: {port: 8000}\nlisen: {}\n")
    assert e.field == "lisen"
    msg = str(e)
    assert msg.startswith(str(tmp_path / "registry.yaml") + ": lisen: unknown key")
    for section in ("listen", "database", "replication", "logging", "leases", "http"):
        assert section in msg
    assert "api_key" not in msg  # a secret is not an allowed file key


def test_unknown_nested_key(tmp_path):
    e = error(tmp_path, "listen: {prot: 8000}\n")
    assert e.field == "listen.prot"
    assert "unknown key" in e.problem and "host, port" in e.problem


def test_unknown_key_reported_before_other_problems(tmp_path):
    e = error(tmp_path, "listen: {port: abc, prot: 1}\n")
    assert e.field == "listen.prot"


def test_several_unknown_keys_named(tmp_path):
    e = error(tmp_path, "leases: {a: 1, b: 2}\n")
    assert e.field == "leases"
    assert "'a', 'b'" in e.problem


def test_api_key_in_yaml_is_rejected_with_reason(tmp_path):
    e = error(tmp_path, "api_key: abc123\n")
    assert e.field == "api_key"
    assert "REGISTRY_API_KEY" in e.problem and "secret" in e.problem
    assert "abc123" not in str(e)  # the secret is not echoed


def test_section_must_be_a_mapping(tmp_path):
    e = error(tmp_path, "listen: 8000\n")
    assert (e.field, e.problem) == ("listen", "must be a mapping, got 8000")


@pytest.mark.parametrize(
    "text, field, problem",
    [
        ("listen: {port: abc}", "listen.port", "must be an integer 0..65535, got 'abc'"),
        ("listen: {port: '8000'}", "listen.port", "must be an integer 0..65535, got '8000'"),
        ("listen: {port: true}", "listen.port", "must be an integer 0..65535, got true"),
        ("listen: {port: 8000.0}", "listen.port", "must be an integer 0..65535, got 8000.0"),
        ("listen: {port: 65536}", "listen.port", "must be an integer 0..65535, got 65536"),
        ("listen: {port: -1}", "listen.port", "must be an integer 0..65535, got -1"),
        ("listen: {host: localhost}", "listen.host", "must be an IP address such as '::' or '::1', got 'localhost'"),
        ("listen: {host: '[::1]'}", "listen.host", "must be an IP address such as '::' or '::1' (without brackets), got '[::1]'"),
        ("listen: {host: 1}", "listen.host", "must be an IP address such as '::' or '::1', got 1"),
        ("database: {path: ''}", "database.path", "must be a non-empty string, got ''"),
        ("database: {path: 12}", "database.path", "must be a non-empty string, got 12"),
        ("replication: {enabled: 'yes'}", "replication.enabled", "must be true or false, got 'yes'"),
        ("replication: {enabled: 1}", "replication.enabled", "must be true or false, got 1"),
        ("replication: {peers: tnr.bucoto.com}", "replication.peers", "must be a list, got 'tnr.bucoto.com'"),
        ("replication: {peers: ['a=ws://[::1]:1', 1]}", "replication.peers[1]",
         "must be a mapping {id, address} or 'id=ws://...', got 1"),
        ("replication: {interval: 0}", "replication.interval", "must be a duration > 0, got 0"),
        ("logging: {level: verbose}", "logging.level", "must be one of debug|info|warn|error|fatal, got 'verbose'"),
        ("logging: {format: xml}", "logging.format", "must be one of json|text, got 'xml'"),
        ("leases: {ttl_multiplier: 1}", "leases.ttl_multiplier", "must be an integer >= 2, got 1"),
        ("leases: {ttl_multiplier: 3.0}", "leases.ttl_multiplier", "must be an integer >= 2, got 3.0"),
        ("leases: {heartbeat_interval: -5s}", "leases.heartbeat_interval",
         "must be a duration such as '150ms', '30s', '5m', '1h' or a number of seconds, got '-5s'"),
        ("leases: {checkpoint_interval: null}", "leases.checkpoint_interval",
         "must be a duration such as '150ms', '30s', '5m', '1h' or a number of seconds, got null"),
        ("http: {max_body_bytes: 0}", "http.max_body_bytes", "must be an integer >= 1, got 0"),
        ("http: {request_timeout: 10 s}", "http.request_timeout",
         "must be a duration such as '150ms', '30s', '5m', '1h' or a number of seconds, got '10 s'"),
    ],
)
def test_wrong_type_or_range_names_file_and_field(tmp_path, text, field, problem):
    e = error(tmp_path, text + "\n")
    assert (e.field, e.problem) == (field, problem)
    assert str(e) == f"{tmp_path / 'registry.yaml'}: {field}: {problem}"


def test_message_of_the_brief():
    # the exact shape the operator sees: file, dotted field, problem
    e = ConfigError("configs/bad.yaml", "listen.port", "must be an integer 1..65535, got 'abc'")
    assert str(e) == "configs/bad.yaml: listen.port: must be an integer 1..65535, got 'abc'"


def test_long_bad_value_is_shortened(tmp_path):
    e = error(tmp_path, f"listen: {{host: '{'x' * 500}'}}\n")
    assert len(str(e)) < 250
    assert str(e).endswith("...")


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    "value, seconds",
    [("150ms", 0.15), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1m30s", 90.0), ("1h0m1s", 3601.0),
     ("2.5s", 2.5), (" 30S ", 30.0), ("45", 45.0), ("0.5", 0.5), (10, 10.0), (0.25, 0.25)],
)
def test_durations(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "s", "10x", "10 s", "1.2.3s", "-1s", "0s", "0", 0, -3, True, None, [1],
                                   float("inf"), float("nan"), "inf", "m5", "5m 3s"])
def test_bad_durations(value):
    with pytest.raises(FieldError):
        parse_duration(value)


# --------------------------------------------------------------------------- environment


def test_env_overrides_file(tmp_path):
    p = write(tmp_path, "listen: {host: '::1', port: 8000}\nlogging: {level: info}\n")
    env = {
        "REGISTRY_PORT": "9000",
        "REGISTRY_LISTEN": "::",
        "REGISTRY_DB_PATH": "/tmp/x.db",
        "REGISTRY_API_KEY": "s3cret-key",
        "LOG_LEVEL": "DEBUG",
        "LOG_FORMAT": "text",
        "REGISTRY_HEARTBEAT_INTERVAL": "150ms",
        "UNRELATED": "ignored",
    }
    c = load_registry_config(str(p), env)
    assert c.listen.port == 9000
    assert c.listen.host == "::"
    assert c.database.path == "/tmp/x.db"
    assert c.api_key == "s3cret-key"
    assert c.logging.level == "debug"
    assert c.logging.format == "text"
    assert c.leases.heartbeat_interval == pytest.approx(0.15)
    assert c.leases.ttl == pytest.approx(0.45)


def test_env_without_file():
    c = load_registry_config(None, {"REGISTRY_PORT": "0"})
    assert c.listen.port == 0
    assert c.listen.host == "::"


def test_env_absent_keeps_file_values(tmp_path):
    c = load_registry_config(str(write(tmp_path, "listen: {port: 9100}\n")), {})
    assert c.listen.port == 9100


def test_api_key_comes_only_from_env():
    assert load_registry_config(None, {}).api_key is None
    assert load_registry_config(None, {"REGISTRY_API_KEY": "k"}).api_key == "k"


@pytest.mark.parametrize(
    "var, value, field, problem",
    [
        ("REGISTRY_PORT", "abc", "listen.port", "must be an integer 0..65535, got 'abc'"),
        ("REGISTRY_PORT", "70000", "listen.port", "must be an integer 0..65535, got 70000"),
        ("REGISTRY_PORT", "", "listen.port", "must be an integer 0..65535, got ''"),
        ("REGISTRY_LISTEN", "example.com", "listen.host", "must be an IP address such as '::' or '::1', got 'example.com'"),
        ("REGISTRY_DB_PATH", " ", "database.path", "must be a non-empty string, got ' '"),
        ("LOG_LEVEL", "loud", "logging.level", "must be one of debug|info|warn|error|fatal, got 'loud'"),
        ("LOG_FORMAT", "xml", "logging.format", "must be one of json|text, got 'xml'"),
        ("REGISTRY_HEARTBEAT_INTERVAL", "0s", "leases.heartbeat_interval", "must be a duration > 0, got '0s'"),
        ("REGISTRY_API_KEY", "", "api_key", "must be a non-empty string (unset the variable to run without a key)"),
    ],
)
def test_env_errors_name_the_variable(var, value, field, problem):
    with pytest.raises(ConfigError) as info:
        load_registry_config(None, {var: value})
    e = info.value
    assert e.source == f"environment variable {var}"
    assert (e.field, e.problem) == (field, problem)
    assert str(e) == f"environment variable {var}: {field}: {problem}"


def test_env_api_key_with_whitespace_is_rejected_without_echo():
    with pytest.raises(ConfigError) as info:
        load_registry_config(None, {"REGISTRY_API_KEY": "abc def"})
    assert "abc def" not in str(info.value)
    assert "REGISTRY_API_KEY" in str(info.value)


def test_file_error_reported_before_env(tmp_path):
    p = write(tmp_path, "listen: {port: x}\n")
    with pytest.raises(ConfigError) as info:
        load_registry_config(str(p), {"REGISTRY_PORT": "9000"})
    assert info.value.source == str(p)


def test_env_table_is_the_documented_one():
    assert dict(REGISTRY_ENV_VARS) == {
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
    }


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    from trustnet.tls import make_certificates, write_certificates

    return write_certificates(make_certificates(["::1"]), str(tmp_path_factory.mktemp("tls")))


def tls_env(files: dict[str, str]) -> dict[str, str]:
    return {"REGISTRY_TLS_CERT": files["cert.pem"], "REGISTRY_TLS_KEY": files["key.pem"],
            "REGISTRY_TLS_CA": files["ca.pem"]}


def test_every_env_var_reaches_its_field(tls_files):
    samples = {
        "REGISTRY_PORT": ("9000", 9000),
        "REGISTRY_WS_PORT": ("9001", 9001),
        "REGISTRY_LISTEN": ("::1", "::1"),
        "REGISTRY_DB_PATH": ("/d.db", "/d.db"),
        "REGISTRY_API_KEY": ("key", "key"),
        "LOG_LEVEL": ("error", "error"),
        "LOG_FORMAT": ("text", "text"),
        "REGISTRY_HEARTBEAT_INTERVAL": ("2m", 120.0),
        "REGISTRY_REPLICATION": ("no", False),
        "REGISTRY_REPLICA_ID": ("r9", "r9"),
        "REGISTRY_PEERS": ("r1=ws://[::1]:1", [PeerConfig("r1", "ws://[::1]:1")]),
        "REGISTRY_REPLICA_JOIN": ("true", True),
        "REGISTRY_CLUSTER_SECRET": (SECRET, SECRET),
        "REGISTRY_TLS_CERT": (tls_files["cert.pem"], tls_files["cert.pem"]),
        "REGISTRY_TLS_KEY": (tls_files["key.pem"], tls_files["key.pem"]),
        "REGISTRY_TLS_CA": (tls_files["ca.pem"], tls_files["ca.pem"]),
    }
    assert samples.keys() == REGISTRY_ENV_VARS.keys()
    for var, (text, expected) in samples.items():
        # the TLS files go together (checked below)
        companions = tls_env(tls_files) if var.startswith("REGISTRY_TLS_") else {}
        c = load_registry_config(None, {**companions, var: text})
        obj = c
        for part in REGISTRY_ENV_VARS[var].split("."):
            obj = getattr(obj, part)
        assert obj == expected, var


def test_redacted_masks_the_api_key():
    c = load_registry_config(None, {"REGISTRY_API_KEY": "topsecret"})
    d = redacted(c)
    assert d["api_key"] == "***"
    assert "topsecret" not in repr(d)
    assert "topsecret" not in repr(c)
    assert d["listen"] == {"host": "::", "port": 8000, "ws_port": 8001}


# --------------------------------------------------------------------------- reuse


@attrs.frozen
class _Node:
    id: NonEmptyStr = NonEmptyStr("node-1")
    listen_port: PositiveInt = PositiveInt(9000)


@attrs.frozen
class _Peers:
    max_connections: PositiveInt = PositiveInt(10)
    peer_timeout: Duration = Duration(60.0)


@attrs.frozen
class _NodeConfig:
    node: _Node = attrs.field(factory=_Node)
    peers: _Peers = attrs.field(factory=_Peers)


def test_generic_loader_serves_another_config(tmp_path):
    p = write(tmp_path, "node: {id: n7}\npeers: {peer_timeout: 90s}\n", "node.yaml")
    env_vars = {"NODE_ID": "node.id", "PEER_TIMEOUT": "peers.peer_timeout"}
    c = load_config(_NodeConfig, str(p), {"PEER_TIMEOUT": "2m"}, env_vars)
    assert c.node.id == "n7"
    assert c.peers.peer_timeout == 120.0
    assert c.peers.max_connections == 10
    with pytest.raises(ConfigError) as info:
        load_config(_NodeConfig, str(p), {"NODE_ID": ""}, env_vars)
    assert str(info.value) == "environment variable NODE_ID: node.id: must be a non-empty string, got ''"
    bad = write(tmp_path, "peers: {max_connections: many}\n", "bad-node.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(_NodeConfig, str(bad), {}, env_vars)
    assert str(info.value) == f"{bad}: peers.max_connections: must be an integer >= 1, got 'many'"


# ---------------------------------------------------------------- replication (issue 4)

def test_replication_defaults():
    r = load_registry_config(None, {}).replication
    assert (r.enabled, r.id, r.peers) == (False, None, [])
    assert (r.tick, r.heartbeat_ticks, r.election_ticks, r.snapshot_threshold) == (0.01, 5, 15, 10_000)


def test_replication_env_and_own_address(tmp_path):
    from trustnet.config import replica_addresses

    p = write(tmp_path, 'listen: {host: "::1", ws_port: 8001}\nreplication: {enabled: true}\n')
    c = load_registry_config(p, {"REGISTRY_REPLICA_ID": "r1", "REGISTRY_CLUSTER_SECRET": SECRET,
                                 "REGISTRY_PEERS": "r2=ws://[::1]:8011, r3=ws://[::1]:8021"})
    assert replica_addresses(c) == {"r1": "ws://[::1]:8001", "r2": "ws://[::1]:8011",
                                    "r3": "ws://[::1]:8021"}


@pytest.mark.parametrize(("text", "env", "field"), [
    ("replication: {enabled: true}", {}, "replication.id"),
    ("replication: {enabled: true, id: 'a b'}", {}, "replication.id"),
    ("replication: {enabled: true, id: r1, peers: [{id: r1, address: 'http://x:1'}]}", {},
     "replication.peers[0].address"),
    ("replication: {enabled: true, id: r1, peers: [{id: r1}]}", {}, "replication.peers[0].address"),
    ("replication: {enabled: true, id: r1, peers: ['r1']}", {}, "replication.peers[0]"),
    ("replication: {enabled: true, id: r1, peers: ['r2=ws://[::1]:1', 'r2=ws://[::1]:2']}", {},
     "replication.peers[1].id"),
    ("replication: {enabled: true, id: r1, heartbeat_ticks: 15}", {}, "replication.heartbeat_ticks"),
    ("listen: {ws_port: 0}\nreplication: {enabled: true, id: r1}", {}, "listen.ws_port"),
    ("replication: {enabled: false}", {"REGISTRY_PEERS": "r1=ws://nope"}, "replication.peers[0].address"),
])
def test_replication_errors(tmp_path, text, env, field):
    with pytest.raises(ConfigError) as info:
        load_registry_config(write(tmp_path, text + "\n"), {"REGISTRY_CLUSTER_SECRET": SECRET, **env})
    assert info.value.field == field, str(info.value)


def test_the_cluster_secret_is_required_long_and_never_in_files(tmp_path):
    """Replicas authenticate each other with it (actors.linkauth)."""
    on = write(tmp_path, "listen: {ws_port: 8001}\nreplication: {enabled: true, id: r1}\n")
    with pytest.raises(ConfigError, match="REGISTRY_CLUSTER_SECRET") as info:
        load_registry_config(on, {})
    assert info.value.field == "replication.secret"
    with pytest.raises(ConfigError, match="at least 16 characters") as info:
        load_registry_config(on, {"REGISTRY_CLUSTER_SECRET": "short-secret"})
    assert "short-secret" not in str(info.value)
    c = load_registry_config(on, {"REGISTRY_CLUSTER_SECRET": SECRET})
    assert c.replication.secret == SECRET and SECRET not in repr(c)
    assert redacted(c)["replication"]["secret"] == "***"
    # A single registry needs none (it has no replicas to trust).
    assert load_registry_config(None, {}).replication.secret is None
    with pytest.raises(ConfigError, match="never read from config files"):
        load_registry_config(write(tmp_path, f"replication: {{secret: {SECRET}}}\n"), {})


# ---------------------------------------------------------------- fuzz

_ODD_YAML = [
    "[1, 2]", "{a: 1}", "null", "~", "!!binary aGk=", "1e400", ".inf", ".nan", "-0", "0x1F",
    '"8000"', "yes", "2026-11-27", "[[[[[]]]]]", "é", "-5", "99999999999999999999", "&a [*a]",
    "&b {c: *b}", "*undefined", "!!set {a, b}", "!!omap [a: 1]", "!!python/object:os.system x",
    "|\n    two\n    lines", "10ms", "-1s", "''", "!!float x", "!!int 1x", "!!bool x",
    "!!timestamp x", "!!map [1]", "!!seq {a: 1}", "<<: *x",
]
_KEYS = ["listen", "port", "host", "database", "path", "replication", "peers", "id", "address",
         "logging", "level", "node", "registry", "url", "1", "null", "<<", "? [a, b]"]


def _mutated_yaml(rng, text: str) -> str:
    lines = text.splitlines()
    for _ in range(rng.randrange(1, 4)):
        i = rng.randrange(len(lines))
        line, op = lines[i], rng.randrange(6)
        indent = " " * (len(line) - len(line.lstrip()))
        if op == 0 and ":" in line:
            lines[i] = line.partition(":")[0] + ": " + rng.choice(_ODD_YAML)
        elif op == 1:
            del lines[i]
        elif op == 2:
            lines.insert(i, indent + rng.choice(_KEYS) + ": " + rng.choice(_ODD_YAML))
        elif op == 3:
            lines.insert(i, line)  # a duplicate key
        elif op == 4:
            lines[i] = " " * rng.randrange(5) + line.lstrip()
        else:
            lines[i] = line.replace(":", rng.choice([" :", "::", ": &x", ": *x", ":\t"]), 1)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("example", ["registry.yaml", "cluster/r1.yaml", "node.yaml"])
def test_damaged_example_configs_give_one_line_config_errors(tmp_path, example):
    """Seeded random damage to the example configs (odd values and tags,
    aliases, lost and doubled keys, bad indentation): each either loads or
    is one ConfigError line naming the file, never another exception. (It
    found `!!float x` and its kind escaping PyYAML as plain exceptions.)"""
    import random

    from trustnet.node.config import load_node_config

    load = load_node_config if example == "node.yaml" else load_registry_config
    source = (REPO / "configs" / example).read_text()
    path = tmp_path / "damaged.yaml"
    loaded = 0
    for seed in range(400):
        path.write_text(_mutated_yaml(random.Random(seed), source))
        try:
            load(str(path), {"REGISTRY_CLUSTER_SECRET": SECRET})
            loaded += 1
        except ConfigError as exc:
            assert str(exc).startswith(str(path) + ": ") and "\n" not in str(exc), seed
    assert 0 < loaded < 400  # the damage is neither always harmless nor always fatal


# --------------------------------------------------------------------------- tls


def test_tls_is_off_by_default_and_on_with_a_certificate_and_its_key(tls_files):
    from trustnet.config import replica_addresses

    assert not load_registry_config(None, {}).tls.enabled
    c = load_registry_config(None, {**tls_env(tls_files), "REGISTRY_REPLICATION": "true",
                                    "REGISTRY_REPLICA_ID": "r1", "REGISTRY_CLUSTER_SECRET": SECRET,
                                    "REGISTRY_LISTEN": "::1"})
    assert c.tls.enabled and c.tls.ca_file == tls_files["ca.pem"]
    assert replica_addresses(c) == {"r1": "wss://[::1]:8001"}  # the ws port serves TLS


@pytest.mark.parametrize(("env", "var", "field", "problem"), [
    ({"REGISTRY_TLS_CERT": "cert.pem"}, "REGISTRY_TLS_CERT", "tls.key_file",
     "is required when tls.cert_file is set"),
    ({"REGISTRY_TLS_KEY": "key.pem"}, "REGISTRY_TLS_KEY", "tls.cert_file",
     "is required when tls.key_file is set"),
    ({"REGISTRY_TLS_CA": "ca.pem"}, "REGISTRY_TLS_CA", "tls.ca_file", "only used with"),
    ({"REGISTRY_TLS_CERT": "missing.pem", "REGISTRY_TLS_KEY": "key.pem"}, "REGISTRY_TLS_CERT",
     "tls.cert_file", "missing.pem': No such file"),
    ({"REGISTRY_TLS_CERT": "cert.pem", "REGISTRY_TLS_KEY": "missing.pem"}, "REGISTRY_TLS_KEY",
     "tls.key_file", "missing.pem': No such file"),
    ({"REGISTRY_TLS_CERT": "ca.pem", "REGISTRY_TLS_KEY": "key.pem"}, "REGISTRY_TLS_CERT",
     "tls.cert_file", "KEY_VALUES_MISMATCH"),
    ({"REGISTRY_TLS_CERT": "key.pem", "REGISTRY_TLS_KEY": "key.pem"}, "REGISTRY_TLS_CERT",
     "tls.cert_file", "cannot load the certificate"),
    ({"REGISTRY_TLS_CERT": "cert.pem", "REGISTRY_TLS_KEY": "encrypted.pem"}, "REGISTRY_TLS_KEY",
     "tls.key_file", "the private key is encrypted"),
    ({"REGISTRY_TLS_CERT": "cert.pem", "REGISTRY_TLS_KEY": "key.pem", "REGISTRY_TLS_CA": "key.pem"},
     "REGISTRY_TLS_CA", "tls.ca_file", "cannot load CA certificates"),
])
def test_tls_files_that_do_not_go_together_or_do_not_load_are_config_errors(
        tls_files, env, var, field, problem):
    """Each names the variable the value came from and the field; an
    encrypted key is refused at once (an unattended registry would otherwise
    stop at a pass-phrase prompt)."""
    from cryptography.hazmat.primitives import serialization

    folder = Path(tls_files["ca.pem"]).parent
    encrypted = folder / "encrypted.pem"
    if not encrypted.exists():
        key = serialization.load_pem_private_key(Path(tls_files["key.pem"]).read_bytes(), None)
        encrypted.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pass phrase")))
    with pytest.raises(ConfigError) as info:
        load_registry_config(None, {k: str(folder / v) for k, v in env.items()})
    assert info.value.source == f"environment variable {var}", str(info.value)
    assert info.value.field == field and problem in str(info.value), str(info.value)


def test_tls_errors_from_the_file_name_the_file(tmp_path):
    p = write(tmp_path, "tls: {cert_file: /nonexistent/cert.pem, key_file: /nonexistent/key.pem}\n")
    with pytest.raises(ConfigError) as info:
        load_registry_config(p, {})
    assert (info.value.source, info.value.field) == (str(p), "tls.cert_file"), str(info.value)


@pytest.mark.parametrize(("tls", "address"), [(True, "ws://[::1]:8011"), (False, "wss://[::1]:8011")])
def test_replica_addresses_must_match_whether_the_group_serves_tls(tls_files, tls, address):
    env = {"REGISTRY_REPLICATION": "true", "REGISTRY_REPLICA_ID": "r1",
           "REGISTRY_CLUSTER_SECRET": SECRET, "REGISTRY_PEERS": f"r2={address}",
           **(tls_env(tls_files) if tls else {})}
    with pytest.raises(ConfigError, match="wss://" if tls else "must be a ws://") as info:
        load_registry_config(None, env)
    assert info.value.field == "replication.peers[0].address"
