"""trustnet.cli and trustnet.version."""

import logging
import subprocess
import sys
import types
from pathlib import Path

import orjson
import pytest

import trustnet.version as version_mod
from trustnet import cli
from trustnet.addressing import ula_for
from trustnet.version import build_info, version

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "trustnet"


@pytest.fixture(autouse=True)
def restore_logging():
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    yield
    for h in list(root.handlers):
        if h not in saved[1]:
            root.removeHandler(h)
    root.setLevel(saved[0])
    logging.captureWarnings(False)


def run_main(argv: list[str]) -> int:
    try:
        cli.main(argv)
    except SystemExit as exc:
        return 0 if exc.code is None else exc.code
    return 0


def test_version_flag(capsys):
    assert run_main(["--version"]) == 0
    assert capsys.readouterr().out == f"trustnet {version()}\n"
    assert version() == "0.1.0"


def test_help_lists_subcommands(capsys):
    assert run_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "addr" in out and "registry" in out


def test_no_command_prints_usage_and_exits_2(capsys):
    assert run_main([]) == 2
    assert "usage: trustnet" in capsys.readouterr().err


def test_unknown_command_exits_2(capsys):
    assert run_main(["frobnicate"]) == 2


def test_addr(capsys):
    assert run_main(["addr", "node-1"]) == 0
    assert capsys.readouterr().out == f"{ula_for('node-1')}\n"


def test_addr_empty_id(capsys):
    assert run_main(["addr", ""]) == 2
    assert "non-empty" in capsys.readouterr().err


def test_registry_bad_config_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen:\n  port: abc\n")
    assert run_main(["registry", "--config", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"config error: {bad}: listen.port: must be an integer 0..65535, got 'abc'\n"


def test_node_config_with_an_unconvertible_tagged_value_exits_2(tmp_path, capsys):
    bad = tmp_path / "node.yaml"
    bad.write_text("node:\n  id: n1\n  listen_port: !!int nine\n")
    assert run_main(["node", "--config", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"config error: {bad}: invalid YAML: a tagged value")
    assert captured.err.count("\n") == 1


def test_registry_missing_config_exits_2(tmp_path, capsys):
    assert run_main(["registry", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith("config error: ")


def test_registry_bad_env_exits_2(monkeypatch, capsys):
    monkeypatch.setenv("REGISTRY_PORT", "eighty")
    assert run_main(["registry"]) == 2
    assert capsys.readouterr().err == (
        "config error: environment variable REGISTRY_PORT: listen.port: must be an integer 0..65535, got 'eighty'\n"
    )


@pytest.fixture
def fake_service(monkeypatch):
    """A stand-in trustnet.registry.service whose serve() records its config."""
    mod = types.ModuleType("trustnet.registry.service")
    mod.calls = []
    mod.result = 0

    async def serve(config):
        mod.calls.append(config)
        if isinstance(mod.result, BaseException):
            raise mod.result
        return mod.result

    mod.serve = serve
    monkeypatch.setitem(sys.modules, "trustnet.registry.service", mod)
    for var in ("REGISTRY_PORT", "LOG_LEVEL", "LOG_FORMAT", "REGISTRY_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    return mod


def test_registry_runs_service_with_config_and_exit_code(fake_service, tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("listen: {port: 0}\n")
    monkeypatch.setenv("REGISTRY_API_KEY", "k3y")
    fake_service.result = 3
    assert run_main(["registry", "--config", str(cfg)]) == 3
    (config,) = fake_service.calls
    assert config.listen.port == 0
    assert config.api_key == "k3y"
    out = capsys.readouterr().out
    docs = [orjson.loads(line) for line in out.splitlines()]
    loaded = [d for d in docs if d["message"] == "config loaded"]
    assert loaded and loaded[0]["service"] == "registry"
    assert loaded[0]["config"]["api_key"] == "***"
    assert "k3y" not in out


def test_registry_exit_0(fake_service, capsys):
    assert run_main(["registry"]) == 0
    assert len(fake_service.calls) == 1


def test_registry_crash_exits_1_with_fatal_log(fake_service, capsys):
    fake_service.result = RuntimeError("database is locked")
    assert run_main(["registry"]) == 1
    docs = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert docs[-1]["level"] == "fatal"
    assert docs[-1]["error"] == "RuntimeError: database is locked"


def test_registry_missing_service_module_exits_1(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trustnet.registry.service", None)  # import fails
    assert run_main(["registry"]) == 1
    docs = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert docs[-1]["level"] == "fatal"


def test_tls_cert_writes_a_ca_and_a_certificate_a_registry_loads(tmp_path, capsys):
    import ipaddress
    import ssl
    import stat

    from cryptography import x509

    from trustnet.config import load_registry_config

    out = tmp_path / "certs"
    assert run_main(["tls-cert", "--host", "::1", "--host", "registry.example", "--out", str(out)]) == 0
    assert "REGISTRY_TLS_CERT=" in capsys.readouterr().out
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    assert sorted(p.name for p in out.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]  # no CA key
    c = load_registry_config(None, {"REGISTRY_TLS_CERT": str(out / "cert.pem"),
                                    "REGISTRY_TLS_KEY": str(out / "key.pem")})
    assert c.tls.enabled
    cert = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]
    assert sans.get_values_for_type(x509.DNSName) == ["registry.example"]
    ca = ssl.create_default_context(cafile=str(out / "ca.pem"))  # the CA loads as a trust anchor
    assert ca.cert_store_stats()["x509_ca"] == 1
    # never over what is there, and usage errors exit 2
    assert run_main(["tls-cert", "--host", "::1", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    for bad in (["--days", "0"], ["--days", "99999999"], ["--host", ""], ["--host", "a b"],
                ["--host", "wss://[::1]:8001"], ["--host", "fe80::1%eth0"]):
        assert run_main(["tls-cert", "--host", "::1", *bad, "--out", str(tmp_path / "x")]) == 2
        assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_commands_table():
    assert {"addr", "registry"} <= set(cli.COMMANDS)
    for name, cmd in cli.COMMANDS.items():
        assert cmd.name == name and cmd.help


# --------------------------------------------------------------------------- console script


@pytest.mark.skipif(not SCRIPT.exists(), reason="console script not installed")
def test_console_script(tmp_path):
    out = subprocess.run([str(SCRIPT), "--version"], capture_output=True, text=True, check=False)
    assert (out.returncode, out.stdout) == (0, f"trustnet {version()}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- not a mapping\n")
    out = subprocess.run([str(SCRIPT), "registry", "--config", str(bad)], capture_output=True, text=True, check=False)
    assert out.returncode == 2
    assert out.stderr.startswith(f"config error: {bad}: top level must be a mapping")
    assert out.stderr.count("\n") == 1


# --------------------------------------------------------------------------- version


def test_build_info_from_env(monkeypatch):
    monkeypatch.setenv("TRUSTNET_BUILD_TIME", "2026-01-30T14:23:15Z")
    monkeypatch.setenv("TRUSTNET_COMMIT", "abc123def")
    assert build_info() == {"version": version(), "build_time": "2026-01-30T14:23:15Z", "commit": "abc123def"}


def test_build_info_without_env(monkeypatch):
    monkeypatch.delenv("TRUSTNET_BUILD_TIME", raising=False)
    monkeypatch.delenv("TRUSTNET_COMMIT", raising=False)
    info = build_info()
    assert set(info) == {"version", "build_time", "commit"}
    assert all(isinstance(v, str) and v for v in info.values())
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        if head.returncode == 0:
            assert info["commit"] == head.stdout.strip()


def test_git_commit_unknown_outside_a_checkout(tmp_path):
    assert version_mod._git_commit(tmp_path) == "unknown"


def test_git_commit_never_fails(tmp_path, monkeypatch):
    (tmp_path / ".git").mkdir()  # looks like a checkout, but git will refuse it

    def boom(*a, **k):
        raise FileNotFoundError("git")

    monkeypatch.setattr(version_mod.subprocess, "run", boom)
    assert version_mod._git_commit(tmp_path) == "unknown"


def test_version_when_not_installed(monkeypatch):
    def missing(name):
        raise version_mod.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(version_mod.importlib.metadata, "version", missing)
    assert version() == "0.0.0+unknown"


def test_tls_cert_leaves_nothing_half_written(tmp_path, capsys):
    """A name taken in the output directory (here a dangling link) stops it
    before anything is written, so a second try in a clean directory works."""
    out = tmp_path / "certs"
    out.mkdir()
    (out / "key.pem").symlink_to(tmp_path / "nowhere")
    assert run_main(["tls-cert", "--host", "::1", "--out", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["key.pem"]
    assert not (tmp_path / "nowhere").exists()
