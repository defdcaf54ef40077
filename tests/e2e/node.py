"""One GPU node of an e2e fleet: a FakeVllm serving completions, a fake GCE metadata
server, and the `gpu-node-agent run` subprocess beside them on a fixed port (a load
balancer's health check names it), restartable the way systemd restarts units."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from agent.sim.metadata import FakeMetadataServer
from agent.sim.vllm import FakeVllm
from tests.harness import AgentProcess, free_port, status_is, until


class Node:
    """`await start()`, then `agent` is the running agent (`agents` keeps every one
    this node has run, oldest first); always `close()`."""

    def __init__(self, tmp_path: Path, name: str, *, propagation_delay_s: float) -> None:
        self.name = name
        self.dir = tmp_path / name
        self.dir.mkdir()
        self.propagation_delay_s = propagation_delay_s
        self.vllm = FakeVllm()
        self.vllm.ttft_s, self.vllm.tpot_s = 0.05, 0.02  # ~0.35 s per completion
        # vLLM's default: stopping it aborts whatever is in flight, so only a drain that
        # waited for the node to empty loses nothing.
        self.vllm.shutdown_timeout_s = 0.0
        self.metadata = FakeMetadataServer()
        self.agent_port = free_port()
        self.agents: list[AgentProcess] = []

    @property
    def agent(self) -> AgentProcess:
        return self.agents[-1]

    async def start(self) -> Node:
        await self.vllm.start()
        await self.metadata.start()
        await self.start_agent()
        return self

    async def start_agent(self) -> AgentProcess:
        agent = AgentProcess(self.dir, {
            "GPU_AGENT_SERVICE__PORT": str(self.agent_port),
            "GPU_AGENT_INFERENCE__BASE_URL": self.vllm.url,
            "GPU_AGENT_DRAIN__PROPAGATION_DELAY_S": str(self.propagation_delay_s),
            "GPU_AGENT_PREEMPTION__ENABLED": "true",
            "GPU_AGENT_PREEMPTION__WATCH_TIMEOUT_S": "2",
            "GCE_METADATA_HOST": self.metadata.address,
            "GPU_AGENT_PREEMPTION__METADATA_HOST": self.metadata.address,
        })
        self.agents.append(agent)
        await agent.start().started()
        return agent

    async def ready(self, http: aiohttp.ClientSession, timeout_s: float = 15.0) -> None:
        await until(lambda: status_is(http, f"{self.agent.url}/readyz", 200), timeout_s, 0.05, f"{self.name} READY")

    async def restart_vllm(self) -> None:
        """systemd stops vLLM after the agent (unit order) and starts a fresh one on its
        port: nothing in flight, every counter from zero."""
        await self.vllm.stop()
        self.vllm.restart()
        await self.vllm.start(self.vllm.port)

    async def power_off(self) -> None:
        """GCE stops the VM hard: vLLM and the agent go at once."""
        await self.vllm.stop()
        self.agent.kill()

    async def close(self) -> None:
        for agent in self.agents:
            agent.kill()
        await self.vllm.stop()
        await self.metadata.stop()
