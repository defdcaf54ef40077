"""The host probe on this machine: CPU, memory, our RSS, and the inference
server found by pid file or by name (real child processes)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from probes.host import HostProbe, cpu_percent_between, matches_process
from tests.harness import until

Times = namedtuple("Times", "user nice system idle iowait irq softirq steal guest guest_nice")

# The fake server: a Python script whose file name carries the marker; with
# "spawn" it starts a copy of itself (like vLLM's engine process) and sleeps.
_SERVER = """
import subprocess, sys, time
if sys.argv[1:] == ["spawn"]:
    subprocess.Popen([sys.executable, __file__])
time.sleep(30)
"""



@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    marker = f"fake-vllm-{uuid.uuid4().hex[:8]}"
    script = tmp_path / f"{marker}.py"
    script.write_text(_SERVER)
    proc = subprocess.Popen([sys.executable, str(script), "spawn"])
    yield proc, marker
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.wait(timeout=5)


@pytest.mark.parametrize(
    ("before", "after", "percent"),
    [
        (Times(0, 0, 0, 0, 0, 0, 0, 0, 0, 0), Times(50, 0, 0, 50, 0, 0, 0, 0, 0, 0), 50.0),
        (Times(0, 0, 0, 0, 0, 0, 0, 0, 0, 0), Times(10, 0, 10, 60, 20, 0, 0, 0, 0, 0), 20.0),  # iowait is idle
        (Times(0, 0, 0, 0, 0, 0, 0, 0, 0, 0), Times(40, 0, 0, 60, 0, 0, 0, 0, 30, 0), 40.0),  # guest is inside user
        (Times(5, 0, 0, 5, 0, 0, 0, 0, 0, 0), Times(5, 0, 0, 5, 0, 0, 0, 0, 0, 0), 0.0),  # no time passed
        (Times(9, 0, 0, 0, 0, 0, 0, 0, 0, 0), Times(0, 0, 0, 10, 0, 0, 0, 0, 0, 0), 0.0),  # a counter went backwards
    ],
)
def test_cpu_percent_is_the_busy_share_of_the_interval(before, after, percent: float) -> None:
    assert cpu_percent_between(before, after) == percent


@pytest.mark.parametrize(
    ("name", "cmdline", "matched"),
    [
        ("vllm", ["/usr/local/bin/vllm", "serve", "Qwen/Qwen3-8B"], True),
        ("python3", ["python3", "-m", "vllm.entrypoints.openai.api_server"], True),
        ("python3", ["/opt/venv/bin/python3", "/opt/venv/bin/vllm", "serve", "m"], True),
        ("VLLM::EngineCore", [], True),
        ("tail", ["tail", "-f", "/var/log/vllm.log"], False),
        ("python3", ["python3", "server.py", "--served-model-name", "vllm"], False),
    ],
)
def test_inference_server_is_matched_by_name_program_or_module(name: str, cmdline: list[str], matched: bool) -> None:
    assert matches_process("vllm", name, cmdline) is matched


async def test_host_probe_reads_sane_values_on_this_machine() -> None:
    probe = HostProbe(process_name=f"no-such-process-{uuid.uuid4().hex[:8]}")
    first = await probe.sample()
    second = await probe.sample()
    for reading in (first, second):
        assert 0.0 <= reading.cpu_percent <= 100.0
        assert 0 < reading.memory_used_bytes <= reading.memory_total_bytes
        assert 0.0 < reading.memory_percent < 100.0
        assert 10 * 2**20 < reading.agent_rss_bytes < reading.memory_total_bytes
    assert abs(second.agent_rss_bytes - psutil.Process().memory_info().rss) < 64 * 2**20
    assert second.inference_rss_bytes is None and second.inference_pid is None
    assert "no process matches" in second.inference_note


async def test_finds_the_inference_server_by_pid_file(tmp_path: Path, server) -> None:
    proc, _ = server
    pid_file = tmp_path / "vllm.pid"
    pid_file.write_text(f"{proc.pid}\n")
    reading = await HostProbe(pid_file=pid_file).sample()
    assert reading.inference_pid == proc.pid
    assert reading.inference_rss_bytes is not None and reading.inference_rss_bytes > 1 * 2**20
    assert f"from {pid_file}" in reading.inference_note


async def test_finds_the_server_by_name_and_sums_its_process_tree(server) -> None:
    proc, marker = server
    await until(lambda: len(psutil.Process(proc.pid).children()) == 1)
    reading = await HostProbe(process_name=marker).sample()
    assert reading.inference_pid == proc.pid  # the parent, not its matching child
    assert reading.inference_processes == 2
    own = psutil.Process(proc.pid).memory_info().rss
    assert reading.inference_rss_bytes is not None and reading.inference_rss_bytes > own
    assert marker in reading.inference_note


def _pid_of_a_finished_process() -> int:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait(timeout=5)
    return finished.pid


@pytest.mark.parametrize(
    ("content", "note"),
    [(None, "No such file"), ("garbage", "not a pid"), ("dead", "is not running")],
)
async def test_a_bad_pid_file_says_why(tmp_path: Path, content: str | None, note: str) -> None:
    pid_file = tmp_path / "vllm.pid"
    if content == "dead":
        content = str(_pid_of_a_finished_process())
    if content is not None:
        pid_file.write_text(content)
    reading = await HostProbe(pid_file=pid_file).sample()
    assert reading.inference_pid is None and reading.inference_rss_bytes is None
    assert note in reading.inference_note
