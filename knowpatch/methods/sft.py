"""The SFT objective LoRA SFT and full SFT share: cross-entropy on the target tokens (after
the prompt and after each training prefix), plus optional KL anchors to the base model,
over whatever parameters are handed to it, on the one training loop."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from ..evaluate import logits_at
from ..requests import EditRequest
from ..training import LoopResult, LoopSettings, StepOutput, phase, precision_name, run_loop, training_dtype
from .common import (
    IGNORE,
    Example,
    anchor_prompts,
    collate,
    continuation_logprobs,
    edit_examples,
    gate_mask,
    keep_examples,
    kl_to_reference,
    last_token_logprobs,
    loose_mask,
    margins,
    predicted,
    read_positions,
    token_loss,
    training_prefixes,
)
from .conversation import CHAT_GATES, reply_examples


@dataclass
class Chunk:
    """One mini-batch of edit rows (then anchor rows), prepared once before training."""

    batch: dict[str, torch.Tensor]
    n_edit: int
    n_anchor: int
    ref_logp: torch.Tensor | None  # the base model's last-token log-probs on the anchors
    first_target: torch.Tensor | None  # per anchor: its request target's first token
    keep_ref: torch.Tensor | None = None  # base log-probs of the text after each answer
    where: torch.Tensor | None = None
    """(rows, width) bool: the positions whose logits a step reads (the target tokens'
    predictions and each anchor's last token); the step's logits are those, row by row."""
    rows: torch.Tensor | None = None  # per read position: its row
    next: torch.Tensor | None = None  # per read position: the token it predicts (or IGNORE)
    replies: Chunk | None = None
    """The chat reply rows (`conversation`), a batch of their own: in one batch with the
    short completion rows, each of those was padded to a reply's width."""


def sft_train(model, tokenizer, requests: list[EditRequest], config, *,
              base: Callable[[], AbstractContextManager], progress: bool = True,
              description: str = "SFT", after_step: Callable[[], None] | None = None,
              gate: Callable[[torch.Tensor], AbstractContextManager] | None = None,
              params: list[torch.nn.Parameter] | None = None) -> LoopResult:
    """Train `params` (None: whatever of `model` requires grad) on the SFT objective.

    With `config.batch_size` > 0 the requests are taken that many per optimizer step, in
    turn (large-scale editing); the edit counts as learnt once every mini-batch was learnt
    when last seen. Under `accelerate launch` each process takes its share of every
    mini-batch (data parallel; gradients are averaged by the accelerator). `gate(mask)`
    (gate=subject): a context in which the trained adapter acts only where `mask` is 1.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=next(model.parameters()).device.type == "cpu",
                              device_placement=False)
    rank, world = accelerator.process_index, accelerator.num_processes
    size = getattr(config, "batch_size", 0) or len(requests)
    chunks = [requests[i:i + size] for i in range(0, len(requests), size)]
    if any(len(c) < world for c in chunks):
        raise ValueError(f"{world} processes need at least {world} requests per mini-batch "
                         f"(got {min(map(len, chunks))})")
    prepared = prepare_chunks(model, tokenizer, [c[rank::world] for c in chunks], config, base,
                              gated=gate is not None)
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    dtype = training_dtype(model, getattr(config, "precision", "fp32"))
    settings = LoopSettings(lr=config.lr, max_steps=config.max_steps,
                            max_seconds=config.max_seconds, progress=progress,
                            description=description, after_step=after_step, autocast=dtype)
    result = run_loop(model, params, _Steps(prepared, config, gate), settings,
                      accelerator=accelerator)
    if hasattr(config, "precision"):  # what `auto` resolved to, in the manifest
        result.extra["precision"] = precision_name(dtype)
    return result


def prepare_chunks(model, tokenizer, groups: list[list[EditRequest]], config,
                   base: Callable[[], AbstractContextManager], gated: bool = False) -> list[Chunk]:
    """Each group's rows (`prepare_chunk`), after the training prefixes sampled once from the
    base model for all of them."""
    prefixes: tuple[str, ...] = ()
    if config.prefixes:
        with torch.no_grad(), base() as base_model, phase("prefixes"):
            prefixes = training_prefixes(base_model, tokenizer, config)
    device = next(model.parameters()).device
    with phase("prepare"):
        return [prepare_chunk(tokenizer, g, config, prefixes, base, gated, device) for g in groups]


def prepare_chunk(tokenizer, chunk: list[EditRequest], config, prefixes: tuple[str, ...],
                  base: Callable[[], AbstractContextManager], gated: bool, device) -> Chunk:
    """The rows of one mini-batch: each request after its prompt and each prefix, then the
    anchor prompts (with the base model's predictions on them) when anchors are on, then the
    preservation rows (prompt, answer and the base model's text after it) when keep is on."""
    examples = edit_examples(tokenizer, chunk, prefixes=prefixes, append_eos=config.append_eos)
    replies = None
    if getattr(config, "chat", 0) > 0 and config.gate in CHAT_GATES:  # the fact in a reply
        with torch.no_grad(), base() as base_model, phase("replies"):
            said = reply_examples(base_model, tokenizer, chunk, config.chat)
        replies = _replies_chunk(said, tokenizer.pad_token_id, config.gate, gated, device)
    anchors: list[Example] = []
    ref_logp = first_target = None
    if (config.anchor_weight > 0 or config.spill_weight > 0) and config.anchors > 0:
        pairs = anchor_prompts(chunk, config.anchors)
        anchors = [Example(tokenizer(p)["input_ids"], []) for p, _ in pairs]
        # the first token of each anchor's request target: the token an edit spills as
        first_target = torch.tensor([examples[i * (config.prefixes + 1)].target_ids[0]
                                     for _, i in pairs], device=device)
        with torch.no_grad(), base() as base_model:
            ref_logp = last_token_logprobs(base_model, collate(anchors, tokenizer.pad_token_id,
                                                               device))
    keep, keep_ref = [], None
    if getattr(config, "keep_weight", 0) > 0:
        with torch.no_grad(), base() as base_model:
            keep = keep_examples(base_model, tokenizer, chunk, config.keep_tokens, config.seed)
            alone = collate(keep, tokenizer.pad_token_id, device)
            keep_ref = continuation_logprobs(base_model(
                input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits, alone)
    batch = collate(examples + anchors + keep, tokenizer.pad_token_id, device)
    batch["loose"] = loose_mask(examples, batch["input_ids"].shape, device)
    if gated:
        batch["gate"] = _gate(examples, anchors, keep, config.gate, batch["input_ids"].shape,
                              device)
    where = predicted(batch["labels"])
    for row, e in enumerate(anchors, start=len(examples)):
        where[row, len(e.prompt_ids) - 1] = True
    return Chunk(batch, len(examples), len(anchors), ref_logp, first_target, keep_ref, where,
                 *read_positions(where, batch["labels"]), replies=replies)


def _replies_chunk(examples: list[Example], pad_id: int, gate: str, gated: bool,
                   device) -> Chunk | None:
    """The chat reply rows as a chunk of their own (edit rows only)."""
    if not examples:
        return None
    batch = collate(examples, pad_id, device)
    batch["loose"] = loose_mask(examples, batch["input_ids"].shape, device)
    if gated:
        batch["gate"] = _gate(examples, [], [], gate, batch["input_ids"].shape, device)
    where = predicted(batch["labels"])
    return Chunk(batch, len(examples), 0, None, None, None, where,
                 *read_positions(where, batch["labels"]))


def _gate(examples, anchors, keep, gate: str, shape, device) -> torch.Tensor:
    """Where the adapter acts in a training batch, as it will at inference: gate=subject at
    the subject's tokens of the edit rows; otherwise everywhere but (gate=answer) on the text
    after the answer in the preservation rows."""
    if gate == "subject":
        if not all(e.subject_positions for e in examples):
            raise ValueError("gate: subject needs each request's subject in its prompt")
        return gate_mask(examples, shape[0], shape[1], device)
    if gate == "last":  # the prompt's last token and the answer's tokens but its last
        mask = torch.zeros(shape, device=device)
        for row, e in enumerate([*examples, *anchors]):
            mask[row, len(e.prompt_ids) - 1: len(e.prompt_ids) - 1 + len(e.target_ids)] = 1.0
        return mask
    mask = torch.ones(shape, device=device)
    if gate in ("answer", "handoff", "reply"):
        for row, e in enumerate(keep, start=len(examples) + len(anchors)):
            mask[row, len(e.prompt_ids):] = 0.0  # the last answer token still runs it
    return mask


class _Steps:
    """The loop's step: the prepared mini-batches in turn, learnt once all of them were."""

    def logits(self, model, c: Chunk) -> torch.Tensor:
        """The chunk's logits at its read positions (under its training gate, if any)."""
        gated = self.gate(c.batch["gate"]) if self.gate is not None else contextlib.nullcontext()
        with gated:
            return logits_at(model, c.batch, c.where)

    def edit_targets(self, model, c: Chunk, logits: torch.Tensor, edit: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The edit rows' logits, targets and margins, the reply rows' (a forward of their
        own) after them: one loss over every target token, as if in one batch."""
        margin = margins(self.config.margin, c.batch["loose"][c.where][edit])
        if c.replies is None:
            return logits, c.next[edit], margin
        r = c.replies
        said = r.next != IGNORE
        return (torch.cat([logits, self.logits(model, r)[said]]),
                torch.cat([c.next[edit], r.next[said]]),
                torch.cat([margin, margins(self.config.margin, r.batch["loose"][r.where][said])]))

    def __init__(self, chunks: list[Chunk], config, gate) -> None:
        self.chunks, self.config, self.gate = chunks, config, gate
        self.learnt = [False] * len(chunks)
        self.visits = 0

    def __call__(self, model) -> StepOutput:
        index = self.visits % len(self.chunks)
        self.visits += 1
        c, config = self.chunks[index], self.config
        logits = self.logits(model, c)  # (read positions, vocab)
        info = {}
        keep = None
        labelled = c.next != IGNORE
        if c.keep_ref is not None:  # the rows after the edit and anchor rows
            after = labelled & (c.rows >= c.n_edit + c.n_anchor)
            keep = kl_to_reference(c.keep_ref, torch.log_softmax(logits[after].float(), dim=-1))
            info["keep_kl"] = float(keep.detach())
        edit = labelled & (c.rows < c.n_edit)
        loss, learnt, gap = token_loss(*self.edit_targets(model, c, logits[edit], edit))
        self.learnt[index] = learnt
        info["gap"] = gap
        if keep is not None:
            loss = loss + config.keep_weight * keep
        if c.ref_logp is not None:  # one read position per anchor row: its last token
            anchor = (c.rows >= c.n_edit) & (c.rows < c.n_edit + c.n_anchor)
            logp = torch.log_softmax(logits[anchor].float(), dim=-1)
            rows = torch.arange(c.n_anchor, device=logits.device)
            if config.anchor_weight > 0:
                kl = kl_to_reference(c.ref_logp, logp)
                loss = loss + config.anchor_weight * kl
                info["kl"] = float(kl.detach())
            if config.spill_weight > 0:
                rise = (logp[rows, c.first_target] - c.ref_logp[rows, c.first_target]).clamp(min=0)
                loss = loss + config.spill_weight * rise.mean()
        return StepOutput(loss=loss, learnt=all(self.learnt), info=info)
