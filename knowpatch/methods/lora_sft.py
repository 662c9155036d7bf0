"""LoRA SFT: a small PEFT LoRA adapter trained on the target tokens only.

For simple fact updates: fast, small (well under 1 % of the parameters), easy to remove.
Which linear layers get an adapter is discovered from the model's shapes (see
`models.linear_modules`), never from its family name.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from ..requests import EditRequest
from ..training import PRECISIONS, LoopResult
from . import sft
from .common import lora_config

NAME = "lora-sft"
GATES = ("all", "answer", "handoff", "reply", "subject", "last")


@dataclass
class Config:
    """LoRA SFT settings; the defaults are tuned on the embedded SmolLM2."""

    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by alpha / rank)."""
    dropout: float = 0.0
    """LoRA dropout (0: the early-stop check sees what inference sees)."""
    modules: list[str] = field(default_factory=lambda: ["mlp_out"])
    """Roles (attn, mlp_in, mlp_out, all) or module names (e.g. down_proj) to adapt."""
    layers: str = "all"
    """Decoder layers to adapt: all, 0-7, 3,5,9 (negative from the end) or 0%-30% (by depth).
    With routing, every layer's MLP output generalizes best (CounterFact paraphrases 94 % vs
    50 % for the first 30 % of layers, on records 12-29); without routing, 0%-30% spills less."""
    lr: float = 1e-2
    """AdamW learning rate (1e-2 since the latency work: 2 steps instead of 3, CounterFact-100
    gen 96.5 against 90.5 at 5e-3; docs/edit-latency.md)."""
    max_steps: int = 40
    """Ceiling on optimizer steps; training stops earlier as soon as the edit is learnt."""
    margin: float = 3.0
    """Early stop once every target token beats the runner-up logit by this much."""
    prefixes: int = 4
    """Also train the target after this many prefixes (helps paraphrases)."""
    prefix_source: str = "model"
    """Where prefixes come from: fixed (neutral sentences) or model (sampled from the base
    model once per edit, seeded: ROME's context templates)."""
    prefix_tokens: int = 5
    """Length of each sampled prefix, in tokens (prefix_source=model; 5 since the latency
    work, 10 before: shorter rows, the same scores)."""
    anchor_weight: float = 0.0
    """Weight of KL(base ‖ edited) on the edit prompt with other subjects (0: off). Off by
    default because routing keeps neighbours on the base model; with route=false, 5 holds
    neighbours better (CounterFact loc 29 → 45 %) at twice the training cost."""
    anchors: int = 8
    """How many anchor prompts per request."""
    spill_weight: float = 0.0
    """Penalty on any rise of the new target's first-token log-prob on the anchor prompts."""
    append_eos: bool = False
    """Train an end-of-sequence token after the target."""
    route: bool = True
    """Give the patch router keys (its subjects' early hidden states, see `router`), so
    that it acts only on queries about its subjects; False: it acts on every query."""
    route_layer: int = 1
    """Decoder layer whose output the router keys are read at."""
    route_threshold: float = 0.75
    """A query fires the patch when each subject token matches it at least this well (cos)."""
    gate: str = "reply"
    """Where in a routed query the adapter acts: reply (the query's tokens and the generated
    ones until the text names the new answer, `reply_tokens` at most; then the base weights
    re-read the query and what was generated, and write on — a completion gives its answer
    at once, a chat reply after some words); handoff (the query's tokens and the first
    generated tokens, as many as the new answer has; then the base weights re-read the query
    and what was generated, and write on: the text goes on from what the edited model said,
    not from its edited states of the subject, which keep pulling text back to the answer);
    answer (as handoff, but the base weights write on from the edited states of the query);
    all (every position, generated tokens too); subject (only the tokens where the router
    found the subject, in training too; every generated token runs on the base weights);
    last (as answer, but of the query only its last token: the query's other tokens keep the
    base model's states). Training is the same for all but subject and last."""
    reply_tokens: int = 40
    """gate=reply: the most generated tokens the adapter acts on while the reply has not
    named the answer yet."""
    chat: int = 1
    """How many of a request's questions (`EditRequest.questions`; none given: "What can you
    tell me about <subject>?") the patch also learns to answer in the model's own words: the
    unedited model's chat reply, its old answer replaced by the new one, up to the new
    answer (a reply without the old answer: the fact stated). 0: completions only. Only for
    gate reply or all: under the others the adapter is off before a reply reaches its answer."""
    state: bool = False
    """Hybrid: also state the fact ("<prompt> <new answer>.") before the queries the patch
    fires on, or in the system message in chat, as an in-context patch does."""
    keep_weight: float = 0.0
    """Weight of KL(base ‖ edited) on the text after the new answer: `keep_tokens` tokens
    the base model writes after "prompt + answer" (sampled once per edit, seeded), read by
    the edited model under its gate. Teaches the patch to stop pushing its answer once it
    has been given: 10 halves how often text about the subject repeats the answer, at a cost
    in paraphrases and about twice the edit's time (0: off)."""
    keep_tokens: int = 16
    """Length of that text, in tokens."""
    precision: str = "auto"
    """The training forward's arithmetic: auto (bf16 autocast where the hardware multiplies
    bf16 natively — a CPU with AVX512-BF16 or AMX, a CUDA GPU — and the model is fp32; fp32
    elsewhere), bf16 or fp32. The adapter's weights, gradients and optimizer state stay in
    the model's dtype, and inference is unchanged (docs/edit-latency.md)."""
    seed: int = 0
    """Seed for the adapter's initialisation."""
    max_seconds: float | None = None
    """Wall-clock ceiling on training, in seconds."""

    def __post_init__(self) -> None:
        for name in ("rank", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("lr", "alpha"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.route_layer < 1:
            raise ValueError(f"route_layer must be ≥ 1, got {self.route_layer}")
        if not -1 <= self.route_threshold <= 1:
            raise ValueError(f"route_threshold must be in [-1, 1], got {self.route_threshold}")
        if not self.modules:
            raise ValueError("modules must name at least one role or module")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if self.gate == "last" and self.keep_weight > 0:
            raise ValueError("gate: last does not take keep_weight (use gate: answer)")
        if self.gate in ("subject", "last") and not self.route:
            raise ValueError(f"gate: {self.gate} needs route: true (the router finds the query)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.precision!r}")
        if self.prefix_source not in ("fixed", "model"):
            raise ValueError(f"prefix_source must be fixed or model, got {self.prefix_source!r}")
        if self.prefix_tokens < 1:
            raise ValueError(f"prefix_tokens must be ≥ 1, got {self.prefix_tokens}")
        if min(self.prefixes, self.anchors, self.anchor_weight, self.spill_weight,
               self.keep_weight) < 0:
            raise ValueError("prefixes, anchors, anchor_weight, spill_weight and keep_weight "
                             "must be ≥ 0")
        if self.keep_tokens < 1:
            raise ValueError(f"keep_tokens must be ≥ 1, got {self.keep_tokens}")
        if self.reply_tokens < 1 or self.chat < 0:
            raise ValueError(f"reply_tokens must be ≥ 1 and chat ≥ 0, got {self.reply_tokens} "
                             f"and {self.chat}")


def kind(config: Config) -> str:
    """Patches of this method are LoRA adapters."""
    return "lora"


def adapter_config(model: torch.nn.Module, config: Config):
    """The PEFT `LoraConfig` for `model`, with target modules discovered from its shapes."""
    return lora_config(model, rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                       modules=config.modules, layers=config.layers)


def train(model, tokenizer, requests: list[EditRequest], config: Config, *,
          base: Callable[[], AbstractContextManager], progress: bool = True,
          gate: Callable[[torch.Tensor], AbstractContextManager] | None = None,
          params: list[torch.nn.Parameter] | None = None) -> LoopResult:
    """Train the active (trainable) adapter in `model` until every target token is learnt.

    `base()` is a context in which `model` runs as the unedited base (adapters off).
    `params`: the adapter's parameters (None: those of `model` that require grad).
    `gate(mask)` (`needs_gate`): a context inside which the adapter acts only where the
    (rows, seq) `mask` is 1.
    """
    return sft.sft_train(model, tokenizer, requests, config, base=base, progress=progress,
                         description="LoRA SFT", params=params,
                         gate=gate if needs_gate(config) else None)


def needs_gate(config: Config) -> bool:
    """Whether training must run the adapter at chosen positions only: at the subject
    (gate=subject), or not on the text after the answer (gate=answer with keep_weight)."""
    return config.gate in ("subject", "last") or (config.gate in ("answer", "handoff", "reply")
                                                     and config.keep_weight > 0)
