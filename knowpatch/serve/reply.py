"""The OpenAI response of one request, whole or streamed, from the engine's events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi.responses import JSONResponse

from .errors import ApiError, error_body


class Reply:
    """The OpenAI response of one request, from the engine's events."""

    def __init__(self, chat: bool, model: str, n: int, prompt_tokens: int):
        self.chat, self.model, self.n, self.prompt_tokens = chat, model, n, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.texts = [""] * n
        self.finish: list[str | None] = [None] * n
        self.fired: list[list[str]] = [[] for _ in range(n)]
        self.tokens = [0] * n

    def take(self, event: tuple) -> None:
        choice, text, reason, fired, tokens = event
        self.texts[choice] += text
        self.fired[choice], self.tokens[choice] = list(fired), tokens
        if reason is not None:
            self.finish[choice] = reason
            if reason.startswith("unavailable:"):
                raise ApiError(503, reason[12:].strip(), None, "engine_unavailable")
            if reason.startswith("error:"):
                raise ApiError(500, f"generation failed: {reason[6:].strip()}", None, "server_error")

    async def whole(self, events: asyncio.Queue) -> JSONResponse:
        while any(f is None for f in self.finish):
            self.take(await events.get())
        choices = []
        for i in range(self.n):
            body = ({"message": {"role": "assistant", "content": self.texts[i]}} if self.chat
                    else {"text": self.texts[i], "logprobs": None})
            choices.append({"index": i, **body, "finish_reason": self.finish[i],
                            "knowpatch": {"patches": self.fired[i]}})
        tokens = sum(self.tokens)
        out = {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": choices,
               "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": tokens,
                         "total_tokens": self.prompt_tokens + tokens}}
        fired = sorted({p for f in self.fired for p in f})
        return JSONResponse(out, headers={"x-knowpatch-patches": ",".join(fired)})

    def chunk(self, event: tuple) -> str:
        choice, text, reason, fired, _tokens = event
        if self.chat:
            delta = {"role": "assistant", "content": text} if text or reason is None else {}
            item = {"index": choice, "delta": delta, "finish_reason": reason}
        else:
            item = {"index": choice, "text": text, "logprobs": None, "finish_reason": reason}
        item["knowpatch"] = {"patches": list(fired)}
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [item]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def stream(self, first: tuple, events: asyncio.Queue):
        event = first
        while True:
            choice, _text, reason, _fired, _tokens = event
            if reason is not None and reason.startswith(("error:", "unavailable:")):
                yield f"data: {json.dumps(error_body(reason, None, 'server_error'))}\n\n"
                return
            yield self.chunk(event)
            if reason is not None:
                self.finish[choice] = reason
            if all(f is not None for f in self.finish):
                yield "data: [DONE]\n\n"
                return
            event = await events.get()
