"""The warnings block of `gpu-node-agent status`: everything in a /status document that
needs a person, one sentence each, saying what is wrong and, where it helps, what to do.

Reads the document defensively (.get everywhere): an older agent may lack a key, and a
missing key is "nothing to report", never a crash. Standard library only.
"""

from __future__ import annotations

from typing import Any

from agent.units import count, secs

_MAX_GPU_FAULTS = 3
# Readings whose trouble the headline already explains while the node is not serving.
_INFERENCE_KEYS = ("inference", "vllm")


def warnings(status: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for check in (_export, _preemption_watch, _state_file, _in_flight, _stale, _gpu, _tasks, _idle_action):
        found.extend(check(status))
    return found


def _get(doc: Any, *path: str) -> Any:
    for key in path:
        doc = doc.get(key) if isinstance(doc, dict) else None
    return doc


def _export(status: dict[str, Any]) -> list[str]:
    exporter = status.get("exporter") or {}
    if not exporter.get("enabled") or exporter.get("healthy") is not False:
        return []
    last_ok = exporter.get("last_success_age_s")
    since = "it never succeeded" if last_ok is None else f"last success {secs(last_ok)} ago"
    error = exporter.get("last_error") or "no error recorded yet"
    code = exporter.get("last_error_code")
    text = f"export to Cloud Monitoring failing{f' ({code})' if code else ''}: {error}; {since}"
    backlog = exporter.get("backlog_size")
    if backlog:
        text += f"; {count(backlog)} points wait in the backlog (at most {count(exporter.get('backlog_max_points'))})"
    if exporter.get("dropped"):
        text += f"; {count(exporter['dropped'])} points dropped"
    return [text + ". Autoscalers stop seeing this node when its series go missing."]


def _preemption_watch(status: dict[str, Any]) -> list[str]:
    reading = _get(status, "readings", "metadata.watch") or {}
    watch = reading.get("value") or {}
    if watch.get("enabled") == "false":
        return []
    if reading.get("error") and not watch:
        return [f"preemption watch: {reading['error']}"]
    if watch.get("blind_to_preemption"):
        why = watch.get("note") or reading.get("error") or "instance/preempted cannot be watched"
        hint = " (set preemption.enabled=false if this node is not on GCE)" if watch.get("presence") == "absent" else ""
        return [f"blind to preemption: {why}{hint}"]
    return []


def _state_file(status: dict[str, Any]) -> list[str]:
    state_file = status.get("state_file") or {}
    path = state_file.get("path") or "the state file"
    found = []
    if state_file.get("error"):
        found.append(f"drain not persisted: {path}: {state_file['error']}; an agent restart would forget the drain")
    elif state_file.get("persisted") is False:
        found.append(f"drain not persisted yet to {path}: an agent restart now would forget it")
    elif state_file.get("writable") is False:
        why = state_file.get("unwritable_reason") or "it cannot be written"
        found.append(f"state dir not writable ({why}): an admin drain would not survive an agent restart")
    quarantined = state_file.get("quarantined") or []
    if quarantined:
        found.append(f"unreadable state file(s) kept aside for a look: {', '.join(map(str, quarantined))}")
    return found


def _in_flight(status: dict[str, Any]) -> list[str]:
    drain = status.get("drain") or {}
    progress = drain.get("progress") or {}
    if progress.get("phase") != "waiting" or progress.get("in_flight_known") is not False:
        return []
    error = _get(status, "readings", "vllm", "error") or "no fresh reading"
    end = "waits for its deadline" if drain.get("terminal") else "cannot finish until they can be read"
    return [f"in-flight requests unknown: vLLM's metrics cannot be read ({error}); the drain {end}"]


def _stale(status: dict[str, Any]) -> list[str]:
    state = status.get("state")
    found = []
    for key, reading in sorted((status.get("readings") or {}).items()):
        if key == "metadata.watch" or not isinstance(reading, dict) or not reading.get("stale"):
            continue
        code = reading.get("error_code")
        if key in _INFERENCE_KEYS and (state in ("INIT", "WARMING") or (state != "READY" and code == "refused")):
            continue  # vLLM loading, lost, or gone at the end of a drain: the headline says so
        age = reading.get("age_s")
        old = "never read" if age is None else f"{secs(age)} old"
        found.append(f"{key} reading stale ({old}): {reading.get('error') or 'no fresh value'}")
    return found


def _gpu(status: dict[str, Any]) -> list[str]:
    gpu = status.get("gpu") or {}
    faults = gpu.get("faults") or {}
    found = []
    drained_for = faults.get("drained_for")
    if drained_for:
        found.append(f"GPU fault drained the node: {_fault(drained_for)}")
    seen = {(drained_for or {}).get("event_id")}
    recent = [f for f in faults.get("recent") or [] if f.get("event_id") not in seen]
    for fault in recent[-_MAX_GPU_FAULTS:]:
        found.append(f"GPU fault{' (fatal)' if fault.get('fatal') else ''}: {_fault(fault)}")
    if len(recent) > _MAX_GPU_FAULTS:
        found.append(f"... and {len(recent) - _MAX_GPU_FAULTS} earlier GPU faults (gpu-node-agent status --json)")
    reading = _get(status, "readings", "gpu", "value") or {}
    if reading.get("status") == "degraded":
        found.append(f"GPUs degraded: {reading.get('detail') or 'see the gpu rows'}")
    stuck = _get(gpu, "nvml", "stuck_calls")
    if stuck:
        found.append(f"NVML calls stuck: {count(stuck) if not isinstance(stuck, list) else len(stuck)} (a wedged driver?)")
    xid = gpu.get("xid") or {}
    if xid.get("state") == "failed":
        found.append(f"XID events not watched: {xid.get('detail') or 'the event wait failed'}")
    return found


def _fault(fault: dict[str, Any]) -> str:
    where = [f"gpu {fault['gpu']}" if fault.get("gpu") is not None else "", f"XID {fault['xid']}" if fault.get("xid") else ""]
    where_text = ", ".join(w for w in where if w)
    return f"{fault.get('detail') or fault.get('kind')}{f' ({where_text})' if where_text else ''}"


def _tasks(status: dict[str, Any]) -> list[str]:
    found = []
    for name, task in sorted((status.get("tasks") or {}).items()):
        if not isinstance(task, dict) or not task.get("restarts"):
            continue
        critical = " (critical: /healthz fails while it keeps failing)" if task.get("critical") else ""
        found.append(f"task {name} failed and was restarted {count(task['restarts'])} times{critical}; "
                     f"last error: {task.get('last_error') or '-'}")
    return found


def _idle_action(status: dict[str, Any]) -> list[str]:
    result = _get(status, "idle", "action_result") or {}
    if not result or result.get("returncode") == 0:
        return []
    code = result.get("returncode")
    output = (result.get("output") or "").strip().splitlines()
    return [f"idle.action {'exited ' + str(code) if code is not None else 'did not run to the end'}: "
            f"{output[-1] if output else 'no output'}"]
