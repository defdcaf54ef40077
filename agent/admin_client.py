"""How the CLI reaches a running agent: where it listens (--url, or the local config's
port read without the config model) and its JSON answers over HTTP.

Standard library only (urllib, json, tomllib): `gpu-node-agent status` must start in
tens of milliseconds and must work when the config file has a typo, so nothing here
imports pydantic, aiohttp or prometheus_client.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Mirrors of agent.config's defaults (tests/agent/test_cli.py keeps them equal).
DEFAULT_PORT = 8095
DEFAULT_CONFIG_PATH = Path("/etc/gpu-node-agent/config.toml")
PORT_ENV = "GPU_AGENT_SERVICE__PORT"
HOST_ENV = "GPU_AGENT_SERVICE__HOST"
SERVICE_KEYS = frozenset({  # [service]
    "host", "port", "admin_token_file", "state_dir", "shutdown_timeout_s", "max_connections", "keepalive_timeout_s",
})
ENDPOINTS = ("/status", "/readyz", "/healthz", "/metrics", "/drain", "/resume")
_WILDCARDS = ("", "0.0.0.0", "::", "[::]")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
NEXT_STEP = "Is the agent running? Check `systemctl status gpu-node-agent`, or pass --url HOST:PORT."


class BadUrl(ValueError):
    """--url is not a host:port or http(s)://host:port; the message says what is wrong."""


class AgentUnreachable(Exception):
    """No HTTP answer from the agent; the message names the URL and the next step."""


class Answer:
    """An HTTP answer: status code, the JSON body (None when it was not JSON) and the text."""

    __slots__ = ("body", "status", "text")

    def __init__(self, status: int, body: Any, text: str) -> None:
        self.status, self.body, self.text = status, body, text

    def field(self, key: str) -> Any:
        return self.body.get(key) if isinstance(self.body, dict) else None


def normalise_url(raw: str) -> str:
    """`host:port`, `http://host:port` or `https://host[:port][/prefix]` -> a base URL with
    no trailing slash and no agent endpoint (`.../status` is what people paste)."""
    text = raw.strip()
    if not text or any(c.isspace() for c in text):
        raise BadUrl("it is empty or contains spaces")
    explicit = "://" in text
    parts = urllib.parse.urlsplit(text if explicit else "http://" + text)
    if parts.scheme not in ("http", "https"):
        raise BadUrl(f"the scheme must be http or https, not {parts.scheme!r}")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise BadUrl("the port must be a number from 1 to 65535")
    host = parts.hostname or ""
    if "@" in parts.netloc or not (_HOSTNAME.fullmatch(host) or (":" in host and parts.netloc.startswith("["))):
        raise BadUrl("it needs a host name or address, like 127.0.0.1:8095")
    if port is None and not explicit:
        raise BadUrl("it needs a port, like 127.0.0.1:8095")
    path = parts.path.rstrip("/")
    for endpoint in ENDPOINTS:
        if path.endswith(endpoint):
            path = path.removesuffix(endpoint).rstrip("/")
            break
    return f"{parts.scheme}://{parts.netloc}{path}"


def local_url(config_path: Path | None, environ: Mapping[str, str] = os.environ) -> tuple[str, list[str]]:
    """The local agent's URL from GPU_AGENT_SERVICE__PORT/HOST, else the config file's
    [service] port/host, else port 8095 on loopback; and notes for stderr saying what
    could not be read (a broken config must not stop `status` from working)."""
    notes: list[str] = []
    service = _service_section(config_path, notes)
    port, where = _port(environ.get(PORT_ENV), PORT_ENV, notes), PORT_ENV
    if port is None:
        port, where = _port(service.get("port"), "service.port in the config file", notes), "the config file"
    if port is None:
        port, where = DEFAULT_PORT, "the default"
    if notes:
        notes.append(f"using port {port} ({where})")
    host = str(environ.get(HOST_ENV) or service.get("host") or "")
    if host in _WILDCARDS:
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"http://{host}:{port}", notes


def _service_section(config_path: Path | None, notes: list[str]) -> dict[str, Any]:
    path = config_path or DEFAULT_CONFIG_PATH
    if config_path is None and not path.exists():
        return {}
    try:
        import tomllib  # only when there is a file to read

        section = tomllib.loads(path.read_text()).get("service", {})
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # tomllib.TOMLDecodeError is a ValueError
        notes.append(f"cannot read the config file {path} ({exc})")
        return {}
    if not isinstance(section, dict):
        return {}
    unknown = sorted(set(section) - SERVICE_KEYS)
    if unknown:  # a misspelt `port` would otherwise send us to the default port in silence
        notes.append(f"unknown key(s) in [service] of {path}: {', '.join(unknown)} (`gpu-node-agent check-config` says more)")
    return section


def _port(value: Any, where: str, notes: list[str]) -> int | None:
    if value is None:
        return None
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = -1
    if isinstance(value, bool) or not 0 < port <= 65535:
        why = " (0: the agent picks a port at start)" if port == 0 else ""
        notes.append(f"{where} = {value!r} is not a port{why}")
        return None
    return port


# No proxies: the agent is on this node (or one next to it), never behind http_proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(method: str, url: str, payload: dict[str, Any] | None = None, *, timeout_s: float) -> Answer:
    """One request; an HTTP error status is an Answer, no answer at all raises AgentUnreachable."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(request, timeout=timeout_s) as resp:
            return _answer(resp.status, resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return _answer(exc.code, exc.read())
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise AgentUnreachable(f"cannot reach the agent at {url} ({_why(exc, timeout_s)}). {NEXT_STEP}") from None


def _answer(status: int, raw: bytes) -> Answer:
    text = raw.decode(errors="replace")
    try:
        body = json.loads(text) if text.strip() else None
    except ValueError:
        body = None
    return Answer(status, body, text)


def _why(exc: BaseException, timeout_s: float) -> str:
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout_s:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused: nothing listens there"
    if isinstance(reason, socket.gaierror):
        return "unknown host"
    if isinstance(reason, (http.client.RemoteDisconnected, http.client.BadStatusLine)):
        return "the connection closed without an HTTP answer: is that the agent's port?"
    return str(reason) or type(reason).__name__
