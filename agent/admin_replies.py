"""What `gpu-node-agent drain` and `resume` say about the agent's answer: one sentence,
whether it is a success, and warnings for stderr. Pure functions over the JSON of
POST /drain and POST /resume (service/app.py); standard library only."""

from __future__ import annotations

from typing import Any

from agent.admin_client import Answer

FOLLOW = "`gpu-node-agent status` to follow"


class Reply:
    """`ok` decides the exit code (in agent/cli.py); `text` goes to stdout when ok, stderr otherwise."""

    __slots__ = ("ok", "text", "warnings")

    def __init__(self, ok: bool, text: str, warnings: list[str] | None = None) -> None:
        self.ok, self.text, self.warnings = ok, text, warnings or []


def drain_reply(answer: Answer, asked_reason: str, wait_s: float | None) -> Reply:
    """POST /drain: 202 accepted, 200 drained (--wait), 504 not in time, 409 terminated."""
    drain = answer.field("drain") or {}
    running = _drain_name(drain)
    warnings = _warnings(answer)
    if answer.status in (200, 202) and answer.field("started") is False:
        return Reply(True, _not_started(drain, asked_reason, drained=answer.status == 200), warnings)
    if answer.status == 200:
        return Reply(True, f"Drained ({running}): nothing in flight; {_until(drain)}.", warnings)
    if answer.status == 202:
        return Reply(True, f"Drain started ({running}): /readyz answers 503 now; {FOLLOW}, "
                           "`gpu-node-agent drain --wait` to wait for in-flight work.", warnings)
    if answer.status == 504:
        return Reply(False, f"Not drained within {wait_s:g} s ({running}); the drain goes on: {FOLLOW}.", warnings)
    if answer.status == 409:
        return Reply(
            False, f"Cannot drain: {_error(answer)} (state {answer.field('state')}, {answer.field('reason')}).", warnings
        )
    return Reply(False, _refused(answer), warnings)


def resume_reply(answer: Answer) -> Reply:
    """POST /resume: 200 resumed, 409 refused (not an admin drain, or not draining)."""
    state = answer.field("state")
    if answer.status == 200:
        then = "READY already" if state == "READY" else f"{state}; READY again once vLLM passes its health checks"
        return Reply(True, f"Resumed: the admin drain ended and the node is {then}.", _warnings(answer))
    if answer.status == 409 and state in ("INIT", "WARMING", "READY"):
        return Reply(True, f"Nothing to resume: the node is not draining (state {state}).", _warnings(answer))
    if answer.status == 409:
        return Reply(False, f"Cannot resume: {_error(answer)}.", _warnings(answer))
    return Reply(False, _refused(answer), _warnings(answer))


def _not_started(drain: dict[str, Any], asked_reason: str, *, drained: bool) -> str:
    """A drain was already running: an admin one keeps its first reason; a higher-priority
    one (preemption, maintenance, a signal...) has subsumed this request."""
    if drain.get("reason") != "admin":
        return (
            f"Not started: a {drain.get('reason')} drain is running ({drain.get('detail') or '-'}), "
            f"which takes precedence over an admin drain; {_until(drain) if drained else 'the node is going away'}."
        )
    kept = "" if drain.get("detail") == asked_reason else f", kept the first reason, not {asked_reason!r}"
    state = "drained: nothing in flight" if drained or drain.get("drained") else FOLLOW
    return f"Already draining ({_drain_name(drain)}){kept}; {state}."


def _until(drain: dict[str, Any]) -> str:
    if drain.get("reason") == "admin":
        return "the node stays out of rotation until `gpu-node-agent resume`"
    return f"the {drain.get('reason')} drain has finished and the node is going away"


def _drain_name(drain: dict[str, Any]) -> str:
    detail = drain.get("detail")
    return f"{drain.get('reason')}: {detail}" if detail else str(drain.get("reason"))


def _warnings(answer: Answer) -> list[str]:
    """Anything the agent says needs a person (e.g. a drain it could not save to disk)."""
    found = [str(w) for w in answer.field("warnings") or [] if w]
    if answer.field("warning"):
        found.append(str(answer.field("warning")))
    if answer.field("persisted") is False and not found:
        found.append("the agent could not save this drain to disk: an agent restart would forget it")
    return found


def _error(answer: Answer) -> str:
    return str(answer.field("error") or answer.text.strip()[:200] or f"HTTP {answer.status}")


def _refused(answer: Answer) -> str:
    hint = ""
    if answer.status in (401, 403):
        hint = " (from off the node, admin calls need the token of service.admin_token_file)"
    elif answer.body is None:
        hint = " (not the agent's JSON: is --url the agent's address?)"
    return f"The agent refused the request: HTTP {answer.status}, {_error(answer)}{hint}."
