"""Preference pairs laid out for DPO: micro-batches of whole pairs under a token budget.

A pair's chosen and rejected rows always share a micro-batch (the preference loss compares
them); a pair larger than the budget gets a micro-batch of its own. Each micro-batch is
collated on its own, so it is padded to its own longest row, not the step's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..training import StepOutput
from .common import Example, collate, predicted, read_positions


@dataclass
class Chunk:
    """One micro-batch: `n` chosen rows, then the rejected rows of those that have one."""

    batch: dict[str, torch.Tensor]
    where: torch.Tensor
    """(rows, width) bool: the positions whose logits are read (each predicts a label)."""
    rows: torch.Tensor
    """Each read position's row."""
    targets: torch.Tensor
    """Each read position's target token."""
    n: int
    rej_rows: torch.Tensor
    """The chosen rows that have a rejected row, in the rejected rows' order."""
    ref: torch.Tensor | None = None
    """The reference model's summed completion log-prob of each row (set before training)."""

    @property
    def n_rows(self) -> int:
        return len(self.where)

    @property
    def chosen(self) -> torch.Tensor:
        """Which read positions belong to a chosen row."""
        return self.rows < self.n


@dataclass
class Totals:
    """What a step's loss is averaged over: pairs with a rejected answer, chosen tokens."""

    pairs: int
    tokens: int


def micro_batches(examples: list[tuple[Example, Example | None]], pad: int,
                  device: torch.device, budget: int) -> list[Chunk]:
    """(chosen, rejected or None) pairs in order, in micro-batches of at most `budget` padded
    tokens (rows × width)."""
    groups: list[list[tuple[Example, Example | None]]] = [[]]
    for pair in examples:
        group = groups[-1] + [pair]
        if groups[-1] and _padded(group) > budget:
            groups.append([pair])
        else:
            groups[-1] = group
    return [_chunk(group, pad, device) for group in groups]


def _padded(group: list[tuple[Example, Example | None]]) -> int:
    rows = [e for pair in group for e in pair if e is not None]
    return len(rows) * max(len(e.prompt_ids) + len(e.target_ids) for e in rows)


def _chunk(group, pad: int, device: torch.device) -> Chunk:
    chosen = [c for c, _ in group]
    rejected = [r for _, r in group if r is not None]
    batch = collate(chosen + rejected, pad, device)
    where = predicted(batch["labels"])
    rows, targets = read_positions(where, batch["labels"])
    rej_rows = torch.tensor([i for i, (_, r) in enumerate(group) if r is not None],
                            dtype=torch.long, device=device)
    return Chunk(batch, where, rows, targets, len(chosen), rej_rows)


def combined(outs: list[StepOutput]) -> StepOutput:
    """One step's result from its micro-batches' (their gradients already accumulated): the
    summed loss, learnt when every one is, the smallest gap and margin."""
    info = {"gap": min(o.info["gap"] for o in outs)}
    h = [o.info["h_min"] for o in outs if "h_min" in o.info]
    if h:
        info["h_min"] = min(h)
    return StepOutput(loss=sum(o.loss.detach() for o in outs), learnt=all(o.learnt for o in outs),
                      info=info, accumulated=True)
