"""Shared helpers for the deploy tests: paths, manifest loading, the provisioning
module, and test-only Python modules (a missing one fails the test, loudly; a missing
system tool skips it, see tests/tools.py)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
GCE = DEPLOY / "gce"
GKE = DEPLOY / "gke"
MONITORING = DEPLOY / "monitoring"

# SPEC §7: the metric types the agent writes (and nothing else may be referenced).
SPEC_METRIC_TYPES = frozenset(
    f"custom.googleapis.com/{name}"
    for name in (
        "gpu/usage_percent",
        "gpu/memory_used_gb",
        "vllm/tps",
        "vllm/queue_length",
        "vllm/kv_cache_usage_gb",
        "queue/pending_requests",
        "vllm/ttft_ms",
        "vllm/tpot_ms",
        "agent/state",
    )
)


def require_module(name: str, pip_name: str) -> ModuleType:
    """Import a test-only dependency; fails the test (never skips) when it is missing."""
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.fail(f"{name} is not installed; it is required by this test (pip install {pip_name})", pytrace=False)


def manifests() -> dict[str, list[dict[str, Any]]]:
    """Every YAML document under deploy/gke, by file name."""
    found = {}
    for path in sorted(GKE.glob("*.yaml")):
        found[path.name] = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def manifest(kind: str) -> dict[str, Any]:
    (doc,) = [doc for docs in manifests().values() for doc in docs if doc["kind"] == kind]
    return doc


def pod_spec() -> dict[str, Any]:
    return manifest("Deployment")["spec"]["template"]["spec"]


def container(name: str) -> dict[str, Any]:
    spec = pod_spec()
    (found,) = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name]
    return found


def prestop_command() -> list[str]:
    return container("vllm")["lifecycle"]["preStop"]["exec"]["command"]


def load_provision() -> ModuleType:
    """deploy/gce/provision.py is a script, not an installed package: load it by path."""
    spec = importlib.util.spec_from_file_location("gce_provision", GCE / "provision.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


# PodMonitoring (monitoring.googleapis.com/v1) is a CRD, absent from the Kubernetes
# schemas: this schema is written from the CRD's documented fields (Google Cloud
# Managed Service for Prometheus, PodMonitoringSpec / ScrapeEndpoint / TargetLabels /
# ScrapeLimits). Strict like the Kubernetes ones: unknown fields fail.
_DURATION = {
    "type": "string",
    "pattern": r"^((([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?|0)$",
}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": {"oneOf": [{"type": "integer", "minimum": 1, "maximum": 65535}, {"type": "string", "minLength": 1}]},
        "scheme": {"enum": ["http", "https"]},
        "path": {"type": "string", "pattern": "^/"},
        "params": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}},
        "interval": _DURATION,
        "timeout": _DURATION,
        "metricRelabeling": {"type": "array", "items": {"type": "object"}},
        # HTTPClientConfig, inlined.
        "authorization": {"type": "object"},
        "basicAuth": {"type": "object"},
        "oauth2": {"type": "object"},
        "tls": {"type": "object"},
        "proxyUrl": {"type": "string"},
    },
}
PODMONITORING_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.googleapis.com/v1"},
        "kind": {"const": "PodMonitoring"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": _LABEL_SELECTOR,
                "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
                "targetLabels": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "metadata": {"type": "array", "items": {"enum": ["pod", "container", "node"]}},
                        "fromPod": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["from"],
                                "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
                            },
                        },
                    },
                },
                "limits": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        key: {"type": "integer", "minimum": 0}
                        for key in ("samples", "labels", "labelNameLength", "labelValueLength")
                    },
                },
                "filterRunning": {"type": "boolean"},
            },
        },
    },
}
