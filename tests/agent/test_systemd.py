"""systemd notify from a real `gpu-node-agent run`: READY, STATUS, WATCHDOG,
STOPPING and EXTEND_TIMEOUT_USEC arrive on $NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

from tests.harness import AgentProcess, until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_notify_protocol_over_a_real_datagram_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    messages: list[str] = []

    async def read_forever() -> None:
        # Read as systemd does, promptly: the kernel queues only ~10 datagrams.
        loop = asyncio.get_running_loop()
        while True:
            messages.append((await loop.sock_recv(sock, 4096)).decode())

    def drain_socket() -> list[str]:
        return messages

    reader = asyncio.create_task(read_forever())

    # Nothing listens on the vLLM port: the node stays WARMING, and the drain ends at
    # once because a refusing vLLM has nothing in flight.
    agent = AgentProcess(
        tmp_path,
        {"GPU_AGENT_INFERENCE__BASE_URL": f"http://127.0.0.1:{free_port()}"},
        extra_env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"},
    ).start()
    try:
        await agent.started()
        await until(lambda: any(m.startswith("READY=1") for m in drain_socket()), 5, what="READY=1")
        await until(lambda: sum(m == "WATCHDOG=1" for m in drain_socket()) >= 3, 5, what="watchdog pings")
        agent.send(signal.SIGTERM)
        assert await agent.exited() == 0
        await asyncio.sleep(0.1)
    finally:
        reader.cancel()
        agent.kill()
        sock.close()
    ready = next(m for m in messages if m.startswith("READY=1"))
    assert "STATUS=WARMING" in ready
    assert any(m.startswith("STOPPING=1") and "DRAINING: signal" in m for m in messages)
    assert any(m.startswith("STATUS=TERMINATED") for m in messages)


async def test_sigterm_with_vllm_down_exits_0_and_logs_the_report(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, {"GPU_AGENT_INFERENCE__BASE_URL": f"http://127.0.0.1:{free_port()}"}).start()
    try:
        await agent.started()
        agent.send(signal.SIGINT)
        assert await agent.exited() == 0
    finally:
        agent.kill()
    stopping = agent.logs("agent stopping")
    assert stopping and stopping[0]["termination_report"]["reason"] == "signal"
    assert stopping[0]["termination_report"]["outcome"] == "emptied"
    for line in agent.logs():
        assert {"severity", "message", "time", "state", "reason"} <= set(line)
