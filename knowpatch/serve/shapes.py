"""The request and response shapes of the API (pydantic models of the OpenAI request, plus
knowpatch's `patches` field), and what the patch list shows of a manifest."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields of the OpenAI API not used here

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    patches: Literal["auto"] | list[str] = "auto"


class CompletionBody(Sampling):
    prompt: str | list[str]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | None = None


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)


class RouteBody(BaseModel):
    prompt: str
    patches: Literal["auto"] | list[str] = "auto"


class EditBody(BaseModel):
    """An `EditRequest` in JSON, with the method and its settings."""

    model_config = ConfigDict(extra="allow")  # the EditRequest fields, checked by EditRequest
    method: str = "lora-sft"
    settings: dict[str, Any] = Field(default_factory=dict)


class LoadBody(BaseModel):
    id: str


def summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the patch list shows of one manifest."""
    reqs = manifest.get("requests") or [{}]
    router = manifest.get("router") or {}
    behaviour = manifest.get("behaviour") or {}
    shown = {"behaviour": behaviour.get("behaviour"), "pass_rate": behaviour.get("pass_rate"),
             "scope": router.get("scope")} if behaviour else {}
    return {**shown,"id": manifest.get("id"), "object": "patch", "method": manifest.get("method"),
            "kind": manifest.get("kind", "lora"), "created": manifest.get("created"),
            "prompt": reqs[0].get("prompt"), "target_new": reqs[0].get("target_new"),
            "subject": reqs[0].get("subject"), "requests": len(manifest.get("requests") or []),
            "routed": bool(router), "scores": manifest.get("scores") or {},
            "baseline": manifest.get("baseline") or {}, "steps": manifest.get("steps"),
            "seconds": manifest.get("seconds")}
