"""A FakeVllm in its own process, so its rendering does not run in the measuring
process; prints `listening PORT BYTES` when it serves. --full-v1 adds the families
FakeVllm leaves out, for a real V1 server's size (~1,500 lines for 4 engines). With --extra-lines or
--long-line-bytes it serves a pre-rendered real exposition and, from the first
SIGUSR1 on, that exposition with extra distinct-label `vllm:request_success_total`
series (or one huge label value) added: BYTES is that body's size. SIGUSR1 is a
no-op otherwise.

    python -m bench.vllm_child [--engines 4] [--model NAME] [--full-v1] [--extra-lines 100000 | --long-line-bytes 7000000]
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop

from agent.sim.vllm import FakeVllm
from bench.v1_families import FullV1Vllm

_FAMILY = b"vllm:request_success_total{"


class PaddedVllm(FakeVllm):
    """Serves pre-rendered bytes (rendering 100k lines per scrape would measure
    prometheus_client, not the agent): `plain` until `pad()`, then `padded`."""

    def __init__(self, plain: bytes, padded: bytes, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.plain, self.padded = plain, padded
        self.body = plain

    def pad(self) -> None:
        self.body = self.padded

    def render_metrics(self) -> bytes:
        return self.body


def padded(exposition: bytes, lines: list[bytes]) -> bytes:
    """`lines` inserted right after the family's last sample, where a real server puts them."""
    at = exposition.rindex(_FAMILY)
    at = exposition.index(b"\n", at) + 1
    return exposition[:at] + b"".join(line + b"\n" for line in lines) + exposition[at:]


def extra_lines(model: str, count: int) -> list[bytes]:
    return [b'%sengine="0",finished_reason="r%d",model_name="%s"} 1.0' % (_FAMILY, i, model.encode()) for i in range(count)]


def long_line(model: str, total_bytes: int) -> list[bytes]:
    head, tail = _FAMILY + b'engine="0",finished_reason="', b'",model_name="%s"} 1.0' % model.encode()
    return [head + b"x" * max(0, total_bytes - len(head) - len(tail)) + tail]


def loaded(vllm: FakeVllm) -> FakeVllm:
    """Something in flight and 50 finished requests per engine: histograms are populated."""
    for engine in range(vllm.engines):
        vllm.set_load(running=12, waiting=3, engine=engine)
        for _ in range(50):
            vllm.observe_request(engine=engine)
    return vllm


def build(args: argparse.Namespace) -> FakeVllm:
    kind = FullV1Vllm if args.full_v1 else FakeVllm
    real = loaded(kind(engines=args.engines, model=args.model))
    if not (args.extra_lines or args.long_line_bytes):
        return real
    plain = real.render_metrics()
    extra = extra_lines(args.model, args.extra_lines) if args.extra_lines else long_line(args.model, args.long_line_bytes)
    return PaddedVllm(plain, padded(plain, extra), engines=args.engines, model=args.model)


async def serve(args: argparse.Namespace) -> None:
    vllm = build(args)
    pad = vllm.pad if isinstance(vllm, PaddedVllm) else lambda: None
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, pad)
    await vllm.start()
    body = vllm.padded if isinstance(vllm, PaddedVllm) else vllm.render_metrics()
    print(f"listening {vllm.port} {len(body)}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=int, default=1)
    parser.add_argument("--model", default="fake/llama-3-8b")
    parser.add_argument("--full-v1", action="store_true", help="every family a V1 server serves (bench/v1_families.py)")
    parser.add_argument("--extra-lines", type=int, default=0)
    parser.add_argument("--long-line-bytes", type=int, default=0)
    uvloop.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
