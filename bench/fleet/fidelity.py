"""How close to reality the fleet simulation runs: one knob per perturbation of issue 17,
each with its realistic default (what the study's headline runs use), its idealised
value (what the earlier model assumed) and where the number comes from.

bench/fleet_sim.py turns every field into a flag (`--prefill-cost off`, `--hpa-delay-s
300`, ...); `--sensitivity` runs each policy with one knob at a time set back to ideal.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True, slots=True)
class Fidelity:
    # Prefill takes GPU time inside the per-iteration token budget (vLLM V1 chunked
    # prefill: decodes first, the rest of max_num_batched_tokens goes to prompts).
    prefill_cost: bool = True
    # Each request's own prompt and output sizes ("request"), or its minute's mean ("minute").
    sizes: str = "request"
    # vLLM preempts (recomputes) the newest sequences when decodes outgrow the KV cache.
    kv_preemption: bool = True
    # What the MIG autoscaler reads: the mean of each VM's points over this window, this
    # long after they were written (Cloud Monitoring ingestion).
    mig_window_s: float = 120.0
    mig_delay_s: float = 60.0
    # What the HPA reads through the custom-metrics adapter: each pod's latest point at
    # least this old (ingestion + the adapter's cache; the adapter serves points up to 5 min old).
    hpa_delay_s: float = 120.0
    # GCE MIG: VM boot (accelerator image with the driver) and vLLM's model load.
    mig_boot_s: float = 90.0
    mig_model_load_s: float = 300.0
    # GKE: a new GPU node (VM, kubelet join, GPU driver install), the vLLM image pull on
    # a node that has not pulled it, and the model load.
    gke_node_provision_s: float = 240.0
    gke_image_pull_s: float = 180.0
    gke_model_load_s: float = 300.0
    # Cluster autoscaler: a node without pods is removed after this long
    # (--scale-down-unneeded-time, default 10 min); it bills meanwhile.
    scale_down_delay_s: float = 600.0
    # Load balancer: each request to a random serving node, with weights that differ by
    # this coefficient of variation (connection reuse); 0 is an even split.
    lb_skew_cv: float = 0.25


IDEAL = Fidelity(
    prefill_cost=False,
    sizes="minute",
    kv_preemption=False,
    mig_window_s=0.0,
    mig_delay_s=0.0,
    hpa_delay_s=0.0,
    gke_node_provision_s=0.0,
    gke_image_pull_s=90.0,
    gke_model_load_s=300.0,
    scale_down_delay_s=0.0,
    lb_skew_cv=0.0,
)
REALISTIC = Fidelity()

# One knob at a time back to ideal, for the sensitivity table: (column, fields).
KNOBS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("free prefill", ("prefill_cost",)),
    ("per-minute mean sizes", ("sizes",)),
    ("no KV preemption", ("kv_preemption",)),
    ("fresh metrics", ("mig_window_s", "mig_delay_s", "hpa_delay_s")),
    ("GKE boots like a MIG VM", ("gke_node_provision_s", "gke_image_pull_s", "gke_model_load_s")),
    ("no scale-down delay", ("scale_down_delay_s",)),
    ("even LB split", ("lb_skew_cv",)),
)
# And the harsh end of one: the adapter serving 5-minute-old points.
HARSH: tuple[tuple[str, dict[str, float]], ...] = (("HPA delay 300 s", {"hpa_delay_s": 300.0}),)


def with_ideal(base: Fidelity, names: tuple[str, ...]) -> Fidelity:
    return replace(base, **{name: getattr(IDEAL, name) for name in names})


def describe(f: Fidelity) -> str:
    """The settings that differ from REALISTIC, for table headers ("realistic" if none)."""
    diff = [f"{x.name}={getattr(f, x.name)}" for x in fields(f) if getattr(f, x.name) != getattr(REALISTIC, x.name)]
    return ", ".join(diff) or "realistic"
