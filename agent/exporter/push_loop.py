"""The Cloud Monitoring exporter: every `interval_s` one sample of the node becomes
one batch of points (one per series), queued in a bounded backlog and written in
order with CreateTimeSeries through google-cloud-monitoring's async gRPC client.

The API's rules hold by construction: one point per series per request (a
request carries one batch, <= 200 series), batches >= 10 s apart in end time
(the quota), final flush included, and in time order (a sample that would break
this is skipped, and the final one waits for the gap when the deadline allows),
GAUGE only. Only
UNAVAILABLE and DEADLINE_EXCEEDED are retried, with jittered backoff, and then
the batch waits in the backlog for the next round; INVALID_ARGUMENT (a partial
failure with its CreateTimeSeriesSummary) is counted and logged, never retried;
any other refusal (PERMISSION_DENIED, NOT_FOUND, ...) fails that batch and ends
the round, the rest waits. A backlog replay is paced (one request per
`Tuning.replay_interval_s`); what falls off the bounded backlog is counted.
Everything runs in the exporter's own task: nothing here is on a probe's path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from agent.config import ExportConfig, ExportResource
from agent.core.backoff import backoff_s
from agent.exporter.api_client import (
    DEFAULT_ENDPOINT,
    RETRYABLE,
    ExportSetupError,
    build_client,
    code_of,
    explain,
    message_of,
    partial_summary,
)
from agent.exporter.backlog import Backlog, Batch
from agent.exporter.health import ExportStats, SetupFailure
from agent.exporter.report import TerminationReport, report_points
from agent.exporter.resource import Identity, Resource, ResourceError, detect_resource
from agent.exporter.series import (
    DESCRIPTORS,
    MAX_SERIES_PER_REQUEST,
    MIN_POINT_GAP_S,
    create_request,
    descriptor_proto,
    node_metrics,
    series_points,
    time_series_protos,
)
from agent.node_view import NodeView

log = logging.getLogger(__name__)

_MAX_BATCH_AGE_S = 24 * 3600.0  # the API refuses points older than 25 h
_FINAL_SEND_S = 1.0  # time kept to write the final sample after waiting for its gap
_JITTER_S = 0.5


@dataclass(frozen=True, slots=True)
class Tuning:
    """Timings with production defaults; tests shrink them."""

    request_timeout_s: float = 10.0
    max_attempts: int = 4
    retry_base_s: float = 0.5
    retry_cap_s: float = 8.0
    replay_interval_s: float = 1.0
    identity_wait_s: float = 30.0
    max_series_per_request: int = MAX_SERIES_PER_REQUEST


class NodeRounds(Protocol):
    """What the exporter reads of the node (agent/node_view.py's NodeViews)."""

    identity_seen: asyncio.Event  # set once the metadata source has named the node

    def round(self) -> NodeView:
        """The node view for this export round (it advances what a drain holds)."""
        ...

    def identity(self) -> Identity | None: ...


class Outcome(StrEnum):
    SENT = "sent"
    REJECTED = "rejected"  # not retried: counted failed
    TRANSIENT = "transient"  # retries exhausted or out of time: stays queued


class Exporter:
    """`run()` in its own task; `flush_final()` on the way out; `health()` and
    `collect()` for /status and /metrics."""

    def __init__(
        self,
        cfg: ExportConfig,
        node: NodeRounds,
        *,
        client_factory: Callable[[ExportConfig], Awaitable[Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        environ: dict[str, str] | None = None,
        hostname: str | None = None,
        tuning: Tuning = Tuning(),
    ) -> None:
        self.cfg = cfg
        # Each sample is one round of the node view (a READY round's autoscaling values
        # are what a later drain holds); without a demand gauge they are plain facts.
        self._node = node
        self._client_factory = client_factory or build_client
        self._clock, self._wall = clock, wall
        self._environ = dict(os.environ if environ is None else environ)
        self._hostname = socket.gethostname() if hostname is None else hostname
        self.tuning = tuning
        self.stats = ExportStats(wall=wall)
        self.resource: Resource | None = None
        self._created: set[str] = set()
        self._client: Any = None
        self._backlog = Backlog(cfg.backlog_max_points)
        self._last_end_wall: float | None = None
        self._started = clock()
        self._closing = False
        self._flushed: bool | None = None
        self.final_sample: str | None = None  # what became of the final flush's sample (/status)
        self._wake = asyncio.Event()
        self._send_lock = asyncio.Lock()

    @property
    def points_total(self) -> Counter[str]:
        """Points by result: ok, failed, dropped, retried."""
        return self.stats.points_total

    # --- the task ----------------------------------------------------------------------
    async def run(self) -> None:
        """Push every interval_s until flush_final takes over (then it returns, and the
        flush owns the client); the first round creates the descriptors. Every failure is
        caught and counted; cancellation is not."""
        try:
            await self._wait_for_identity()
            next_at = self._clock()
            while not self._closing:
                try:
                    await self.push_once(deadline_mono=next_at + self.cfg.interval_s)
                except Exception as exc:  # a bug here must not stop the pushes
                    log.exception("export round failed")
                    self.stats.fail(SetupFailure.ERROR, f"export round failed: {type(exc).__name__}: {exc}")
                next_at = max(next_at + self.cfg.interval_s, self._clock())
                await self._pause(next_at - self._clock())
        finally:
            if not self._closing:  # cancelled while pushing; once closing, flush_final closes it
                await self._close_client()

    async def push_once(self, deadline_mono: float | None = None) -> None:
        """One round: sample the node into the backlog, then write what is queued, in order."""
        if self._closing:
            return
        deadline = self._clock() + self.cfg.interval_s if deadline_mono is None else deadline_mono
        self._sample(final=False)
        async with self._send_lock:
            if await self._prepare(deadline):
                await self._send_backlog(deadline, paced=True)
        dropped = self._backlog.trim(self._wall() - _MAX_BATCH_AGE_S)
        if dropped:
            self.stats.points_total["dropped"] += dropped
            extra = {"dropped": dropped, "backlog_max_points": self._backlog.max_points}
            log.warning("export backlog full: oldest points dropped", extra=extra)

    async def flush_final(self, report: TerminationReport | None, deadline_s: float) -> bool:
        """Write the termination report, then the last points and what is queued,
        within `deadline_s`. Logs the report whatever happens; True when it was written.
        Once only: a second call (TERMINATED, then the stop signal) returns the first result."""
        if self._flushed is not None:
            return self._flushed
        if report is not None:
            log.info("termination report", extra={"termination_report": report.as_dict()})
        self._closing = True
        self._wake.set()  # cut run()'s waits short; it parks
        deadline = self._clock() + max(0.0, deadline_s)
        final = Batch(self._wall(), []) if report is None else Batch(self._report_time(report), report_points(report))
        try:
            async with asyncio.timeout(max(0.0, deadline_s)):
                async with self._send_lock:
                    self._wake.clear()
                    # The report first: its series are new, so it waits neither on the
                    # backlog's order nor on the 10 s gap of the regular series.
                    if await self._prepare(deadline) and await self._send_batch(final, deadline, paced=False):
                        await self._final_sample(deadline)
                        await self._send_backlog(deadline, paced=False)
                    else:
                        self._sample(final=True)  # kept in the count of points not written
        except TimeoutError:
            log.warning("final export cut short by the shutdown deadline", extra={"deadline_s": deadline_s})
        finally:
            left = self._backlog.points + len(final.points)
            self._backlog.trim(float("inf"))
            if left:
                self.stats.points_total["dropped"] += left
                log.warning("export: points not written before exit", extra={"dropped": left})
            await self._close_client()
        self._flushed = bool(final.written) and not final.points
        return self._flushed

    # --- what the service shows ------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """The exporter block of /status."""
        return {
            "enabled": True,
            "endpoint": self.cfg.endpoint or DEFAULT_ENDPOINT,
            "interval_s": self.cfg.interval_s,
            "resource": None if self.resource is None else self.resource.as_dict(),
            **self.stats.as_dict(),
            "backlog_size": self._backlog.points,
            "backlog_batches": len(self._backlog),
            "backlog_max_points": self._backlog.max_points,
            "descriptors_created": len(self._created),
            "descriptors_total": len(DESCRIPTORS),
            "final_sample": self.final_sample,
        }

    def collect(self) -> Iterator[Any]:
        """Prometheus families for /metrics (gpu_node_agent_export_*)."""
        return self.stats.families(self._backlog.points, len(self._created) == len(DESCRIPTORS))

    # --- a round's steps -------------------------------------------------------------------
    def _sample(self, *, final: bool) -> None:
        end = self._wall()
        if self._last_end_wall is not None and MIN_POINT_GAP_S - _JITTER_S <= end - self._last_end_wall < MIN_POINT_GAP_S:
            # A round due at exactly the gap, a few ms early by the clocks: stamped at the
            # gap (a point may end up to 5 min in the future), not skipped.
            end = self._last_end_wall + MIN_POINT_GAP_S
        if self._last_end_wall is not None and end - self._last_end_wall < MIN_POINT_GAP_S:
            # One point per series per 10 s, in time order: skip rather than squeeze.
            log.log(
                logging.INFO if final else logging.WARNING,
                "export sample skipped: the previous one is under 10 s old",
                extra={"previous_age_s": round(end - self._last_end_wall, 3)},
            )
            return
        self._backlog.append(Batch(end, series_points(node_metrics(self._node.round()))))
        self._last_end_wall = end

    async def _final_sample(self, deadline: float) -> None:
        """The last sample of the regular series, at least MIN_POINT_GAP_S after the one
        before (the quota): wait for the gap when the deadline leaves time to write it,
        else skip it and say so (the last regular point then stands as the final one)."""
        wait_s = 0.0 if self._last_end_wall is None else self._last_end_wall + MIN_POINT_GAP_S - self._wall()
        if wait_s > 0 and self._clock() + wait_s + _FINAL_SEND_S > deadline:
            self.final_sample = (
                f"skipped: the last point is {MIN_POINT_GAP_S - wait_s:.1f} s old, under the 10 s quota, "
                "and the deadline leaves no time to wait"
            )
            log.info("final export sample skipped", extra={"reason": self.final_sample})
            return
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        self._sample(final=True)
        self.final_sample = "written" if wait_s <= 0 else f"written after waiting {wait_s:.1f} s for the 10 s quota"

    def _report_time(self, report: TerminationReport) -> float:
        now = self._wall()
        return report.at_wall if now - _MAX_BATCH_AGE_S < report.at_wall <= now else now

    async def _wait_for_identity(self) -> None:
        """Give the metadata probe up to identity_wait_s to name the node before the
        first sample: the resource of a series never changes once written."""
        if self.cfg.resource is ExportResource.GENERIC_NODE and self.cfg.project_id:
            return
        left = self.tuning.identity_wait_s - (self._clock() - self._started)
        if self._node.identity() is None and left > 0:
            try:
                async with asyncio.timeout(left):
                    await self._node.identity_seen.wait()
            except TimeoutError:
                log.info("no node identity from the metadata server; exporting without it", extra={"waited_s": round(left, 3)})

    async def _prepare(self, deadline: float) -> bool:
        """Resource, client and descriptors, each once; False while one is missing."""
        if self.resource is None and not self._resolve_resource():
            return False
        if self._client is None:
            try:
                self._client = await self._client_factory(self.cfg)
            except ExportSetupError as exc:
                self.stats.fail(SetupFailure.CREDENTIALS, str(exc))
                return False
            except Exception as exc:
                self.stats.fail(SetupFailure.SETUP, f"cannot build the Cloud Monitoring client: {type(exc).__name__}: {exc}")
                return False
        return await self._ensure_descriptors(deadline)

    def _resolve_resource(self) -> bool:
        try:
            self.resource = detect_resource(self.cfg, self._node.identity(), self._environ, self._hostname)
        except ResourceError as exc:
            self.stats.fail(SetupFailure.RESOURCE, str(exc))
            return False
        log.info("export resource", extra={"resource": self.resource.as_dict()})
        return True

    async def _ensure_descriptors(self, deadline: float) -> bool:
        assert self.resource is not None
        project = self.resource.project_id
        for desc in DESCRIPTORS:
            if desc.type in self._created:
                continue
            proto = descriptor_proto(desc, project)

            def create(t: float, proto: Any = proto) -> Awaitable[Any]:
                return self._client.create_metric_descriptor(
                    name=f"projects/{project}", metric_descriptor=proto, timeout=t, retry=None
                )

            outcome, exc = await self._call(
                "CreateMetricDescriptor",
                create,
                deadline,
                0,
                ok_codes=frozenset({"ALREADY_EXISTS"}),
            )
            if outcome is not Outcome.SENT:
                if outcome is Outcome.REJECTED:
                    self.stats.fail(code_of(exc), explain(f"creating descriptor {desc.type}", project, exc))
                return False
            self._created.add(desc.type)
            if len(self._created) == len(DESCRIPTORS):
                log.info("export descriptors ready", extra={"descriptors": len(DESCRIPTORS), "project": project})
        return True

    async def _send_backlog(self, deadline: float, *, paced: bool) -> None:
        first = True
        while (batch := self._backlog.head()) is not None:
            # A replay is paced so a long backlog cannot eat the project's ingestion quota.
            if not first and paced and not await self._pause(self.tuning.replay_interval_s):
                return
            first = False
            if not await self._send_batch(batch, deadline, paced=paced):
                return

    async def _send_batch(self, batch: Batch, deadline: float, *, paced: bool) -> bool:
        """Write `batch` in chunks of <= 200 series; False when the round should stop."""
        assert self.resource is not None
        project, labels = self.resource.project_id, dict(self.resource.labels)
        while batch.points:
            chunk = batch.points[: min(self.tuning.max_series_per_request, MAX_SERIES_PER_REQUEST)]
            request = create_request(project, time_series_protos(chunk, self.resource.type.value, labels, batch.end_wall))

            def write(t: float, request: Any = request) -> Awaitable[Any]:
                return self._client.create_time_series(request=request, timeout=t, retry=None)

            outcome, exc = await self._call(
                "CreateTimeSeries",
                write,
                deadline,
                len(chunk),
            )
            if outcome is Outcome.TRANSIENT:
                return False
            del batch.points[: len(chunk)]
            written = len(chunk) if outcome is Outcome.SENT else self._rejected(exc, len(chunk), project)
            batch.written += written
            self.stats.written(written)
            if outcome is Outcome.REJECTED and code_of(exc) != "INVALID_ARGUMENT":
                return False  # the project or quota refused: the rest waits for the next round
            if batch.points and paced and not await self._pause(self.tuning.replay_interval_s):
                return False
        return True

    def _rejected(self, exc: BaseException | None, n: int, project: str) -> int:
        """Count a refused write (partial or whole) and say why; returns the points stored."""
        summary = partial_summary(exc)
        stored = min(n, summary.success_point_count) if summary is not None else 0
        self.stats.points_total["failed"] += n - stored
        self.stats.fail(code_of(exc), explain(f"writing {n} points ({stored} stored)", project, exc))
        return stored

    async def _call(
        self,
        what: str,
        invoke: Callable[[float], Awaitable[Any]],
        deadline: float,
        n_points: int,
        *,
        ok_codes: frozenset[str] = frozenset(),
    ) -> tuple[Outcome, BaseException | None]:
        """One API call; only UNAVAILABLE and DEADLINE_EXCEEDED are tried again, with backoff."""
        stats, attempt = self.stats, 0
        while True:
            timeout_s = min(self.tuning.request_timeout_s, deadline - self._clock())
            if timeout_s <= 0:
                return Outcome.TRANSIENT, None
            try:
                await invoke(timeout_s)
                stats.requests_total["OK"] += 1
                return Outcome.SENT, None
            except Exception as exc:
                code = code_of(exc)
                stats.requests_total[code] += 1
                if code in ok_codes:
                    return Outcome.SENT, None
                stats.failures_by_code[code] += 1
                if code not in RETRYABLE:
                    return Outcome.REJECTED, exc
                attempt += 1
                delay_s = backoff_s(attempt, self.tuning.retry_base_s, self.tuning.retry_cap_s)
                if attempt >= self.tuning.max_attempts or self._clock() + delay_s >= deadline or not await self._pause(delay_s):
                    stats.fail(code, f"{what}: {code} after {attempt} attempt(s): {message_of(exc)}; queued for the next round")
                    return Outcome.TRANSIENT, exc
                stats.points_total["retried"] += n_points
                log.info("export retrying", extra={"call": what, "code": code, "attempt": attempt, "delay_s": round(delay_s, 3)})

    async def _pause(self, delay_s: float) -> bool:
        """Wait `delay_s`; False when flush_final cut the wait short."""
        if delay_s > 0:
            try:
                async with asyncio.timeout(delay_s):
                    await self._wake.wait()
            except TimeoutError:
                return True
        return not self._wake.is_set()

    async def close(self) -> None:
        """Close the gRPC channel (run() and flush_final() do it themselves on the way out)."""
        await self._close_client()

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.transport.close()
