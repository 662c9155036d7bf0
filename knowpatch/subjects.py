"""Finding the subject of an edit prompt when none is given.

The router keys a patch by its subject's tokens; a patch without a subject would act on
every query. So when a request names none, the subject is found in the prompt: the
candidates are its names (runs of capitalised or numeric words, "Call the Doctor",
"2011 Cannes Film Festival"; failing any, its runs of words that are not stop words), and
of several, the subject is the one whose deletion lowers the base model's probability of
its own next token the most (the name the answer depends on: "Eiffel Tower" rather than
"Paris" in "Visitors to the Eiffel Tower leave Paris by"). One batched forward per prompt.
How often it agrees with the subjects benchmark files give is in docs/cli.md.
"""

from __future__ import annotations

import re

import torch

from .decoding import prompt_ids
from .methods.common import Example, collate, last_token_logprobs

_WORD = re.compile(r"\S+")
_TRAIL = ",.;:!?\"')"
# words that open a sentence or a question, or join parts of a name ("Call the Doctor")
STOPWORDS = frozenset("""a an the this that these those it its is are was were be been being
has have had do does did what which who whom whose where when why how of in on at to for from
by with as and or but not no his her their our your my he she they we you i there here than
then so if into onto about after before over under can could will would shall should may
might must""".split())
JOINERS = frozenset({"of", "the", "de", "and", "&", "for", "la", "le", "del", "von", "van",
                     "der", "du", "y", "da"})


def _core(word: str) -> str:
    return _core_tail(word).lstrip("\"'(")


def _is_name(word: str) -> bool:
    core = _core(word)
    return bool(core) and core.lower() not in STOPWORDS and (
        any(c.isupper() or c.isdigit() for c in core))


def candidate_spans(prompt: str) -> list[tuple[int, int]]:
    """Character spans (start, end) of the prompt's names: maximal runs of capitalised or
    numeric words (joined by "of", "the", … inside a run), a trailing possessive or
    punctuation trimmed; without any, the runs of words that are not stop words."""
    words = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(prompt)]
    spans = _runs(prompt, words, _is_name, JOINERS)
    if spans:
        return spans
    runs = _runs(prompt, words, lambda w: bool(_core(w)) and _core(w).lower() not in
                 STOPWORDS, frozenset())
    out = []  # no name: every part of a run of content words ("scientific method")
    for start, end in runs:
        inner = [(m.start() + start, m.end() + start) for m in _WORD.finditer(prompt[start:end])]
        for i in range(len(inner)):
            for j in range(i, min(i + 4, len(inner))):
                text = _core_tail(prompt[inner[i][0]:inner[j][1]])
                out.append((inner[i][0], inner[i][0] + len(text)))
    return list(dict.fromkeys(s for s in out if s[1] > s[0]))


def _runs(prompt: str, words, member, joiners) -> list[tuple[int, int]]:
    spans, i = [], 0
    while i < len(words):
        if not member(words[i][2]):
            i += 1
            continue
        j = i
        while j + 1 < len(words) and (member(words[j + 1][2]) or (
                words[j + 1][2].lower() in joiners and j + 2 < len(words)
                and member(words[j + 2][2]) and words[j][2] == words[j][2].rstrip(_TRAIL))):
            j += 1 + (not member(words[j + 1][2]))
        start = words[i][0]
        text = _core(prompt[start:words[j][1]]) if i == j else prompt[start:words[j][1]]
        text = _core_tail(text)
        if text:
            spans.append((start, start + len(text)))
        i = j + 1
    return spans


def _core_tail(text: str) -> str:
    """`text` without trailing punctuation or possessive; a closing bracket that closes one
    in the text, and the full stop of an abbreviation ("F.C."), stay."""
    while True:
        before = text
        for suffix in ("'s", "’s"):
            text = text.removesuffix(suffix)
        if text.endswith(")") and text.count("(") >= text.count(")"):
            break
        if text.endswith(".") and "." in text.rsplit(" ", 1)[-1][:-1]:
            break
        if text and text[-1] in _TRAIL:
            text = text[:-1]
        if text == before:
            return text
    return text


@torch.no_grad()
def infer_subject(model, tokenizer, prompt: str) -> str | None:
    """The subject of `prompt` (see the module's doc); None when the prompt has no
    candidate. `model` must run as the base model."""
    spans = candidate_spans(prompt)
    if len(spans) <= 1:
        return prompt[spans[0][0]:spans[0][1]] if spans else None
    texts = [prompt] + [" ".join((prompt[:a] + prompt[b:]).split()) for a, b in spans]
    rows = [Example(prompt_ids(tokenizer, t), []) for t in texts]
    logp = last_token_logprobs(model, collate(rows, tokenizer.pad_token_id,
                                              next(model.parameters()).device))
    answer = int(logp[0].argmax())
    a, b = spans[int((logp[0, answer] - logp[1:, answer]).argmax())]
    return prompt[a:b]


def with_subjects(model, tokenizer, requests: list) -> tuple[list, dict[int, str]]:
    """`requests` with a subject found (by `infer_subject`) for each that has none, and
    {index: subject} of those found. `model` must run as the base model."""
    import dataclasses

    found = {}
    out = list(requests)
    for i, req in enumerate(requests):
        if req.subject is None:
            subject = infer_subject(model, tokenizer, req.prompt)
            if subject:
                found[i] = subject
                out[i] = dataclasses.replace(req, subject=subject)
    return out, found
