"""The daemon with every feature on, for the footprint bench: the real `run` path,
except that NVML is the in-process fake with 8 GPUs (this machine has no GPU).

    python -m bench.agent_all_features   # config from GPU_AGENT_* env, like `run`
"""

from __future__ import annotations

import asyncio

import uvloop

from agent.config import load_config
from agent.daemon import Daemon
from agent.logs import configure_logging
from agent.sim.nvml import FakeNvml


async def main() -> None:
    cfg = load_config(None)
    configure_logging(cfg.logging.level, cfg.logging.format.value)
    nvml = FakeNvml(count=8)
    nvml.set_all(utilization_percent=87, memory_used_bytes=20 * 2**30, temperature_c=64, power_mw=250_000)
    daemon = Daemon(cfg, nvml=nvml)
    daemon.install_signal_handlers(asyncio.get_running_loop())
    await daemon.serve()


if __name__ == "__main__":
    uvloop.run(main())
