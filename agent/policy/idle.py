"""Idle watchdog: a READY node with nothing running or waiting and no tokens
generated for `idle.after_s` drains with reason idle, then runs `idle.action`
(e.g. powering the VM off) so nobody pays for idle GPUs. Off when after_s is 0."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from agent.config import DrainConfig, IdleConfig
from agent.core.snapshot import Snapshot
from agent.policy.requests import DrainDesk, DrainRequest
from probes.vllm import VLLM
from state_machine import DrainReason, Source, State

log = logging.getLogger(__name__)

_CHECK_S = 1.0
_ACTION_TIMEOUT_S = 120.0


def is_idle(vllm: Any) -> bool:
    """Pure: nothing running or waiting and no tokens generated in the window."""
    if vllm is None:
        return False  # unknown is not idle
    tokens = vllm.generation_tokens_per_s
    return vllm.in_flight == 0 and (tokens is None or tokens == 0)


class IdleWatchdog:
    def __init__(
        self,
        drains: DrainDesk,
        snapshot: Snapshot,
        cfg: IdleConfig,
        drain_cfg: DrainConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._drains = drains
        self._lifecycle = drains.lifecycle
        self._snapshot = snapshot
        self._cfg = cfg
        self._drain_cfg = drain_cfg
        self._clock = clock
        self.idle_since: float | None = None
        self.action_result: dict[str, Any] | None = None

    def check(self) -> bool:
        """One look at the snapshot; True when it started the idle drain."""
        now = self._clock()
        if self._lifecycle.state is not State.READY or not is_idle(self._snapshot.value(VLLM)):
            self.idle_since = None
            return False
        if self.idle_since is None:
            self.idle_since = now
        if now - self.idle_since < self._cfg.after_s:
            return False
        return self._drains.request(
            DrainRequest(
                DrainReason.IDLE,
                source=Source.IDLE_WATCHDOG,
                deadline_s=self._drain_cfg.timeout_s,
                detail=f"no requests and no tokens for {self._cfg.after_s:g}s",
            )
        )

    async def run(self) -> None:
        """Watch until the idle drain ends, then run the action once; returns when done
        (or at once when disabled): run it as a task that may finish."""
        if self._cfg.after_s <= 0:
            return
        while self._lifecycle.state is not State.TERMINATED or not self._idle_drain():
            self.check()
            await asyncio.sleep(_CHECK_S)
        await self._run_action()

    def _idle_drain(self) -> bool:
        drain = self._lifecycle.drain
        return drain is not None and drain.reason is DrainReason.IDLE

    async def _run_action(self) -> None:
        if not self._cfg.action:
            log.info("idle drain finished; no idle.action configured")
            return
        log.warning("idle drain finished; running idle.action", extra={"action": self._cfg.action})
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._cfg.action, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
        except OSError as exc:
            self.action_result = {"returncode": None, "output": f"cannot start: {exc}"}
        else:
            try:
                async with asyncio.timeout(_ACTION_TIMEOUT_S):
                    output, _ = await proc.communicate()
                self.action_result = {"returncode": proc.returncode, "output": output.decode(errors="replace")[-2000:]}
            except TimeoutError:
                proc.kill()
                await proc.wait()
                self.action_result = {"returncode": None, "output": f"killed after {_ACTION_TIMEOUT_S:g}s"}
        level = logging.INFO if self.action_result["returncode"] == 0 else logging.ERROR
        log.log(level, "idle.action finished", extra={"result": self.action_result})
