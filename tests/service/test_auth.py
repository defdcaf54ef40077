"""Admin auth: loopback is trusted, off-node callers need the bearer token."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from unittest.mock import Mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from service.auth import AdminAuth


def request_from(remote: str, headers: dict[str, str] | None = None) -> web.Request:
    transport = Mock()
    transport.get_extra_info.side_effect = lambda key, default=None: (remote, 40000) if key == "peername" else default
    return make_mocked_request("POST", "/drain", headers=headers or {}, transport=transport)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("tok-123\n")
    return path


@pytest.mark.parametrize("remote", ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"])
async def test_loopback_is_trusted_without_a_token(remote: str, token_file: Path) -> None:
    await AdminAuth(token_file).check(request_from(remote))
    await AdminAuth(None).check(request_from(remote))


async def test_off_node_without_token_config_is_forbidden() -> None:
    with pytest.raises(web.HTTPForbidden) as err:
        await AdminAuth(None).check(request_from("10.1.2.3"))
    assert "loopback" in err.value.text


async def test_off_node_without_header_is_unauthorized(token_file: Path) -> None:
    with pytest.raises(web.HTTPUnauthorized) as err:
        await AdminAuth(token_file).check(request_from("10.1.2.3"))
    assert err.value.headers["WWW-Authenticate"] == "Bearer"


async def test_off_node_with_the_right_token_is_allowed(token_file: Path) -> None:
    await AdminAuth(token_file).check(request_from("10.1.2.3", {"Authorization": "Bearer tok-123"}))


@pytest.mark.parametrize(
    "header, status",
    [("Bearer wrong", web.HTTPForbidden), ("Basic dG9rLTEyMw==", web.HTTPUnauthorized), ("Bearer", web.HTTPUnauthorized)],
)
async def test_bad_credentials_are_refused_even_from_loopback(token_file: Path, header: str, status: type) -> None:
    with pytest.raises(status):
        await AdminAuth(token_file).check(request_from("127.0.0.1", {"Authorization": header}))


async def test_token_file_is_reread_so_rotation_needs_no_restart(token_file: Path) -> None:
    auth = AdminAuth(token_file)
    await auth.check(request_from("10.0.0.1", {"Authorization": "Bearer tok-123"}))
    token_file.write_text("tok-456")
    with pytest.raises(web.HTTPForbidden):
        await auth.check(request_from("10.0.0.1", {"Authorization": "Bearer tok-123"}))
    await auth.check(request_from("10.0.0.1", {"Authorization": "Bearer tok-456"}))


async def test_unreadable_token_file_refuses_token_callers(tmp_path: Path) -> None:
    with pytest.raises(web.HTTPForbidden):
        await AdminAuth(tmp_path / "missing").check(request_from("10.0.0.1", {"Authorization": "Bearer x"}))


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda p: os.mkfifo(p), "not a regular file"),  # opening it to read would block for ever
        (lambda p: p.write_bytes(b"x" * 10_000), "over the 4096"),
        (lambda p: p.mkdir(), "not a regular file"),
        (lambda p: p.write_bytes(b"\xff\xfe"), "not UTF-8"),
    ],
)
async def test_a_token_file_that_cannot_be_used_is_refused_with_the_reason_never_hanging(tmp_path: Path, make, why: str) -> None:
    path = tmp_path / "token"
    make(path)
    async with asyncio.timeout(3):
        with pytest.raises(web.HTTPForbidden) as err:
            await AdminAuth(path).check(request_from("10.0.0.1", {"Authorization": "Bearer x"}))
    assert why in err.value.text


async def test_the_token_is_cached_until_the_file_changes_or_sighup(token_file: Path) -> None:
    auth = AdminAuth(token_file)
    await auth.check(request_from("10.0.0.1", {"Authorization": "Bearer tok-123"}))
    stat_before = token_file.stat()
    token_file.write_text("tok-999\n")  # same size, new content
    os.utime(token_file, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))  # and the old mtime
    await auth.check(request_from("10.0.0.1", {"Authorization": "Bearer tok-123"}))  # cached: same identity
    auth.reload()  # SIGHUP
    await auth.check(request_from("10.0.0.1", {"Authorization": "Bearer tok-999"}))
