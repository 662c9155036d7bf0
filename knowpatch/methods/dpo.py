"""DPO: the new answer preferred over the old one, or behaviour from preference pairs.

For a fact edit, chosen = `target_new` and rejected = the request's `rejected` when given,
else its `ground_truth`, else the base model's own greedy answer before the edit (recorded
in the patch manifest). For behaviour edits, each request is a (prompt, chosen, rejected)
pair (`knowpatch edit --preferences`).

Losses on h = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r)), log-probabilities
summed over the completion tokens only:
    sigmoid  −log σ(β h)                 (Rafailov et al. 2023)
    ipo      (h − 1/(2β))²               (Azar et al. 2023)
    hinge    max(0, 1 − β h)             (SLiC, Zhao et al. 2023)
plus `alpha` × the SFT loss on the chosen tokens. The reference is the base model: with
LoRA, the adapter disabled; with full training, log-probs computed once before training.
In both cases they are computed once, before the first step (the reference never
changes), so no second copy of the model is held.

Written by hand rather than with TRL's DPOTrainer: an edit is a handful of steps on a few
sequences, stopped as soon as learnt, inside knowpatch's own loop and patch format; the
trainer's dataset/collator/reference-model machinery costs more than the edit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..evaluate import logits_at
from ..requests import EditRequest, encode_completion
from ..training import LoopResult, LoopSettings, StepOutput, phase, run_loop
from . import full_sft
from .common import Example, lora_config, predicted, read_positions, token_loss, training_prefixes
from .preference_batches import Chunk, Totals, combined, micro_batches

NAME = "dpo"
LOSSES = ("sigmoid", "ipo", "hinge")


@dataclass
class Config:
    """DPO settings; the defaults are tuned on the embedded SmolLM2."""

    loss: str = "sigmoid"
    """sigmoid (DPO), ipo or hinge."""
    beta: float = 0.1
    """Strength of the preference (inverse temperature on the log-ratio margin)."""
    alpha: float = 1.0
    """Weight of an SFT (cross-entropy) term on the chosen answer (0: pure preference)."""
    train: str = "lora"
    """lora (an adapter; reference = adapter off) or full (weights; patch = delta)."""
    rank: int = 8
    """LoRA rank (train=lora)."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (train=lora)."""
    modules: list[str] = field(default_factory=lambda: ["mlp_out"])
    """Roles (attn, mlp_in, mlp_out, all) or module names; with train=full, * for all."""
    layers: str = "all"
    """Decoder layers trained (as LoRA SFT: every layer, routing keeps it on its subject)."""
    lr: float = 5e-3
    """AdamW learning rate (use ~1e-5 with train=full, modules=*)."""
    max_steps: int = 40
    """Ceiling on optimizer steps."""
    margin: float = 3.0
    """Fact edits: learnt once every chosen token beats the runner-up logit by this much."""
    pref_margin: float = 2.0
    """Preference pairs: learnt once β·h ≥ this for every training pair."""
    prefixes: int = 4
    """Also train each pair after this many prefixes (fact edits)."""
    prefix_source: str = "model"
    """fixed or model (sampled from the base model, seeded)."""
    prefix_tokens: int = 10
    """Length of each sampled prefix, in tokens (prefix_source=model)."""
    norm_bound: float | None = None
    """train=full: keep every trained weight within ±norm_bound of its original."""
    delta_dtype: str = "float32"
    """train=full: how the delta is stored (float32 or bfloat16)."""
    route: bool = True
    """train=lora: router keys from each request's subject (see `router`)."""
    route_layer: int = 1
    route_threshold: float = 0.75
    gate: str = "handoff"
    """train=lora, routed: where in a query the adapter acts: handoff, answer or all (see
    LoRA SFT)."""
    micro_batch_tokens: int = 2048
    """A step's pairs run in micro-batches of at most this many (padded) tokens each, their
    gradients summed: the memory a step holds grows with this, not with the pair count."""
    seed: int = 0
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.gate not in ("all", "answer", "handoff"):
            raise ValueError(f"gate must be all, answer or handoff, got {self.gate!r}")
        if self.train not in ("lora", "full"):
            raise ValueError(f"train must be lora or full, got {self.train!r}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be ≥ 0, got {self.alpha}")
        for name in ("rank", "max_steps", "micro_batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.norm_bound is not None and self.norm_bound <= 0:
            raise ValueError(f"norm_bound must be > 0 (or null for none), got {self.norm_bound}")
        if self.prefix_source not in ("fixed", "model"):
            raise ValueError(f"prefix_source must be fixed or model, got {self.prefix_source!r}")
        if self.prefix_tokens < 1:
            raise ValueError(f"prefix_tokens must be ≥ 1, got {self.prefix_tokens}")
        if not self.modules:
            raise ValueError("modules must name at least one role or module")


def kind(config: Config) -> str:
    """LoRA patches, or weight deltas with train=full."""
    return "delta" if config.train == "full" else "lora"


def adapter_config(model, config: Config):
    """The PEFT `LoraConfig` for `model` (train=lora), as LoRA SFT builds it."""
    return lora_config(model, rank=config.rank, alpha=config.lora_alpha, dropout=0.0,
                       modules=config.modules, layers=config.layers)


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *, loss: str,
                    beta: float) -> torch.Tensor:
    """Per-pair loss from summed completion log-probs (each a tensor of shape (pairs,))."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss == "sigmoid":
        return -F.logsigmoid(beta * h)
    if loss == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss == "hinge":
        return torch.relu(1 - beta * h)
    raise ValueError(f"unknown loss {loss!r}")


def completion_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of the labelled (completion) tokens of each row, from full logits;
    `logits[:, t]` predicts `labels[:, t + 1]`, IGNORE elsewhere."""
    where = predicted(labels)
    rows, targets = read_positions(where, labels)
    return row_logprobs(logits[where], targets, rows, len(labels))


def row_logprobs(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
                 n_rows: int) -> torch.Tensor:
    """`completion_logprobs` from the logits read at the labelled positions only: (N, vocab)
    logits, each position's target token and row; (n_rows,) sums."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1))
    return logp.new_zeros(n_rows).index_add(0, rows, logp.squeeze(-1))


def _greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    from ..evaluate import greedy

    ids = greedy(model, tokenizer, [prompt], max_new_tokens)[0]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for stop in ("\n", ".", ","):
        text = text.split(stop)[0]
    return text.strip()


def rejected_answers(model, tokenizer, requests: list[EditRequest]) -> list[str]:
    """The answer each request pushes down: `rejected`, else `ground_truth`, else the base
    model's own greedy answer (`model` must run as the base)."""
    out = []
    for req in requests:
        answer = req.rejected or req.ground_truth
        if not answer:
            answer = _greedy_answer(model, tokenizer, req.prompt)
        if not answer or answer.strip() == req.target_new.strip():
            answer = None  # nothing to push down: the pair degenerates to SFT on chosen
        out.append(answer)
    return out


def chunk_step(model, chunk: Chunk, config: Config, total: Totals, pairs: bool) -> StepOutput:
    """One micro-batch's share of the step's loss (its pairs' and chosen tokens' fraction of
    the whole), and whether its pairs are learnt."""
    logits = logits_at(model, chunk.batch, chunk.where)
    logp = row_logprobs(logits, chunk.targets, chunk.rows, chunk.n_rows)
    sft, learnt, gap = token_loss(logits[chunk.chosen], chunk.targets[chunk.chosen],
                                  config.margin)
    info = {"gap": gap}
    loss = config.alpha * sft * (int(chunk.chosen.sum()) / max(total.tokens, 1))
    if len(chunk.rej_rows):
        n, ref, rej = chunk.n, chunk.ref, chunk.rej_rows
        pref = preference_loss(logp[rej], logp[n:], ref[rej], ref[n:], loss=config.loss,
                               beta=config.beta)
        loss = loss + pref.sum() / total.pairs
        with torch.no_grad():
            h = (logp[rej] - ref[rej]) - (logp[n:] - ref[n:])
            info["h_min"] = float(h.min())
        if pairs:
            learnt = bool((config.beta * h >= config.pref_margin).all())
    return StepOutput(loss=loss, learnt=learnt, info=info)


def train(model, tokenizer, requests: list[EditRequest], config: Config, *,
          base: Callable[[], AbstractContextManager], progress: bool = True, pairs: bool = False,
          params: list[torch.nn.Parameter] | None = None) -> LoopResult:
    """Train until learnt. `pairs`: the requests are preference pairs (behaviour edits)
    rather than fact edits. Returns the loop result (train=full: with the deltas).
    `params` (LoRA): the adapter's parameters (None: those of `model` that require grad)."""
    if config.train == "full":
        return full_sft.train_full(model, config, lambda after_step: _train(
            model, tokenizer, requests, config, base, progress, pairs, after_step))
    return _train(model, tokenizer, requests, config, base, progress, pairs, None, params)


def _train(model, tokenizer, requests, config: Config, base, progress, pairs,
           after_step, params=None) -> LoopResult:
    from accelerate import Accelerator

    device = next(model.parameters()).device
    accelerator = Accelerator(cpu=device.type == "cpu", device_placement=False)
    rank, world = accelerator.process_index, accelerator.num_processes
    if len(requests) < world:
        raise ValueError(f"{world} processes need at least {world} requests or pairs")
    with torch.no_grad(), base() as base_model, phase("prepare"):
        rejected = rejected_answers(base_model, tokenizer, requests)
        prefixes = () if pairs else training_prefixes(base_model, tokenizer, config)
    record = rejected
    # data parallel: each process trains its share (gradients are averaged across processes)
    requests, rejected = requests[rank::world], rejected[rank::world]
    examples = []
    for req, rej in zip(requests, rejected):
        for prefix in ("",) + prefixes:
            examples.append((
                Example(*encode_completion(tokenizer, prefix + req.prompt, req.target_new)),
                Example(*encode_completion(tokenizer, prefix + req.prompt, rej)) if rej else None))
    chunks = micro_batches(examples, tokenizer.pad_token_id, device, config.micro_batch_tokens)
    with torch.no_grad(), base() as base_model, phase("prepare"):
        for chunk in chunks:
            chunk.ref = row_logprobs(logits_at(base_model, chunk.batch, chunk.where),
                                     chunk.targets, chunk.rows, chunk.n_rows)
    total = Totals(pairs=sum(len(c.rej_rows) for c in chunks),
                   tokens=sum(int(c.chosen.sum()) for c in chunks))

    def step(model) -> StepOutput:
        if len(chunks) == 1:  # one forward, its graph kept for the loop's backward
            return chunk_step(model, chunks[0], config, total, pairs)
        # several: each chunk's backward runs here, so only one chunk's graph is alive at a
        # time (a behaviour edit's pairs in one batch held 23 GB on SmolLM2); gradients are
        # summed, synchronised across processes once, on the last chunk
        outs = []
        for i, chunk in enumerate(chunks):
            sync = contextlib.nullcontext() if i == len(chunks) - 1 else accelerator.no_sync(model)
            with sync:
                out = chunk_step(model, chunk, config, total, pairs)
                accelerator.backward(out.loss)
            outs.append(out)
        return combined(outs)

    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    settings = LoopSettings(lr=config.lr, max_steps=config.max_steps,
                            max_seconds=config.max_seconds, progress=progress,
                            description=f"DPO ({config.loss})", after_step=after_step)
    result = run_loop(model, params, step, settings, accelerator=accelerator)
    if not pairs:
        result.extra = {"rejected": record}
    return result
