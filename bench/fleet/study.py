"""The traces the study runs and the request stream of each run: the sample rate
traces of bench/traces (in cohorts of 3 requests: a cost knob, see requests.py), and
the Azure LLM inference trace 2023 read from its directory as conv, code and mixed
(each part scaled by `scale`, the hour tiled `tiles` times). Streams are built per run;
the Azure traces once per process."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from bench.fleet.fidelity import Fidelity
from bench.fleet.node_model import ServingParams
from bench.fleet.requests import RateStream, RequestStream, RequestTrace, load_azure, scale, superpose, tile
from bench.fleet.trace import load_trace

AZURE_FILES = {"conv": "AzureLLMInferenceTrace_conv.csv", "code": "AzureLLMInferenceTrace_code.csv"}
AZURE_TRACES = {"azure_conv": ("conv",), "azure_code": ("code",), "azure_mixed": ("conv", "code")}
RATE_COHORT = 3  # requests per simulated arrival on the day-long sample traces (run time)


@dataclass(frozen=True, slots=True)
class TraceSpec:
    name: str
    kind: str  # "rate" (a t_s,rps CSV) or "azure" (per-request CSVs)
    path: Path
    parts: tuple[str, ...] = ()
    scale: float = 1.0
    tiles: int = 1


def rate_specs(paths: list[Path]) -> list[TraceSpec]:
    return [TraceSpec(p.stem, "rate", p) for p in paths]


def azure_specs(directory: Path, factor: float, tiles: int) -> list[TraceSpec]:
    """The three Azure traces, or none when the files are not there."""
    if not all((directory / f).is_file() for f in AZURE_FILES.values()):
        return []
    return [TraceSpec(name, "azure", directory, parts, factor, tiles) for name, parts in AZURE_TRACES.items()]


@functools.lru_cache(maxsize=4)
def azure_trace(spec: TraceSpec, seed: int) -> RequestTrace:
    parts = [scale(load_azure(spec.path / AZURE_FILES[part]), spec.scale, seed=seed) for part in spec.parts]
    return tile(superpose(spec.name, *parts), spec.tiles)


def stream_for(spec: TraceSpec, fidelity: Fidelity, seed: int, hours: float | None) -> RequestStream | RateStream:
    if spec.kind == "azure":
        stream: RequestStream | RateStream = RequestStream(azure_trace(spec, seed), sizes=fidelity.sizes)
    else:
        serving = ServingParams()
        stream = RateStream(load_trace(spec.path), (serving.prompt_tokens, serving.output_tokens), seed=seed,
                            sizes=fidelity.sizes, cohort=RATE_COHORT)
    if hours is not None:
        stream.duration_s = min(stream.duration_s, hours * 3600.0)
    return stream
