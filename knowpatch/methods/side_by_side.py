"""Edits trained side by side: k independent LoRA SFT patches in one batched forward and
backward, each adapter on its own edit's rows only.

A step's cost on a CPU is mostly reading the model's weights, about the same for 5 rows as
for 40, so k edits trained together cost far less than k edits one after another. Each
edit keeps its own adapter (seeded as it would be alone), its own loss and its own
early stop: once its target is learnt by the margin, its rows leave the batch and its
adapter is no longer updated. AdamW keeps its state per parameter and gradients are
clipped per adapter, so each adapter takes the updates it would take alone; what differs
is floating-point rounding (rows padded to a common width, batched products), so scores
agree within noise rather than bit for bit.

Written by hand: PEFT runs one adapter per row at most in training (`adapter_names` is
inference-only) and TRL/PEFT have no notion of several independent edits in one batch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from ..adapters import AdapterBank, RowPlan
from ..errors import KnowpatchError
from ..evaluate import logits_at
from ..requests import EditRequest
from ..training import LoopResult, autocast, frozen_cast, precision_name, training_dtype
from .common import IGNORE, margins, predicted, read_positions, token_loss
from .sft import Chunk, prepare_chunks


def check_side_by_side(config) -> None:
    """The objective side-by-side training covers: the target loss alone (anchor, spill
    and keep terms, and the subject/last training gates, train one edit at a time)."""
    for name in ("anchor_weight", "spill_weight", "keep_weight"):
        if getattr(config, name, 0):
            raise KnowpatchError(f"{name}: edits trained side by side take the target loss only "
                             f"(set {name}: 0, or train one edit at a time)")
    if getattr(config, "gate", "all") in ("subject", "last"):
        raise KnowpatchError(f"gate: {config.gate} trains under a position mask; edits trained "
                         "side by side take gate all, answer or handoff")
    if getattr(config, "batch_size", 0):
        raise KnowpatchError("batch_size: edits trained side by side take each edit whole")


def train_side_by_side(model, tokenizer, bank: AdapterBank, names: list[str],
                       groups: list[list[EditRequest]], config, *,
                       base: Callable[[], AbstractContextManager],
                       progress: Callable[[int, int], None] | None = None) -> list[LoopResult]:
    """Train adapter `names[i]` (in `bank`, freshly initialised) on `groups[i]`, all at once.
    `progress(done, total)` is called as edits finish. Returns each edit's LoopResult; its
    `seconds` is the run's wall time divided among the edits."""
    check_side_by_side(config)
    chunks = prepare_chunks(model, tokenizer, groups, config, base)
    params = {n: bank.params(n) for n in names}
    dtype = training_dtype(model, getattr(config, "precision", "fp32"))
    optimizer = torch.optim.AdamW([p for n in names for p in params[n]], lr=config.lr,
                                  weight_decay=0.0)
    steps, losses = [0] * len(names), [[] for _ in names]
    results: list[LoopResult | None] = [None] * len(names)
    active = list(range(len(names)))
    started = time.perf_counter()
    bank.activate([])  # PEFT's own pass off: each adapter acts on its own rows only
    bank.set_trainable(names, True)
    cast = contextlib.ExitStack()
    cast.enter_context(frozen_cast(model, dtype))
    try:
        while active:
            batch, rows = _merged([chunks[i] for i in active], tokenizer.pad_token_id)
            plan = RowPlan({names[i]: rows[j] for j, i in enumerate(active)}, train=True)
            with bank.running(plan), autocast(model, dtype):
                each = _row_losses(model, batch, rows, config.margin)
            going = []
            late = config.max_seconds and time.perf_counter() - started > config.max_seconds
            for (loss, learnt), i in zip(each, active):
                losses[i].append(float(loss.detach()))
                if learnt or steps[i] >= config.max_steps or late:
                    results[i] = LoopResult(steps=steps[i], learnt=learnt, seconds=0.0,
                                            losses=losses[i])
                else:
                    going.append((i, loss))
            if progress is not None:
                progress(sum(r is not None for r in results), len(names))
            active = [i for i, _ in going]
            if not going:
                break
            optimizer.zero_grad(set_to_none=True)
            torch.stack([loss for _, loss in going]).sum().backward()
            for i, _ in going:  # clipped per adapter, as each is alone
                torch.nn.utils.clip_grad_norm_(params[names[i]], 1.0)
                steps[i] += 1
            optimizer.step()
    finally:
        cast.close()
        optimizer.zero_grad(set_to_none=True)
        bank.set_trainable(names, False)
    share = (time.perf_counter() - started) / len(names)
    for r in results:
        r.seconds = share
        r.extra["side_by_side"] = len(names)
        r.extra["precision"] = precision_name(dtype)
    return results


def _row_losses(model, batch: dict[str, torch.Tensor], rows: list[torch.Tensor],
                margin: float) -> list[tuple[torch.Tensor, bool]]:
    """One forward of the merged batch; each edit's target loss over its own rows, and
    whether it is learnt."""
    where = predicted(batch["labels"])
    at, targets = read_positions(where, batch["labels"])
    loose = batch["loose"][where]
    logits = logits_at(model, batch, where)
    out = []
    for mine in rows:
        read = torch.isin(at, mine)
        loss, learnt, _gap = token_loss(logits[read], targets[read], margins(margin, loose[read]))
        out.append((loss, learnt))
    return out


def _merged(chunks: list[Chunk], pad_id: int) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The chunks' edit rows in one right-padded batch, and each chunk's rows in it."""
    width = max(c.batch["input_ids"].shape[1] for c in chunks)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE, "loose": False}
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in fill}
    width = max([width] + [c.replies.batch["input_ids"].shape[1] for c in chunks if c.replies])
    rows, start = [], 0
    for c in chunks:
        own = [(c.batch, c.n_edit)] + ([(c.replies.batch, c.replies.n_edit)] if c.replies else [])
        for batch, n in own:  # the edit rows, then the chat reply rows (`sft.Chunk.replies`)
            for key, value in fill.items():
                t = batch[key][:n]
                parts[key].append(torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value))
        count = sum(n for _, n in own)
        rows.append(torch.arange(start, start + count, device=t.device))
        start += count
    return {k: torch.cat(v) for k, v in parts.items()}, rows
