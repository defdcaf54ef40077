"""The metadata source whole (probes/metadata/source.py), with the preemption policy on a
real Lifecycle as its listener, against the fake metadata server over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from agent.config import DrainConfig, PreemptionConfig
from agent.core.snapshot import Snapshot
from agent.policy.preemption import PreemptionPolicy
from agent.policy.requests import DrainDesk
from agent.sim.metadata import FakeMetadataServer
from probes.metadata import IDENTITY_KEY, WATCH_KEY, MetadataClient, MetadataPresence, MetadataWatch
from state_machine import DrainReason, Lifecycle, State
from tests.agent.policy.test_preemption import FAST, MIGRATE, TERMINATE, deadline_in_s, drains, ready
from tests.harness import until


@contextlib.asynccontextmanager
async def watching(
    base_url: str, session: aiohttp.ClientSession, lifecycle: Lifecycle, identity_wanted: bool = False, **cfg: Any
):
    snapshot = Snapshot()
    preemption = PreemptionConfig(**cfg)
    policy = PreemptionPolicy(DrainDesk(lifecycle), preemption, DrainConfig())
    client = MetadataClient(base_url, session, timeout_s=1, wait_slack_s=0.5)
    watch = MetadataWatch(client, snapshot, policy, preemption, tuning=FAST, identity_wanted=identity_wanted)
    task = asyncio.create_task(watch.run())
    try:
        yield watch, snapshot, policy
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # anything else the watch raised fails the test


def closed_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/computeMetadata/v1/"


async def test_preemption_over_the_wire_drains_at_once(metadata_server, session) -> None:
    lifecycle = ready()
    async with watching(metadata_server.url, session, lifecycle) as (_, snapshot, _):
        await until(lambda: metadata_server.parked("instance/preempted") == 1, 2)
        assert lifecycle.state is State.READY and snapshot.value("metadata.preempted") is False
        notice_at = time.monotonic()
        await metadata_server.set("instance/preempted", "TRUE")
        await until(lambda: lifecycle.state is State.DRAINING, 1)
        assert time.monotonic() - notice_at < 0.5
    assert lifecycle.drain.reason is DrainReason.PREEMPTION and 24 <= deadline_in_s(lifecycle) <= 25
    assert snapshot.value(WATCH_KEY)["watching"] == ["instance/preempted", "instance/upcoming-maintenance",
                                                      "instance/maintenance-event"]  # fmt: skip


async def test_agent_started_on_a_preempted_node_never_becomes_ready(session) -> None:
    fake = FakeMetadataServer({"instance/preempted": "TRUE"})
    await fake.start()
    lifecycle = Lifecycle()
    lifecycle.start_warming()
    try:
        async with watching(fake.url, session, lifecycle) as (watch, _, policy):
            await until(watch.settled.is_set, 2)
            assert lifecycle.state is State.DRAINING and not lifecycle.mark_ready("health passed")
            await fake.set("instance/preempted", "FALSE")  # never undoes it
            await until(lambda: ("preempted", "FALSE") in [(e["kind"], e["value"]) for e in policy.events], 2)
            assert lifecycle.state is State.DRAINING and lifecycle.drain.reason is DrainReason.PREEMPTION
    finally:
        await fake.stop()


async def test_metadata_faults_cause_no_false_drain_and_read_as_unknown(metadata_server, session) -> None:
    lifecycle = ready()
    async with watching(metadata_server.url, session, lifecycle) as (watch, snapshot, _):
        await until(lambda: metadata_server.parked("instance/preempted") == 1, 2)
        metadata_server.inject("instance/preempted", "503", "garbage", "no_etag", "reset", "reset", "503")
        metadata_server.inject("instance/maintenance-event", "garbage", "503", "no_etag")
        await metadata_server.set("instance/preempted", "MAYBE")  # garbage value too
        await until(lambda: watch.watchers["instance/preempted"].failures >= 3, 3)
        assert lifecycle.state is State.READY
        assert snapshot.get("metadata.preempted").is_stale(snapshot.now())  # unknown, not FALSE
        await metadata_server.set("instance/preempted", "TRUE")
        await until(lambda: lifecycle.state is State.DRAINING, 3)
    assert lifecycle.drain.reason is DrainReason.PREEMPTION and drains(lifecycle) == 1


async def test_terminate_over_the_wire_drains_by_the_window_start(metadata_server, session) -> None:
    lifecycle = ready()
    start = datetime.fromtimestamp(time.time() + 120, UTC).isoformat().replace("+00:00", "Z")
    await metadata_server.set("instance/upcoming-maintenance", json.dumps({"type": "SCHEDULED", "window_start_time": start}))
    # A window further out than the maintenance budget: recorded only, TERMINATE drains.
    async with watching(metadata_server.url, session, lifecycle, maintenance_budget_s=60) as (_, snapshot, policy):
        await until(lambda: metadata_server.parked("instance/maintenance-event") == 1 and policy.upcoming is not None, 2)
        await metadata_server.set("instance/maintenance-event", MIGRATE)
        await until(lambda: snapshot.value("metadata.maintenance_event") == MIGRATE, 2)
        assert lifecycle.state is State.READY
        await metadata_server.set("instance/maintenance-event", TERMINATE)
        await until(lambda: lifecycle.state is State.DRAINING, 2)
    assert lifecycle.drain.reason is DrainReason.MAINTENANCE and 113 <= deadline_in_s(lifecycle) <= 115


async def test_an_upcoming_window_within_the_budget_drains_by_its_start(metadata_server, session) -> None:
    lifecycle = ready()
    start = datetime.fromtimestamp(time.time() + 600, UTC).isoformat().replace("+00:00", "Z")
    async with watching(metadata_server.url, session, lifecycle) as (_, snapshot, policy):
        await until(
            lambda: metadata_server.parked("instance/upcoming-maintenance") == 1 or snapshot.get("metadata.upcoming_maintenance"),
            2,
        )
        notice = {"type": "SCHEDULED", "maintenance_status": "PENDING", "window_start_time": start}
        await metadata_server.set("instance/upcoming-maintenance", json.dumps(notice))
        await until(lambda: lifecycle.state is State.DRAINING, 3)
    assert lifecycle.drain.reason is DrainReason.MAINTENANCE
    assert 290 <= deadline_in_s(lifecycle) <= 295  # min(drain.timeout_s 300, 600 s to the window) - 5 s margin
    assert all(r.query.get("alt") == "json" for r in metadata_server.served("instance/upcoming-maintenance"))


async def test_upcoming_maintenance_follows_a_redirect(metadata_server, session) -> None:
    lifecycle = ready()
    start = datetime.fromtimestamp(time.time() + 300, UTC).isoformat().replace("+00:00", "Z")
    metadata_server.redirects["instance/upcoming-maintenance"] = "instance/upcoming-maintenance/"
    await metadata_server.set("instance/upcoming-maintenance/", json.dumps({"type": "SCHEDULED", "window_start_time": start}))
    async with watching(metadata_server.url, session, lifecycle) as (_, _, policy):
        await until(lambda: policy.upcoming is not None, 3)
    assert policy.upcoming["window_start_time"] == start and lifecycle.state is State.DRAINING


@pytest.mark.parametrize("no_notice", ["NONE", '"NONE"', "{}", None, "404"])
async def test_every_form_of_no_notice_on_upcoming_maintenance_is_no_notice(session, no_notice) -> None:
    fake = FakeMetadataServer()
    await fake.start()
    try:
        if no_notice == "404":
            fake.not_found.add("instance/upcoming-maintenance")
        elif no_notice is not None:  # None: the 503 "no notifications have been received yet"
            await fake.set("instance/upcoming-maintenance", no_notice)
        lifecycle = ready()
        async with watching(fake.url, session, lifecycle) as (_, snapshot, policy):
            await until(lambda: snapshot.get("metadata.upcoming_maintenance") is not None or no_notice == "404", 2)
            await asyncio.sleep(0.2)
            reading = snapshot.get("metadata.upcoming_maintenance")
            if reading is not None:  # a 404 means the path is not offered: not watched at all
                assert reading.value is None and reading.error is None, reading
            assert policy.upcoming is None and lifecycle.state is State.READY
    finally:
        await fake.stop()


async def test_restricted_server_is_reported_blind_not_healthy(session) -> None:
    fake = FakeMetadataServer(restricted=True, cluster=("serving", "us-central1"))
    await fake.start()
    try:
        async with watching(fake.url, session, ready()) as (watch, snapshot, _):
            await until(lambda: snapshot.get(WATCH_KEY) is not None and snapshot.get(IDENTITY_KEY) is not None, 2)
            reading = snapshot.get(WATCH_KEY)
            assert reading.is_stale(snapshot.now()) and reading.code == "blind" and "SIGTERM" in reading.error
            assert reading.value["blind_to_preemption"] is True and reading.value["presence"] == "restricted"
            assert "instance/preempted" not in reading.value["watching"] and watch.settled.is_set()
            identity = snapshot.value(IDENTITY_KEY)
            assert identity.presence is MetadataPresence.RESTRICTED and identity.cluster_name == "serving"
    finally:
        await fake.stop()
    assert [r.query for r in fake.served("instance/preempted")] == [{}]  # asked once, never watched


async def test_absent_server_in_auto_mode_watches_nothing_and_says_so(session) -> None:
    lifecycle = ready()
    async with watching(closed_url(), session, lifecycle) as (watch, snapshot, _):
        await until(lambda: snapshot.get(IDENTITY_KEY) is not None, 2)  # after three looks, not at the first
        assert watch.settled.is_set()
        reading = snapshot.get(WATCH_KEY)
        assert reading.value["presence"] == "absent" and reading.value["watching"] == []
        assert not reading.is_stale(snapshot.now())  # nothing to watch off GCE is not a fault
        assert snapshot.value(IDENTITY_KEY).presence is MetadataPresence.ABSENT
    assert lifecycle.state is State.READY and snapshot.get("metadata.preempted") is None


async def test_absent_server_when_enabled_true_is_reported_failing(session) -> None:
    async with watching(closed_url(), session, ready(), enabled="true") as (watch, snapshot, _):
        await until(watch.settled.is_set, 2)
        reading = snapshot.get(WATCH_KEY)
        assert reading.code == "absent" and reading.is_stale(snapshot.now()) and "enabled=true" in reading.error


async def test_a_server_that_appears_later_is_found_and_watched(session) -> None:
    fake = FakeMetadataServer()
    url = closed_url()
    port = int(url.split(":")[2].split("/")[0])
    lifecycle = ready()
    async with watching(url, session, lifecycle) as (watch, snapshot, _):
        await until(watch.settled.is_set, 2)
        await fake.start(port)
        try:
            await until(lambda: snapshot.value(WATCH_KEY) and snapshot.value(WATCH_KEY)["presence"] == "present", 3)
            await fake.set("instance/preempted", "TRUE")
            await until(lambda: lifecycle.state is State.DRAINING, 2)
        finally:
            await fake.stop()


async def test_disabled_watch_contacts_nothing(metadata_server, session) -> None:
    async with watching(metadata_server.url, session, ready(), enabled="false") as (watch, snapshot, _):
        await until(watch.settled.is_set, 2)
        assert snapshot.value(WATCH_KEY)["watching"] == [] and snapshot.get(IDENTITY_KEY) is None
    assert metadata_server.requests == []


async def test_disabled_watch_still_reads_the_identity_when_export_needs_it(metadata_server, session) -> None:
    async with watching(metadata_server.url, session, ready(), identity_wanted=True, enabled="false") as (watch, snapshot, _):
        await until(lambda: snapshot.get(IDENTITY_KEY), 3)
        assert snapshot.value(IDENTITY_KEY).instance_id == "4520031799277581759"
        assert snapshot.value(WATCH_KEY)["watching"] == []
    assert not [r for r in metadata_server.requests if r.query.get("wait_for_change")]


async def test_a_server_answering_badly_at_start_is_unknown_then_watched(metadata_server, session) -> None:
    metadata_server.inject("project/project-id", "503", times=3)
    async with watching(metadata_server.url, session, ready()) as (watch, snapshot, _):
        journal: list[tuple[str | None, bool]] = []
        snapshot.subscribe(
            lambda key, reading: journal.append((reading.code, watch.settled.is_set())) if key == WATCH_KEY else None
        )
        await until(watch.settled.is_set, 2)
        reading = snapshot.get(WATCH_KEY)
        assert reading.value["presence"] == "present" and not reading.is_stale(snapshot.now())
    assert journal == [("http_503", False)] * 3 + [(None, False)]  # unknown three times, never "absent"
