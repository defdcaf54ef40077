"""Configuration: defaults < TOML < env; bad input names the field and value."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_match_the_spec() -> None:
    cfg = load_config(None, {})
    assert (cfg.service.host, cfg.service.port) == ("0.0.0.0", 8095)
    assert cfg.inference.base_url == "http://127.0.0.1:8000"
    assert (cfg.inference.ready_after, cfg.inference.lost_after) == (2, 3)
    assert cfg.export.interval_s == 60 and cfg.export.enabled
    assert cfg.preemption.notice_budget_s == 30
    assert (cfg.drain.timeout_s, cfg.drain.propagation_delay_s, cfg.drain.settle_s, cfg.drain.safety_margin_s) == (300, 5, 2, 5)
    assert (cfg.slo.ttft_ms, cfg.slo.tpot_ms) == (2000, 100)
    assert cfg.idle.after_s == 0


def test_env_overrides_toml_which_overrides_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, '[service]\nhost = "127.0.0.1"\nport = 7000\n[drain]\nsettle_s = 1\n')
    cfg = load_config(path, {"GPU_AGENT_SERVICE__PORT": "9000"})
    assert cfg.service.host == "127.0.0.1"  # from the file
    assert cfg.service.port == 9000  # env wins
    assert cfg.drain.settle_s == 1
    assert cfg.drain.timeout_s == 300  # default kept


@pytest.mark.parametrize(
    "toml, env, expected",
    [
        ("[service]\nport = 70000\n", {}, "service.port = 70000"),
        ("[service]\nbogus = 1\n", {}, "service.bogus = 1: unknown key"),
        ("[nosuch]\nx = 1\n", {}, "nosuch"),
        ("", {"GPU_AGENT_EXPORT__INTERVAL_S": "5"}, "export.interval_s = '5' (from GPU_AGENT_EXPORT__INTERVAL_S)"),
        ("", {"GPU_AGENT_FOO": "1"}, "GPU_AGENT_FOO='1': unknown setting"),
        ("", {"GPU_AGENT_SERVICE__NOPE": "x"}, "service.nope"),
        ("", {"GPU_AGENT_INFERENCE__BASE_URL": "localhost:8000"}, "inference.base_url = 'localhost:8000'"),
        ("[drain]\nsafety_margin_s = 40\n", {}, "must be below preemption.notice_budget_s"),
        ("[service\n", {}, "not valid TOML"),
    ],
)
def test_bad_config_names_field_and_value(tmp_path: Path, toml: str, env: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, toml), env)
    assert expected in str(err.value)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml", {})


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=30, env=env
    )


def test_check_config_prints_effective_config_as_json(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token")
    path = write(tmp_path, f'[service]\nport = 7001\nadmin_token_file = "{token}"\n')
    result = _cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["service"]["port"] == 7001
    assert effective["drain"]["timeout_s"] == 300
    assert "s3cret-token" not in result.stdout  # the secret itself is never printed


def test_bad_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, "[inference]\nready_after = 0\n")
    for command in ("check-config", "run"):
        result = _cli(command, "--config", str(path))
        assert result.returncode == 2
        assert "inference.ready_after = 0" in result.stderr


def test_unknown_env_variable_exits_2() -> None:
    import os

    env = {**os.environ, "GPU_AGENT_SERVCE__PORT": "1"}
    result = _cli("check-config", env=env)
    assert result.returncode == 2
    assert "GPU_AGENT_SERVCE__PORT" in result.stderr


def test_usage_error_exits_2() -> None:
    result = _cli("frobnicate")
    assert result.returncode == 2
