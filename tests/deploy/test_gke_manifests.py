"""deploy/gke: every manifest against the Kubernetes schemas in strict mode (unknown
fields fail), the PodMonitoring against its CRD schema, and the properties the
drain depends on (native sidecar, probes, grace period, agent env)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from tests.deploy.support import (
    GKE,
    PODMONITORING_SCHEMA,
    container,
    manifest,
    manifests,
    pod_spec,
    prestop_command,
    require_module,
)

# 1.29: the oldest release with native sidecars on by default; and the newest
# schemas that kubernetes-validate bundles, so a field removed later is caught too.
K8S_VERSIONS = ("1.29", "latest")
CRD_SCHEMAS = {("monitoring.googleapis.com/v1", "PodMonitoring"): PODMONITORING_SCHEMA}
DOCS = [(name, index, doc) for name, docs in manifests().items() for index, doc in enumerate(docs)]


def validate(doc: dict[str, Any], version: str) -> None:
    crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if crd is not None:
        require_module("jsonschema", "jsonschema").Draft202012Validator(crd).validate(doc)
        return
    kubernetes_validate = require_module("kubernetes_validate", "kubernetes-validate")
    if version == "latest":
        version = kubernetes_validate.utils.latest_version()
    # Raises SchemaNotFoundError for a kind it does not know: no silent pass.
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_manifest_directory_holds_every_expected_kind() -> None:
    kinds = sorted(doc["kind"] for _, _, doc in DOCS)
    assert kinds == sorted(
        ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "PodMonitoring", "Service", "ServiceAccount"]
    )


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("name", "index", "doc"), DOCS, ids=[f"{n}#{i}" for n, i, _ in DOCS])
def test_every_manifest_passes_its_schema_in_strict_mode(name: str, index: int, doc: dict[str, Any], version: str) -> None:
    validate(doc, version)


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("Deployment", ["spec", "template", "spec", "initContainers", 0]),
        ("HorizontalPodAutoscaler", ["spec"]),
        ("PodDisruptionBudget", ["spec"]),
        ("PodMonitoring", ["spec", "endpoints", 0]),
    ],
)
def test_strict_validation_rejects_an_unknown_field(kind: str, path: list[Any]) -> None:
    doc = copy.deepcopy(manifest(kind))
    node = doc
    for key in path:
        node = node[key]
    node["restartPolicyy"] = "Always"  # a typo must not pass as "extra data"
    jsonschema = require_module("jsonschema", "jsonschema")
    with pytest.raises(jsonschema.ValidationError, match="restartPolicyy"):
        validate(doc, K8S_VERSIONS[0])


def test_the_agent_is_a_native_sidecar_started_before_vllm() -> None:
    spec = pod_spec()
    assert [c["name"] for c in spec["initContainers"]] == ["gpu-node-agent"]
    assert spec["initContainers"][0]["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["vllm"]
    # vLLM starts only after the sidecar's startup probe passed, so its preStop has an agent.
    assert container("gpu-node-agent")["startupProbe"]["httpGet"]["path"] == "/healthz"


def agent_port() -> int:
    (port,) = [p["containerPort"] for p in container("gpu-node-agent")["ports"] if p["name"] == "agent"]
    return port


def test_readiness_is_the_agents_readyz_and_liveness_its_healthz() -> None:
    vllm, agent = container("vllm"), container("gpu-node-agent")
    assert vllm["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": agent_port()}
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "agent"}
    # A liveness kill of vLLM would run the preStop and leave the pod admin-drained.
    assert "livenessProbe" not in vllm


def prestop_timeout_s() -> int:
    match = re.search(r'^url, timeout_s = "[^"]+", (\d+)$', prestop_command()[2], re.MULTILINE)
    assert match is not None, "the preStop script names its wait timeout"
    return int(match.group(1))


def agent_env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in container("gpu-node-agent")["env"] if "value" in e}


def test_termination_grace_covers_the_prestop_drain_and_both_exits() -> None:
    timeout_s = prestop_timeout_s()
    env = agent_env()
    propagation_s = float(env["GPU_AGENT_DRAIN__PROPAGATION_DELAY_S"])
    assert timeout_s >= float(env["GPU_AGENT_DRAIN__TIMEOUT_S"]) > propagation_s
    vllm_exit_s, agent_exit_s = vllm_shutdown_timeout_s(), 10
    assert pod_spec()["terminationGracePeriodSeconds"] >= timeout_s + vllm_exit_s + agent_exit_s


def vllm_shutdown_timeout_s() -> int:
    args = container("vllm")["args"]
    assert "--shutdown-timeout" in args, "vLLM aborts in-flight requests at SIGTERM without it"
    return int(args[args.index("--shutdown-timeout") + 1])


def test_vllm_is_a_version_with_graceful_shutdown_and_is_given_time_for_it() -> None:
    tag = container("vllm")["image"].rsplit(":", 1)[1]
    assert tuple(int(p) for p in tag.removeprefix("v").split(".")[:2]) >= (0, 18)  # --shutdown-timeout
    # Long enough to finish what a Spot reclaim (about 15 s for pods) leaves running.
    assert 15 <= vllm_shutdown_timeout_s() <= 60


def test_the_prestop_drains_the_agent_on_loopback_with_python_only() -> None:
    command = prestop_command()
    assert command[:2] == ["python3", "-c"]
    script = command[2]
    assert f'"http://127.0.0.1:{agent_port()}/drain"' in script
    assert '"wait": True' in script
    imports = set(re.findall(r"^import (.+)$", script, re.MULTILINE)[0].replace(" ", "").split(","))
    assert imports <= {"json", "sys", "urllib.error", "urllib.request"}


def test_the_sidecar_env_is_a_valid_agent_config_with_the_downward_api(tmp_path: Path) -> None:
    env = agent_env()
    empty = tmp_path / "config.toml"  # the image ships no config file: env only
    empty.write_text("")
    cfg = load_config(empty, environ=env)
    assert cfg.export.resource.value == "k8s_pod"
    assert cfg.service.port == agent_port()
    assert cfg.inference.base_url == "http://127.0.0.1:8000"
    refs = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container("gpu-node-agent")["env"] if "valueFrom" in e}
    assert refs["POD_NAME"] == "metadata.name"
    assert refs["POD_NAMESPACE"] == "metadata.namespace"


def test_the_agent_runs_as_non_root_with_a_read_only_root_and_a_state_volume() -> None:
    agent = container("gpu-node-agent")
    ctx = agent["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0
    assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    (mount,) = agent["volumeMounts"]
    assert mount["mountPath"] == agent_env()["GPU_AGENT_SERVICE__STATE_DIR"]


def test_the_hpa_scales_the_deployment_on_the_demand_gauge_from_1_to_20() -> None:
    hpa = manifest("HorizontalPodAutoscaler")["spec"]
    deployment = manifest("Deployment")["metadata"]["name"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 20)
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "custom.googleapis.com|node|demand"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "1"}  # 1.0 = a pod at its target


@pytest.mark.parametrize("kind", ["PodDisruptionBudget", "Service", "PodMonitoring"])
def test_selectors_pick_the_deployment_pods(kind: str) -> None:
    doc = manifest(kind)
    selector = doc["spec"]["selector"]
    selector = selector.get("matchLabels", selector)
    labels = manifest("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selector and selector.items() <= labels.items()


def test_the_pods_use_the_workload_identity_service_account() -> None:
    sa = manifest("ServiceAccount")
    assert pod_spec()["serviceAccountName"] == sa["metadata"]["name"]
    assert sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")


def test_podmonitoring_scrapes_the_agent_port_by_name() -> None:
    (endpoint,) = manifest("PodMonitoring")["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("agent", "/metrics")


def test_no_manifest_file_is_empty() -> None:
    assert all(manifests()[path.name] for path in GKE.glob("*.yaml"))
