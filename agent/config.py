"""The one configuration model (SPEC §3): defaults < TOML file < GPU_AGENT_ env.

Each component receives only its own section. Unknown keys and bad values raise
ConfigError naming the field and the value; the CLI turns that into exit code 2.
"""

from __future__ import annotations

import os
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "GPU_AGENT_"
DEFAULT_CONFIG_PATH = Path("/etc/gpu-node-agent/config.toml")


class ConfigError(Exception):
    """Bad configuration; the message names the field and the bad value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServiceConfig(_Section):
    host: str = "0.0.0.0"
    port: int = Field(8095, ge=0, le=65535)
    admin_token_file: Path | None = None
    state_dir: Path = Path("/var/lib/gpu-node-agent")
    shutdown_timeout_s: float = Field(2.0, gt=0, le=60)
    # Inbound connections held at once (also kept below the open-file limit); past it
    # the oldest idle connection is closed. Probes and scrapes need a handful.
    max_connections: int = Field(256, ge=8, le=65_536)
    keepalive_timeout_s: float = Field(5.0, gt=0, le=3600)  # idle keep-alive, and time to send a request head


class InferenceConfig(_Section):
    base_url: str = "http://127.0.0.1:8000"
    poll_interval_s: float = Field(1.0, gt=0, le=60)
    timeout_s: float = Field(3.0, gt=0, le=60)
    ready_after: int = Field(2, ge=1, le=100)
    lost_after: int = Field(3, ge=1, le=100)
    check_models: bool = True
    metrics_max_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    # A 4-engine vLLM serves ~1,400 lines. More than this is a label explosion: the
    # scrape is dropped (counted, too_large) instead of costing the agent seconds of CPU.
    metrics_max_lines: int = Field(20_000, ge=100)
    pid_file: Path | None = None
    process_name: str = "vllm"
    # vLLM exposes no KV-cache bytes gauge: give the capacity, or the per-token size, to get GB.
    kv_cache_capacity_bytes: float | None = Field(None, gt=0)
    kv_cache_bytes_per_token: float | None = Field(None, gt=0)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class ExportResource(StrEnum):
    AUTO = "auto"
    GCE_INSTANCE = "gce_instance"
    K8S_POD = "k8s_pod"
    GENERIC_NODE = "generic_node"


class ExportConfig(_Section):
    enabled: bool = True
    project_id: str | None = None
    interval_s: float = Field(60.0, ge=10, le=3600)
    endpoint: str | None = None
    insecure: bool = False
    resource: ExportResource = ExportResource.AUTO
    backlog_max_points: int = Field(10_000, ge=0)
    location: str | None = None
    node_id: str | None = None


class PreemptionConfig(_Section):
    enabled: Literal["auto", "true", "false"] = "auto"
    notice_budget_s: float = Field(30.0, gt=0, le=3600)
    metadata_host: str | None = None  # default: GCE_METADATA_HOST, else metadata.google.internal
    watch_timeout_s: int = Field(60, ge=1, le=3600)
    drain_on_migrate: bool = False
    maintenance_budget_s: float = Field(3600.0, gt=0)

    @field_validator("enabled", mode="before")
    @classmethod
    def _bool_text(cls, value: Any) -> Any:
        return str(value).lower() if isinstance(value, bool) else value


class DrainConfig(_Section):
    timeout_s: float = Field(300.0, gt=0, le=86_400)
    propagation_delay_s: float = Field(5.0, ge=0, le=600)
    settle_s: float = Field(2.0, ge=0, le=600)
    safety_margin_s: float = Field(5.0, ge=0, le=600)


class IdleConfig(_Section):
    after_s: float = Field(0.0, ge=0)
    action: list[str] | None = None  # argv run after an idle drain, e.g. ["systemctl", "poweroff"]


class SloConfig(_Section):
    ttft_ms: float = Field(2000.0, gt=0)
    tpot_ms: float = Field(100.0, gt=0)
    window_s: float = Field(60.0, ge=5, le=3600)  # sliding window for rates, quantiles and goodput


class AutoscalingConfig(_Section):
    """The node demand gauge (agent/demand.py): 1.0 = exactly at target. It calibrates
    itself from what vLLM reports; the hand targets are overrides, unset by default."""

    utilization_target: float = Field(0.6, gt=0, le=1)  # share of the node's saturation throughput
    queue_per_node: float | None = Field(None, gt=0)  # override: waiting requests per node at 1.0
    kv_usage_ratio: float | None = Field(None, gt=0, le=1)  # override: adds a KV-cache term
    ttft_p95_ms: float | None = Field(None, gt=0)  # default: slo.ttft_ms
    max_demand: float | None = Field(3.0, gt=0)
    # Overrides of what the gauge learns or assumes: vLLM's --max-num-seqs where the batch
    # limit binds before the KV cache; t0, the fixed cost of one engine iteration.
    max_num_seqs: int | None = Field(None, ge=1)
    iteration_floor_ms: float | None = Field(None, gt=0)


class GpuConfig(_Section):
    enabled: bool = True
    poll_interval_s: float = Field(1.0, gt=0, le=60)
    call_timeout_s: float = Field(2.0, gt=0, le=60)
    # XIDs whose action in NVIDIA's XID catalogue is a GPU reset, a machine/VM restart or
    # a hardware workflow (see probes/xid.py); application XIDs are never fatal.
    fatal_xids: list[int] = Field(
        default_factory=lambda: [46, 48, 62, 64, 74, 79, 95, 109, 110, 119, 120, 136, 140, 143, 151, 155, 156, 158]
    )
    drain_on_fault: bool = True


class HostConfig(_Section):
    poll_interval_s: float = Field(5.0, gt=0, le=300)


class LogFormat(StrEnum):
    JSON = "json"
    TEXT = "text"


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    format: LogFormat = LogFormat.JSON

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class AgentConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    service: ServiceConfig = ServiceConfig()
    inference: InferenceConfig = InferenceConfig()
    export: ExportConfig = ExportConfig()
    preemption: PreemptionConfig = PreemptionConfig()
    drain: DrainConfig = DrainConfig()
    idle: IdleConfig = IdleConfig()
    slo: SloConfig = SloConfig()
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    gpu: GpuConfig = GpuConfig()
    host: HostConfig = HostConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _drain_fits_budget(self) -> AgentConfig:
        if self.drain.safety_margin_s >= self.preemption.notice_budget_s:
            raise ValueError(
                f"drain.safety_margin_s ({self.drain.safety_margin_s:g}) must be below "
                f"preemption.notice_budget_s ({self.preemption.notice_budget_s:g})"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init (the TOML file's contents) is the lowest source after defaults; env wins.
        return (env_settings, init_settings)

    def redacted(self) -> dict[str, Any]:
        """The effective config as JSON-able data; secrets are file paths, never contents."""
        return self.model_dump(mode="json")


_SECTIONS = frozenset(AgentConfig.model_fields)


def load_config(path: Path | None = None, environ: dict[str, str] | None = None) -> AgentConfig:
    """Build the effective config; raises ConfigError with the field and value named."""
    environ = dict(os.environ if environ is None else environ)
    _reject_unknown_env(environ)
    file_data = _read_toml(path)
    try:
        return _build(file_data, environ)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, file_data, environ)) from None


def _build(file_data: dict[str, Any], environ: dict[str, str]) -> AgentConfig:
    saved = dict(os.environ)
    try:
        # pydantic-settings reads os.environ; give it exactly the environment we were handed.
        os.environ.clear()
        os.environ.update(environ)
        return AgentConfig(**file_data)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _read_toml(path: Path | None) -> dict[str, Any]:
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return {}
        path = DEFAULT_CONFIG_PATH
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror}") from None


def _reject_unknown_env(environ: dict[str, str]) -> None:
    for name in environ:
        if not name.upper().startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):]
        section = rest.split("__", 1)[0].lower()
        if "__" not in rest or section not in _SECTIONS:
            raise ConfigError(
                f"{name}={environ[name]!r}: unknown setting "
                f"(expected {ENV_PREFIX}<SECTION>__<KEY> with SECTION one of {', '.join(sorted(_SECTIONS))})"
            )


def _explain(exc: ValidationError, file_data: dict[str, Any], environ: dict[str, str]) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        field = ".".join(loc) or "config"
        value = err.get("input")
        env_name = ENV_PREFIX + "__".join(part.upper() for part in loc)
        origin = f" (from {env_name})" if any(k.upper() == env_name for k in environ) else ""
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{field}{shown}{origin}: {message}")
    return "invalid configuration: " + "; ".join(lines)
