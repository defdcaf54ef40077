"""deploy/gce units: `systemd-analyze verify` finds nothing to say about them, and
the keys the drain depends on are set (ordering, notify, watchdog, stop timeout).

verify checks that ExecStart's binary exists and is executable; the real ones live
under /opt on the VM, so each unit is verified as a copy in a temporary directory
with its ExecStart pointed at a stub script there. Nothing else is changed.
"""

from __future__ import annotations

import configparser
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.deploy.support import GCE
from tests.tools import require_tool

UNITS = {"gpu-node-agent.service": "/opt/gpu-node-agent/venv/bin/gpu-node-agent", "vllm.service": "/opt/vllm/venv/bin/vllm"}


def stubbed_units(tmp_path: Path) -> list[Path]:
    stub = tmp_path / "stub"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copies = []
    for name, binary in UNITS.items():
        text = (GCE / name).read_text()
        assert f"ExecStart={binary} " in text, f"{name} runs {binary}"
        copy = tmp_path / name
        copy.write_text(text.replace(f"ExecStart={binary} ", f"ExecStart={stub} "))
        copies.append(copy)
    return copies


def verify(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    tool = require_tool("systemd-analyze", "systemd")
    return subprocess.run([tool, "verify", *map(str, paths)], capture_output=True, text=True, timeout=60)


def test_systemd_analyze_verify_has_nothing_to_say_about_the_units(tmp_path: Path) -> None:
    result = verify(stubbed_units(tmp_path))
    ours = [line for line in (result.stdout + result.stderr).splitlines() if any(n in line for n in UNITS) or "Unknown" in line]
    assert ours == [], "\n".join(ours)
    assert result.returncode == 0, result.stdout + result.stderr


def test_verify_does_report_a_misspelled_key(tmp_path: Path) -> None:
    # The check above is only worth something if verify speaks up on our files.
    units = stubbed_units(tmp_path)
    units[0].write_text(units[0].read_text().replace("WatchdogSec=", "WatchdogSecs="))
    result = verify(units)
    # systemd 252 says "Unknown key 'X'", newer releases "Unknown key name 'X'".
    assert re.search(r"Unknown key (name )?'WatchdogSecs'", result.stdout + result.stderr)


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string((GCE / name).read_text())
    return parser


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_the_agent_is_ordered_after_vllm_so_it_stops_and_drains_first() -> None:
    section = unit("gpu-node-agent.service")["Unit"]
    after = section["After"].split()
    assert "vllm.service" in after and "network-online.target" in after
    assert "network-online.target" in section["Wants"].split()
    assert section["PartOf"] == "vllm.service"


def test_the_agent_unit_notifies_is_watched_and_restarts_on_failure() -> None:
    service = unit("gpu-node-agent.service")["Service"]
    assert service["Type"] == "notify"
    assert seconds(service["WatchdogSec"]) >= 10  # the agent pings at least every WatchdogSec/2 (<= 1 s here)
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"


def test_the_stop_timeout_covers_the_configured_drain() -> None:
    config = tomllib.loads((GCE / "config.toml").read_text())["drain"]
    shutdown_budget_s = 10  # final report and export flush
    stop_s = seconds(unit("gpu-node-agent.service")["Service"]["TimeoutStopSec"])
    assert stop_s >= config["timeout_s"] + config["propagation_delay_s"] + shutdown_budget_s


def test_hardening_keeps_the_nvidia_devices_reachable() -> None:
    service = unit("gpu-node-agent.service")["Service"]
    assert service["PrivateDevices"] == "no"
    assert service["DevicePolicy"] == "closed"
    text = (GCE / "gpu-node-agent.service").read_text()
    assert "DeviceAllow=/dev/nvidiactl rw" in text and "DeviceAllow=char-nvidia-frontend rw" in text
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["User"] != "root"


@pytest.mark.parametrize("name", sorted(UNITS))
def test_units_install_into_multi_user(name: str) -> None:
    assert unit(name)["Install"]["WantedBy"] == "multi-user.target"


def test_the_agent_unit_raises_the_open_file_limit_above_systemds_1024() -> None:
    # A 1024 soft limit lets 1,000 idle client connections stop every probe.
    service = unit("gpu-node-agent.service")["Service"]
    assert int(service["LimitNOFILE"].split(":")[-1]) >= 65536


def test_vllm_finishes_in_flight_work_at_sigterm_within_its_stop_timeout() -> None:
    service = unit("vllm.service")["Service"]
    match = re.search(r"--shutdown-timeout (\d+)", service["ExecStart"])
    assert match, "vLLM aborts in-flight requests at SIGTERM without --shutdown-timeout"
    assert seconds(service["TimeoutStopSec"]) > int(match.group(1))
