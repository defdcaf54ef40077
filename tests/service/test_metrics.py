"""The /metrics collector, read with prometheus_client's own get_sample_value on a real,
unstarted Daemon's registry: each family says what the node view says."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from agent.daemon import Daemon
from probes.gpu import GPU, GpuInfo, GpuReading
from probes.vllm import VLLM
from state_machine import State
from tests.agent.test_exporter_series import vllm as vllm_reading
from tests.harness import inprocess_config


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    cfg = inprocess_config(tmp_path)
    return Daemon(cfg, environ={})


def test_lifecycle_families_name_the_state_and_count_transitions(daemon: Daemon) -> None:
    daemon.lifecycle.start_warming()
    sample = daemon.registry.get_sample_value
    assert sample("gpu_node_agent_state", {"state": "WARMING"}) == 1.0
    assert sample("gpu_node_agent_state", {"state": "INIT"}) == 0.0
    assert sample("gpu_node_agent_ready") == 0.0
    assert sample("gpu_node_agent_transitions_total", {"from": "INIT", "to": "WARMING", "reason": "started"}) == 1.0


def test_vllm_and_gpu_families_read_the_node_view(daemon: Daemon) -> None:
    daemon.lifecycle.start_warming()
    daemon.lifecycle.mark_ready("test")
    daemon.snapshot.put(VLLM, replace(vllm_reading(), queue_waiting=4.0), stale_after_s=60)
    gpus = [GpuInfo(index=0, utilization_percent=50.0, memory_used_bytes=2**30), GpuInfo(index=1, utilization_percent=70.0)]
    daemon.snapshot.put(GPU, GpuReading.of(gpus), stale_after_s=60)
    sample = daemon.registry.get_sample_value
    assert sample("gpu_node_agent_vllm_requests_waiting") == 5.0
    assert sample("gpu_node_agent_vllm_queue_length") == 4.0
    assert sample("gpu_node_agent_vllm_ttft_seconds", {"quantile": "0.95"}) == 0.4
    assert sample("gpu_node_agent_gpu_utilization_ratio", {"gpu": "1"}) == 0.7
    assert sample("gpu_node_agent_gpu_memory_used_bytes", {"gpu": "0"}) == 2**30
    view = daemon.node.now()
    assert view.state is State.READY and view.demand is not None
    assert sample("gpu_node_agent_node_demand_ratio") == view.demand


def test_a_scrape_never_moves_what_a_drain_holds(daemon: Daemon) -> None:
    daemon.lifecycle.start_warming()
    daemon.lifecycle.mark_ready("test")
    daemon.snapshot.put(VLLM, vllm_reading(), stale_after_s=60)  # a READY reading: a round (export off)
    held = daemon.node.now().autoscaling
    for _ in range(3):
        daemon.registry.get_sample_value("gpu_node_agent_node_demand_ratio")
    assert daemon.node.now().autoscaling == held
