"""The scaling signals the study compares: what a user would try, at the values the
shipped deploy configs used, and the agent's demand gauge.

`source` says who writes the series: the agent (`agent.demand.Series`, under the agent's
lifecycle rule) or vLLM itself, scraped by Managed Prometheus / the Ops Agent (a live
gauge, absent while vLLM is not listening), as GKE's guide sets up batch-size scaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from agent.demand import Series


class Source(StrEnum):
    AGENT = "agent"
    VLLM = "vllm"


KV_USAGE, RUNNING = "vllm:kv_cache_usage_perc", "vllm:num_requests_running"


@dataclass(frozen=True, slots=True)
class Policy:
    """Scale on `metric` with a per-node target (MIG utilization target / HPA AverageValue)."""

    name: str
    metric: str
    mig_target: float
    hpa_target: float
    source: Source = Source.AGENT

    def target(self, kind: str) -> float:
        return self.mig_target if kind == "mig" else self.hpa_target


# Targets: gpu 80 % and p95 TTFT 1500 ms are deploy/gce/provision.py's METRICS; queue 4 per
# VM is provision.py's default and 3 per pod deploy/gke/hpa.yaml's (both before issue 17);
# KV 0.5 is the demand gauge's former KV target (the audit's "KV-only" twin of it);
# batch 64 running requests is the batch the node model runs at ~70 % of its
# saturation throughput on the sample traces' sizes (profiled once, as GKE's guide
# says to pick a batch-size target).
POLICIES = (
    Policy("gpu80", Series.GPU_USAGE_PERCENT.value, 80.0, 80.0),
    Policy("queue", Series.QUEUE_LENGTH.value, 4.0, 3.0),
    Policy("ttft1.5s", Series.TTFT_P95_MS.value, 1500.0, 1500.0),
    Policy("kv0.5", KV_USAGE, 0.5, 0.5, Source.VLLM),
    Policy("batch64", RUNNING, 64.0, 64.0, Source.VLLM),
    Policy("demand", Series.DEMAND.value, 1.0, 1.0),
)
DEMAND = POLICIES[-1]
