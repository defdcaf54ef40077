"""The fake metadata server speaks the real protocol: raw HTTP against it, asserting
status codes, headers, ETags and the hanging-GET semantics."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from agent.sim.metadata import NO_NOTICE, FakeMetadataServer, Fault
from tests.harness import until

FLAVOR = {"Metadata-Flavor": "Google"}


async def fetch(session: aiohttp.ClientSession, metadata_server: FakeMetadataServer, path: str, headers=FLAVOR, **query: str):
    async with session.get(metadata_server.url + path, headers=headers, params=query) as resp:
        return resp.status, resp.headers.copy(), await resp.read()  # case-insensitive, as on the wire


async def test_requests_without_the_flavor_header_are_refused(metadata_server, session) -> None:
    status, _, body = await fetch(session, metadata_server, "instance/preempted", headers={})
    assert status == 403 and b"Metadata-Flavor" in body


async def test_requests_carrying_x_forwarded_for_are_refused(metadata_server, session) -> None:
    status, _, _ = await fetch(session, metadata_server, "instance/preempted", headers={**FLAVOR, "X-Forwarded-For": "10.0.0.1"})
    assert status == 403


async def test_answers_carry_the_flavor_and_an_etag_that_follows_the_value(metadata_server, session) -> None:
    status, headers, body = await fetch(session, metadata_server, "instance/preempted")
    assert (status, body, headers["Metadata-Flavor"]) == (200, b"FALSE", "Google")
    await metadata_server.set("instance/preempted", "TRUE")
    _, changed, _ = await fetch(session, metadata_server, "instance/preempted")
    await metadata_server.set("instance/preempted", "FALSE")
    _, back, _ = await fetch(session, metadata_server, "instance/preempted")
    assert changed["ETag"] != headers["ETag"] and back["ETag"] == headers["ETag"]


async def test_wait_for_change_hangs_until_the_value_changes(metadata_server, session) -> None:
    waiting = asyncio.create_task(fetch(session, metadata_server, "instance/maintenance-event", wait_for_change="true"))
    await until(lambda: metadata_server.parked("instance/maintenance-event") == 1, 2)
    assert not waiting.done()
    await metadata_server.set("instance/maintenance-event", "TERMINATE_ON_HOST_MAINTENANCE")
    status, _, body = await asyncio.wait_for(waiting, 2)
    assert (status, body) == (200, b"TERMINATE_ON_HOST_MAINTENANCE")


async def test_a_last_etag_that_differs_returns_at_once(metadata_server, session) -> None:
    _, headers, _ = await fetch(session, metadata_server, "instance/preempted")
    await metadata_server.set("instance/preempted", "TRUE")
    started = time.monotonic()
    status, _, body = await fetch(
        session, metadata_server, "instance/preempted", wait_for_change="true", last_etag=headers["ETag"], timeout_sec="30"
    )
    assert (status, body) == (200, b"TRUE") and time.monotonic() - started < 1


async def test_timeout_sec_returns_the_unchanged_value(metadata_server, session) -> None:
    _, headers, _ = await fetch(session, metadata_server, "instance/preempted")
    started = time.monotonic()
    status, again, body = await fetch(
        session, metadata_server, "instance/preempted", wait_for_change="true", last_etag=headers["ETag"], timeout_sec="1"
    )
    assert (status, body, again["ETag"]) == (200, b"FALSE", headers["ETag"])
    assert 0.9 <= time.monotonic() - started < 2


async def test_upcoming_maintenance_without_a_notice_is_a_503_saying_so(metadata_server, session) -> None:
    status, _, body = await fetch(session, metadata_server, "instance/upcoming-maintenance")
    assert (status, body.decode()) == (503, NO_NOTICE)
    notice = {"type": "SCHEDULED", "maintenance_status": "PENDING", "window_start_time": "2030-01-01T00:00:00Z"}
    await metadata_server.set("instance/upcoming-maintenance", json.dumps(notice))
    status, headers, body = await fetch(session, metadata_server, "instance/upcoming-maintenance")
    assert status == 200 and json.loads(body) == notice and headers["ETag"]


async def test_restricted_server_hides_instance_preempted_but_serves_identity(session) -> None:
    fake = FakeMetadataServer(restricted=True, cluster=("serving", "us-central1"))
    await fake.start()
    try:
        assert (await fetch(session, fake, "instance/preempted"))[0] == 404
        status, _, body = await fetch(session, fake, "instance/attributes/cluster-name")
        assert (status, body) == (200, b"serving")
    finally:
        await fake.stop()


async def test_unknown_paths_are_404(metadata_server, session) -> None:
    assert (await fetch(session, metadata_server, "instance/attributes/cluster-name"))[0] == 404


async def test_faults_are_served_in_order_then_the_value(metadata_server, session) -> None:
    metadata_server.inject("instance/preempted", Fault.UNAVAILABLE, times=2)
    metadata_server.inject("instance/preempted", "garbage", "no_etag")
    answers = [await fetch(session, metadata_server, "instance/preempted") for _ in range(5)]
    assert [a[0] for a in answers] == [503, 503, 200, 200, 200]
    assert answers[2][2].startswith(b"\xff\xfe")  # not UTF-8: no value at all
    assert "ETag" not in answers[3][1] and answers[3][2] == b"FALSE"
    assert answers[4][2] == b"FALSE" and answers[4][1]["ETag"]


async def test_a_reset_fault_drops_the_connection(metadata_server) -> None:
    metadata_server.inject("instance/preempted", "reset", times=2)  # aiohttp may retry an idempotent GET once
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            await fetch(http, metadata_server, "instance/preempted")


async def test_a_hang_fault_holds_the_request_until_released(metadata_server, session) -> None:
    metadata_server.inject("instance/preempted", "hang")
    held = asyncio.create_task(fetch(session, metadata_server, "instance/preempted"))
    await until(lambda: len(metadata_server.served("instance/preempted")) == 1, 2)
    await asyncio.sleep(0.1)  # long enough for a normal answer: the fake must still hold it
    assert not held.done()
    metadata_server.release_hangs()
    assert (await asyncio.wait_for(held, 2))[0] == 503


async def test_requests_are_logged_with_query_and_headers(metadata_server, session) -> None:
    await fetch(session, metadata_server, "instance/preempted", wait_for_change="true", last_etag="nope", timeout_sec="5")
    recorded = metadata_server.served("instance/preempted")[-1]
    assert recorded.query == {"wait_for_change": "true", "last_etag": "nope", "timeout_sec": "5"}
    assert recorded.headers["Metadata-Flavor"] == "Google"


async def test_stop_ends_parked_hanging_gets(session) -> None:
    fake = FakeMetadataServer()
    await fake.start()
    waiting = asyncio.create_task(fetch(session, fake, "instance/preempted", wait_for_change="true"))
    await until(lambda: fake.parked("instance/preempted") == 1, 2)
    started = time.monotonic()
    await fake.stop()
    await asyncio.wait_for(asyncio.gather(waiting, return_exceptions=True), 2)
    assert time.monotonic() - started < 1
