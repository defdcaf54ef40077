"""The readings block of `gpu-node-agent status`: one labelled row (or a few) per part of
the node, aligned, wrapped to 100 columns, a unit on every number, no Python reprs.
Standard library only; every key read with .get (older agents lack some)."""

from __future__ import annotations

from typing import Any

from agent.units import count, gb, mb, ms, num, pct, plain, ratio_pct, row, secs


def reading_rows(status: dict[str, Any]) -> list[str]:
    readings = status.get("readings") or {}
    lines = _state_rows(status)
    lines += _inference_rows(readings.get("inference"), status.get("readiness") or {})
    lines += _vllm_rows(readings.get("vllm"))
    lines += _gpu_rows(readings.get("gpu"), status.get("gpu") or {})
    lines += _host_rows(readings.get("host"))
    lines += _metadata_rows(readings, status.get("preemption") or {})
    lines += _export_rows(status.get("exporter") or {})
    lines += _autoscaling_rows(status.get("autoscaling") or {})
    lines += _agent_rows(status)
    known = {"inference", "vllm", "gpu", "host"}
    for key in sorted(k for k in readings if k not in known and not k.startswith("metadata.")):
        lines += row(key, f"{plain((readings[key] or {}).get('value'))}{_age(readings[key])}")
    return lines


def _age(reading: dict[str, Any] | None) -> str:
    if not reading:
        return "  (never read)"
    age = reading.get("age_s")
    if age is None:
        return "  (never read)"
    return f"  (stale, {secs(age)} old)" if reading.get("stale") else f"  ({secs(age)} ago)"


def _missing(label: str, reading: dict[str, Any] | None) -> list[str]:
    error = (reading or {}).get("error") or "no reading yet"
    return row(label, f"no data: {error}{_age(reading)}")


def _state_rows(status: dict[str, Any]) -> list[str]:
    history = status.get("history") or []
    source = f", from {history[-1].get('source')}" if history else ""
    lines = row("state", f"{status.get('state')} since {status.get('since')} ({status.get('reason')}{source}); "
                         f"ready {'yes' if status.get('ready') else 'no'}")
    drain = status.get("drain")
    if not drain:
        return lines
    lines += row("drain", f"{drain.get('reason')} from {drain.get('source')}, started {drain.get('started_at')}: "
                          f"{drain.get('detail') or '-'}")
    progress = drain.get("progress") or {}
    parts = [f"phase {progress.get('phase', '-')}"]
    if drain.get("terminal"):  # an admin drain has no deadline: it lasts until resume
        parts.append(f"{secs(drain.get('deadline_in_s'))} left")
    notice = progress.get("in_flight_at_notice")
    parts.append(f"in flight {count(notice) if notice is not None else 'unknown'} at the notice, "
                 f"{count(progress['in_flight_now']) if progress.get('in_flight_now') is not None else 'unknown'} now")
    parts.append(f"{count(progress.get('completed'))} completed, {count(progress.get('aborted'))} aborted")
    if progress.get("empty_for_s"):
        parts.append(f"empty for {secs(progress['empty_for_s'])}")
    return lines + row("", "; ".join(parts))


def _inference_rows(reading: dict[str, Any] | None, readiness: dict[str, Any]) -> list[str]:
    value = (reading or {}).get("value")
    if not value:
        return _missing("inference", reading)
    detail = value.get("detail") or "-"
    ok = "healthy" if value.get("ok") else f"NOT healthy ({value.get('code')}): {detail}"
    if value.get("ok") and detail != "healthy":
        ok += f": {detail}"
    checks = (f"; {count(readiness.get('consecutive_successes'))} checks passed, "
              f"{count(readiness.get('consecutive_failures'))} failed in a row") if readiness else ""
    return row("inference", f"{ok}, answered in {num(value.get('latency_ms'))} ms{checks}{_age(reading)}")


def _vllm_rows(reading: dict[str, Any] | None) -> list[str]:
    v = (reading or {}).get("value")
    if not v:
        return _missing("vllm", reading)
    models = ", ".join(v.get("models") or []) or "-"
    lines = row("vllm", f"{count(v.get('in_flight'))} in flight ({count(v.get('requests_running'))} running, "
                        f"{count(v.get('requests_waiting'))} waiting); {count(v.get('engines'))} engine(s), {models}"
                        f"{'; engine asleep' if v.get('engine_sleeping') else ''}{_age(reading)}")
    if v.get("kv_cache_capacity_bytes"):
        used, capacity = gb(v.get("kv_cache_used_bytes")), gb(v["kv_cache_capacity_bytes"])
        kv = f"kv cache {ratio_pct(v.get('kv_cache_usage_ratio'))}, {used} of {capacity}"
    else:
        kv = f"kv cache {ratio_pct(v.get('kv_cache_usage_ratio'))} (GB unknown: no cache size known)"
    lines += row(
        "",
        f"{kv}; {num(v.get('generation_tokens_per_s'))} tok/s generated, "
        f"{num(v.get('prompt_tokens_per_s'))} tok/s prefill; goodput {ratio_pct(v.get('goodput_ratio'))}",
    )
    lines += row("", _latencies(v))
    return lines


def _latencies(v: dict[str, Any]) -> str:
    window = f"over the last {secs(v.get('window_s'))}"
    series = [(name, v.get(key) or {}) for name, key in (("ttft", "ttft_s"), ("tpot", "tpot_s"), ("e2e", "e2e_s"))]
    if not any(value is not None for _, q in series for value in q.values()):
        return f"latency: no request finished {window}"
    return f"{window}: " + "; ".join(
        f"{name} p50/p95/p99 {'/'.join(ms(q.get(p)).removesuffix(' ms') for p in ('p50', 'p95', 'p99'))} ms" for name, q in series
    )


def _gpu_rows(reading: dict[str, Any] | None, gpu: dict[str, Any]) -> list[str]:
    if gpu.get("enabled") is False:
        return row("gpus", "not read (gpu.enabled=false)")
    g = (reading or {}).get("value")
    if not g:
        return _missing("gpus", reading)
    if g.get("status") in ("no_driver", "no_gpu"):
        return row("gpus", f"none: {g.get('detail') or g.get('status')}{_age(reading)}")
    driver = f", driver {g['driver_version']}" if g.get("driver_version") else ""
    lines = row(
        "gpus",
        f"{count(g.get('gpu_count'))} GPU(s){driver} ({g.get('status')}): "
        f"util {pct(g.get('utilization_percent_mean'))} mean, memory "
        f"{gb(g.get('memory_used_bytes_total'))} of {gb(g.get('memory_total_bytes_total'))}{_age(reading)}",
    )
    for info in g.get("gpus") or []:
        throttled = ", throttled: " + ", ".join(info["throttle_reasons"]) if info.get("throttle_reasons") else ""
        lost = "LOST; " if info.get("lost") else ""
        lines += row(
            f"  gpu{info.get('index')}",
            f"{lost}{info.get('name') or '-'}: util {pct(info.get('utilization_percent'))}, "
            f"memory {gb(info.get('memory_used_bytes'))} of {gb(info.get('memory_total_bytes'))}, "
            f"{num(info.get('temperature_c'))} C, {num(info.get('power_w'))} W{throttled}",
        )
    return lines


def _host_rows(reading: dict[str, Any] | None) -> list[str]:
    h = (reading or {}).get("value")
    if not h:
        return _missing("host", reading)
    vllm_rss = mb(h.get("inference_rss_bytes"))
    if h.get("inference_rss_bytes") is None and h.get("inference_note"):
        vllm_rss += f" ({h['inference_note']})"
    return row(
        "host",
        f"cpu {pct(h.get('cpu_percent'))}, memory {gb(h.get('memory_used_bytes'))} of "
        f"{gb(h.get('memory_total_bytes'))}; rss: agent {mb(h.get('agent_rss_bytes'))}, vLLM {vllm_rss}{_age(reading)}",
    )


def _metadata_rows(readings: dict[str, Any], preemption: dict[str, Any]) -> list[str]:
    watch_reading = readings.get("metadata.watch") or {}
    watch = watch_reading.get("value") or {}
    if watch.get("enabled") == "false" or preemption.get("enabled") == "false":
        return row("metadata", "not watched (preemption.enabled=false)")
    watching = ", ".join(str(p).removeprefix("instance/") for p in watch.get("watching") or []) or "nothing"
    event = (readings.get("metadata.maintenance_event") or {}).get("value") or preemption.get("maintenance_event")
    lines = row(
        "metadata",
        f"{watch.get('server') or '-'} ({watch.get('presence') or 'not found yet'}): watching {watching}; "
        f"preempted {plain(preemption.get('preempted'))}, maintenance {event or '-'}",
    )
    identity = (readings.get("metadata.identity") or {}).get("value") or {}
    if identity.get("project_id") or identity.get("instance_id"):
        cluster = (
            f", cluster {identity['cluster_name']} in {identity.get('cluster_location')}" if identity.get("cluster_name") else ""
        )
        lines += row(
            "identity",
            f"project {identity.get('project_id') or '-'}, instance {identity.get('instance_id') or '-'} "
            f"({identity.get('instance_name') or '-'}), zone {identity.get('zone') or '-'}{cluster}",
        )
    notice = (readings.get("metadata.upcoming_maintenance") or {}).get("value") or preemption.get("upcoming_maintenance")
    if notice:
        lines += row("maintenance", f"upcoming: {plain(notice)}")
    return lines


def _export_rows(exporter: dict[str, Any]) -> list[str]:
    if not exporter.get("enabled"):
        return row("export", "off (export.enabled=false)")
    resource = (exporter.get("resource") or {}).get("type") or "-"
    health = "healthy" if exporter.get("healthy") else "FAILING (see the warnings)"
    last = exporter.get("last_success_age_s")
    lines = row(
        "export",
        f"{health}: {count(exporter.get('points_written'))} points written, last push "
        f"{'never' if last is None else secs(last) + ' ago'}, every {secs(exporter.get('interval_s'))} "
        f"to {exporter.get('endpoint') or 'Cloud Monitoring'} as {resource}",
    )
    failures = exporter.get("failures_by_code") or {}
    if failures or exporter.get("backlog_size"):
        by_code = ", ".join(f"{code} {count(n)}" for code, n in sorted(failures.items())) or "none"
        lines += row("", f"backlog {count(exporter.get('backlog_size'))} points; failed requests by code: {by_code}")
    return lines


def _autoscaling_rows(autoscaling: dict[str, Any]) -> list[str]:
    """The series autoscalers read; quantile series (`x{quantile=p95}`) grouped on one item."""
    if not autoscaling:
        return []
    plain_items: list[str] = []
    quantiles: dict[str, list[tuple[str, Any]]] = {}
    for name, value in autoscaling.items():
        base, _, label = str(name).partition("{quantile=")
        if label:
            quantiles.setdefault(base, []).append((label.rstrip("}"), value))
        else:
            plain_items.append(f"{name} {num(value, 2)}")
    for base, items in quantiles.items():
        plain_items.append(f"{base} {'/'.join(q for q, _ in items)} {'/'.join(num(v, 2) for _, v in items)}")
    return row("autoscaling", ", ".join(plain_items) + " (what this node writes for autoscalers)")


def _agent_rows(status: dict[str, Any]) -> list[str]:
    systemd = status.get("systemd") or {}
    notify = "systemd notify" + (
        f", watchdog every {secs(systemd.get('watchdog_interval_s'))}" if systemd.get("watchdog_interval_s") else ""
    )
    process = status.get("process") or {}
    lines = row(
        "agent",
        f"{status.get('version')}, pid {status.get('pid')}, up {secs(status.get('uptime_s'))}; "
        f"{count(process.get('asyncio_tasks'))} tasks, {count(process.get('threads'))} threads, "
        f"{count(process.get('open_fds'))} fds{'; ' + notify if systemd.get('notify') else ''}",
    )
    errors = status.get("probe_errors") or {}
    if errors:
        lines += row("", "probe errors since start: " + ", ".join(f"{k} {count(v)}" for k, v in sorted(errors.items())))
    state_file = (status.get("state_file") or {}).get("path")
    if state_file:
        lines += row("", f"state file {state_file}")
    idle = status.get("idle") or {}
    if idle.get("after_s"):
        idle_for = idle.get("idle_for_s")
        lines += row(
            "idle", f"drains after {secs(idle['after_s'])} idle; idle for {secs(idle_for) if idle_for is not None else '0 s'}"
        )
    return lines
