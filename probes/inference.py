"""Inference server health: vLLM `/health` (and `/v1/models`), the signal for WARMING <-> READY.

An unhealthy server is a normal reading here (ok=False with a code), not a probe
error: the readiness policy counts consecutive results, and a down vLLM must not
slow the polling down through backoff.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import aiohttp

from agent.core.snapshot import Key
from probes.base import ProbeError
from probes.http import get_capped

# Enough for an OpenAI model list; a bigger answer is not vLLM.
_MAX_MODELS_BYTES = 1024 * 1024
# Once /v1/models has listed a model, /health alone says the server lives: the list is
# read again every this many polls, and at once after any failed /health (a restarted
# server must list its model again). Each HTTP call costs the event loop ~0.5 ms.
MODELS_EVERY_POLLS = 10


@dataclass(frozen=True, slots=True)
class HealthReading:
    ok: bool
    code: str  # ok, refused, timeout, http_<n>, connection, garbage, no_models
    detail: str
    latency_ms: float
    models: tuple[str, ...] = ()


INFERENCE: Key[HealthReading] = Key("inference")


class InferenceHealthProbe:
    """Probe "inference": one `/health` call (plus `/v1/models` when asked) per interval."""

    name = INFERENCE

    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        *,
        interval_s: float = 1.0,
        timeout_s: float = 3.0,
        check_models: bool = True,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._session = session
        self.interval_s = interval_s
        # The runner's deadline sits above ours so a slow vLLM yields a reading, not an error.
        self.timeout_s = timeout_s * 2 + 1
        self._call_timeout_s = timeout_s
        self._check_models = check_models
        self._models: tuple[str, ...] = ()
        self._models_due_in = 0  # polls until /v1/models is read again

    async def sample(self) -> HealthReading:
        started = time.perf_counter()
        code, detail, models = await self._check()
        return HealthReading(
            ok=code == "ok",
            code=code,
            detail=detail,
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
            models=models,
        )

    async def _check(self) -> tuple[str, str, tuple[str, ...]]:
        code, detail, _ = await self._get("/health")
        if code != "ok" or not self._check_models:
            self._models_due_in = 0
            return code, detail, ()
        if self._models and self._models_due_in > 0:
            self._models_due_in -= 1
            return "ok", "healthy", self._models
        code, detail, body = await self._get("/v1/models")
        self._models, self._models_due_in = (), 0
        if code != "ok":
            return code, f"/v1/models: {detail}", ()
        models = _model_ids(body)
        if models is None:
            return "garbage", "/v1/models: not an OpenAI model list", ()
        if not models:
            return "no_models", "/v1/models lists no model", ()
        self._models, self._models_due_in = models, MODELS_EVERY_POLLS - 1
        return "ok", "healthy", models

    async def _get(self, path: str) -> tuple[str, str, bytes]:
        try:
            body = await get_capped(
                self._session, self._base_url + path, what=path, timeout_s=self._call_timeout_s, max_bytes=_MAX_MODELS_BYTES
            )
        except ProbeError as exc:
            return exc.code, str(exc), b""
        return "ok", "healthy", body


def _model_ids(body: bytes) -> tuple[str, ...] | None:
    try:
        data = json.loads(body)
        return tuple(str(item["id"]) for item in data["data"])
    except (ValueError, KeyError, TypeError):
        return None
