"""The C load driver (bench/loadgen.c) from Python: compiled with `gcc -O2` into
bench/.build/ when missing or stale, run as its own process, its JSON parsed.

    python -m bench.loadgen http://127.0.0.1:PORT/readyz [--rate 2000] [--seconds 5] [--connections 8]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

SOURCE = Path(__file__).resolve().parent / "loadgen.c"
BUILD_DIR = SOURCE.parent / ".build"


class LoadgenUnavailable(RuntimeError):
    """No C compiler, or the driver did not build."""


@dataclasses.dataclass(frozen=True, slots=True)
class LoadResult:
    """One run of the driver. Latencies (ms, from each request's due time) are over
    the `count` complete answers of any status; `ok` are the 2xx ones."""

    requests: int
    count: int
    ok: int
    errors: int
    errors_by: dict[str, int]
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    p999_ms: float | None
    max_ms: float | None
    send_lag_p99_ms: float | None  # the driver's own lateness: due and a connection free -> sent
    retried: int = 0  # sent again on a new connection: the reused one had been closed by the server
    latencies_ms: tuple[float, ...] = ()  # every complete answer's, sorted: only when drive(keep_latencies=True)

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @classmethod
    def from_json(cls, text: str) -> LoadResult:
        raw = json.loads(text)
        return cls(
            raw["requests"], raw["count"], raw["ok"], raw["errors"], raw["errors_by"],
            raw["p50"], raw["p90"], raw["p99"], raw["p999"], raw["max"], raw["send_lag_p99"], raw["retried"],
        )


def binary() -> Path:
    """The compiled driver, named after a hash of its source so an edit rebuilds it."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    target = BUILD_DIR / f"loadgen-{digest}"
    if target.exists():
        return target
    gcc = shutil.which("gcc")
    if gcc is None:
        raise LoadgenUnavailable("gcc is not on PATH: the C load driver cannot be built")
    BUILD_DIR.mkdir(exist_ok=True)
    partial = BUILD_DIR / f".{target.name}.{os.getpid()}"  # renamed into place: concurrent builds are safe
    proc = subprocess.run([gcc, "-O2", "-Wall", "-o", str(partial), str(SOURCE)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LoadgenUnavailable(f"gcc failed on {SOURCE}:\n{proc.stderr}")
    partial.replace(target)
    return target


def argv(url: str, rate_per_s: float, duration_s: float, connections: int, timeout_s: float, latencies_path: str = "") -> list[str]:
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"need http://HOST:PORT/PATH, got {url}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return [
        str(binary()),
        parts.hostname,
        str(parts.port),
        path,
        f"{rate_per_s:g}",
        f"{duration_s:g}",
        str(connections),
        f"{timeout_s:g}",
        *([latencies_path] if latencies_path else []),
    ]


async def drive(
    url: str, rate_per_s: float, duration_s: float, connections: int = 8, timeout_s: float = 5.0, keep_latencies: bool = False
) -> LoadResult:
    """Open-loop GETs at `rate_per_s` for `duration_s`; the event loop stays free meanwhile.
    `keep_latencies`: the result carries every latency, to pool several runs."""
    with tempfile.TemporaryDirectory() as tmp:
        latencies_path = str(Path(tmp) / "latencies") if keep_latencies else ""
        proc = await asyncio.create_subprocess_exec(
            *argv(url, rate_per_s, duration_s, connections, timeout_s, latencies_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            out, err = await proc.communicate()
        finally:
            if proc.returncode is None:  # cancelled: do not leave the driver running
                proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"loadgen exited {proc.returncode}: {err.decode(errors='replace')}")
        result = LoadResult.from_json(out.decode())
        if keep_latencies:
            latencies = tuple(float(line) for line in Path(latencies_path).read_text().split())
            result = dataclasses.replace(result, latencies_ms=latencies)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, default=2000)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    result = asyncio.run(drive(args.url, args.rate, args.seconds, args.connections, args.timeout))
    print(json.dumps(dataclasses.asdict(result)))


if __name__ == "__main__":
    main()
