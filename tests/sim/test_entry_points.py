"""`python -m agent.sim.vllm` and `python -m agent.sim.metadata` (the README's "Try it by
hand"): each runs as its own process, prints its URL, serves the real protocol on
loopback, logs what happens, and stops cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time

import aiohttp
import pytest

from tests.harness import REPO, reap, until


class Launched:
    """A fake started with `python -m MODULE ARGS`; its stdout lines are collected."""

    def __init__(self, module: str, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def logged(self, pattern: str) -> re.Match[str] | None:
        return next((m for m in (re.search(pattern, line) for line in list(self.lines)) if m), None)

    async def url(self) -> str:
        found = await until(lambda: self.logged(r"listening on (http://127\.0\.0\.1:\d+\S*)") or self.proc.poll() is not None,
                            15, 0.05, "the URL line")
        assert self.proc.poll() is None, "\n".join(self.lines)
        return found.group(1)

    async def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        await until(lambda: self.proc.poll() is not None, 10, 0.05, "exit")
        self._reader.join(timeout=5)
        return self.proc.returncode

    def kill(self) -> None:
        reap(self.proc, self._reader)


@pytest.fixture
def launched():
    started: list[Launched] = []

    def start(module: str, *args: str) -> Launched:
        started.append(Launched(module, *args))
        return started[-1]

    yield start
    for fake in started:
        fake.kill()


async def test_fake_vllm_serves_health_metrics_and_slow_completions(launched, session: aiohttp.ClientSession) -> None:
    fake = launched("agent.sim.vllm", "--port", "0", "--engines", "2", "--latency", "0.5")
    url = await fake.url()
    async with session.get(f"{url}/health") as resp:
        assert resp.status == 200
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    assert 'vllm:num_requests_running{engine="1",model_name="fake/llama-3-8b"}' in text
    started = time.monotonic()
    async with session.post(f"{url}/v1/completions", json={"prompt": "hello"}) as resp:
        assert resp.status == 200 and (await resp.json())["object"] == "text_completion"
    assert time.monotonic() - started >= 0.45  # --latency: in-flight work lasts long enough to watch
    await until(lambda: fake.logged(r"0 request\(s\) in flight \(1 received so far\)"), 5, 0.05, "the in-flight log line")
    assert fake.logged(r"first /health check")
    assert await fake.stop(signal.SIGINT) == 0
    assert fake.lines[-1].endswith("fake-vllm: stopped")


async def test_fake_metadata_serves_the_protocol_and_preempts_on_time(launched, session: aiohttp.ClientSession) -> None:
    fake = launched("agent.sim.metadata", "--port", "0", "--preempt-after", "1")
    url = await fake.url()
    host = fake.logged(r"GCE_METADATA_HOST=(127\.0\.0\.1:\d+)").group(1)
    assert url == f"http://{host}/computeMetadata/v1/"
    flavor = {"Metadata-Flavor": "Google"}
    async with session.get(f"{url}instance/preempted") as resp:
        assert resp.status == 403  # without the header, like the real server
    async with session.get(f"{url}instance/preempted", headers=flavor) as resp:
        assert (resp.status, await resp.text()) == (200, "FALSE")

    async def preempted() -> bool:
        async with session.get(f"{url}instance/preempted", headers=flavor) as resp:
            return await resp.text() == "TRUE"

    await until(preempted, 5, 0.05, "instance/preempted = TRUE")
    assert fake.logged(r"instance/preempted = TRUE: Spot preemption notice issued")
    assert await fake.stop(signal.SIGTERM) == 0


async def test_fake_metadata_preempts_on_sigusr1(launched, session: aiohttp.ClientSession) -> None:
    fake = launched("agent.sim.metadata", "--port", "0")
    url = await fake.url()
    fake.proc.send_signal(signal.SIGUSR1)

    async def preempted() -> bool:
        async with session.get(f"{url}instance/preempted", headers={"Metadata-Flavor": "Google"}) as resp:
            return await resp.text() == "TRUE"

    await until(preempted, 5, 0.05, "instance/preempted = TRUE after SIGUSR1")
    assert await fake.stop(signal.SIGINT) == 0
