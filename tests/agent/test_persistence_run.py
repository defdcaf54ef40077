"""The persisted admin drain on a bad day, through a real `gpu-node-agent run`: state
files that cannot be used are moved aside (never deleted) and the agent still starts;
a drain that cannot be written is reported to the caller, retried until it lands,
and leaves no temp files behind."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from agent.sim.vllm import FakeVllm
from tests.harness import REPO, AgentProcess, get_json, post_json, status_is, until


async def start(tmp_path: Path, vllm: FakeVllm, state_dir: Path) -> AgentProcess:
    env = {"GPU_AGENT_INFERENCE__BASE_URL": vllm.url, "GPU_AGENT_SERVICE__STATE_DIR": str(state_dir)}
    return await AgentProcess(tmp_path, env).start().started()


def corrupt(path: Path) -> None:
    path.write_text('{"reason": "admin", "detail": "cordoned for a disk swap", "started_at')


def recursion(path: Path) -> None:
    path.write_text("[" * 100_000)  # json.loads raises RecursionError, not ValueError


def huge(path: Path) -> None:
    with open(path, "wb") as fh:
        fh.truncate(300 * 1024 * 1024)  # sparse: 300 MB that take no disk


def fifo(path: Path) -> None:
    os.mkfifo(path)  # opening it to read would block for ever


def directory(path: Path) -> None:
    path.mkdir()
    (path / "inside").write_text("evidence")


def wrong_shape(path: Path) -> None:
    path.write_text('{"reason": "holiday", "started_at_wall": "yesterday"}')


@pytest.mark.parametrize("make_bad", [corrupt, recursion, huge, fifo, directory, wrong_shape])
async def test_an_unusable_state_file_is_moved_aside_never_deleted_and_the_agent_still_starts(tmp_path, vllm, make_bad) -> None:
    state = tmp_path / "state"
    state.mkdir()
    bad = state / "drain.json"
    make_bad(bad)
    before = os.lstat(bad)
    agent = await start(tmp_path, vllm, state)
    try:
        async with aiohttp.ClientSession() as http:
            await until(lambda: status_is(http, f"{agent.url}/readyz", 200), 10)
            _, full = await get_json(http, f"{agent.url}/status")
            moved = [Path(p) for p in full["state_file"]["quarantined"]]
            assert len(moved) == 1 and moved[0].parent == state
            kept = os.lstat(moved[0])
            assert (stat.S_IFMT(kept.st_mode), kept.st_size, kept.st_ino) == (
                stat.S_IFMT(before.st_mode),
                before.st_size,
                before.st_ino,
            )
            assert full["state_file"]["persisted"] is True
            assert agent.logs("state file unusable; moved aside, starting without it")
            # A new drain is written where the bad file was, and survives a restart.
            code, body = await post_json(http, f"{agent.url}/drain", {"reason": "after the bad file"})
            assert code == 202 and body["persisted"] is True
        agent.kill()
        agent = await start(tmp_path, vllm, state)
        async with aiohttp.ClientSession() as http:
            _, full = await get_json(http, f"{agent.url}/status")
            assert full["state"] == "DRAINING" and full["drain"]["detail"] == "after the bad file"
        assert os.path.lexists(moved[0])  # still there: evidence is never cleaned up
    finally:
        agent.kill()


async def test_a_state_dir_that_cannot_be_written_is_reported_at_start_told_to_the_caller_and_retried(tmp_path, vllm) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the state dir's parent should be")  # ENOTDIR, even for root
    state = blocker / "state"
    agent = await start(tmp_path, vllm, state)
    try:
        assert agent.logs("state dir not writable: admin drains will not survive an agent restart")
        async with aiohttp.ClientSession() as http:
            _, full = await get_json(http, f"{agent.url}/status")
            assert full["state_file"]["writable"] is False
            code, body = await post_json(http, f"{agent.url}/drain", {"reason": "disk swap"})
            assert code == 202 and body["persisted"] is False
            assert "an agent restart would not restore it" in body["warning"]
            _, full = await get_json(http, f"{agent.url}/status")
            assert full["state_file"]["persisted"] is False and full["state_file"]["error"]
            cli = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "agent", "drain", "--url", agent.url, "--reason", "again"],
                capture_output=True,
                text=True,
                timeout=30,
                cwd=REPO,
            )
            assert cli.returncode == 0 and "not persisted" in cli.stderr, cli  # the CLI says so too
            blocker.unlink()  # the disk comes back: the retry must land without another call
            await until(lambda: (state / "drain.json").exists(), 10, 0.1, "the retried write")

            async def persisted() -> bool:
                return (await get_json(http, f"{agent.url}/status"))[1]["state_file"]["persisted"]

            await until(persisted, 5)
        agent.kill()
        agent = await start(tmp_path, vllm, state)
        async with aiohttp.ClientSession() as http:
            _, full = await get_json(http, f"{agent.url}/status")
            assert full["state"] == "DRAINING" and full["drain"]["detail"] == "disk swap"
    finally:
        agent.kill()


async def test_a_failed_write_leaves_no_temp_file_and_resume_is_reported_too(tmp_path, vllm) -> None:
    state = tmp_path / "state"
    agent = await start(tmp_path, vllm, state)
    try:
        async with aiohttp.ClientSession() as http:
            await until(lambda: status_is(http, f"{agent.url}/readyz", 200), 10)
            (state / "drain.json").mkdir()  # the rename onto it fails after the temp file was written
            code, body = await post_json(http, f"{agent.url}/drain", {"reason": "x"})
            assert code == 202 and body["persisted"] is False
            # No .tmp left behind (the retries write one for a moment, then remove it).
            await until(lambda: sorted(p.name for p in state.iterdir()) == ["drain.json"], 3, 0.005, "no temp file left")
            shutil.rmtree(state / "drain.json")
            await until(lambda: (state / "drain.json").is_file(), 10, 0.1, "the retried write")
            (state / "drain.json").unlink()
            (state / "drain.json").mkdir()  # now resume cannot clear it... (rmdir is not unlink)
            (state / "drain.json" / "keep").write_text("")
            code, body = await post_json(http, f"{agent.url}/resume", {})
            assert code == 200 and body["persisted"] is False and "warning" in body
    finally:
        agent.kill()
