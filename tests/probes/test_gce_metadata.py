"""The metadata client and watchers against a fake server that speaks the real
protocol (headers, ETags, wait_for_change / last_etag / timeout_sec, faults)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from agent.config import PreemptionConfig
from agent.notices import NoticePolicy, run_metadata_watch
from agent.config import DrainConfig
from agent.sim.gce_metadata import FakeMetadataServer
from probes.base import ProbeError
from probes.gce_metadata import (
    MetadataClient,
    MetadataWatcher,
    Presence,
    detect,
    fetch_identity,
    metadata_base_url,
    parse_preempted,
)
from probes.snapshot import Snapshot
from state_machine import Lifecycle
from tests.harness import until


@pytest.fixture
async def server():
    fake = FakeMetadataServer()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def client(server):
    async with aiohttp.ClientSession() as session:
        yield MetadataClient(metadata_base_url(None, {"GCE_METADATA_HOST": server.address}), session, timeout_s=2)


def test_address_comes_from_config_then_env_then_dns_name() -> None:
    assert metadata_base_url("10.0.0.1:80", {"GCE_METADATA_HOST": "x:1"}) == "http://10.0.0.1:80/computeMetadata/v1/"
    assert metadata_base_url(None, {"GCE_METADATA_HOST": "127.0.0.1:9"}) == "http://127.0.0.1:9/computeMetadata/v1/"
    assert metadata_base_url(None, {}) == "http://metadata.google.internal/computeMetadata/v1/"


async def test_server_requires_the_flavor_header_and_refuses_forwarded_requests(server) -> None:
    url = f"http://{server.address}/computeMetadata/v1/instance/preempted"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            assert resp.status == 403
        async with session.get(url, headers={"Metadata-Flavor": "Google", "X-Forwarded-For": "1.2.3.4"}) as resp:
            assert resp.status == 403
        async with session.get(url, headers={"Metadata-Flavor": "Google"}) as resp:
            assert resp.status == 200 and resp.headers["ETag"] and await resp.text() == "FALSE"


async def test_client_sends_the_header_and_hanging_get_parameters(server, client) -> None:
    first = await client.get("instance/preempted")
    assert (first.text, bool(first.etag)) == ("FALSE", True)
    waiting = asyncio.create_task(client.get("instance/preempted", wait=True, last_etag=first.etag, timeout_sec=5))
    await until(lambda: len(server.served("instance/preempted")) == 2, 2)
    assert not waiting.done()  # hangs until the value changes
    await server.set("instance/preempted", "TRUE")
    changed = await asyncio.wait_for(waiting, 2)
    assert changed.text == "TRUE" and changed.etag != first.etag
    request = server.served("instance/preempted")[-1]
    assert request.headers["Metadata-Flavor"] == "Google"
    assert request.query == {"wait_for_change": "true", "timeout_sec": "5", "last_etag": first.etag}


async def test_last_etag_returns_at_once_when_the_value_changed_in_between(server, client) -> None:
    first = await client.get("instance/maintenance-event")
    await server.set("instance/maintenance-event", "TERMINATE_ON_HOST_MAINTENANCE")  # between two calls
    answer = await asyncio.wait_for(client.get("instance/maintenance-event", wait=True, last_etag=first.etag, timeout_sec=30), 2)
    assert answer.text == "TERMINATE_ON_HOST_MAINTENANCE"


async def test_timeout_sec_returns_the_unchanged_value(client) -> None:
    first = await client.get("instance/preempted")
    answer = await asyncio.wait_for(client.get("instance/preempted", wait=True, last_etag=first.etag, timeout_sec=1), 3)
    assert answer == first


@pytest.mark.parametrize("fault, code", [("503", "http_503"), ("reset", "connection"), ("garbage", "garbage")])
async def test_faults_are_errors_with_codes_never_values(server, client, fault, code) -> None:
    server.inject("instance/preempted", fault, fault)  # aiohttp retries a reset idempotent GET once
    with pytest.raises(ProbeError) as err:
        parse_preempted((await client.get("instance/preempted")).text)
    assert err.value.code == code


async def watch(server: FakeMetadataServer, client: MetadataClient, snapshot: Snapshot, seen: list):
    watcher = MetadataWatcher(
        client, "instance/preempted", parse_preempted, seen.append, snapshot, "metadata.preempted",
        timeout_sec=1, backoff_base_s=0.01, backoff_cap_s=0.05,
    )
    return asyncio.create_task(watcher.run()), watcher


async def test_watcher_delivers_each_change_once(server, client) -> None:
    snapshot, seen = Snapshot(), []
    task, _ = await watch(server, client, snapshot, seen)
    try:
        await until(lambda: seen == [False], 2)
        await server.set("instance/preempted", "TRUE")
        await until(lambda: seen == [False, True], 2)
        await asyncio.sleep(1.3)  # a timeout_sec round trip with the same value is not a new delivery
        assert seen == [False, True]
    finally:
        task.cancel()


async def test_faults_and_hangs_make_the_value_unknown_and_deliver_nothing(server, client) -> None:
    snapshot, seen = Snapshot(), []
    server.inject("instance/preempted", "503", "reset", "garbage", "503")
    task, watcher = await watch(server, client, snapshot, seen)
    try:
        await until(lambda: watcher.failures >= 3, 3)
        assert seen == []  # never a guessed FALSE (safe) or TRUE (preempted)
        reading = snapshot.get("metadata.preempted")
        assert reading.is_stale(snapshot.now()) and reading.value is None
        await until(lambda: seen == [False], 3)  # recovers once the server does
    finally:
        task.cancel()


async def test_detect_present_restricted_and_absent(server, client) -> None:
    assert await detect(client) is Presence.PRESENT
    server.restricted = True
    assert await detect(client) is Presence.RESTRICTED
    async with aiohttp.ClientSession() as session:
        nowhere = MetadataClient("http://127.0.0.1:9/computeMetadata/v1/", session, timeout_s=1)
        assert await detect(nowhere) is Presence.ABSENT


async def test_identity_fields_for_resource_labels(server, client) -> None:
    await server.set("instance/attributes/cluster-name", "serving")
    identity = await fetch_identity(client, Presence.PRESENT)
    assert identity.project_id == "demo-project"
    assert identity.instance_id == "4520031799277581759"
    assert identity.zone == "us-central1-a"
    assert identity.cluster_name == "serving" and identity.cluster_location is None


async def test_restricted_server_is_reported_blind_not_healthy(server, client) -> None:
    server.restricted = True
    snapshot = Snapshot()
    policy = NoticePolicy(Lifecycle(), PreemptionConfig(watch_timeout_s=1), DrainConfig())
    task = asyncio.create_task(run_metadata_watch(client, snapshot, policy, PreemptionConfig(watch_timeout_s=1)))
    try:
        await until(lambda: snapshot.value("metadata.watch") is not None, 3)
        watch_status = snapshot.value("metadata.watch")
        assert watch_status["presence"] == "restricted"
        assert watch_status["blind_to_preemption"] is True
        assert "instance/preempted" not in watch_status["watching"]
        assert "SIGTERM" in watch_status["note"]
    finally:
        task.cancel()


async def test_upcoming_maintenance_503_means_no_notice(server, client) -> None:
    snapshot = Snapshot()
    policy = NoticePolicy(Lifecycle(), PreemptionConfig(watch_timeout_s=1), DrainConfig())
    task = asyncio.create_task(run_metadata_watch(client, snapshot, policy, PreemptionConfig(watch_timeout_s=1)))
    try:
        await until(lambda: snapshot.get("metadata.upcoming_maintenance") is not None, 3)
        assert snapshot.value("metadata.upcoming_maintenance") is None and policy.upcoming is None
        assert not snapshot.get("metadata.upcoming_maintenance").is_stale(snapshot.now())
    finally:
        task.cancel()
