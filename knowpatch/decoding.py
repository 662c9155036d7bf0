"""Greedy decoding, batched with left padding: what every generation score is made of."""

from __future__ import annotations

import torch

from .errors import KnowpatchError
from .requests import split_completion


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The ids a prompt is fed as (trailing spaces belong to the answer, not the prompt)."""
    head, _ = split_completion(prompt, "x")
    return tokenizer(head, add_special_tokens=True)["input_ids"]


def left_padded(encoded: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of a batch, padded on the left (for generation)."""
    width = max(map(len, encoded))
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, width - len(e):] = torch.tensor(e)
        mask[row, width - len(e):] = 1
    return ids, mask


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], max_new_tokens: list[int] | int,
           batch_size: int = 32) -> list[list[int]]:
    """Greedy continuations (token ids, stopped at EOS), batched with left padding."""
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else max_new_tokens
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    context = getattr(model.config, "max_position_embeddings", None)
    for i, e in enumerate(encoded):
        if context and len(e) + budgets[i] > context:
            raise KnowpatchError(f"prompt: {len(e)} tokens + {budgets[i]} new tokens exceed the "
                                 f"model's context of {context} tokens ({prompts[i][:40]!r}…)")
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[list[int]] = [[] for _ in prompts]
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        ids, mask = left_padded([encoded[i] for i in chunk], pad)
        width = ids.shape[1]
        budget = max(budgets[i] for i in chunk)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=budget, do_sample=False, pad_token_id=pad,
                             eos_token_id=eos, temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(chunk):
            cont = gen[row, width:].tolist()
            if eos is not None and eos in cont:
                cont = cont[: cont.index(eos) + 1]
            out[i] = cont[: budgets[i]]
    return out
