"""Scoped patches: a patch that fires on queries *like* some example prompts (a topic, e.g.
questions about languages), rather than on queries that name a subject.

A subject patch's keys are its subject's tokens (`router`). A topic has no such tokens, so a
scoped patch keeps one key per in-scope example prompt instead: the base model's hidden
states at an early layer, averaged over the words of the user's message (in a chat prompt,
the last user turn; the system message and the template's own tokens are left out), as a
unit vector. A query's score is the mean cosine of its own such vector to its `NEIGHBOURS`
nearest examples, and it fires the patch at or above a threshold calibrated when the patch
is made: from the examples scored against each other (each one left out of its own
neighbours) and, where given, out-of-scope examples scored against them.

Written by hand: it reuses the router's early-layer pass (`hidden_rows`), and what it adds
is a nearest-neighbour score over a few hundred vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

NEIGHBOURS = 3
"""How many nearest examples a query's score averages (fewer examples: all of them)."""
SCOPE_LAYER = 1
"""The layer whose output is pooled: the router's own (one early pass serves both). Measured
on SmolLM2 (questions about languages vs other CounterFact questions, distinct subjects,
docs/behaviour.md): nearest-neighbour AUC 0.966 at layer 1; its calibrated threshold fired
on 92.5 % of held-out in-scope questions and 4 % of out-of-scope ones."""


@dataclass(frozen=True)
class Turn:
    """Where a chat prompt's last user message lies: after `opens`, before `closes` (token
    ids of the model's chat template)."""

    opens: tuple[int, ...]
    closes: tuple[int, ...]


def chat_turn(tokenizer) -> Turn | None:
    """The token ids around a user message in `tokenizer`'s chat template (None: no template,
    or one whose markers cannot be told apart from the message)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "§§scope§§"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}],
                                             tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that needs more than one user turn: pool the whole row
        return None
    if text.count(marker) != 1:
        return None
    before, after = text.split(marker)
    opens = tokenizer(before, add_special_tokens=False)["input_ids"]
    closes = tokenizer(after, add_special_tokens=False)["input_ids"]
    # the last few tokens before the message open the user turn ("<|im_start|>user\n")
    return Turn(tuple(opens[-3:]), tuple(closes[:1])) if opens and closes else None


def user_span(row: Sequence[int], turn: Turn | None) -> tuple[int, int]:
    """(start, end) of the last user message in a row of token ids; the whole row when it
    is not a chat prompt of that template."""
    if turn is None:
        return 0, len(row)
    row = list(row)
    n = len(turn.opens)
    start = next((i + n for i in range(len(row) - n, -1, -1)
                  if tuple(row[i:i + n]) == turn.opens), None)
    if start is None:
        return 0, len(row)
    end = next((j for j in range(start, len(row)) if row[j] == turn.closes[0]), len(row))
    return (start, end) if end > start else (0, len(row))


def pool(hidden: torch.Tensor, row: Sequence[int], turn: Turn | None) -> torch.Tensor:
    """A query's vector: its hidden states (tokens, hidden) averaged over the user message,
    unit length. `row` may hold one token more than `hidden`: a leading <bos> read but left
    out of the states (`router.hidden_rows`)."""
    row = list(row)[len(row) - hidden.shape[0]:] if len(row) > hidden.shape[0] else row
    start, end = user_span(row, turn)
    part = hidden[start:end] if end > start else hidden
    if part.shape[0] == 0:
        return torch.zeros(hidden.shape[-1])
    return torch.nn.functional.normalize(part.float().mean(0), dim=-1)


def scores(queries: torch.Tensor, keys: torch.Tensor, leave_out_self: bool = False) -> torch.Tensor:
    """(queries,) mean cosine to each query's `NEIGHBOURS` nearest keys; `leave_out_self`:
    the queries are the keys, each scored without itself."""
    sims = queries @ keys.T
    if leave_out_self:
        sims.fill_diagonal_(-float("inf"))
    k = max(1, min(NEIGHBOURS, keys.shape[0] - int(leave_out_self)))
    return sims.topk(k, dim=1).values.mean(1)


CHAT = 2.0
"""The value of a chat scope's `"scope"` key (1.0: examples)."""


def is_scope(keys: dict[str, torch.Tensor]) -> bool:
    return "scope" in keys


def scope_kind(keys: dict[str, torch.Tensor]) -> str:
    """"" (a subject patch's keys), "examples" or "chat"."""
    if "scope" not in keys:
        return ""
    return "chat" if float(keys["scope"].flatten()[0]) == CHAT else "examples"


def chat_scope_keys(hidden_size: int) -> dict[str, torch.Tensor]:
    """The keys of a patch that fires on every chat prompt and on nothing else (a behaviour
    learnt from chat turns: a completion prompt is not a turn to answer)."""
    return {"keys": torch.zeros(1, hidden_size), "variant": torch.zeros(1, dtype=torch.long),
            "scope": torch.tensor([CHAT])}


def is_chat(row: Sequence[int], turn: Turn | None) -> bool:
    """`row` holds a user turn of the chat template."""
    if turn is None:
        return False
    n, row = len(turn.opens), list(row)
    return any(tuple(row[i:i + n]) == turn.opens for i in range(len(row) - n + 1))




def score_entries(entries, hidden: list[dict[int, torch.Tensor]], rows: list[list[int]],
                  turn: Turn | None, scored: list[tuple[dict[str, float], list[str]]]) -> None:
    """Score scoped router entries for each row (its hidden states per layer) and add them
    to `scored` (each row's scores and fired patches), as `Router.score_rows` leaves it."""
    for e in (e for e in entries if e.scope == "chat"):
        for r, row in enumerate(rows):
            score = 1.0 if is_chat(row, turn) else 0.0
            scored[r][0][e.patch_id] = score
            if score >= e.threshold:
                scored[r][1].append(e.patch_id)
    entries = [e for e in entries if e.scope != "chat"]
    for layer in sorted({e.layer for e in entries}):
        present = [r for r, h in enumerate(hidden) if layer in h and h[layer].shape[0] > 0]
        if not present:
            continue
        queries = torch.stack([pool(hidden[r][layer], rows[r], turn) for r in present])
        for e in (e for e in entries if e.layer == layer):
            for r, s in zip(present, scores(queries, e.keys).tolist()):
                scored[r][0][e.patch_id] = s
                if s >= e.threshold:
                    scored[r][1].append(e.patch_id)
