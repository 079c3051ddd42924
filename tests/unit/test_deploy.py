"""deploy/ cannot be run here (no Docker engine); check what can be checked:
the compose file is well-formed and the registry it describes gets a valid
config from exactly the environment and files the image provides."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from trustnet.config import REGISTRY_ENV_VARS, load_registry_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile.alpine"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _registry_env() -> dict[str, str]:
    env = {}
    for item in _compose()["services"]["registry"]["environment"]:
        name, _, value = item.partition("=")
        if value:  # a bare name is passed through from the host when set
            env[name] = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
    return env


def test_compose_env_is_known_to_the_registry():
    for item in _compose()["services"]["registry"]["environment"]:
        assert item.partition("=")[0] in REGISTRY_ENV_VARS


def test_image_config_loads_with_compose_env():
    # The Dockerfile copies configs/ to /etc/trustnet and runs registry.yaml.
    assert "COPY configs /etc/trustnet" in DOCKERFILE.read_text()
    assert '"/etc/trustnet/registry.yaml"' in DOCKERFILE.read_text()
    config = load_registry_config(ROOT / "configs" / "registry.yaml", _registry_env())
    assert config.listen.host == "::"
    assert config.listen.port == 8000
    assert config.database.path == "/data/registry.db"


def test_registry_address_in_the_ula_network():
    compose = _compose()
    subnet = compose["networks"]["trustnet"]["ipam"]["config"][0]["subnet"]
    address = compose["services"]["registry"]["networks"]["trustnet"]["ipv6_address"]
    import ipaddress

    assert ipaddress.IPv6Address(address) in ipaddress.IPv6Network(subnet)
    assert subnet == "fd10:1234::/32"
    assert compose["services"]["registry"]["restart"] == "on-failure:3"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_accepts_the_file():
    out = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
