"""Completion answers shaped as vLLM's OpenAI server sends them, for /v1/completions
and /v1/chat/completions: one JSON body (`completion_json`), or with `"stream": true`
server-sent events (`CompletionStream`): `data: {json}\\n\\n` per token, the last
token's chunk carrying finish_reason, an optional usage chunk, then `data: [DONE]\\n\\n`.
Pure: FakeVllm decides when each piece goes out."""

from __future__ import annotations

import json
import random
import time
from typing import Any

DONE = b"data: [DONE]\n\n"
CONTENT_TYPE = "text/event-stream"


def _is_chat(path: str) -> bool:
    return path.endswith("/chat/completions")


def _new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{random.getrandbits(64):016x}"


def _usage(prompt_tokens: int, tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}


def completion_json(path: str, model: str, text: str, reason: str, prompt_tokens: int, tokens: int) -> dict[str, Any]:
    chat = _is_chat(path)
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    return {
        "id": _new_id(chat),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": _usage(prompt_tokens, tokens),
    }


class CompletionStream:
    """One streamed answer; chat chunks carry a `delta`, plain completions a `text`,
    every chunk the same id, as in vLLM."""

    def __init__(self, path: str, model: str, prompt_tokens: int, *, include_usage: bool = False) -> None:
        self.chat = _is_chat(path)
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.include_usage = include_usage
        self.id = _new_id(self.chat)
        self.created = int(time.time())

    def opening(self) -> list[bytes]:
        """What goes out before the first token: chat announces the assistant's role."""
        return (
            [self._event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])]
            if self.chat
            else []
        )

    def token(self, text: str, finish_reason: str | None = None) -> bytes:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        choice.update({"delta": {"content": text}} if self.chat else {"text": text, "stop_reason": None})
        return self._event([choice])

    def closing(self, tokens: int) -> list[bytes]:
        """After the last token: the usage chunk (with `stream_options.include_usage`), then [DONE]."""
        if not self.include_usage:
            return [DONE]
        return [self._event([], usage=_usage(self.prompt_tokens, tokens)), DONE]

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
