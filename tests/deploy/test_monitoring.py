"""deploy/monitoring: the dashboard and alert policies are what `gcloud monitoring
dashboards create --config-from-file` and `gcloud beta monitoring policies create
--policy-from-file` accept: they parse into the API's own messages (unknown fields
fail) in the REST JSON spelling, and name only the metrics the agent writes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from google.cloud import monitoring_v3  # a runtime dependency of the agent
from google.protobuf import json_format

from tests.deploy.support import MONITORING, SPEC_METRIC_TYPES, require_module

ALERTS = sorted(MONITORING.glob("alert-*.json"))
FILES = [*ALERTS, MONITORING / "dashboard.json"]


def message_for(path: Path) -> Any:
    if path.name == "dashboard.json":
        dashboards = require_module("google.cloud.monitoring_dashboard_v1", "google-cloud-monitoring-dashboards")
        return dashboards.Dashboard.pb()()
    return monitoring_v3.AlertPolicy.pb()()


def is_subset(small: Any, big: Any) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and is_subset(v, big[k]) for k, v in small.items())
    if isinstance(small, list):
        return isinstance(big, list) and len(small) == len(big) and all(map(is_subset, small, big))
    return small == big


def test_there_is_one_policy_per_documented_alert() -> None:
    assert [p.name for p in ALERTS] == [
        "alert-agent-down.json",
        "alert-export-failing.json",
        "alert-preemptions.json",
        "alert-ttft-slo.json",
    ]


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_each_file_is_the_api_message_in_rest_json_spelling(path: Path) -> None:
    data = json.loads(path.read_text())
    message = message_for(path)
    json_format.ParseDict(data, message)  # unknown fields and bad enum values raise
    # gcloud reads the REST (camelCase) names: everything we wrote must come back
    # unchanged when the message is printed that way.
    printed = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    assert is_subset(data, printed)


def test_the_parser_rejects_a_misspelled_field() -> None:
    data = json.loads((MONITORING / "alert-ttft-slo.json").read_text())
    data["conditions"][0]["conditionThreshold"]["tresholdValue"] = 1
    with pytest.raises(json_format.ParseError, match="tresholdValue"):
        json_format.ParseDict(data, monitoring_v3.AlertPolicy.pb()())


def referenced_metric_types(path: Path) -> set[str]:
    text = path.read_text()
    direct = set(re.findall(r"custom\.googleapis\.com/[a-z_]+/[a-z_]+", text))
    # PromQL spells custom.googleapis.com/a/b as custom_googleapis_com:a_b.
    promql = {name for name in SPEC_METRIC_TYPES if _promql_name(name) in text}
    unknown_promql = set(re.findall(r"custom_googleapis_com:[a-z_]+", text)) - {_promql_name(n) for n in SPEC_METRIC_TYPES}
    assert not unknown_promql, f"{path.name}: {unknown_promql} is not a metric the agent writes"
    return direct | promql


def _promql_name(metric_type: str) -> str:
    domain, path = metric_type.split("/", 1)
    return domain.replace(".", "_") + ":" + path.replace("/", "_")


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_only_metrics_the_agent_writes_are_referenced(path: Path) -> None:
    assert referenced_metric_types(path) <= SPEC_METRIC_TYPES


def test_the_dashboard_shows_every_metric_the_agent_writes() -> None:
    assert referenced_metric_types(MONITORING / "dashboard.json") == SPEC_METRIC_TYPES


def test_the_ttft_alert_fires_on_the_p95_over_the_slo_default() -> None:
    policy = json.loads((MONITORING / "alert-ttft-slo.json").read_text())
    for condition in policy["conditions"]:
        threshold = condition["conditionThreshold"]
        assert 'metric.labels.quantile = "p95"' in threshold["filter"]
        assert threshold["thresholdValue"] == 2000  # agent's slo.ttft_ms default
        assert threshold["comparison"] == "COMPARISON_GT"


def test_the_preemption_alert_matches_the_audit_log_and_is_rate_limited() -> None:
    policy = json.loads((MONITORING / "alert-preemptions.json").read_text())
    (condition,) = policy["conditions"]
    assert 'protoPayload.methodName="compute.instances.preempted"' in condition["conditionMatchedLog"]["filter"]
    assert policy["alertStrategy"]["notificationRateLimit"]["period"] == "3600s"  # required for log alerts


@pytest.mark.parametrize("path", ALERTS, ids=[p.name for p in ALERTS])
def test_every_alert_points_to_the_runbook(path: Path) -> None:
    policy = json.loads(path.read_text())
    section = re.search(r'deploy/README\.md, section "([^"]+)"', policy["documentation"]["content"])
    assert section is not None
    readme = (MONITORING.parent / "README.md").read_text()
    assert f"### {section.group(1)}" in readme
