"""`gpu-node-agent status`: the /status document as an SRE reads it at a glance."""

from __future__ import annotations

from typing import Any


def render(status: dict[str, Any]) -> str:
    lines = [
        f"state      {status['state']}  ({status['reason']}, for {_dur(status.get('seconds_in_state'))}, since {status['since']})",
        f"ready      {'yes' if status.get('ready') else 'no'}    agent {status.get('version')} pid {status.get('pid')} up {_dur(status.get('uptime_s'))}",
    ]
    drain = status.get("drain")
    if drain:
        progress = drain.get("progress") or {}
        lines.append(
            f"drain      {drain['reason']}{' (drained)' if drain.get('drained') else ''}: {drain.get('detail') or '-'}; "
            f"deadline in {_dur(drain.get('deadline_in_s'))}; phase {progress.get('phase', '-')}, "
            f"in flight {_num(progress.get('in_flight_now'))} (at notice {_num(progress.get('in_flight_at_notice'))}), "
            f"completed {_num(progress.get('completed'))}, aborted {_num(progress.get('aborted'))}"
        )
    readings = status.get("readings", {})
    lines.extend(_reading_lines(readings))
    broken = [name for name, task in status.get("tasks", {}).items() if task.get("last_error")]
    if broken:
        lines.append("tasks      restarted: " + ", ".join(f"{n} ({status['tasks'][n]['last_error']})" for n in broken))
    for extra in ("autoscaling", "exporter", "preemption"):
        if status.get(extra):
            lines.append(f"{extra:<10} {_compact(status[extra])}")
    history = status.get("history", [])[-5:]
    if history:
        lines.append("history")
        lines.extend(f"  {t['at']}  {t['from']} -> {t['to']}  {t['reason']} ({t['source']}) {t.get('detail') or ''}" for t in history)
    return "\n".join(lines)


def _reading_lines(readings: dict[str, Any]) -> list[str]:
    lines = []
    health = readings.get("inference")
    if health:
        value = health.get("value") or {}
        lines.append(f"inference  {value.get('code', '-')}: {value.get('detail', health.get('error') or '-')}{_age(health)}")
    vllm = readings.get("vllm")
    if vllm:
        v = vllm.get("value")
        if v:
            lines.append(
                f"vllm       waiting {_num(v.get('requests_waiting'))} running {_num(v.get('requests_running'))} "
                f"kv {_pct(v.get('kv_cache_usage_ratio'))} gen {_num(v.get('generation_tokens_per_s'))} tok/s "
                f"ttft p95 {_ms((v.get('ttft_s') or {}).get('p95'))} tpot p95 {_ms((v.get('tpot_s') or {}).get('p95'))} "
                f"goodput {_pct(v.get('goodput_ratio'))}{_age(vllm)}"
            )
        else:
            lines.append(f"vllm       no data: {vllm.get('error') or 'not scraped yet'}{_age(vllm)}")
    gpu = readings.get("gpu")
    if gpu and gpu.get("value"):
        g = gpu["value"]
        lines.append(
            f"gpus       {g.get('gpu_count', 0)} ({g.get('status', '-')}{': ' + g['detail'] if g.get('detail') else ''}) "
            f"util {_num(g.get('utilization_percent_mean'))}% mem {_gb(g.get('memory_used_bytes_total'))}/{_gb(g.get('memory_total_bytes_total'))} GB{_age(gpu)}"
        )
        for info in g.get("gpus", []):
            lines.append(
                f"  gpu{info.get('index')} util {_num(info.get('utilization_percent'))}% mem {_gb(info.get('memory_used_bytes'))} GB "
                f"{_num(info.get('temperature_c'))}C {_num(info.get('power_w'))}W{' LOST' if info.get('lost') else ''}"
            )
    host = readings.get("host")
    if host and host.get("value"):
        h = host["value"]
        lines.append(
            f"host       cpu {_num(h.get('cpu_percent'))}% mem {_gb(h.get('memory_used_bytes'))}/{_gb(h.get('memory_total_bytes'))} GB "
            f"agent rss {_mb(h.get('agent_rss_bytes'))} MB vllm rss {_mb(h.get('inference_rss_bytes'))} MB{_age(host)}"
        )
    for key in sorted(k for k in readings if k.startswith("metadata")):
        r = readings[key]
        lines.append(f"{key:<10} {_compact(r.get('value'))}{_age(r)}")
    return lines


def _age(reading: dict[str, Any]) -> str:
    age = reading.get("age_s")
    text = f"  [{'STALE ' if reading.get('stale') else ''}{'never' if age is None else f'{age:.1f}s ago'}]"
    if reading.get("error"):
        text += f" last error: {reading['error']}"
    return text


def _compact(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_compact(v)}" for k, v in value.items() if v not in (None, [], {}))
    return str(value)


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value * 1000:.0f}ms"


def _gb(value: Any) -> str:
    return "-" if value is None else f"{value / 1e9:.1f}"


def _mb(value: Any) -> str:
    return "-" if value is None else f"{value / 1e6:.0f}"


def _dur(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    return f"{value:.1f}s" if value < 120 else f"{value / 60:.1f}m" if value < 7200 else f"{value / 3600:.1f}h"
