"""A row's answer gate as two phases of generation, for an engine that applies an adapter to
every position of a request (vLLM): phase 1 writes with the fired patches' adapter until
the gate lets go; phase 2 continues prompt + those tokens on the base weights.

The local engine (`dispatch.Placement`) runs the adapter on the query and on the first
generated tokens, then the base weights re-read the text so far and write on:

    gate=reply    until the text names the patch's answer, `reply_tokens` tokens at most
    gate=handoff  the answer's first `answer_tokens` tokens
    gate=all      every token (and an unrouted patch acts on every token)

Phase 1 of a row ends after the token at which the local engine's adapter would stop, so
greedy text is the same token for token (where the two engines compute alike). Where a row
fires several patches, the merged adapter writes until every one of them has let go (the
local engine drops each at its own point; the two can differ there). Gates that act on
part of the query (answer, subject, last) keep the adapter's states of the query under
the base weights, which an engine that runs one adapter per request cannot do: such
patches are refused (`servable`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...chat import names
from ...errors import KnowpatchError

TWO_PHASE_GATES = ("reply", "handoff", "all")


def gate_of(manifest: dict[str, Any]) -> str:
    """The gate patch `manifest` is served under (an unrouted patch acts everywhere)."""
    if not (manifest.get("router") or {}).get("keys"):
        return "all"
    return str((manifest.get("config") or {}).get("gate", "all"))


def servable(manifest: dict[str, Any]) -> None:
    """Raise `KnowpatchError` (naming why) if an engine of one adapter per request cannot
    serve patch `manifest` as the local engine does."""
    kind, patch_id = manifest.get("kind"), manifest.get("id")
    if kind == "delta":
        raise KnowpatchError(f"patch {patch_id}: a full-parameter patch (a weight delta) cannot "
                             "be served by vLLM's LoRA; use --engine local")
    if kind == "lora" and (gate := gate_of(manifest)) not in TWO_PHASE_GATES:
        raise KnowpatchError(f"patch {patch_id}: gate={gate} keeps the adapter's states of the "
                             "query under the base weights, which vLLM cannot do; retrain it "
                             f"with gate {', '.join(TWO_PHASE_GATES)} or use --engine local")


@dataclass(frozen=True)
class Stop:
    """Where one patch's adapter lets go of a row: after `limit` tokens (None: never), or
    once the text names one of `answers`."""

    limit: int | None
    answers: tuple[str, ...] = ()

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> Stop:
        router, gate = manifest.get("router") or {}, gate_of(manifest)
        if gate == "reply" and router.get("answers") and router.get("reply_tokens"):
            return cls(int(router["reply_tokens"]), tuple(router["answers"]))
        if gate in ("reply", "handoff") and router.get("answer_tokens"):
            return cls(int(router["answer_tokens"]))
        return cls(None)

    def done(self, tokenizer, written: list[int], text: str | None = None) -> bool:
        if self.limit is not None and len(written) >= self.limit:
            return True
        if self.answers:
            text = tokenizer.decode(written, skip_special_tokens=True) if text is None else text
            return any(names(text, a) for a in self.answers)
        return False


@dataclass
class Phases:
    """For one row: the adapter patches of phase 1 (none: the base weights throughout) and
    when phase 1 ends."""

    patches: list[str] = field(default_factory=list)
    stops: list[Stop] = field(default_factory=list)

    @classmethod
    def of(cls, manifests: list[dict[str, Any]], scores: dict[str, float]) -> Phases:
        """The phases of a row that fires the patches `manifests` (in-context patches have
        no adapter: their fact is stated in the prompt); strongest route score first."""
        lora = [m for m in manifests if m.get("kind") == "lora"]
        lora.sort(key=lambda m: -scores.get(m["id"], 1.0))
        return cls([m["id"] for m in lora], [Stop.of(m) for m in lora])

    @property
    def limit(self) -> int | None:
        """The most tokens phase 1 writes (None: no limit)."""
        limits = [s.limit for s in self.stops]
        return None if not limits or None in limits else max(limits)

    def released(self, tokenizer, written: list[int]) -> bool:
        """Every patch of the row has let go after the tokens `written`."""
        text = (tokenizer.decode(written, skip_special_tokens=True)
                if any(s.answers for s in self.stops) else "")
        return bool(self.stops) and all(s.done(tokenizer, written, text) for s in self.stops)
