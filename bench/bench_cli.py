"""`gpu-node-agent status` start-up: wall time of the whole command against a live agent,
next to `python -c pass` (the interpreter's own floor) and `curl -s /status` (what an SRE
would type instead), measured in the same run, interleaved, N times each.

    python -m bench.bench_cli [--runs 30]

The agent is a real `gpu-node-agent run`; the vLLM it watches is `python -m
agent.sim.vllm` in its own process, so nothing here shares a loop with the timings.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, AgentProcess, fmt_ms, machine_header, median, percentile, summary_line, until

TARGET_S = 0.150


def cli_command() -> list[str]:
    """The console script pip installed next to this interpreter, as a user runs it."""
    script = Path(sys.executable).parent / "gpu-node-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent"]


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, cwd=REPO, capture_output=True, timeout=30)
    took = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.decode()[-500:]}")
    return took


async def start_world(tmp: Path) -> tuple[subprocess.Popen[str], AgentProcess]:
    vllm = subprocess.Popen([sys.executable, "-m", "agent.sim.vllm", "--port", "0"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert vllm.stdout is not None
    line = vllm.stdout.readline()  # "... listening on http://127.0.0.1:PORT (...)"
    url = line.split("listening on ", 1)[1].split()[0]
    agent = AgentProcess(tmp, {"GPU_AGENT_INFERENCE__BASE_URL": url}).start()
    await agent.started()
    return vllm, agent


def measure(agent_url: str, runs: int) -> dict[str, list[float]]:
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "gpu-node-agent status": [*cli_command(), "status", "--url", agent_url],
    }
    curl = shutil.which("curl")
    if curl:
        commands["curl -s /status"] = [curl, "-s", "-f", f"{agent_url}/status"]
    times: dict[str, list[float]] = {name: [] for name in commands}
    for argv in commands.values():
        timed(argv)  # warm the page cache once; not counted
    for _ in range(runs):  # interleaved, so a noisy moment hits all three alike
        for name, argv in commands.items():
            times[name].append(timed(argv))
    return times


async def run(runs: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        vllm, agent = await start_world(Path(tmp))
        try:
            await until(lambda: agent.logs("state WARMING -> READY") or agent.proc.poll() is not None, 20, 0.05, "READY")
            return await asyncio.to_thread(measure, agent.url, runs)
        finally:
            agent.kill()
            vllm.terminate()
            vllm.wait(timeout=10)
            if vllm.stdout is not None:
                vllm.stdout.close()


def report(times: dict[str, list[float]], runs: int) -> str:
    status = times["gpu-node-agent status"]
    rows = [f"| `{name}` | {fmt_ms(median(t))} | {fmt_ms(percentile(t, 0.9))} |" for name, t in times.items()]
    if "curl -s /status" not in times:
        rows.append("| `curl -s /status` | absent (no curl on PATH: apt-get install curl) | |")
    floor = median(times["python -c pass"])
    return "\n".join(
        [
            f"### CLI start-up: `gpu-node-agent status` wall time ({runs} runs each, interleaved)",
            "",
            f"`python -m bench.bench_cli --runs {runs}` — {machine_header()}",
            "",
            "| command | median | p90 |",
            "|---|---|---|",
            *rows,
            "",
            f"`status` costs {fmt_ms(median(status) - floor)} over a bare interpreter (median); target: median <= {TARGET_S * 1000:.0f} ms.",
            summary_line(
                f"`gpu-node-agent status` wall time, median of {runs} (python -c pass {fmt_ms(floor)})",
                f"{fmt_ms(median(status))}",
                f"<= {TARGET_S * 1000:.0f} ms",
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    print(report(asyncio.run(run(args.runs)), args.runs))


if __name__ == "__main__":
    main()
