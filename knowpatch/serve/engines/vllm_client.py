"""The HTTP calls knowpatch makes to a vLLM OpenAI server: health, LoRA adapters loaded and
unloaded at run time, and completions streamed as token ids.

vLLM's own endpoints: `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` (with
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`), `/v1/completions` with a prompt of token ids and
`return_token_ids` (each streamed chunk carries the ids it adds). Closing a stream early
aborts the request in vLLM.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx


class EngineUnavailable(RuntimeError):
    """The vLLM server does not answer (down, restarting, or never started)."""


class UnknownAdapter(LookupError):
    """vLLM does not know the adapter a request names (it restarted without it)."""


class AdapterRefused(ValueError):
    """vLLM refused to load an adapter; the message is vLLM's reason."""


@dataclass
class Sampling:
    """How a row is continued: greedy at temperature 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def body(self) -> dict:
        out = {"temperature": self.temperature, "top_p": self.top_p}
        if self.seed is not None:
            out["seed"] = self.seed
        if self.stop:
            out["stop"], out["include_stop_str_in_output"] = list(self.stop), True
        return out


class VLLMClient:
    """Talks to the vLLM server at `url` (e.g. http://127.0.0.1:8100), whose base model is
    served under the name `base`."""

    def __init__(self, url: str, base: str = "base", timeout: float = 600.0,
                 connections: int = 512):
        self.url, self.base = url.rstrip("/"), base
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=5.0),
                                 limits=limits)

    def close(self) -> None:
        self.http.close()

    def healthy(self) -> bool:
        try:
            return self.http.get("/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def served(self) -> list[str]:
        """The base models the server serves (not its LoRA adapters)."""
        return [m["id"] for m in self._models() if not m.get("parent")]

    def _models(self) -> list[dict]:
        try:
            reply = self.http.get("/v1/models", timeout=10.0)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"vLLM at {self.url} does not answer ({exc})") from None
        if reply.status_code != 200:
            raise EngineUnavailable(f"{self.url}/v1/models answered {reply.status_code}")
        return list(reply.json().get("data", []))

    def load_adapter(self, name: str, path: str) -> None:
        """Load the PEFT adapter folder `path` as `name` (already loaded: nothing to do)."""
        reply = self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        if reply.status_code >= 400 and "already" not in reply.text.lower():
            raise AdapterRefused(_reason(reply))

    def unload_adapter(self, name: str) -> None:
        reply = self._post("/v1/unload_lora_adapter", {"lora_name": name})
        if reply.status_code >= 400 and reply.status_code != 404 and "not" not in reply.text.lower():
            raise AdapterRefused(_reason(reply))

    def _post(self, path: str, body: dict) -> httpx.Response:
        try:
            return self.http.post(path, json=body, timeout=120.0)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"vLLM at {self.url} does not answer ({exc})") from None

    def stream(self, model: str | None, prompt: list[int], max_tokens: int,
               sampling: Sampling) -> Iterator[tuple[list[int], str | None]]:
        """Continue `prompt` (token ids) with adapter `model` (None: the base model): yields
        (new token ids, finish reason or None) as vLLM makes them. Leaving the loop early
        aborts the request."""
        body = {"model": model or self.base, "prompt": prompt, "max_tokens": max_tokens,
                "stream": True, "return_token_ids": True, "skip_special_tokens": False,
                **sampling.body()}
        try:
            with self.http.stream("POST", "/v1/completions", json=body) as reply:
                if reply.status_code >= 400:
                    reply.read()
                    if reply.status_code == 404 and model:
                        raise UnknownAdapter(f"vLLM does not know {model!r}: {_reason(reply)}")
                    raise RuntimeError(f"vLLM answered {reply.status_code}: {_reason(reply)}")
                for line in reply.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise RuntimeError(f"vLLM: {_reason_of(event)}")
                    for choice in event.get("choices", []):
                        yield list(choice.get("token_ids") or []), choice.get("finish_reason")
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"vLLM at {self.url} stopped answering ({exc})") from None


def _reason(reply: httpx.Response) -> str:
    try:
        return _reason_of(reply.json())
    except ValueError:
        return reply.text.strip()[:500]


def _reason_of(body) -> str:
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(body.get("message") or err)
    return str(body)
