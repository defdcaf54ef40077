"""The daemon, phase by phase: serve -> startup -> main loop -> shutdown. Wiring
and the phases only: the decisions are in agent/policy/, the signals in probes/,
what the node reads in agent/node_view.py.

Read top to bottom, this file is the life of the process:
  1. serve: the HTTP service, then the supervisor, each teardown pushed on one
     exit stack as its set-up succeeds;
  2. startup: restore a persisted drain, start the probes, the metadata source
     and the policies' tasks under the supervisor, enter WARMING;
  3. main loop: until a stop (a signal, or the injected trigger) has come AND the
     node is TERMINATED, ping the systemd watchdog and ask for stop time while a
     drain runs;
  4. shutdown, the exit stack in reverse: flush the final report and close the
     HTTP client sessions, cancel the tasks, shut NVML down, close the HTTP
     service, put the signal handlers back; each step with its own bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from agent import __version__
from agent.config import AgentConfig
from agent.core.snapshot import Snapshot
from agent.demand import DemandGauge, DemandTargets
from agent.limits import connection_cap
from agent.logs import LOG_STATS, lifecycle_context
from agent.loop_monitor import LoopMonitor
from agent.node_view import NodeViews
from agent.persistence import DrainPersistence
from agent.policy.drain import DrainController
from agent.policy.gpu_faults import GpuFaultPolicy
from agent.policy.idle import IdleWatchdog
from agent.policy.preemption import PreemptionPolicy
from agent.policy.readiness import MetadataHold, ReadinessPolicy
from agent.policy.requests import DrainDesk, DrainRequest
from agent.signals import LoopSignals, stack_dump
from agent.state_file import DrainStore
from agent.status import node_status
from agent.supervisor import Supervisor
from agent.systemd import SystemdNotifier
from probes.base import ProbeRunner
from probes.gpu_probe import GpuProbe
from probes.host import HostProbe
from probes.inference import InferenceHealthProbe
from probes.metadata import MetadataClient, MetadataWatch, metadata_base_url
from probes.nvml_backend import NvmlBackend, PynvmlBackend
from probes.offloop_http import OffLoopGet
from probes.vllm import VLLM, VllmMetricsProbe
from probes.xid import XidWatcher
from service.app import build_app
from service.auth import AdminAuth
from service.connections import ConnectionGuard, ConnectionLimits, GuardedSite
from service.metrics import AgentCollector
from state_machine import DrainReason, Lifecycle, Source, State, Transition

log = logging.getLogger(__name__)

_TICK_S = 1.0
_SHUTDOWN_BUDGET_S = 10.0
_FLUSH_BUDGET_S = 5.0


def _demand_targets(cfg: AgentConfig) -> DemandTargets:
    auto = cfg.autoscaling
    return DemandTargets(
        queue_per_node=auto.queue_per_node,
        kv_usage_ratio=auto.kv_usage_ratio,
        ttft_p95_s=(auto.ttft_p95_ms or cfg.slo.ttft_ms) / 1000.0,
        max_demand=auto.max_demand,
        utilization_target=auto.utilization_target,
        max_num_seqs=auto.max_num_seqs,
        iteration_floor_s=None if auto.iteration_floor_ms is None else auto.iteration_floor_ms / 1000.0,
    )


class StartupError(Exception):
    """The daemon cannot start (port taken, state dir unusable); the message says why."""


class Daemon:
    def __init__(
        self,
        cfg: AgentConfig,
        *,
        environ: dict[str, str] | None = None,
        nvml: NvmlBackend | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        """`stop` is the injected stop trigger (hypercorn's shutdown_trigger): setting it
        is a first stop signal, so tests, the demo or an embedding program stop the
        daemon as SIGTERM does. The CLI feeds the same path from signal handlers."""
        self.cfg = cfg
        self.environ = dict(os.environ if environ is None else environ)
        self.started_mono = time.monotonic()
        self.snapshot = Snapshot()
        self.lifecycle = Lifecycle()
        self.probe_errors: Counter[str] = Counter()
        self.notifier = SystemdNotifier(self.environ)
        self._wire_policies()
        self.nvml = nvml
        self.gpu_probe: GpuProbe | None = None
        self.xid_watcher: XidWatcher | None = None
        self.demand = DemandGauge(_demand_targets(cfg))
        # The one view of the node /metrics, /status and the exporter read; with export
        # off each READY reading is a round (what a drain holds), else the export round is.
        self.node = NodeViews(self.snapshot, self.lifecycle, self.demand, rounds_on_readings=not cfg.export.enabled)
        self.exporter: Any = None
        self.final_report: Any = None
        if cfg.export.enabled:
            self._wire_export()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentCollector(self))
        self.signals_received = 0
        self.bound_port: int | None = None
        self.http_guard: ConnectionGuard | None = None
        self.log_stats = LOG_STATS
        self.loop_monitor = LoopMonitor()
        self.admin_auth = AdminAuth(cfg.service.admin_token_file)
        self._signals: LoopSignals | None = None
        self.stop = asyncio.Event() if stop is None else stop
        self._changed = asyncio.Event()
        self._transitioned = asyncio.Event()
        self._runners: dict[str, ProbeRunner[Any]] = {}
        self.supervisor: Supervisor | None = None
        self._http: web.AppRunner | None = None
        self.inference_session: aiohttp.ClientSession | None = None
        self.vllm_client: OffLoopGet | None = None  # the /metrics scrape's, off the loop
        self.metadata_session: aiohttp.ClientSession | None = None
        self.lifecycle.subscribe(self._on_transition)
        lifecycle_context.provider = lambda: {"state": self.lifecycle.state.value, "reason": self.lifecycle.reason}

    # --- the life of the process ----------------------------------------------
    async def serve(self) -> None:
        """Every step of set-up is paired with its teardown on one exit stack, so a start-up
        that fails half-way still flushes and closes what it opened; teardown runs in the
        reverse order, numbered as `shutdown()` describes."""
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self._restore_signals)  # 5. the pre-loop handlers: a late signal is ignored
            await self.start_http()
            stack.push_async_callback(self.stop_http)  # 4. the HTTP service, last to go
            stack.push_async_callback(self._close_gpu)  # 3. NVML, once no probe task runs
            self.supervisor = await stack.enter_async_context(Supervisor())  # 2. the tasks, cancelled
            stack.push_async_callback(self.shutdown)  # 1. the final report, the HTTP sessions
            await self.startup(self.supervisor)
            await self.main_loop()

    async def startup(self, supervisor: Supervisor) -> None:
        saved = await self.persistence.restore()
        self.inference_session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.inference.timeout_s),
            connector=aiohttp.TCPConnector(limit=8, force_close=False),
        )
        self._start_probes(supervisor)
        supervisor.add("stop", self._stop_when_triggered, may_finish=True)
        supervisor.add("drain", self.drainer.run, critical=True)
        supervisor.add("persist", self.persistence.run)
        supervisor.add("idle", self.idle.run, may_finish=True)
        supervisor.add("loop_monitor", self.loop_monitor.run)
        if self.exporter is not None:
            # Not critical: export trouble must never make /healthz fail or flip readiness.
            supervisor.add("export", self.exporter.run, may_finish=True)  # returns once flush_final takes over
            supervisor.add("final_report", self.final_report.run, may_finish=True)

        if saved is None:
            self.lifecycle.start_warming()
        self.notifier.ready(self._systemd_status())
        # Everything built so far lives as long as the process: keep it out of the
        # collector's way, so a collection (after bad requests, or the periodic ones)
        # walks only what was made since and never stalls the loop for long.
        gc.freeze()
        log.info(
            "agent started",
            extra={
                "version": __version__,
                "port": self.bound_port,
                "pid": os.getpid(),
                "max_connections": None if self.http_guard is None else self.http_guard.limits.max_connections,
            },
        )

    async def main_loop(self) -> None:
        interval = min(_TICK_S, self.notifier.watchdog_interval_s or _TICK_S)
        while not (self.stop.is_set() and self.lifecycle.state is State.TERMINATED):
            self._changed.clear()
            try:
                async with asyncio.timeout(interval):
                    await self._changed.wait()
            except TimeoutError:
                pass
            self.notifier.watchdog()
            drain = self.lifecycle.drain
            if self.lifecycle.state is State.DRAINING and drain is not None and self.stop.is_set():
                # Ask systemd for the time the drain still needs, plus the shutdown.
                self.notifier.extend_timeout(max(0.0, drain.deadline_mono - time.monotonic()) + _SHUTDOWN_BUDGET_S + 5)

    async def shutdown(self) -> None:
        """The first step out (serve()'s exit stack runs the rest): 1. the final report (a
        no-op when it was already written at TERMINATED) and the HTTP client sessions;
        2. the tasks are cancelled; 3. NVML is shut down; 4. the HTTP service closes;
        5. the signal handlers are put back. Each step has its own bound: the flush
        _FLUSH_BUDGET_S, NVML 2 s, the HTTP service service.shutdown_timeout_s."""
        report = self.drainer.report
        log.info(
            "agent stopping",
            extra={"termination_report": None if report is None else report.as_dict(), "signals": self.signals_received},
        )
        if self.exporter is not None:
            await self.final_report.flush(_FLUSH_BUDGET_S)
            await self.exporter.close()
        for session in (self.inference_session, self.metadata_session):
            if session is not None:
                await session.close()
        if self.vllm_client is not None:
            self.vllm_client.close()

    async def _close_gpu(self) -> None:
        if self.gpu_probe is not None:
            # After the probe tasks are cancelled; skips nvmlShutdown while a call is stuck.
            await self.gpu_probe.close(timeout_s=2.0)

    def _restore_signals(self) -> None:
        if self._signals is not None:
            self._signals.remove()

    # --- signals (what each does: agent/signals.py) ---------------------------------
    def install_signal_handlers(self, loop: asyncio.AbstractEventLoop, pending: list[str] | None = None) -> None:
        """Handlers on the loop; `pending` are stop signals that came before it ran."""
        stop = self.on_stop_signal
        self._signals = LoopSignals({
            signal.SIGTERM: stop, signal.SIGINT: stop, signal.SIGHUP: self.on_reload_signal,
            signal.SIGUSR1: self.on_status_signal, signal.SIGUSR2: self.on_stack_signal,
        })  # fmt: skip
        self._signals.install(loop)
        for name in pending or ():
            self.on_stop_signal(name)

    def on_stop_signal(self, name: str = "SIGTERM") -> None:
        """First signal starts the drain; the second skips the waiting. No I/O here."""
        self.signals_received += 1
        self.stop.set()
        self._changed.set()
        if self.signals_received == 1:
            log.info("stop signal received; draining", extra={"signal": name})
            self.drains.request(DrainRequest(DrainReason.SIGNAL, name, self.cfg.drain.timeout_s, Source.SIGNAL))
            self.notifier.stopping(self._systemd_status())
        elif self.signals_received == 2:
            log.warning("second stop signal: skipping the wait", extra={"signal": name})
            self.drainer.skip_waiting()
        else:
            log.info("stop signal received again; already stopping", extra={"signal": name, "count": self.signals_received})

    def on_reload_signal(self, name: str = "SIGHUP") -> None:
        self.admin_auth.reload()
        log.info(
            "SIGHUP: the admin token file is read again at the next admin call; other settings take effect at restart",
            extra={"signal": name},
        )

    def on_status_signal(self, name: str = "SIGUSR1") -> None:
        log.info("status (SIGUSR1)", extra={"signal": name, "status": self.status()})

    def on_stack_signal(self, name: str = "SIGUSR2") -> None:
        log.info("stacks (SIGUSR2)", extra={"signal": name, **stack_dump()})

    # --- HTTP --------------------------------------------------------------------
    async def start_http(self) -> None:
        service = self.cfg.service
        app = build_app(self, self.admin_auth)
        self._http = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=service.shutdown_timeout_s)
        await self._http.setup()
        cap = connection_cap(service.max_connections)
        self.http_guard = ConnectionGuard(ConnectionLimits(max_connections=cap, keepalive_timeout_s=service.keepalive_timeout_s))
        site = GuardedSite(self._http, service.host, service.port, self.http_guard)
        try:
            await site.start()
        except OSError as exc:
            await self._http.cleanup()
            raise StartupError(f"cannot listen on {service.host}:{service.port} (service.port): {exc.strerror}") from None
        addresses = self._http.addresses
        self.bound_port = addresses[0][1] if addresses else service.port

    async def stop_http(self) -> None:
        if self._http is not None:
            await self._http.cleanup()
            self._http = None

    # --- what the service asks -------------------------------------------------------
    def broken(self) -> list[str]:
        return [] if self.supervisor is None else self.supervisor.broken()

    async def admin_drain(self, reason: str) -> bool:
        started = self.drains.request(DrainRequest(DrainReason.ADMIN, reason, self.cfg.drain.timeout_s, Source.ADMIN_API))
        await self.persistence.sync()
        return started

    async def admin_resume(self) -> None:
        self.lifecycle.resume(Source.ADMIN_API)
        await self.persistence.sync()
        self.readiness.successes = 0

    def persistence_warning(self) -> str | None:
        """Said in every admin answer while the disk does not hold what a restart needs."""
        return self.persistence.warning()

    async def wait_drained(self, timeout_s: float) -> bool:
        """True once the drain finished (admin drained or TERMINATED) within `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    drain = self.lifecycle.drain
                    if self.lifecycle.state is State.TERMINATED:
                        return True
                    if self.lifecycle.state is not State.DRAINING or drain is None:
                        return False
                    if drain.drained:
                        return True
                    self._transitioned.clear()
                    await self._transitioned.wait()
        except TimeoutError:
            return False

    def status(self) -> dict[str, Any]:
        return node_status(self)

    # --- internals ---------------------------------------------------------------------
    def _wire_policies(self) -> None:
        """The decisions (agent/policy/); every drain they ask for goes through one desk."""
        cfg = self.cfg
        self.drains = DrainDesk(self.lifecycle)
        self.persistence = DrainPersistence(
            self.drains, DrainStore(cfg.service.state_dir), restore_deadline_s=cfg.drain.timeout_s
        )
        self.drainer = DrainController(self.lifecycle, self.snapshot, cfg.drain, refresh=self._refresh_in_flight)
        self.preemption = PreemptionPolicy(self.drains, cfg.preemption, cfg.drain)
        self.gpu_faults = GpuFaultPolicy(self.drains, cfg.gpu, cfg.drain)
        self.idle = IdleWatchdog(self.drains, self.snapshot, cfg.idle, cfg.drain)
        self.metadata_hold = MetadataHold(self.snapshot)
        self.readiness = ReadinessPolicy(
            self.lifecycle, cfg.inference.ready_after, cfg.inference.lost_after, hold=self.metadata_hold
        )

    def _wire_export(self) -> None:
        # Imported here: light (monitoring_v3 loads at the first push), and not at all with export off.
        from agent.exporter.final_report import FinalReport
        from agent.exporter.push_loop import Exporter

        self.exporter = Exporter(self.cfg.export, self.node, environ=self.environ)
        self.final_report = FinalReport(
            self.exporter,
            self.lifecycle,
            lambda: self.drainer.report,
            notice_budget_s=self.cfg.preemption.notice_budget_s,
            default_deadline_s=_FLUSH_BUDGET_S,
        )

    def _start_probes(self, supervisor: Supervisor) -> None:
        inference = self.cfg.inference
        assert self.inference_session is not None
        health = InferenceHealthProbe(
            inference.base_url,
            self.inference_session,
            interval_s=inference.poll_interval_s,
            timeout_s=inference.timeout_s,
            check_models=inference.check_models,
        )
        self.vllm_client = OffLoopGet(inference.base_url)
        vllm = VllmMetricsProbe(
            self.vllm_client,
            interval_s=inference.poll_interval_s,
            timeout_s=inference.timeout_s,
            max_bytes=inference.metrics_max_bytes,
            max_lines=inference.metrics_max_lines,
            slo_ttft_ms=self.cfg.slo.ttft_ms,
            slo_tpot_ms=self.cfg.slo.tpot_ms,
            window_s=self.cfg.slo.window_s,
            kv_cache_capacity_bytes=inference.kv_cache_capacity_bytes,
            kv_cache_bytes_per_token=inference.kv_cache_bytes_per_token,
        )
        self._add_probe(supervisor, health, on_sample=self._on_health, critical=True)
        self._add_probe(supervisor, vllm)
        host = HostProbe(
            interval_s=self.cfg.host.poll_interval_s, pid_file=inference.pid_file, process_name=inference.process_name
        )
        self._add_probe(supervisor, host)
        self._start_gpu(supervisor)
        self._start_metadata(supervisor)

    def _start_metadata(self, supervisor: Supervisor) -> None:
        cfg = self.cfg.preemption
        # Its own small pool: the hanging GETs hold up to 3 connections for watch_timeout_s
        # and must not compete with the health probe.
        self.metadata_session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None), connector=aiohttp.TCPConnector(limit=4)
        )
        client = MetadataClient(metadata_base_url(cfg.metadata_host, self.environ), self.metadata_session)
        watch = MetadataWatch(
            client, self.snapshot, self.preemption, cfg, errors=self.probe_errors, identity_wanted=self.cfg.export.enabled
        )
        self.metadata_hold.watch = watch
        supervisor.add("metadata", watch.run, may_finish=True)  # "false" contacts nothing and says so

    def _start_gpu(self, supervisor: Supervisor) -> None:
        gpu = self.cfg.gpu
        if not gpu.enabled:
            return
        nvml = self.nvml or PynvmlBackend()
        self.gpu_probe = GpuProbe(
            nvml, interval_s=gpu.poll_interval_s, call_timeout_s=gpu.call_timeout_s, on_fault=self.gpu_faults.on_fault
        )
        self._add_probe(supervisor, self.gpu_probe)
        self.xid_watcher = XidWatcher(
            nvml, on_fault=self.gpu_faults.on_fault, fatal_xids=gpu.fatal_xids, errors=self.probe_errors
        )
        supervisor.add("xid", self.xid_watcher.run)  # cancelling run() stops its thread (bounded join)

    def _add_probe(self, supervisor: Supervisor, probe: Any, *, on_sample: Any = None, critical: bool = False) -> None:
        runner = ProbeRunner(probe, self.snapshot, self.probe_errors, on_sample=on_sample)
        self._runners[probe.name] = runner
        supervisor.add(f"probe.{probe.name}", runner.run, critical=critical)

    def _on_health(self, reading: Any, error: str | None) -> None:
        self.readiness.on_health(reading, error)
        vllm = self._runners.get(VLLM)
        if reading is not None and reading.ok and vllm is not None and vllm.consecutive_failures:
            # vLLM answers again (a model load can take minutes): the metrics probe may be
            # 30 s into its backoff; read the queue now, not after READY has been for a while.
            vllm.poll_now()

    async def _refresh_in_flight(self) -> None:
        runner = self._runners.get(VLLM)
        if runner is not None:
            await runner.refresh()

    async def _stop_when_triggered(self) -> None:
        await self.stop.wait()
        if self.signals_received == 0:  # set from outside, not by a signal handler
            self.on_stop_signal("stop trigger")

    def _on_transition(self, transition: Transition) -> None:
        self._changed.set()
        self._transitioned.set()
        self.notifier.status(self._systemd_status())

    def _systemd_status(self) -> str:
        return f"{self.lifecycle.state.value}: {self.lifecycle.reason}"
