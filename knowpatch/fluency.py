"""Fluency as ROME measures it: weighted bi-/tri-gram entropy of sampled text.

Words are split by a regular expression (no downloaded NLTK data); weights 2/3 and 4/3 for
n = 2 and 3, entropies in bits, averaged (arithmetic) over the texts.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter

import torch

_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3),
                  weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    words = _WORD.findall(text)
    values = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i: i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(h * w)
    return sum(values) / len(values)


class RowSampler:
    """Top-k sampling (temperature 1) with one random stream per row, seeded by the seed, the
    row's prompt and how often that prompt came before it in the list: a text depends on the
    model, its prompt and the seed only, not on which prompts share its batch or in what
    order. transformers' sampling draws every row from one global stream, so batching more
    prompts together (the unedited texts of many records at once) would change every text,
    and a prompt an edit does not touch would no longer give the unedited text. Written
    here as a logits processor: it leaves only the drawn token, which greedy decoding
    then takes."""

    def __init__(self, generators: list[torch.Generator], top_k: int):
        self.generators, self.top_k = generators, top_k

    @staticmethod
    def streams(prompts: list[str], seed: int) -> list[torch.Generator]:
        seen: Counter[str] = Counter()
        out = []
        for prompt in prompts:
            digest = hashlib.sha256(f"{seed}\0{seen[prompt]}\0{prompt}".encode()).digest()
            seen[prompt] += 1
            out.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little")))
        return out

    def __call__(self, _input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        top = scores.float().topk(self.top_k, dim=-1)
        probs = torch.softmax(top.values, dim=-1).cpu()
        drawn = torch.stack([torch.multinomial(p, 1, generator=g)
                             for p, g in zip(probs, self.generators)]).to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, top.indices.gather(-1, drawn), 0.0)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 100, top_k: int = 5,
           seed: int = 0, batch_size: int = 16, streams: list[torch.Generator] | None = None,
           one_stream: bool = False) -> list[str]:
    """Top-k samples of `max_new_tokens` tokens, batched with left padding; each text drawn
    from its own seeded stream (`RowSampler.streams(prompts, seed)` unless given), so the
    batching does not change it. `one_stream`: transformers' own sampling from torch's
    global generator, seeded once for the call (then restored) — the training prefixes are
    drawn this way, as they were before the per-text streams, so an edit trains on the same
    prefixes as every measured run."""
    from transformers import LogitsProcessorList

    from .decoding import left_padded, prompt_ids

    if not one_stream:
        streams = RowSampler.streams(prompts, seed) if streams is None else streams
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    device = next(model.parameters()).device
    out: list[str] = []
    generator_state = torch.random.get_rng_state()
    if one_stream:
        torch.manual_seed(seed)
    try:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start: start + batch_size]
            ids, mask = left_padded(chunk, tokenizer.pad_token_id)
            if one_stream:
                how: dict = dict(do_sample=True, top_k=top_k, top_p=None, temperature=1.0)
            else:
                rows = RowSampler(streams[start: start + batch_size], top_k)
                how = dict(do_sample=False, top_k=None, top_p=None, temperature=None,
                           logits_processor=LogitsProcessorList([rows]))
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, **how)
            out += tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
    finally:
        torch.random.set_rng_state(generator_state)
    return out


def repetition(texts: list[str], answers: list[str], times: int = 3) -> float | None:
    """`rep`: the share (%) of `texts` in which one of `answers` occurs `times` or more
    times (whole words, case-insensitive) — an edit that collapses free text about its
    subject into the new answer ("Prescott Prescott Prescott …") shows here directly."""
    answers = [a.strip() for a in answers if a and a.strip()]
    if not texts or not answers:
        return None
    patterns = [re.compile(rf"(?<!\w){re.escape(a)}(?!\w)", re.IGNORECASE) for a in answers]
    return 100.0 * sum(any(len(p.findall(t)) >= times for p in patterns)
                       for t in texts) / len(texts)


def mean_fluency(texts: list[str]) -> float | None:
    """ROME's fluency of sampled texts: their mean n-gram entropy (None for no texts)."""
    return sum(ngram_entropy(t) for t in texts) / len(texts) if texts else None


def fluency(model, tokenizer, prompts: list[str], seed: int = 0) -> float | None:
    """ROME's fluency of `prompts`' samples."""
    return mean_fluency(sample(model, tokenizer, prompts, seed=seed)) if prompts else None
