"""Where nodes run and what bills: the autoscaler kinds, and a GKE cluster's GPU nodes
as the cluster autoscaler keeps them (a MIG's VM is its node: nothing to keep here).

A pod binds to a GPU node that an earlier pod left empty (image already pulled), or the
cluster autoscaler provisions a new one for it; an empty node is removed after
Fidelity.scale_down_delay_s and bills until then. A Spot preemption takes the node away
at the end of its notice.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from bench.fleet.fidelity import Fidelity


class Kind(StrEnum):
    MIG = "mig"
    HPA = "hpa"


@dataclass(slots=True)
class Host:
    created_s: float
    busy: bool = True
    free_since_s: float | None = None
    gone_s: float | None = None


class HostPool:
    """The cluster's GPU nodes; `bind` places a new pod and says when its image is ready."""

    def __init__(self, fidelity: Fidelity) -> None:
        self.fid = fidelity
        self.hosts: list[Host] = []

    def bind_warm(self, created_s: float) -> Host:
        host = Host(created_s)
        self.hosts.append(host)
        return host

    def bind(self, now_s: float) -> tuple[Host, float]:
        """(the node, when the pod's containers start: vLLM then loads the model)."""
        free = [h for h in self.hosts if not h.busy and h.gone_s is None]
        if free:
            host = max(free, key=lambda h: h.free_since_s or 0.0)  # the warmest
            host.busy, host.free_since_s = True, None
            return host, now_s
        host = Host(now_s)
        self.hosts.append(host)
        return host, now_s + self.fid.gke_node_provision_s + self.fid.gke_image_pull_s

    def release(self, host: Host, now_s: float) -> None:
        if host.gone_s is None:
            host.busy, host.free_since_s = False, now_s

    def preempted(self, host: Host, at_s: float) -> None:
        host.gone_s = at_s

    def expire(self, now_s: float) -> None:
        delay = self.fid.scale_down_delay_s
        for host in self.hosts:
            if not host.busy and host.gone_s is None and host.free_since_s is not None and now_s >= host.free_since_s + delay:
                host.gone_s = now_s
        if len(self.hosts) > 64:
            self.hosts = [h for h in self.hosts if h.gone_s is None or h.gone_s > now_s]

    def billed(self, now_s: float) -> int:
        return sum(1 for h in self.hosts if h.gone_s is None or h.gone_s > now_s)
