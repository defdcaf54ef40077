"""The google-cloud-monitoring client: building it (plaintext to a fake, or with
default credentials), and reading its errors (status code, partial-failure
summary, an explanation an operator can act on)."""

from __future__ import annotations

import asyncio
from typing import Any

from agent.config import ExportConfig

RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
WRITE_SCOPE = "https://www.googleapis.com/auth/monitoring.write"
DEFAULT_ENDPOINT = "monitoring.googleapis.com:443"
_HINTS = {
    "PERMISSION_DENIED": (
        "the node's service account needs roles/monitoring.metricWriter on the project, "
        "and export.project_id must name an existing project"
    ),
    "NOT_FOUND": "check export.project_id",
    "UNAUTHENTICATED": "the credentials were refused: check the node's service account",
    "RESOURCE_EXHAUSTED": "Cloud Monitoring quota exhausted",
}


class ExportSetupError(Exception):
    """The client cannot be built (no credentials, no endpoint); the message says what to do."""


async def build_client(cfg: ExportConfig) -> Any:
    """A MetricServiceAsyncClient; call inside the running loop. `insecure`: plaintext
    gRPC to `endpoint` and no credentials. Otherwise application default credentials,
    looked up off the loop (on GCE that asks the metadata server)."""
    import google.auth
    import grpc
    from google.api_core.client_options import ClientOptions
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import monitoring_v3
    from google.cloud.monitoring_v3.services.metric_service.transports import (
        MetricServiceGrpcAsyncIOTransport,
    )

    if cfg.insecure:
        if not cfg.endpoint:
            raise ExportSetupError("export.insecure needs export.endpoint (host:port)")
        transport = MetricServiceGrpcAsyncIOTransport(channel=grpc.aio.insecure_channel(cfg.endpoint))
        return monitoring_v3.MetricServiceAsyncClient(transport=transport)
    try:
        credentials, _ = await asyncio.to_thread(google.auth.default, scopes=[WRITE_SCOPE])
    except DefaultCredentialsError as exc:
        raise ExportSetupError(
            f"no Google credentials: {exc} (run with a service account on GCE/GKE, set "
            "GOOGLE_APPLICATION_CREDENTIALS, or set export.enabled = false)"
        ) from None
    options = ClientOptions(api_endpoint=cfg.endpoint) if cfg.endpoint else None
    return monitoring_v3.MetricServiceAsyncClient(credentials=credentials, client_options=options)


def code_of(exc: BaseException | None) -> str:
    """The gRPC status name (UNAVAILABLE, ...), else the exception's type name."""
    status = getattr(exc, "grpc_status_code", None)
    return status.name if status is not None else type(exc).__name__


def message_of(exc: BaseException | None) -> str:
    return str(getattr(exc, "message", None) or exc)


def explain(what: str, project: str, exc: BaseException | None) -> str:
    code = code_of(exc)
    hint = _HINTS.get(code)
    return f"{what} in project {project!r} failed with {code}: {message_of(exc)}" + (f" ({hint})" if hint else "")


def partial_summary(exc: BaseException | None) -> Any:
    """The CreateTimeSeriesSummary a partial failure carries in its status details, or None."""
    from google.cloud import monitoring_v3

    summary_cls = monitoring_v3.CreateTimeSeriesSummary.pb()
    for detail in getattr(exc, "details", None) or ():
        if hasattr(detail, "Is") and detail.Is(summary_cls.DESCRIPTOR):
            summary = summary_cls()
            detail.Unpack(summary)
            return summary
    return None
