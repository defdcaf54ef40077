"""The aiohttp application: /healthz, /readyz, /status, /metrics, POST /drain, POST /resume.

Handlers only read the lifecycle and the node (through `AgentControl`); none
of them awaits a probe, so probes stay fast whatever the collectors are doing.
"""

from __future__ import annotations

import json
import math
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from service.auth import AdminAuth
from state_machine import Lifecycle, ResumeRefused, State

_MAX_ADMIN_BODY_BYTES = 16 * 1024
_MAX_REASON_CHARS = 200
_DRAIN_FIELDS = frozenset({"reason", "wait", "timeout"})


class AgentControl(Protocol):
    """What the service needs from the daemon."""

    lifecycle: Lifecycle
    registry: CollectorRegistry

    def status(self) -> dict[str, Any]: ...

    def broken(self) -> list[str]: ...

    async def admin_drain(self, reason: str) -> bool: ...

    async def admin_resume(self) -> None: ...

    async def wait_drained(self, timeout_s: float) -> bool: ...

    def persistence_warning(self) -> str | None: ...


CONTROL = web.AppKey("control", AgentControl)
AUTH = web.AppKey("auth", AdminAuth)


def build_app(control: AgentControl, auth: AdminAuth) -> web.Application:
    app = web.Application(client_max_size=_MAX_ADMIN_BODY_BYTES)
    app[CONTROL] = control
    app[AUTH] = auth
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/drain", drain)
    app.router.add_post("/resume", resume)
    return app


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, default=str, allow_nan=False),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def healthz(request: web.Request) -> web.Response:
    broken = request.app[CONTROL].broken()
    if broken:
        return _json({"status": "broken", "failing_tasks": broken}, status=503)
    return _json({"status": "ok", "state": request.app[CONTROL].lifecycle.state.value})


async def readyz(request: web.Request) -> web.Response:
    lifecycle = request.app[CONTROL].lifecycle
    state = lifecycle.state
    if state is State.READY:
        return _json({"state": state.value, "ready": True})
    return _json({"state": state.value, "ready": False, "reason": lifecycle.reason}, status=503)


async def status(request: web.Request) -> web.Response:
    return _json(_finite(request.app[CONTROL].status()))


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[CONTROL].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def drain(request: web.Request) -> web.Response:
    await request.app[AUTH].check(request)
    params = await _admin_params(request, _DRAIN_FIELDS)
    control = request.app[CONTROL]
    reason = params.get("reason", "admin drain")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > _MAX_REASON_CHARS:
        raise _bad_request(f"reason must be a non-empty string of at most {_MAX_REASON_CHARS} characters")
    wait = _as_bool(params.get("wait", False), "wait")
    timeout_s = _as_seconds(params.get("timeout", 300), "timeout")
    if control.lifecycle.state is State.TERMINATED:
        return _json({"error": "the node is terminated", **_drain_view(control)}, status=409)
    started = await control.admin_drain(reason.strip())
    if not wait:
        return _json({"accepted": True, "started": started, **_drain_view(control)}, status=202)
    done = await control.wait_drained(timeout_s)
    if not done:
        return _json({"error": f"not drained within {timeout_s:g}s", **_drain_view(control)}, status=504)
    return _json({"drained": True, "started": started, **_drain_view(control)}, status=200)


async def resume(request: web.Request) -> web.Response:
    await request.app[AUTH].check(request)
    await _admin_params(request, frozenset())
    control = request.app[CONTROL]
    try:
        await control.admin_resume()
    except ResumeRefused as exc:
        return _json({"error": str(exc), **_drain_view(control)}, status=409)
    return _json({"resumed": True, **_drain_view(control)})


def _drain_view(control: AgentControl) -> dict[str, Any]:
    lifecycle = control.lifecycle
    drain = lifecycle.drain
    warning = control.persistence_warning()
    return {
        "state": lifecycle.state.value,
        "reason": lifecycle.reason,
        "drain": None if drain is None else {"reason": drain.reason.value, "drained": drain.drained, "detail": drain.detail},
        # A drain the disk does not hold is lost at the next agent restart: the caller must know.
        "persisted": warning is None,
        **({"warning": warning} if warning else {}),
    }


async def _admin_params(request: web.Request, fields: frozenset[str]) -> dict[str, Any]:
    """Admin calls take a JSON object body (Content-Type application/json), query
    parameters, or nothing; anything else is refused with the reason."""
    unknown = set(request.query) - fields
    if unknown:
        raise _bad_request(f"unknown query parameter(s): {', '.join(sorted(unknown))}")
    params: dict[str, Any] = dict(request.query)
    raw = await request.read() if request.can_read_body else b""
    if not raw.strip():
        return params  # no body (or an empty one) is fine whatever its type says
    if request.content_type != "application/json":
        raise _error(web.HTTPUnsupportedMediaType, f"a body must be application/json, not {request.content_type}")
    try:
        body = json.loads(raw.decode(request.charset or "utf-8"))
    except LookupError:
        raise _bad_request(f"unknown charset {request.charset!r}") from None
    except (ValueError, RecursionError):  # bad JSON, bad bytes for the charset, nesting bombs
        raise _bad_request("body must be a JSON object") from None
    if not isinstance(body, dict):
        raise _bad_request("body must be a JSON object")
    unknown = set(body) - fields
    if unknown:
        raise _bad_request(f"unknown field(s): {', '.join(sorted(unknown))}")
    params.update(body)
    return params


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
        return value.lower() in ("1", "true", "yes")
    raise _bad_request(f"{name} must be true or false, not {value!r}")


def _as_seconds(value: Any, name: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer like 10**400
        raise _bad_request(f"{name} must be a number of seconds, not {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(seconds) or not 0 < seconds <= 86_400:
        raise _bad_request(f"{name} must be between 0 and 86400 seconds, not {value!r}")
    return seconds


def _bad_request(reason: str) -> web.HTTPException:
    return _error(web.HTTPBadRequest, reason)


def _error(cls: type[web.HTTPException], reason: str) -> web.HTTPException:
    return cls(text=json.dumps({"error": reason}), content_type="application/json")


def _finite(value: Any) -> Any:
    """JSON has no NaN/Inf: a non-finite reading is shown as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
