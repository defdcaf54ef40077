"""deploy/gce/provision.py: the dry run builds the expected compute_v1 request objects
(checked against the real message types in a subprocess, so this process never
loads google.cloud.compute_v1), and the daemon never imports it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest

from tests.deploy.support import GCE, REPO, load_provision

provision = load_provision()
ARGS = [
    "--project",
    "proj",
    "--zone",
    "us-central1-a",
    "--model",
    "org/model",
    "--service-account",
    "sa@proj.iam.gserviceaccount.com",
]


def dry_run(*extra: str) -> list[dict[str, Any]]:
    """The script's output, run as operators run it."""
    result = subprocess.run(
        [sys.executable, str(GCE / "provision.py"), *ARGS, "--dry-run", *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


def planned(capsys: pytest.CaptureFixture[str], *extra: str) -> list[dict[str, Any]]:
    """The same dry run in this process (fast): main() prints the JSON."""
    assert provision.main([*ARGS, "--dry-run", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def body(steps: list[dict[str, Any]], request_type: str, index: int = 0) -> dict[str, Any]:
    matching = [s["request"] for s in steps if s["request_type"] == request_type]
    (resource,) = [v for k, v in matching[index].items() if k.endswith("_resource")]
    return resource


def metadata(template: dict[str, Any]) -> dict[str, str]:
    return {item["key"]: item["value"] for item in template["properties"]["metadata"]["items"]}


def test_the_dry_run_prints_the_calls_in_dependency_order() -> None:
    steps = dry_run()
    assert [(s["client"], s["request_type"]) for s in steps] == [
        ("FirewallsClient", "InsertFirewallRequest"),
        ("HealthChecksClient", "InsertHealthCheckRequest"),
        ("HealthChecksClient", "InsertHealthCheckRequest"),
        ("InstanceTemplatesClient", "InsertInstanceTemplateRequest"),
        ("InstanceGroupManagersClient", "InsertInstanceGroupManagerRequest"),
        ("AutoscalersClient", "InsertAutoscalerRequest"),
    ]
    assert {s["request"]["project"] for s in steps} == {"proj"}


def test_autohealing_checks_healthz_and_the_load_balancer_check_readyz(capsys: pytest.CaptureFixture[str]) -> None:
    steps = planned(capsys)
    autoheal, ready = body(steps, "InsertHealthCheckRequest", 0), body(steps, "InsertHealthCheckRequest", 1)
    assert autoheal["http_health_check"] == {"port": 8095, "request_path": "/healthz"}
    assert ready["http_health_check"] == {"port": 8095, "request_path": "/readyz"}
    mig = body(steps, "InsertInstanceGroupManagerRequest")
    (policy,) = mig["auto_healing_policies"]
    assert policy["health_check"] == f"projects/proj/global/healthChecks/{autoheal['name']}"
    assert policy["initial_delay_sec"] >= 600  # boot + install; /healthz does not wait for the model


def test_the_firewall_lets_google_health_checkers_reach_both_ports(capsys: pytest.CaptureFixture[str]) -> None:
    rule = body(planned(capsys), "InsertFirewallRequest")
    assert rule["source_ranges"] == ["35.191.0.0/16", "130.211.0.0/22"]
    assert rule["allowed"] == [{"I_p_protocol": "tcp", "ports": ["8095", "8000"]}]
    template = body(planned(capsys), "InsertInstanceTemplateRequest")
    assert rule["target_tags"] == template["properties"]["tags"]["items"]


def test_the_template_ships_the_units_startup_script_and_agent_config(capsys: pytest.CaptureFixture[str]) -> None:
    template = body(planned(capsys), "InsertInstanceTemplateRequest")
    items = metadata(template)
    assert items["startup-script"] == (GCE / "startup.sh").read_text()
    assert items["gpu-node-agent-unit"] == (GCE / "gpu-node-agent.service").read_text()
    assert items["vllm-unit"] == (GCE / "vllm.service").read_text()
    assert items["gpu-node-agent-config"] == (GCE / "config.toml").read_text()
    assert items["vllm-model"] == "org/model"
    scheduling = template["properties"]["scheduling"]
    assert scheduling == {"provisioning_model": "STANDARD", "on_host_maintenance": "TERMINATE", "automatic_restart": True}


def test_a_spot_template_is_deleted_on_preemption_and_recreated_by_the_mig(capsys: pytest.CaptureFixture[str]) -> None:
    scheduling = body(planned(capsys, "--spot"), "InsertInstanceTemplateRequest")["properties"]["scheduling"]
    assert scheduling == {
        "provisioning_model": "SPOT",
        "on_host_maintenance": "TERMINATE",
        "automatic_restart": False,
        "instance_termination_action": "DELETE",
    }


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], {"metric": "custom.googleapis.com/node/demand", "utilization_target": 1.0, "utilization_target_type": "GAUGE"}),
        (
            ["--metric", "queue"],
            {"metric": "custom.googleapis.com/vllm/queue_length", "utilization_target": 4.0, "utilization_target_type": "GAUGE"},
        ),
        (
            ["--metric", "ttft", "--target", "1200"],
            {
                "metric": "custom.googleapis.com/vllm/ttft_ms",
                "utilization_target": 1200.0,
                "utilization_target_type": "GAUGE",
                "filter": 'metric.type = "custom.googleapis.com/vllm/ttft_ms" AND metric.labels.quantile = "p95"',
            },
        ),
        (
            ["--metric", "gpu"],
            {"metric": "custom.googleapis.com/gpu/usage_percent", "utilization_target": 80.0, "utilization_target_type": "GAUGE"},
        ),
    ],
    ids=["demand", "queue", "ttft-p95", "gpu"],
)
def test_the_autoscaler_scales_the_mig_on_the_chosen_custom_metric(
    argv: list[str], expected: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    policy = body(planned(capsys, *argv), "InsertAutoscalerRequest")["autoscaling_policy"]
    assert policy["custom_metric_utilizations"] == [expected]
    assert (policy["min_num_replicas"], policy["max_num_replicas"]) == (1, 20)
    assert policy["cool_down_period_sec"] >= 600  # covers the model load


def test_the_autoscaler_targets_the_mig_and_the_mig_the_template(capsys: pytest.CaptureFixture[str]) -> None:
    steps = planned(capsys, "--name", "fleet", "--template-name", "fleet-v2")
    mig = body(steps, "InsertInstanceGroupManagerRequest")
    assert mig["instance_template"] == "projects/proj/global/instanceTemplates/fleet-v2"
    assert body(steps, "InsertAutoscalerRequest")["target"] == "projects/proj/zones/us-central1-a/instanceGroupManagers/fleet"
    assert mig["update_policy"]["max_unavailable"] == {"fixed": 0}


# compute_v1 messages reject unknown fields; its enums (where the library lists the
# values) must contain ours. Run apart so this process never imports compute_v1.
_CHECK_WITH_COMPUTE_V1 = r"""
import json, sys
from google.cloud import compute_v1
enums = {"provisioning_model": compute_v1.Scheduling.ProvisioningModel,
         "on_host_maintenance": compute_v1.Scheduling.OnHostMaintenance,
         "instance_termination_action": compute_v1.Scheduling.InstanceTerminationAction,
         "direction": compute_v1.Firewall.Direction, "mode": compute_v1.AutoscalingPolicy.Mode,
         "utilization_target_type": compute_v1.AutoscalingPolicyCustomMetricUtilization.UtilizationTargetType,
         "replacement_method": compute_v1.InstanceGroupManagerUpdatePolicy.ReplacementMethod}
def walk(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in enums and value not in enums[key].__members__:
                sys.exit(f"{key}={value!r} is not a {enums[key].__name__}")
            walk(value)
    elif isinstance(node, list):
        for value in node:
            walk(value)
for step in json.load(sys.stdin):
    getattr(compute_v1, step["request_type"])(step["request"])  # ValueError on an unknown field
    assert callable(getattr(compute_v1, step["client"]))
    walk(step["request"])
"""


def test_every_request_is_a_valid_compute_v1_message() -> None:
    variant = [
        "--spot",
        "--metric",
        "ttft",
        "--accelerator-count",
        "1",
        "--subnetwork",
        "s",
        "--vllm-args",
        "--max-model-len 8192",
    ]
    steps = dry_run() + dry_run(*variant)
    result = subprocess.run(
        [sys.executable, "-c", _CHECK_WITH_COMPUTE_V1],
        input=json.dumps(steps),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "No module named 'google.cloud.compute_v1'" in result.stderr or "cannot import name 'compute_v1'" in result.stderr:
        pytest.fail("google-cloud-compute is required by this test: pip install -e '.[test,deploy]'", pytrace=False)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_daemon_packages_never_import_google_cloud_compute() -> None:
    offenders = [
        str(path.relative_to(REPO))
        for package in ("agent", "service", "probes", "state_machine")
        for path in (REPO / package).rglob("*.py")
        if re.search(r"google\.cloud\.compute|google\.cloud import compute|compute_v1", path.read_text())
    ]
    assert offenders == []


def test_building_the_steps_is_pure_and_needs_no_google_package() -> None:
    settings = provision.Settings(
        project="p", zone="europe-west4-a", name="n", template_name="t", model="m", service_account="sa"
    )
    steps = provision.build_steps(
        settings, {k: k for k in ("startup-script", "gpu-node-agent-unit", "vllm-unit", "gpu-node-agent-config")}
    )
    assert len(steps) == 6 and "google.cloud.compute_v1" not in sys.modules
    assert settings.region == "europe-west4"
