"""Greedy decoding, batched with left padding: what every generation score is made of."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

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
           batch_size: int = 32, stop: Callable[[int, list[int]], bool] | None = None
           ) -> list[list[int]]:
    """Greedy continuations (token ids, stopped at EOS), batched with left padding.
    `stop(i, ids)`: prompt i's continuation may end once it holds `ids` (the batch ends
    when each row has ended; a row is cut to its budget, not at its stop)."""
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
        criteria = None if stop is None else StoppingCriteriaList([_RowStop(stop, chunk, width)])
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=budget, do_sample=False, pad_token_id=pad,
                             eos_token_id=eos, temperature=None, top_p=None, top_k=None,
                             stopping_criteria=criteria)
        for row, i in enumerate(chunk):
            cont = gen[row, width:].tolist()
            if eos is not None and eos in cont:
                cont = cont[: cont.index(eos) + 1]
            out[i] = cont[: budgets[i]]
    return out


class _RowStop(StoppingCriteria):
    """Each row of a batch is done once `stop(prompt index, its new ids)` says so."""

    def __init__(self, stop: Callable[[int, list[int]], bool], chunk: list[int], width: int):
        self.stop, self.chunk, self.width = stop, chunk, width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([self.stop(i, input_ids[row, self.width:].tolist())
                             for row, i in enumerate(self.chunk)], device=input_ids.device)
