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


def greedy(model, tokenizer, prompts: list[str], max_new_tokens: list[int] | int,
           batch_size: int = 32, stop: Callable[[int, list[int]], bool] | None = None
           ) -> list[list[int]]:
    """Greedy continuations (token ids, stopped at EOS), batched with left padding.
    `stop(i, ids)`: prompt i's continuation may end once it holds `ids` (the batch ends
    when each row has ended; a row is cut to its budget, not at its stop)."""
    return [rows[0] for rows in continuations(model, tokenizer, prompts, max_new_tokens,
                                              batch_size=batch_size, stop=stop)]


@torch.no_grad()
def continuations(model, tokenizer, prompts: list[str], max_new_tokens: list[int] | int, *,
                  samples: int = 1, temperature: float = 0.0, seed: int = 0,
                  batch_size: int = 32, stop: Callable[[int, list[int]], bool] | None = None,
                  shorten: bool = False, done: Callable[[int], None] | None = None
                  ) -> list[list[list[int]]]:
    """`samples` continuations of each prompt (token ids, ending with EOS where one came, so
    that an ended answer tells from one the budget cut): greedy at temperature 0, else
    sampled (seeded once). Prompts run shortest first, in batches, left padded. A prompt
    whose budget overflows the model's context is an error — or, with `shorten`, gets the
    room left (an error only when none is). `done(n)` hears of each batch of n prompts done."""
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    context = getattr(model.config, "max_position_embeddings", None)
    for i, e in enumerate(encoded):
        if context and len(e) + budgets[i] > context:
            if shorten and len(e) < context:
                budgets[i] = context - len(e)
                continue
            raise KnowpatchError(f"prompt: {len(e)} tokens + {budgets[i]} new tokens exceed the "
                                 f"model's context of {context} tokens ({prompts[i][:40]!r}…)")
    if temperature > 0:
        torch.manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[list[list[int]]] = [[] for _ in prompts]
    eos = tokenizer.eos_token_id
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        # a row may run past its own budget while others finish theirs (cut below): capping
        # the batch instead would make a row's text depend on its batchmates
        budget = max(budgets[i] for i in chunk)
        made = _generate(model, tokenizer, [encoded[i] for i in chunk], budget, samples, temperature,
                         None if stop is None else _RowStop(stop, chunk, samples))
        for row, i in enumerate(chunk):
            for cont in made[row * samples:(row + 1) * samples]:
                if eos is not None and eos in cont:
                    cont = cont[: cont.index(eos) + 1]
                out[i].append(cont[: budgets[i]])
        if done is not None:
            done(len(chunk))
    return out


def _generate(model, tokenizer, encoded: list[list[int]], budget: int, samples: int,
              temperature: float, stop: _RowStop | None) -> list[list[int]]:
    """One left-padded batch through `generate`: the new ids of each row (samples per
    prompt, one after another)."""
    pad = tokenizer.pad_token_id
    ids, mask = left_padded(encoded, pad)
    width = ids.shape[1]
    device = next(model.parameters()).device
    sampling = ({"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": None}
                if temperature > 0 else
                {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})
    if stop is not None:
        stop.width = width
    gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         max_new_tokens=budget, num_return_sequences=samples, pad_token_id=pad,
                         eos_token_id=tokenizer.eos_token_id,
                         stopping_criteria=None if stop is None else StoppingCriteriaList([stop]),
                         **sampling)
    return gen[:, width:].tolist()


class _RowStop(StoppingCriteria):
    """Each row of a batch is done once `stop(prompt index, its new ids)` says so (rows are
    the chunk's prompts, `samples` rows each; `width` is set to the padded prompt width)."""

    def __init__(self, stop: Callable[[int, list[int]], bool], chunk: list[int], samples: int = 1):
        self.stop, self.chunk, self.samples, self.width = stop, chunk, samples, 0

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([self.stop(self.chunk[row // self.samples],
                                       input_ids[row, self.width:].tolist())
                             for row in range(input_ids.shape[0])], device=input_ids.device)
