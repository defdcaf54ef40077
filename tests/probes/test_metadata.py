"""The metadata client, watcher, presence detection and identity, against the fake
metadata server over loopback (what crossed the wire is asserted), plus the pure
parsing tables."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import socket
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent.core.snapshot import Snapshot
from agent.sim.metadata import NO_NOTICE, FakeMetadataServer
from probes.base import ProbeError
from probes.metadata import (
    NO_NOTICE_CODES,
    MetadataClient,
    MetadataPresence,
    MetadataWatcher,
    detect_metadata,
    error_code,
    fetch_identity,
    metadata_base_url,
    parse_maintenance_event,
    parse_preempted,
    parse_upcoming_maintenance,
    serves,
)
from tests.harness import until

PREEMPTED = "instance/preempted"
UPCOMING = "instance/upcoming-maintenance"


@pytest.fixture
def client(metadata_server: FakeMetadataServer, session: aiohttp.ClientSession) -> MetadataClient:
    base_url = metadata_base_url(None, {"GCE_METADATA_HOST": metadata_server.address})
    return MetadataClient(base_url, session, timeout_s=1, wait_slack_s=0.3)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def running(coro: Coroutine[Any, Any, None]) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def watcher(
    client: MetadataClient, snapshot: Snapshot, seen: list[Any], path: str = PREEMPTED, parse: Any = parse_preempted,
    **tuning: Any,
) -> MetadataWatcher[Any]:
    """A watcher on `path` with timeout_sec=1 and fast backoff, appending each delivered value to `seen`."""
    tuning = {"backoff_base_s": 0.01, "backoff_cap_s": 0.05, **tuning}
    deliver = lambda value, _etag: seen.append(value)
    return MetadataWatcher(client, path, parse, deliver, snapshot, "metadata.test", 1, **tuning)


# --- pure tables -------------------------------------------------------------------
@pytest.mark.parametrize(
    "configured, environ, url",
    [
        ("10.0.0.1:80", {"GCE_METADATA_HOST": "x:1"}, "http://10.0.0.1:80/computeMetadata/v1/"),
        (None, {"GCE_METADATA_HOST": "127.0.0.1:9"}, "http://127.0.0.1:9/computeMetadata/v1/"),
        (None, {}, "http://metadata.google.internal/computeMetadata/v1/"),
    ],
)
def test_base_url_prefers_config_then_gce_metadata_host_then_the_dns_name(configured, environ, url) -> None:
    assert metadata_base_url(configured, environ) == url


@pytest.mark.parametrize(
    "status, body, code",
    [(404, "Not Found", "not_found"), (503, NO_NOTICE, "no_notice"), (503, "Service Unavailable", "http_503"),
     (500, "", "http_500"), (403, "Missing required header", "http_403")],
)  # fmt: skip
def test_error_codes_for_non_200_answers(status, body, code) -> None:
    assert error_code(status, body) == code


@pytest.mark.parametrize("text, value", [("TRUE", True), ("FALSE", False), ("true", None), ("", None), ("MAYBE", None)])
def test_preempted_is_only_true_or_false_anything_else_is_garbage(text, value) -> None:
    if value is None:
        with pytest.raises(ProbeError) as err:
            parse_preempted(text)
        assert err.value.code == "garbage"
    else:
        assert parse_preempted(text) is value


@pytest.mark.parametrize(
    "parse, text, ok",
    [(parse_maintenance_event, "NONE", True), (parse_maintenance_event, "TERMINATE_ON_HOST_MAINTENANCE", True),
     (parse_maintenance_event, "MIGRATE_ON_HOST_MAINTENANCE", True), (parse_maintenance_event, "REBOOT", False),
     (parse_upcoming_maintenance, '{"type": "SCHEDULED"}', True), (parse_upcoming_maintenance, "[1]", False),
     (parse_upcoming_maintenance, "<html>", False)],
)  # fmt: skip
def test_maintenance_values_outside_the_protocol_are_garbage(parse, text, ok) -> None:
    if ok:
        parse(text)
    else:
        with pytest.raises(ProbeError) as err:
            parse(text)
        assert err.value.code == "garbage"


# --- client ------------------------------------------------------------------------
async def test_client_sends_the_flavor_header_and_the_hanging_get_query(metadata_server, client) -> None:
    first = await client.get(PREEMPTED)
    assert (first.text, bool(first.etag)) == ("FALSE", True)
    async with running(client.wait_for_change(PREEMPTED, first.etag, 5)) as waiting:
        await until(lambda: metadata_server.parked(PREEMPTED) == 1, 2)
        await metadata_server.set(PREEMPTED, "TRUE")
        await asyncio.wait_for(asyncio.shield(waiting), 2)
    request = metadata_server.served(PREEMPTED)[-1]
    assert request.headers["Metadata-Flavor"] == "Google" and "X-Forwarded-For" not in request.headers
    assert request.query == {"wait_for_change": "true", "last_etag": first.etag, "timeout_sec": "5"}


async def test_last_etag_returns_a_change_made_between_two_calls_at_once(metadata_server, client) -> None:
    first = await client.get("instance/maintenance-event")
    await metadata_server.set("instance/maintenance-event", "TERMINATE_ON_HOST_MAINTENANCE")
    answer = await asyncio.wait_for(client.wait_for_change("instance/maintenance-event", first.etag, 30), 1)
    assert answer.text == "TERMINATE_ON_HOST_MAINTENANCE" and answer.etag != first.etag


async def test_timeout_sec_returns_the_same_value_and_etag(client) -> None:
    first = await client.get(PREEMPTED)
    assert await client.wait_for_change(PREEMPTED, first.etag, 1) == first


async def test_client_gives_up_a_hanging_get_timeout_sec_plus_slack_later(metadata_server, client) -> None:
    metadata_server.inject(PREEMPTED, "hang")
    started = time.monotonic()
    with pytest.raises(ProbeError) as err:
        await client.wait_for_change(PREEMPTED, "etag", 0)  # timeout_sec 0 + 0.3 s slack
    assert err.value.code == "timeout" and 0.3 <= time.monotonic() - started < 0.9


@pytest.mark.parametrize(
    "fault, path, code",
    [("503", PREEMPTED, "http_503"), ("reset", PREEMPTED, "reset"), ("garbage", PREEMPTED, "garbage"),
     (None, "instance/attributes/nothing-here", "not_found"), (None, UPCOMING, "no_notice")],
)  # fmt: skip
async def test_failures_are_errors_with_codes_never_values(metadata_server, client, fault, path, code) -> None:
    if fault is not None:
        metadata_server.inject(path, fault, times=2)  # aiohttp may retry a reset idempotent GET once
    with pytest.raises(ProbeError) as err:
        await client.get(path)
    assert err.value.code == code


async def test_nothing_listening_is_absent_at_first_contact_and_unreachable_after(metadata_server, session) -> None:
    nowhere = MetadataClient(f"http://127.0.0.1:{closed_port()}/computeMetadata/v1/", session, timeout_s=1)
    with pytest.raises(ProbeError) as err:
        await nowhere.get(PREEMPTED)
    assert err.value.code == "absent"
    client = MetadataClient(metadata_server.url, session, timeout_s=1)
    await client.get(PREEMPTED)
    await metadata_server.stop()
    with pytest.raises(ProbeError) as err:
        await client.get(PREEMPTED)
    assert err.value.code in ("unreachable", "reset")  # a pooled connection may be reset first


async def test_an_answer_without_the_flavor_header_is_not_a_metadata_server(aiohttp_server, session) -> None:
    async def unflavored(_request: web.Request) -> web.Response:
        return web.Response(text="FALSE", headers={"ETag": "x"})

    app = web.Application()
    app.router.add_get("/computeMetadata/v1/{path:.*}", unflavored)
    impostor = await aiohttp_server(app)
    client = MetadataClient(f"http://127.0.0.1:{impostor.port}/computeMetadata/v1/", session, timeout_s=1)
    with pytest.raises(ProbeError) as err:
        await client.get(PREEMPTED)
    assert err.value.code == "garbage"


async def test_an_oversized_answer_is_garbage(metadata_server, session) -> None:
    await metadata_server.set("instance/attributes/big", "x" * 5000)
    client = MetadataClient(metadata_server.url, session, timeout_s=1, max_bytes=1000)
    with pytest.raises(ProbeError) as err:
        await client.get("instance/attributes/big")
    assert err.value.code == "garbage"


# --- watcher -----------------------------------------------------------------------
async def test_watcher_delivers_the_first_value_and_each_change_once(metadata_server, client) -> None:
    snapshot, seen = Snapshot(), []
    async with running(watcher(client, snapshot, seen).run()):
        await until(lambda: seen == [False] and metadata_server.parked(PREEMPTED) == 1, 2)
        etag_false = metadata_server.etag(PREEMPTED)
        await metadata_server.set(PREEMPTED, "TRUE")
        await until(lambda: seen == [False, True], 2)
        await until(lambda: len(metadata_server.served(PREEMPTED)) >= 4, 3)  # a timeout_sec round trip, unchanged
        assert seen == [False, True] and snapshot.value("metadata.test") is True
    queries = [r.query for r in metadata_server.served(PREEMPTED)]
    assert queries[0] == {} and queries[1] == {"wait_for_change": "true", "last_etag": etag_false, "timeout_sec": "1"}
    assert queries[2]["last_etag"] == metadata_server.etag(PREEMPTED)


async def test_a_change_between_two_hanging_gets_is_not_missed(metadata_server, client) -> None:
    snapshot, seen = Snapshot(), []
    watch = watcher(client, snapshot, seen, backoff_base_s=0.2, backoff_cap_s=0.4)
    async with running(watch.run()):
        await until(lambda: seen == [False] and metadata_server.parked(PREEMPTED) == 1, 2)
        etag_false = metadata_server.etag(PREEMPTED)

        def dropped() -> bool:
            metadata_server.reset_parked(PREEMPTED)  # aiohttp retries a dropped idempotent GET once: drop that too
            return watch.failures == 1

        await until(dropped, 2)
        assert metadata_server.parked(PREEMPTED) == 0  # the watcher is backing off: nothing is waiting
        before = len(metadata_server.served(PREEMPTED))
        await metadata_server.set(PREEMPTED, "TRUE")
        await until(lambda: seen == [False, True], 2)
    # The retry carried the ETag of the last value read, so the metadata server answered the change at once.
    assert metadata_server.served(PREEMPTED)[before].query["last_etag"] == etag_false


async def test_faults_make_the_value_unknown_and_deliver_nothing_until_recovery(metadata_server, client) -> None:
    snapshot, journal = Snapshot(), []
    snapshot.subscribe(
        lambda _key, reading: journal.append(("failed", reading.code, reading.is_stale(snapshot.now())))
        if reading.failed_at is not None
        else journal.append(("read", reading.value, False))
    )
    metadata_server.inject(PREEMPTED, "503", "reset", "reset", "garbage", "no_etag")
    deliver = lambda value, _etag: journal.append(("delivered", value, False))
    watch = MetadataWatcher(
        client, PREEMPTED, parse_preempted, deliver, snapshot, "metadata.test", 1, backoff_base_s=0.01,
        backoff_cap_s=0.05,
    )  # fmt: skip
    async with running(watch.run()):
        await until(lambda: ("delivered", False, False) in journal, 3)
    first = journal.index(("delivered", False, False))
    failures = [entry for entry in journal[:first] if entry[0] == "failed"]
    # aiohttp retries a reset idempotent GET once, so the two resets may be one failure.
    assert [code for _, code, _ in failures if code != "reset"] == ["http_503", "garbage", "garbage"]
    assert any(code == "reset" for _, code, _ in failures) and all(stale for *_, stale in failures)
    assert journal[first - 1 : first + 1] == [("read", False, False), ("delivered", False, False)]
    assert not snapshot.get("metadata.test").is_stale(snapshot.now())


async def test_an_unreadable_preempted_value_is_neither_safe_nor_preempted(metadata_server, client) -> None:
    await metadata_server.set(PREEMPTED, "MAYBE")
    snapshot, seen = Snapshot(), []
    watch = watcher(client, snapshot, seen)
    async with running(watch.run()):
        await until(lambda: watch.failures >= 3, 2)
        reading = snapshot.get("metadata.test")
        assert seen == [] and reading.value is None and reading.code == "garbage" and reading.is_stale(snapshot.now())
        await metadata_server.set(PREEMPTED, "TRUE")
        await until(lambda: seen == [True], 2)


async def test_a_hanging_server_is_given_up_and_retried(metadata_server, session) -> None:
    client = MetadataClient(metadata_server.url, session, timeout_s=0.2, wait_slack_s=0.2)
    metadata_server.inject(PREEMPTED, "hang")
    snapshot, seen, journal = Snapshot(), [], []
    snapshot.subscribe(lambda _key, reading: journal.append((reading.code, list(seen))))
    async with running(watcher(client, snapshot, seen).run()):
        await until(lambda: seen == [False], 2)
    assert journal[:2] == [("timeout", []), (None, [])]  # given up, nothing delivered, then read


async def test_retries_back_off_with_jitter(metadata_server, client) -> None:
    metadata_server.inject(PREEMPTED, "503", times=4)
    seen: list[Any] = []
    watch = watcher(client, Snapshot(), seen, backoff_base_s=0.05, backoff_cap_s=0.2, rng=random.Random(7))
    async with running(watch.run()):
        await until(lambda: seen == [False], 3)
    times = [r.at_mono for r in metadata_server.served(PREEMPTED)[:5]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.05 <= gap < 0.35 for gap in gaps), gaps
    assert len({round(gap, 3) for gap in gaps}) > 1  # jittered, not a fixed beat


async def test_upcoming_maintenance_no_notice_is_a_known_none_then_the_notice(metadata_server, client) -> None:
    snapshot, seen = Snapshot(), []
    watch = watcher(client, snapshot, seen, path=UPCOMING, parse=parse_upcoming_maintenance,
                    none_codes=NO_NOTICE_CODES, none_poll_s=0.05)  # fmt: skip
    notice = {"type": "SCHEDULED", "maintenance_status": "PENDING", "window_start_time": "2030-01-01T00:00:00Z"}
    async with running(watch.run()):
        await until(lambda: seen == [None], 2)
        reading = snapshot.get("metadata.test")
        assert reading.value is None and not reading.is_stale(snapshot.now())  # known: no notice
        await metadata_server.set(UPCOMING, json.dumps(notice))
        await until(lambda: seen == [None, notice], 2)
        await metadata_server.set(UPCOMING, None)
        await until(lambda: seen == [None, notice, None], 2)


# --- presence and identity ---------------------------------------------------------
async def test_detect_tells_present_restricted_and_absent(metadata_server, client, session) -> None:
    assert await detect_metadata(client) is MetadataPresence.PRESENT
    metadata_server.restricted = True
    assert await detect_metadata(client) is MetadataPresence.RESTRICTED
    nowhere = MetadataClient(f"http://127.0.0.1:{closed_port()}/computeMetadata/v1/", session, timeout_s=1)
    assert await detect_metadata(nowhere) is MetadataPresence.ABSENT


async def test_detect_raises_when_a_server_answers_badly(metadata_server, client) -> None:
    metadata_server.inject("project/project-id", "503")
    with pytest.raises(ProbeError) as err:
        await detect_metadata(client)
    assert err.value.code == "http_503"


async def test_serves_is_false_only_for_a_404(metadata_server, client) -> None:
    assert await serves(client, UPCOMING)  # 503 "no notifications": offered, nothing scheduled
    assert not await serves(client, "instance/attributes/cluster-name")


async def test_identity_gives_resource_labels_with_a_short_zone(session) -> None:
    fake = FakeMetadataServer(cluster=("serving", "us-central1"))
    await fake.start()
    try:
        identity = await fetch_identity(MetadataClient(fake.url, session, timeout_s=1))
    finally:
        await fake.stop()
    assert (identity.presence, identity.project_id, identity.instance_id, identity.zone) == (
        MetadataPresence.PRESENT, "demo-project", "4520031799277581759", "us-central1-a")  # fmt: skip
    assert identity.instance_name == "gpu-node-1"
    assert (identity.cluster_name, identity.cluster_location) == ("serving", "us-central1")
    assert identity.hostname and identity.unreadable == ()


async def test_identity_fields_the_server_lacks_are_none_and_failures_are_named(metadata_server, client) -> None:
    metadata_server.inject("instance/id", "503", times=3)
    identity = await fetch_identity(client, attempts=3, retry_base_s=0.01)
    assert identity.cluster_name is None and identity.cluster_location is None
    assert identity.instance_id is None and identity.unreadable == ("instance_id",)
    assert identity.project_id == "demo-project"


async def test_identity_of_an_absent_server_asks_nothing(metadata_server, client) -> None:
    identity = await fetch_identity(client, MetadataPresence.ABSENT)
    assert identity.presence is MetadataPresence.ABSENT and identity.project_id is None
    assert metadata_server.requests == []
