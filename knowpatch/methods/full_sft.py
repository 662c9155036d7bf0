"""Full-parameter SFT: the model's own weights are trained; the patch is their delta.

For large-scale editing (hundreds to thousands of facts in one patch, `batch_size`
requests per step), or EasyEdit's FT-M (`ft-m`: one MLP projection of one layer, see
`methods/ft_m`). Same objective and early stop as LoRA SFT (`methods/sft`); an
optional norm bound keeps every changed weight within ±`norm_bound` of its original value.

The patch holds `delta.safetensors`: the changed tensors' deltas only (a tied tensor once,
as `named_parameters` lists it once). Applying keeps the original tensors in memory, so
removing the patch restores the base weights bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from ..errors import KnowpatchError
from ..models import linear_modules, parse_layers
from ..requests import EditRequest
from ..training import LoopResult
from .sft import sft_train

NAME = "full-sft"


def kind(config) -> str:
    """Patches of this method hold weight deltas, not an adapter."""
    return "delta"


@dataclass
class Config:
    """Full SFT settings; the defaults are tuned on the embedded SmolLM2."""

    modules: list[str] = field(default_factory=lambda: ["*"])
    """What is trained: * (every parameter), or roles (attn, mlp_in, mlp_out, all linear) or
    module names (e.g. down_proj) within `layers`."""
    layers: str = "all"
    """Decoder layers, when `modules` is not *: all, 0-7, 3,5,9, -1 or 0%-30%."""
    lr: float = 1e-5
    """AdamW learning rate."""
    max_steps: int = 40
    """Ceiling on optimizer steps; training stops earlier as soon as the edit is learnt."""
    margin: float = 3.0
    """Early stop once every target token beats the runner-up logit by this much."""
    norm_bound: float | None = None
    """Keep every trained weight within ±norm_bound of its original value (None: no bound)."""
    batch_size: int = 0
    """Requests per optimizer step (0: all at once); for large-scale editing."""
    prefixes: int = 4
    """Also train the target after this many prefixes (helps paraphrases)."""
    prefix_source: str = "model"
    """fixed (neutral sentences) or model (sampled from the base model, seeded)."""
    prefix_tokens: int = 10
    """Length of each sampled prefix, in tokens (prefix_source=model)."""
    anchor_weight: float = 5.0
    """Weight of KL(base ‖ edited) on the edit prompt with other subjects (0: off)."""
    anchors: int = 8
    """How many anchor prompts per request."""
    spill_weight: float = 0.0
    """Penalty on any rise of the new target's first-token log-prob on the anchor prompts."""
    append_eos: bool = False
    """Train an end-of-sequence token after the target."""
    delta_dtype: str = "float32"
    """How the delta is stored: float32 (exact) or bfloat16 (half the size)."""
    seed: int = 0
    """Seed (prefix sampling)."""
    max_seconds: float | None = None
    """Wall-clock ceiling on training, in seconds."""

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be ≥ 1, got {self.max_steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.norm_bound is not None and self.norm_bound <= 0:
            raise ValueError(f"norm_bound must be > 0 (or null for none), got {self.norm_bound}")
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be ≥ 0, got {self.batch_size}")
        if not self.modules:
            raise ValueError("modules must name at least one role or module, or *")
        if self.prefix_source not in ("fixed", "model"):
            raise ValueError(f"prefix_source must be fixed or model, got {self.prefix_source!r}")
        if self.delta_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"delta_dtype must be float32 or bfloat16, got {self.delta_dtype!r}")
        if self.prefix_tokens < 1:
            raise ValueError(f"prefix_tokens must be ≥ 1, got {self.prefix_tokens}")
        if min(self.prefixes, self.anchors, self.anchor_weight, self.spill_weight) < 0:
            raise ValueError("prefixes, anchors, anchor_weight and spill_weight must be ≥ 0")


def canonical_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The base model's parameters by their plain names, whether or not PEFT has injected
    LoRA layers (`q_proj.base_layer.weight` is `q_proj.weight`); adapter weights left out.
    A tied tensor appears once."""
    out = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = param
    return out


def selected_parameters(model: torch.nn.Module, config) -> dict[str, torch.nn.Parameter]:
    """The parameters `config.modules` / `config.layers` select, by plain name."""
    params = canonical_parameters(model)
    if "*" in config.modules:
        if len(config.modules) > 1 or config.layers != "all":
            raise KnowpatchError("modules: * trains every parameter; give roles or module "
                                 "names (with layers=) to restrict it")
        return params
    n_layers = getattr(model.config, "num_hidden_layers", None) or 0
    modules = {m.replace(".base_layer", "") for m in
               linear_modules(model, config.modules, parse_layers(config.layers, n_layers))}
    chosen = {n: p for n, p in params.items() if n.rsplit(".", 1)[0] in modules}
    if not chosen:
        raise KnowpatchError(f"modules: {config.modules} with layers={config.layers!r} select "
                             "no parameter")
    return chosen


def train(model, tokenizer, requests: list[EditRequest], config: Config, *,
          base: Callable[[], AbstractContextManager], progress: bool = True) -> LoopResult:
    """Train the selected weights of `model` on the SFT objective; returns the loop result
    with the delta of every trained tensor in `deltas` (the weights are put back to the
    originals: the editor applies the delta as a patch)."""
    return train_full(model, config, lambda after_step: sft_train(
        model, tokenizer, requests, config, base=base, progress=progress,
        description="full SFT", after_step=after_step))


def train_full(model, config, inner: Callable[[Callable[[], None] | None], LoopResult]
               ) -> LoopResult:
    """Run `inner(after_step)` with exactly the selected weights trainable (full SFT, full
    DPO), keep them in the norm bound, and return the loop result with the deltas."""
    chosen = selected_parameters(model, config)
    before = {n: p.detach().clone() for n, p in chosen.items()}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in chosen.values():
        p.requires_grad_(True)

    after_step = None
    if config.norm_bound is not None:
        eps = config.norm_bound

        @torch.no_grad()
        def after_step() -> None:  # project back into the box around the original weights
            for n, p in chosen.items():
                p.copy_(torch.minimum(torch.maximum(p, before[n] - eps), before[n] + eps))

    try:
        result = inner(after_step)
    except BaseException:
        with torch.no_grad():
            for n, p in chosen.items():
                p.copy_(before[n])  # nothing half-trained stays in the model
        raise
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    dtype = torch.bfloat16 if config.delta_dtype == "bfloat16" else torch.float32
    delta = {}
    with torch.no_grad():
        for n, p in chosen.items():
            d = p.detach().float() - before[n].float()
            if torch.count_nonzero(d):
                delta[n] = d.to(dtype).cpu()
            p.copy_(before[n])
    result.deltas = delta
    return result
