"""The monitored resource the node's series are written on: gce_instance on a VM,
k8s_pod on GKE, generic_node elsewhere. Pure: decided from the config, the
metadata identity and the environment.

Sources of each label:
- project_id: `export.project_id`, else the metadata server's project/project-id.
- gce_instance: instance/id (numeric) and the zone's last path segment from
  instance/zone; without a metadata server, `export.node_id` and
  `export.location` stand in.
- k8s_pod: location = `export.location` or the instance attribute
  cluster-location; cluster_name = the attribute cluster-name; namespace_name and
  pod_name from the downward API, env POD_NAMESPACE (fieldRef metadata.namespace)
  and POD_NAME (fieldRef metadata.name). The HPA adapter reads Pods metrics from
  k8s_pod only.
- generic_node: location = `export.location`, else the zone, else "global";
  namespace = the cluster name, else "default"; node_id = `export.node_id`, else
  the numeric instance id, else the hostname.

`auto` picks k8s_pod when running in Kubernetes (KUBERNETES_SERVICE_HOST or
POD_NAME set) on a cluster the metadata server names, gce_instance when a
metadata server answered, generic_node otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from agent.config import ExportConfig, ExportResource

POD_NAME_ENV = "POD_NAME"
POD_NAMESPACE_ENV = "POD_NAMESPACE"
_K8S_ENV = "KUBERNETES_SERVICE_HOST"


class Identity(Protocol):
    """What the metadata source stores under snapshot key "metadata.identity" (read-only)."""

    @property
    def project_id(self) -> str | None: ...
    @property
    def instance_id(self) -> str | None: ...
    @property
    def zone(self) -> str | None: ...
    @property
    def cluster_name(self) -> str | None: ...
    @property
    def cluster_location(self) -> str | None: ...


class ResourceError(Exception):
    """The resource cannot be built; the message names what is missing and where it comes from."""


@dataclass(frozen=True, slots=True)
class Resource:
    type: ExportResource
    labels: tuple[tuple[str, str], ...]

    @property
    def project_id(self) -> str:
        return dict(self.labels)["project_id"]

    def as_dict(self) -> dict[str, object]:
        return {"type": self.type.value, "labels": dict(self.labels)}


def detect_resource(cfg: ExportConfig, identity: Identity | None, environ: Mapping[str, str], hostname: str) -> Resource:
    """Raises ResourceError when the chosen resource type lacks a label."""
    project = cfg.project_id or (identity.project_id if identity is not None else None)
    if not project:
        raise ResourceError("export.project_id is not set and no metadata server gave a project id")
    kind = cfg.resource if cfg.resource is not ExportResource.AUTO else choose(identity, environ)
    if kind is ExportResource.GCE_INSTANCE:
        labels = _gce_instance(cfg, identity)
    elif kind is ExportResource.K8S_POD:
        labels = _k8s_pod(cfg, identity, environ)
    else:
        labels = _generic_node(cfg, identity, hostname)
    return Resource(kind, (("project_id", project), *labels))


def choose(identity: Identity | None, environ: Mapping[str, str]) -> ExportResource:
    in_kubernetes = _K8S_ENV in environ or POD_NAME_ENV in environ
    if identity is not None and in_kubernetes and identity.cluster_name:
        return ExportResource.K8S_POD
    if identity is not None and identity.instance_id:
        return ExportResource.GCE_INSTANCE
    return ExportResource.GENERIC_NODE


def short_zone(zone: str | None) -> str | None:
    """instance/zone is `projects/NUMBER/zones/ZONE`; the label wants ZONE."""
    return zone.rsplit("/", 1)[-1] if zone else None


def _gce_instance(cfg: ExportConfig, identity: Identity | None) -> list[tuple[str, str]]:
    instance_id = (identity.instance_id if identity is not None else None) or cfg.node_id
    zone = short_zone(identity.zone if identity is not None else None) or cfg.location
    if not instance_id or not zone:
        raise ResourceError(
            "resource gce_instance needs the numeric instance id and the zone: no metadata server answered "
            "(set export.node_id and export.location, or export.resource = generic_node)"
        )
    return [("instance_id", instance_id), ("zone", zone)]


def _k8s_pod(cfg: ExportConfig, identity: Identity | None, environ: Mapping[str, str]) -> list[tuple[str, str]]:
    cluster = identity.cluster_name if identity is not None else None
    location = cfg.location or (identity.cluster_location if identity is not None else None)
    namespace, pod = environ.get(POD_NAMESPACE_ENV), environ.get(POD_NAME_ENV)
    missing = [
        what
        for what, value in (
            ("cluster name (metadata attribute cluster-name)", cluster),
            ("cluster location (export.location or metadata attribute cluster-location)", location),
            (f"{POD_NAMESPACE_ENV} (downward API fieldRef metadata.namespace)", namespace),
            (f"{POD_NAME_ENV} (downward API fieldRef metadata.name)", pod),
        )
        if not value
    ]
    if missing:
        raise ResourceError("resource k8s_pod is missing: " + ", ".join(missing))
    assert cluster and location and namespace and pod
    return [("location", location), ("cluster_name", cluster), ("namespace_name", namespace), ("pod_name", pod)]


def _generic_node(cfg: ExportConfig, identity: Identity | None, hostname: str) -> list[tuple[str, str]]:
    zone = short_zone(identity.zone) if identity is not None else None
    cluster = identity.cluster_name if identity is not None else None
    instance_id = identity.instance_id if identity is not None else None
    node_id = cfg.node_id or instance_id or hostname
    if not node_id:
        raise ResourceError("resource generic_node needs a node id: set export.node_id")
    return [("location", cfg.location or zone or "global"), ("namespace", cluster or "default"), ("node_id", node_id)]
