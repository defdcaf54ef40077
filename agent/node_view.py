"""The node view: one pure function turns (snapshot, lifecycle state, held autoscaling
values) into a typed `NodeView`, and /metrics, /status and the exporter all read it,
so one quantity is one number wherever it is shown.

Which vLLM reading a view writes from (`VllmSource`): a fresh one when there is one;
none (zero load) when vLLM refuses connections or was never read; otherwise (hung,
garbage, probe stalled) the last good one, held, so a wedged server never reads as
idle. The GPU reading counts only when fresh and from a node with GPUs.

`NodeViews` is the daemon's handle on it: `now()` reads (never moves what a drain
holds), `round()` is the export round (and, with export off, each READY reading),
the only thing that advances the held values; every new good vLLM reading teaches
the demand gauge once (agent/demand.py, `DemandGauge.learn`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from agent.core.snapshot import Key, Reading, Snapshot
from agent.demand import TTFT_SERIES, DemandGauge, Series
from probes.base import FailureCode
from probes.gpu import GPU, GpuReading
from probes.host import HOST, HostReading
from probes.metadata import IDENTITY_KEY, NodeIdentity
from probes.vllm import VLLM, VllmReading
from state_machine import Lifecycle, State

# The reading types travel with the view: its readers need not import a probe.
__all__ = [
    "TTFT_SERIES",
    "GpuReading",
    "HostReading",
    "NodeIdentity",
    "NodeView",
    "NodeViews",
    "Series",
    "VllmReading",
    "VllmSource",
    "gpu_view",
    "node_view",
    "vllm_view",
]


class VllmSource(StrEnum):
    """Where a view's vLLM values came from (module docstring)."""

    FRESH = "fresh"
    HELD = "held"  # vLLM unreadable (hung, garbage): last good reading
    DOWN = "down"  # vLLM refuses connections or was never read: zero load


@dataclass(frozen=True, slots=True)
class NodeView:
    """What the node is doing at one moment, as every reader must see it.

    `vllm` is the reading this view writes from (None: down and never read; when
    DOWN after a good reading it is that reading, which still says whether the KV
    capacity is known); `vllm_last` and `gpu_last`, `host_last` are the last good
    readings whatever their age (the raw gauges of /metrics). `autoscaling` holds the
    lifecycle rule's values (agent/demand.py), None where no gauge is kept.
    """

    state: State
    vllm: VllmReading | None
    vllm_source: VllmSource
    gpu: GpuReading | None
    vllm_last: VllmReading | None = None
    gpu_last: GpuReading | None = None
    host_last: HostReading | None = None
    identity: NodeIdentity | None = None
    autoscaling: Mapping[Series, float | None] | None = None

    @property
    def demand(self) -> float | None:
        """node/demand, or None where no gauge is kept."""
        return None if self.autoscaling is None else self.autoscaling.get(Series.DEMAND)


def gpu_view(snapshot: Snapshot) -> GpuReading | None:
    """The fresh GPU reading of a node with GPUs, else None (stale or failing NVML is unknown)."""
    gpu = snapshot.value(GPU)
    return gpu if gpu is not None and gpu.gpu_count > 0 else None


def vllm_view(snapshot: Snapshot) -> tuple[VllmReading | None, VllmSource]:
    """The vLLM reading a view writes from, and where it came from."""
    fresh = snapshot.value(VLLM)
    if fresh is not None:
        return fresh, VllmSource.FRESH
    reading = snapshot.get(VLLM)
    if reading is None or reading.value is None or reading.failed_with(FailureCode.REFUSED):
        return (None if reading is None else reading.value), VllmSource.DOWN
    return reading.value, VllmSource.HELD


def node_view(snapshot: Snapshot, state: State, gauge: DemandGauge | None = None) -> NodeView:
    """The node now. Pure: `gauge` is only read (its held values and what it learned)."""
    vllm, source = vllm_view(snapshot)
    gpu = gpu_view(snapshot)
    autoscaling = None
    if gauge is not None:
        autoscaling = gauge.view(
            state,
            None if source is VllmSource.DOWN else vllm,
            stale=source is VllmSource.HELD,
            gpu_usage_percent=None if gpu is None else gpu.utilization_percent_mean,
        )
    return NodeView(
        state=state,
        vllm=vllm,
        vllm_source=source,
        gpu=gpu,
        vllm_last=snapshot.value(VLLM, fresh=False),
        gpu_last=snapshot.value(GPU, fresh=False),
        host_last=snapshot.value(HOST, fresh=False),
        identity=snapshot.value(IDENTITY_KEY, fresh=False),
        autoscaling=autoscaling,
    )


class NodeViews:
    """The daemon's node view: `now()` to read, `round()` to write a round.

    `rounds_on_readings`: with export off nothing writes rounds, yet /metrics (a
    Prometheus-based HPA) needs what a drain holds to be the last READY values, so
    each vLLM or GPU reading taken while READY is a round.
    """

    def __init__(
        self, snapshot: Snapshot, lifecycle: Lifecycle, gauge: DemandGauge | None, *, rounds_on_readings: bool = False
    ) -> None:
        self.snapshot = snapshot
        self._lifecycle = lifecycle
        self.gauge = gauge
        self.identity_seen = asyncio.Event()  # set at the first identity the metadata source publishes
        snapshot.subscribe(self._on_reading)
        self._rounds_on_readings = rounds_on_readings

    def now(self) -> NodeView:
        """The node this moment; changes nothing (/status, /metrics)."""
        return node_view(self.snapshot, self._lifecycle.state, self.gauge)

    def identity(self) -> NodeIdentity | None:
        """The node's identity from the metadata server, once read."""
        return self.snapshot.value(IDENTITY_KEY, fresh=False)

    def round(self) -> NodeView:
        """This round's view; a READY round's autoscaling values are what a later drain holds."""
        view = self.now()
        if self.gauge is not None and view.autoscaling is not None:
            self.gauge.hold(view.state, view.autoscaling)
        return view

    def _on_reading(self, key: Key[Any], reading: Reading[Any]) -> None:
        if key == IDENTITY_KEY:
            self.identity_seen.set()
        elif key == VLLM and self.gauge is not None and reading.failed_at is None and reading.value is not None:
            # Each new good reading, once: how often the node is read never changes what it learns.
            self.gauge.learn(reading.value)
        if self._rounds_on_readings and key in (VLLM, GPU) and self._lifecycle.state is State.READY:
            self.round()
