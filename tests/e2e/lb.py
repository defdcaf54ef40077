"""A load-balancer stand-in: health-checks the agent's /readyz like a real LB
(interval, unhealthy/healthy thresholds) and sends completions to vLLM only while
it holds the node healthy. It records every request it admitted and how it ended."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass, field

import aiohttp


@dataclass
class Outcomes:
    admitted: int = 0
    completed: int = 0
    failed: int = 0
    admitted_while_unhealthy: int = 0
    last_completion_at: float = 0.0
    completion_times: list[float] = field(default_factory=list)  # monotonic, one per completed request
    healthy_changes: list[tuple[float, bool]] = field(default_factory=list)


class LoadBalancer:
    def __init__(
        self,
        readyz_url: str,
        backend_url: str,
        *,
        interval_s: float = 0.1,
        unhealthy_threshold: int = 2,
        healthy_threshold: int = 2,
        rate_rps: float = 20.0,
        max_requests: int = 5000,
    ) -> None:
        self.readyz_url = readyz_url
        self.backend_url = backend_url
        self.interval_s = interval_s
        self.unhealthy_threshold = unhealthy_threshold
        self.healthy_threshold = healthy_threshold
        self.rate_rps = rate_rps
        self.max_requests = max_requests
        self.healthy = False
        self.out = Outcomes()
        self._streak = 0
        self._requests: set[asyncio.Task[None]] = set()

    async def run(self, duration_s: float) -> Outcomes:
        """Health-check and send traffic for `duration_s`, then wait for what is in flight."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            deadline = time.monotonic() + duration_s
            checker = asyncio.create_task(self._check_forever(session))
            try:
                while time.monotonic() < deadline and self.out.admitted < self.max_requests:
                    if self.healthy:
                        self._send(session)
                    await asyncio.sleep(1 / self.rate_rps)
            finally:
                checker.cancel()
                await asyncio.gather(checker, return_exceptions=True)
                await asyncio.gather(*self._requests, return_exceptions=True)
        self._record()
        return self.out

    def _record(self) -> None:
        """bench/bench_scenarios.py collects every scenario's outcome through this file."""
        path = os.environ.get("E2E_OUTCOMES_FILE")
        if path:
            scenario = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
            with open(path, "a") as fh:
                fh.write(json.dumps({"scenario": scenario, **asdict(self.out)}) + "\n")

    async def _check_forever(self, session: aiohttp.ClientSession) -> None:
        while True:
            try:
                async with session.get(self.readyz_url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    ok = resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            self._observe(ok)
            await asyncio.sleep(self.interval_s)

    def _observe(self, ok: bool) -> None:
        self._streak = self._streak + 1 if ok != self.healthy else 0
        threshold = self.healthy_threshold if ok else self.unhealthy_threshold
        if ok != self.healthy and self._streak >= threshold:
            self.healthy = ok
            self._streak = 0
            self.out.healthy_changes.append((time.monotonic(), ok))

    def _send(self, session: aiohttp.ClientSession) -> None:
        self.out.admitted += 1
        if not self.healthy:
            self.out.admitted_while_unhealthy += 1
        task = asyncio.create_task(self._complete(session))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def _complete(self, session: aiohttp.ClientSession) -> None:
        body = {"model": "fake/llama-3-8b", "prompt": "hello", "max_tokens": 16}
        try:
            async with session.post(f"{self.backend_url}/v1/completions", json=body) as resp:
                await resp.read()
                ok = resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        if ok:
            self.out.completed += 1
            self.out.last_completion_at = time.monotonic()
            self.out.completion_times.append(self.out.last_completion_at)
        else:
            self.out.failed += 1
