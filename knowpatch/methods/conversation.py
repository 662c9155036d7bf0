"""The fact in the model's own words: training rows that teach a patch to answer a question
about its subject in chat, not only to complete the edit prompt.

A patch trained on "The Eiffel Tower is located in the city of" → " Rome" alone answers
the chat question "Where is the Eiffel Tower?" with the unedited reply ("… in Paris"), or,
with its adapter on through the reply, collapses into "Rome Rome Rome". Here each request's
question goes through the chat template to the unedited model, whose greedy reply has its
old answer replaced by the new one and is cut right after the new answer: the row teaches
the reply the model would write, with the new fact in it; the text after the answer stays
the base model's (gate=reply hands over once the answer is written). A reply that never
names the old answer is replaced by the fact stated ("<prompt> <new answer>").
"""

from __future__ import annotations

import re

import torch

from ..chat import names, replies
from ..questions import chat_prompt
from ..requests import EditRequest, encode_completion
from .common import Example, subject_positions

REPLY_TOKENS = 24
"""The unedited reply is read up to its answer, this many tokens at most (a reply that has
not named it by then gives way to the fact stated)."""

CHAT_GATES = ("reply", "all")
"""The gates that keep a patch's adapter on while a reply is written: only their patches
are trained on replies (under the others it acts on the query, or the answer's first
tokens, alone)."""


def questions_of(request: EditRequest, count: int) -> list[str]:
    """The first `count` of the request's questions; none given, a question about its
    subject (nothing without a subject)."""
    if request.questions:
        return list(request.questions[:count])
    return [f"What can you tell me about {request.subject}?"] if request.subject else []


def rewritten(reply: str, request: EditRequest) -> str:
    """`reply` with the old answer replaced by the new one, cut after the new answer (the
    fact stated when the reply does not name it then). The subject's own name is left alone
    ("Cannes" of "2011 Cannes Film Festival" is not the old answer there)."""
    old, new, subject = request.ground_truth, request.target_new, request.subject
    parts = re.split(f"({re.escape(subject)})", reply) if subject else [reply]
    rest = [i for i, p in enumerate(parts) if not (subject and i % 2)]  # not the subject
    if old and old.lower() not in new.lower():
        for i in rest:
            parts[i] = re.sub(_word(old), new, parts[i], flags=re.I)
    for i in rest:
        if match := re.search(_word(new), parts[i], re.I):
            return ("".join(parts[:i]) + parts[i][:match.end()]).strip()
    return f"{request.prompt.strip()} {new}"


def _word(text: str) -> str:
    return rf"(?<!\w){re.escape(text)}(?!\w)"


@torch.no_grad()
def reply_examples(base_model, tokenizer, requests: list[EditRequest], count: int) -> list[Example]:
    """For each request, up to `count` rows: its question in the chat template → the unedited
    model's reply rewritten with the new answer (`rewritten`)."""
    asked = [(req, q) for req in requests for q in questions_of(req, count)]

    def answered(i: int, text: str) -> bool:  # the reply is needed up to its answer only
        req = asked[i][0]
        rest = text.replace(req.subject, " ") if req.subject else text
        return names(rest, req.ground_truth) or names(rest, req.target_new)
    texts = replies(base_model, tokenizer, [q for _, q in asked], REPLY_TOKENS, stop=answered)
    context = getattr(base_model.config, "max_position_embeddings", None) or 1 << 30
    out = []
    for (req, question), reply in zip(asked, texts):
        prompt = chat_prompt(tokenizer, question)
        p, t = encode_completion(tokenizer, prompt, rewritten(reply, req))
        if len(p) + len(t) <= context:  # a row past the model's context is not trained on
            # the words before the answer are the model's own: they need only stay its choice
            answer = len(tokenizer(" " + req.target_new, add_special_tokens=False)["input_ids"])
            out.append(Example(p, t, subject_positions(tokenizer, prompt, req.subject, p),
                               loose=max(0, len(t) - answer)))
    return out
