"""The chunks of a streamed (`"stream": true`) completion as vLLM's OpenAI server
sends them: server-sent events `data: {json}\\n\\n`, one per token, the last token's
chunk carrying finish_reason, an optional usage chunk, then `data: [DONE]\\n\\n`.
Pure: FakeVllm decides when each chunk goes out."""

from __future__ import annotations

import json
import random
import time
from typing import Any

DONE = b"data: [DONE]\n\n"
CONTENT_TYPE = "text/event-stream"


class CompletionStream:
    """One streamed answer; chat (`/v1/chat/completions`) chunks carry a `delta`,
    plain completions a `text`, as in vLLM."""

    def __init__(self, path: str, model: str, prompt_tokens: int, *, include_usage: bool = False) -> None:
        self.chat = path.endswith("/chat/completions")
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.include_usage = include_usage
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{random.getrandbits(64):016x}"
        self.created = int(time.time())

    def opening(self) -> list[bytes]:
        """What goes out before the first token: chat announces the assistant's role."""
        return [self._event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])] if self.chat else []

    def token(self, text: str, finish_reason: str | None = None) -> bytes:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        choice.update({"delta": {"content": text}} if self.chat else {"text": text, "stop_reason": None})
        return self._event([choice])

    def closing(self, tokens: int) -> list[bytes]:
        """After the last token: the usage chunk (with `stream_options.include_usage`), then [DONE]."""
        if not self.include_usage:
            return [DONE]
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": tokens, "total_tokens": self.prompt_tokens + tokens}
        return [self._event([], usage=usage), DONE]

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
