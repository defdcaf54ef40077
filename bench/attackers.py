"""Misbehaving HTTP clients for bench/bench_faults.py, run as their own process against
a loopback port. Each attack is bounded: it prints `ready {json}` once its
connections are set up, keeps going for --seconds, closes everything, prints
`done {json}` and exits.

    python -m bench.attackers slowloris --port P [--connections 800] [--seconds 10] [--interval-s 3]
    python -m bench.attackers idle --port P [--connections 2500] [--seconds 10]
    python -m bench.attackers headers --port P [--connections 8] [--seconds 10] [--header-bytes 1000000] [--shape line|fields|endless]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import uvloop

HOST = "127.0.0.1"  # loopback only, whatever the caller asks
_BATCH = 100  # connects in flight at once: a burst of thousands overflows the listen backlog
_ANSWER_TIMEOUT_S = 5.0
_SETUP_TIMEOUT_S = 10.0  # a connect into a full backlog can otherwise retry SYNs for minutes
_OVERRUN_S = 60.0  # on top of --seconds, the most an attack may take in all before it exits
_FIELD_BYTES = 8000  # under aiohttp's 8190-byte max_field_size: many fields, each accepted


def request_head(path: str = "/readyz") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n".encode()


async def read_answer(reader: asyncio.StreamReader) -> int:
    """One HTTP/1.1 answer (Content-Length body); its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


class Attack:
    """What the clients share: the port, the deadline (set once ramped) and `stats`."""

    def __init__(self, port: int, connections: int, seconds: float) -> None:
        self.port = port
        self.connections = connections
        self.seconds = seconds
        self.stats: Counter[str] = Counter()
        self.stop_at = float("inf")
        self.tasks: list[asyncio.Task[None]] = []
        self.over = asyncio.Event()  # idle connections wait on it

    async def ramp(self, setup: Callable[[], Awaitable[None]]) -> None:
        """`setup()` once per connection, _BATCH at a time; then the clock starts."""
        gate = asyncio.Semaphore(_BATCH)

        async def gated() -> None:
            async with gate:
                try:
                    async with asyncio.timeout(_SETUP_TIMEOUT_S):
                        await setup()
                except TimeoutError:
                    self.stats["setup_timed_out"] += 1

        await asyncio.gather(*(gated() for _ in range(self.connections)))
        self.stop_at = time.monotonic() + self.seconds
        print("ready " + json.dumps(self.stats), flush=True)

    def left_s(self) -> float:
        return self.stop_at - time.monotonic()

    def spawn(self, coro: Awaitable[None]) -> None:
        self.tasks.append(asyncio.ensure_future(coro))

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.open_connection(HOST, self.port)
        except OSError:
            self.stats["connect_failed"] += 1
            return None


async def slowloris(attack: Attack, interval_s: float) -> None:
    """Each connection sends a request head, then one more header byte every
    `interval_s` (random phase), never finishing; a dropped one is reopened."""

    async def setup() -> None:
        opened = await attack.open()
        attack.stats["opened"] += opened is not None
        attack.spawn(hold(opened))

    async def hold(opened: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> None:
        while attack.left_s() > 0:
            if opened is None:
                await asyncio.sleep(min(interval_s, max(attack.left_s(), 0.0)))
                opened = await attack.open()
                attack.stats["reopened"] += opened is not None
                continue
            await _dribble(attack, *opened, interval_s)
            opened = None

    await attack.ramp(setup)
    await asyncio.gather(*attack.tasks)


async def _dribble(attack: Attack, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, interval_s: float) -> None:
    try:
        writer.write(request_head() + b"X-Slow: ")
        await asyncio.sleep(random.uniform(0, interval_s))
        while attack.left_s() > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(interval_s, max(attack.left_s(), 0.01))):
                    await reader.read(1024)  # anything back (or EOF) means the server gave up on us
                    attack.stats["dropped_by_server"] += 1
                    return
            writer.write(b"a")
            await writer.drain()
    except OSError:
        attack.stats["dropped_by_server"] += 1
    finally:
        writer.close()


async def idle(attack: Attack) -> None:
    """Each connection sends one full request, reads the answer, then sits idle
    (a watcher counts the ones the server closes)."""

    async def setup() -> None:
        opened = await attack.open()
        if opened is None:
            return
        reader, writer = opened
        writer.write(request_head() + b"\r\n")
        try:
            async with asyncio.timeout(_ANSWER_TIMEOUT_S):
                attack.stats[f"answered_{await read_answer(reader)}"] += 1
        except TimeoutError:
            attack.stats["no_answer"] += 1
        except (OSError, asyncio.IncompleteReadError):
            attack.stats["dropped"] += 1
        attack.spawn(sit(reader, writer))

    async def sit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        eof = asyncio.ensure_future(reader.read())  # returns at EOF: the server closed it
        over = asyncio.ensure_future(attack.over.wait())
        await asyncio.wait([eof, over], return_when=asyncio.FIRST_COMPLETED)
        attack.stats["held_to_the_end" if over.done() and not eof.done() else "closed_by_server"] += 1
        for task in (eof, over):
            task.cancel()
        writer.close()

    await attack.ramp(setup)
    await asyncio.sleep(attack.seconds)
    attack.over.set()
    await asyncio.gather(*attack.tasks)


def header_block(shape: str, header_bytes: int, serial: int = 0) -> bytes:
    """`header_bytes` of headers: one line ("line"), or fields of 8,000 bytes ("fields",
    "endless": numbered from `serial` so an endless block never repeats a name)."""
    if shape == "line":
        return b"X-Big: " + b"a" * header_bytes + b"\r\n"
    count = max(1, header_bytes // (_FIELD_BYTES + 16))
    return b"".join(b"X-Pad-%d: %s\r\n" % (serial + i, b"a" * _FIELD_BYTES) for i in range(count))


async def big_headers(attack: Attack, header_bytes: int, shape: str) -> None:
    """Each client sends requests with `header_bytes` of headers, back to back, on a
    keep-alive connection reopened when dropped. "line" and "fields" end each request;
    "endless" never does: 1 MB of fields after another until the server gives up."""
    request = request_head() + header_block(shape, header_bytes) + b"\r\n"

    async def setup() -> None:
        attack.spawn(send_loop())

    async def send_loop() -> None:
        while attack.left_s() > 0:
            opened = await attack.open()
            if opened is None:
                await asyncio.sleep(0.1)
                continue
            reader, writer = opened
            try:
                while attack.left_s() > 0:
                    status = await (
                        _endless(attack, reader, writer, header_bytes)
                        if shape == "endless"
                        else _one(attack, reader, writer, request)
                    )
                    attack.stats[f"answered_{status}"] += 1
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                attack.stats["dropped"] += 1
            finally:
                writer.close()

    await attack.ramp(setup)
    await asyncio.gather(*attack.tasks)


async def _one(attack: Attack, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    attack.stats["sent"] += 1
    async with asyncio.timeout(_ANSWER_TIMEOUT_S):
        return await read_answer(reader)


async def _endless(attack: Attack, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, header_bytes: int) -> int:
    answer = asyncio.ensure_future(read_answer(reader))
    writer.write(request_head())
    serial = 0
    try:
        while not answer.done() and attack.left_s() > 0:
            writer.write(header_block("fields", header_bytes, serial))
            serial += header_bytes // (_FIELD_BYTES + 16) + 1
            attack.stats["blocks_sent"] += 1
            await writer.drain()
        async with asyncio.timeout(_ANSWER_TIMEOUT_S):
            return await answer
    finally:
        answer.cancel()


async def bounded(body: Callable[[], Awaitable[None]], limit_s: float) -> None:
    """Whatever the server does, the attack ends."""
    try:
        async with asyncio.timeout(limit_s):
            await body()
    except TimeoutError:
        print(f"attack overran {limit_s:g} s: stopped", file=sys.stderr)


def raise_nofile() -> None:
    """This client holds thousands of sockets: soft limit up to the hard one."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["slowloris", "idle", "headers"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int)
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the attack lasts once ramped")
    parser.add_argument("--interval-s", type=float, default=3.0, help="slowloris: seconds between bytes")
    parser.add_argument(
        "--header-bytes", type=int, default=1_000_000, help="headers: bytes of headers per request (or per write)"
    )
    parser.add_argument("--shape", choices=["line", "fields", "endless"], default="line", help="headers: how they are sent")
    args = parser.parse_args()
    raise_nofile()
    default = {"slowloris": 800, "idle": 2500, "headers": 8}[args.kind]
    attack = Attack(args.port, args.connections or default, args.seconds)
    body = {
        "slowloris": lambda: slowloris(attack, args.interval_s),
        "idle": lambda: idle(attack),
        "headers": lambda: big_headers(attack, args.header_bytes, args.shape),
    }[args.kind]
    uvloop.run(bounded(body, args.seconds + _OVERRUN_S))
    print("done " + json.dumps(attack.stats), flush=True)


if __name__ == "__main__":
    main()
