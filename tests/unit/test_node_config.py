import pytest

from trustnet.addressing import ula_for
from trustnet.config import ConfigError
from trustnet.node.config import load_node_config


def write(tmp_path, text):
    p = tmp_path / "node.yaml"
    p.write_text(text)
    return p


def test_example_config_loads():
    c = load_node_config("configs/node.yaml", {})
    assert c.node_id == "node-1" and c.node.listen_port == 9000
    assert c.ping_interval == 20.0 and c.http.port == 9100


def test_env_overrides_and_ula(tmp_path):
    c = load_node_config(write(tmp_path, "node:\n  id: a\n"),
                         {"NODE_NAME": "b", "NODE_ADVERTISE": "ula", "NODE_LISTEN_PORT": "9123",
                          "REGISTRY_WS": "ws://[fd10:1234:ffff::1]:8001", "NODE_HTTP_PORT": "9200"})
    assert c.node_id == "b" and c.node.listen_port == 9123 and c.http.port == 9200
    assert c.advertise_ipv6 == str(ula_for("b"))


def test_registry_ws_lists_the_replicas_in_order(tmp_path):
    from trustnet.node.context import NodeParams

    c = load_node_config(write(tmp_path, "node:\n  id: a\n"),
                         {"REGISTRY_WS": "ws://[fd10::1]:8001, ws://[FD10::2]:8001,ws://[fd10::3]:8001"})
    assert c.registry_addresses == ("ws://[fd10::1]:8001", "ws://[fd10::2]:8001",
                                    "ws://[fd10::3]:8001")
    params = NodeParams.from_config(c, port=9000)
    assert params.registry_address == "ws://[fd10::1]:8001"
    assert params.registry_fallbacks == ("ws://[fd10::2]:8001", "ws://[fd10::3]:8001")
    assert load_node_config(write(tmp_path, "node:\n  id: a\n"), {}).registry_addresses == (
        "ws://[::1]:8001",)


@pytest.mark.parametrize("text, env, expect", [
    ("node:\n  id: a\n  listen_port: abc\n", {}, "node.yaml: node.listen_port: must be an integer"),
    ("node:\n  listen_port: 9000\n", {}, "node.id: required"),
    ("node:\n  id: a\n  advertise: 10.0.0.1\n", {}, "node.advertise:"),
    ("node:\n  id: a\nregistry:\n  ws: http://x\n", {}, "registry.ws:"),
    ("node:\n  id: a\n", {"REGISTRY_WS": "ws://[::1]:8001,nope"},
     "environment variable REGISTRY_WS: registry.ws:"),
    ("node:\n  id: a\n", {"REGISTRY_WS": "ws://[::1]:8001,"}, "registry.ws:"),
    ("node:\n  id: a\n  colour: red\n", {}, "node.colour: unknown key"),
    ("node:\n  id: a\n", {"NODE_NAME": "bad name"}, "environment variable NODE_NAME: node.id:"),
    ("node:\n  id: a\n", {"NODE_HTTP_PORT": "x"}, "environment variable NODE_HTTP_PORT: http.port:"),
    ("node:\n  id: a\n", {"REGISTRY_CA_FILE": "/nonexistent/ca.pem", "REGISTRY_WS": "wss://[::1]:1"},
     "environment variable REGISTRY_CA_FILE: registry.ca_file: cannot load CA certificates"),
    ("node:\n  id: a\nregistry:\n  ws: 'wss://[::1]:1'\n  ca_file: node.yaml\n", {},
     "node.yaml: registry.ca_file: cannot load CA certificates"),
    ("node:\n  id: a\nregistry:\n  ca_file: node.yaml\n", {},
     "node.yaml: registry.ca_file: is only used for a wss:// registry"),
    ("node:\n  id: a\n", {"REGISTRY_WS": "wss://[::1]:1,ws://[::1]:2"},
     "environment variable REGISTRY_WS: registry.ws: mixes ws:// and wss://"),
    ("node:\n  id: a\n", {"PEERS_TLS": "maybe"}, "environment variable PEERS_TLS: peers.tls:"),
    ("node:\n  id: a\npeers:\n  tls: sometimes\n", {}, "node.yaml: peers.tls:"),
])
def test_bad_config_names_source_and_field(tmp_path, text, env, expect):
    with pytest.raises(ConfigError) as info:
        load_node_config(write(tmp_path, text), env)
    assert expect in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_exits_2_on_bad_config(tmp_path, capsys):
    from trustnet.cli import main
    with pytest.raises(SystemExit) as info:
        main(["node", "--config", str(write(tmp_path, "node:\n  id: a\n  listen_port: -1\n"))])
    assert info.value.code == 2
    assert "node.listen_port" in capsys.readouterr().err


def test_a_registry_with_tls_is_dialled_wss_and_checked_against_ca_file(tmp_path):
    from trustnet.tls import make_certificates, write_certificates

    files = write_certificates(make_certificates(["fd10::1"]), str(tmp_path / "certs"))
    c = load_node_config(write(tmp_path, "node:\n  id: a\n"),
                         {"REGISTRY_WS": "wss://[FD10::1]:8001", "REGISTRY_CA_FILE": files["ca.pem"]})
    assert c.registry_addresses == ("wss://[fd10::1]:8001",)
    assert c.registry.ca_file == files["ca.pem"]


@pytest.mark.parametrize("registry_ws, setting, expect", [
    ("ws://[::1]:8001", None, "ws"), ("wss://[::1]:8001", None, "wss"),  # as the registry
    ("ws://[::1]:8001", "true", "wss"), ("wss://[::1]:8001", "false", "ws"),
])
def test_peer_links_follow_the_registry_unless_peers_tls_says(tmp_path, registry_ws, setting,
                                                               expect):
    from trustnet.node.context import NodeParams

    env = {"REGISTRY_WS": registry_ws}
    if setting is not None:
        env["PEERS_TLS"] = setting
    c = load_node_config(write(tmp_path, "node:\n  id: a\n"), env)
    assert NodeParams.from_config(c, port=9000).peer_scheme == expect
