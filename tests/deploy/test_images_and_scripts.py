"""The sidecar Dockerfile (non-root, every package copied), the GCE startup script
(valid bash, shellcheck-clean, reads only the metadata the template sets) and the
shipped agent config (a valid config)."""

from __future__ import annotations

import re
import subprocess
import tomllib

import pytest

from agent.config import load_config
from tests.deploy.support import GCE, GKE, REPO, container, load_provision
from tests.tools import require_tool

DOCKERFILE = GKE / "Dockerfile"


def final_stage() -> list[str]:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    last_from = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    return lines[last_from:]


def test_the_image_runs_as_the_non_root_uid_the_pod_expects() -> None:
    (user,) = [line.split()[1] for line in final_stage() if line.startswith("USER ")]
    uid, gid = (int(part) for part in user.split(":"))
    assert uid != 0 and gid != 0
    ctx = container("gpu-node-agent")["securityContext"]
    assert (ctx["runAsUser"], ctx["runAsGroup"]) == (uid, gid)


def test_the_image_copies_every_package_the_distribution_installs() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", DOCKERFILE.read_text(), re.MULTILINE))
    assert copied == packages
    ignore = (GKE / "Dockerfile.dockerignore").read_text()
    assert all(f"!{package}/**" in ignore for package in packages)


def test_the_image_entrypoint_is_the_agent_and_bases_are_pinned() -> None:
    stage = final_stage()
    assert 'ENTRYPOINT ["gpu-node-agent"]' in stage
    assert container("gpu-node-agent")["args"] == ["run"]
    for base in re.findall(r"^FROM (\S+)", DOCKERFILE.read_text(), re.MULTILINE):
        assert ":" in base and not base.endswith(":latest"), base


def test_the_startup_script_is_valid_bash() -> None:
    result = subprocess.run([require_tool("bash", "bash"), "-n", str(GCE / "startup.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_startup_script_is_shellcheck_clean() -> None:
    result = subprocess.run(
        [require_tool("shellcheck", "shellcheck"), "--severity=style", str(GCE / "startup.sh")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout


def startup_metadata_keys() -> tuple[set[str], set[str]]:
    """Keys the startup script reads, and those of them it requires."""
    text = (GCE / "startup.sh").read_text()
    read = set(re.findall(r"\b(?:attr|attr_or|require_attr) ([a-z][a-z0-9-]+)", text))
    required = set(re.findall(r"\brequire_attr ([a-z][a-z0-9-]+)", text))
    return read, required


def template_metadata_keys(*extra_args: str) -> set[str]:
    provision = load_provision()
    settings, config_path, _ = provision.parse_args(
        ["--project", "p", "--zone", "us-east1-b", "--model", "m", "--service-account", "sa", *extra_args]
    )
    template = provision.instance_template(settings, provision.read_files(config_path))
    return {item["key"] for item in template["properties"]["metadata"]["items"]}


def test_the_template_sets_every_metadata_key_the_startup_script_reads() -> None:
    read, required = startup_metadata_keys()
    assert required <= template_metadata_keys()
    assert read <= template_metadata_keys("--vllm-args", "--max-model-len 8192")


@pytest.mark.parametrize("key", sorted(template_metadata_keys("--vllm-args", "x") - {"enable-oslogin"}))
def test_the_gcloud_commands_in_the_readme_set_the_same_metadata(key: str) -> None:
    assert key in (GCE / "README.md").read_text()


def test_the_startup_script_installs_the_units_under_their_own_names() -> None:
    text = (GCE / "startup.sh").read_text()
    for unit in ("gpu-node-agent.service", "vllm.service"):
        assert (GCE / unit).exists()
        assert f"/etc/systemd/system/{unit}" in text


def test_the_shipped_gce_config_is_valid_and_exports_per_instance() -> None:
    cfg = load_config(GCE / "config.toml", environ={})
    assert cfg.export.resource.value == "gce_instance"
    assert cfg.service.host == "0.0.0.0" and cfg.service.port == 8095  # Google's health checkers
    assert str(cfg.service.state_dir) == "/var/lib/gpu-node-agent"  # StateDirectory= of the unit
