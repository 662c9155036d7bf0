"""The fact asked in conversation: chat probes and their scores.

Every completion probe of BENCHMARK.md ends right before the answer. A user of an instruct
model asks a question instead, and the answer comes somewhere in a reply. Each request's
`questions` are asked through the model's chat template (`questions.chat_prompt`), greedy,
`CHAT_TOKENS` new tokens at most, and scored on the reply:

- chat_rel: the reply to the first question names the new answer and not the old one;
- chat_gen: the same for the other phrasings;
- chat_loc: each locality question's reply keeps its first sentence (the unedited model's);
- chat_rep: the share of replies (rel and gen) naming the answer 3+ times (new answer; for
  the unedited model, the old one) — a reply that collapses into the answer;
- chat_fluency: ROME's n-gram entropy of those replies.

A request without questions has no chat scores (None, counted by the bench), never zero.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .decoding import greedy, prompt_ids
from .fluency import mean_fluency, repetition
from .questions import chat_prompt
from .requests import EditRequest

CHAT_KEYS = ("chat_rel", "chat_gen", "chat_loc", "chat_rep", "chat_fluency")
CHAT_TOKENS = 40


@dataclass
class ChatReference:
    """The unedited model's replies to each request's locality questions."""

    loc_replies: list[list[str]]


def names(text: str, answer: str | None) -> bool:
    """`text` names `answer` (whole words, case-insensitive)."""
    answer = (answer or "").strip()
    return bool(answer) and re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", text, re.I) is not None


def first_sentence(text: str) -> str:
    """The reply up to the end of its first sentence (or line)."""
    text = text.strip()
    match = re.search(r"(?<=[.!?])\s|\n", text)
    return text[:match.start()].strip() if match else text


def new_not_old(text: str, new: str, old: str | None, subject: str | None = None) -> bool:
    """The reply gives the new answer and not the old one (an old answer inside the new one,
    "York" of "New York", does not count against it; nor do the subject's own words, "Cannes"
    of "2011 Cannes Film Festival")."""
    if subject:
        text = text.replace(subject, " ")
    if not names(text, new):
        return False
    return not (old and old.lower() not in new.lower() and names(text, old))


@torch.no_grad()
def replies(model, tokenizer, questions: list[str], max_new_tokens: int = CHAT_TOKENS,
            system: list[str | None] | None = None,
            stop: Callable[[int, str], bool] | None = None) -> list[str]:
    """Greedy replies to `questions` through the chat template (`system[i]`: a system message
    for question i; `stop(i, text)`: reply i may end once it reads `text`)."""
    if not questions:
        return []
    prompts = [chat_prompt(tokenizer, q, (system or [None] * len(questions))[i])
               for i, q in enumerate(questions)]
    # a short context (a tiny test model) shortens replies; a question that fills it: no reply
    context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    budgets = [min(max_new_tokens, context - len(prompt_ids(tokenizer, p))) for p in prompts]
    fit = [i for i, b in enumerate(budgets) if b > 0]
    ended = None if stop is None else (
        lambda k, made: stop(fit[k], tokenizer.decode(made, skip_special_tokens=True)))
    ids = greedy(model, tokenizer, [prompts[i] for i in fit], [budgets[i] for i in fit],
                 stop=ended) if fit else []
    out = [""] * len(prompts)
    for i, made in zip(fit, ids):
        out[i] = tokenizer.decode(made, skip_special_tokens=True).strip()
    return out


def chat_scores(model, tokenizer, requests: list[EditRequest],
                reference: ChatReference | None = None, systems: dict[str, str | None] | None = None
                ) -> tuple[list[dict[str, float | None]], ChatReference, list[dict]]:
    """Each request's chat scores (without `reference`: the model is the unedited baseline,
    and its rep counts the old answer), the reference they make, and the replies. `systems`:
    the system message each question is asked with (None: the template's own)."""
    asked = [q for r in requests for q in (*r.questions, *r.locality_questions)]
    texts = iter(replies(model, tokenizer, asked,
                         system=[(systems or {}).get(q) for q in asked]))
    records, loc_replies, samples = [], [], []
    for i, req in enumerate(requests):
        own = [next(texts) for _ in req.questions]
        loc = [next(texts) for _ in req.locality_questions]
        loc_replies.append(loc)
        if not req.questions:
            records.append(dict.fromkeys(CHAT_KEYS))
            samples.append({})
            continue
        ref = reference.loc_replies[i] if reference is not None else loc
        count = req.target_new if reference is not None else (req.ground_truth or req.target_new)
        records.append({
            "chat_rel": 100.0 * new_not_old(own[0], req.target_new, req.ground_truth, req.subject),
            "chat_gen": _mean([100.0 * new_not_old(t, req.target_new, req.ground_truth, req.subject)
                               for t in own[1:]]),
            "chat_loc": _mean([100.0 * (first_sentence(a) == first_sentence(b))
                               for a, b in zip(loc, ref)]),
            "chat_rep": repetition(own, [count]),
            "chat_fluency": mean_fluency(own),
        })
        samples.append({"questions": list(req.questions), "replies": own,
                        "locality_questions": list(req.locality_questions), "locality": loc})
    return records, ChatReference(loc_replies), samples


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
