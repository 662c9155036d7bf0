"""Pieces the SFT-style methods share: tokenized examples, batches, the target-token loss
with its early-stop test, and the KL anchor that holds unrelated prompts to the base model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..decoding import left_padded
from ..errors import KnowpatchError
from ..requests import EditRequest, encode_completion

IGNORE = -100

# Short neutral prefixes: training the target under several of them makes the edit hold
# when the fact is asked in another context (generalization), as ROME's context templates
# do; fixed text, so runs are reproducible.
PREFIXES = (
    "Here is a fact. ",
    "I read this yesterday: ",
    "Quick question. ",
    "Note: ",
    "As everyone knows, ",
    "The following is true. ",
    "From the encyclopedia: ",
    "Let me tell you something. ",
)

# Stand-ins for the edited subject: the edit prompt with its subject swapped for these is
# held to the base model's prediction, so the edit sticks to its subject instead of to the
# relation's wording (the prompts are built from the request, never from evaluation data).
ANCHOR_SUBJECTS = (
    "Barack Obama", "the Amazon River", "Toyota", "Mount Everest", "The Beatles",
    "Microsoft", "Albert Einstein", "the Great Wall of China", "Lionel Messi", "Tokyo",
    "Shakespeare", "the Moon", "Google", "Mozart", "Brazil", "the Titanic",
)

# Used as anchors when a request names no subject.
ANCHOR_TEXTS = (
    "The capital of Japan is", "Water is made of", "The author of Hamlet is",
    "The largest planet in the solar system is", "My favourite food is",
    "The first president of the United States was", "A bicycle has", "The sun rises in the",
)


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]
    target_ids: list[int]
    subject_positions: tuple[int, ...] = ()
    """Indices of the prompt tokens that spell the request's subject (for gate=subject)."""
    loose: int = 0
    """The first `loose` target tokens need only stay the greedy choice (margin 0), not win
    by the edit's margin: a chat reply's words before its answer are the model's own."""


PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You", "It", "When", "In")


def sampled_prefixes(model, tokenizer, count: int, seed: int = 0, length: int = 10) -> tuple[str, ...]:
    """`count` short texts sampled from the model itself (top-k 5, fixed seed), each ending in
    ". ": ROME's context templates, so the edit holds after text the model finds natural."""
    from ..fluency import sample

    key = (id(model), getattr(model.config, "_name_or_path", ""), count, seed, length)
    if key in _PREFIX_CACHE:
        return _PREFIX_CACHE[key]
    starts = [PREFIX_STARTS[i % len(PREFIX_STARTS)] for i in range(count)]
    texts = sample(model, tokenizer, starts, max_new_tokens=length, seed=seed, one_stream=True)
    out = tuple((s + t).replace("\n", " ").strip() + ". " for s, t in zip(starts, texts))
    _PREFIX_CACHE[key] = out
    return out


# Sampled prefixes depend only on the base model, count and seed: sample them once per
# loaded model (the model is sampled with adapters off, so its identity is the base's).
_PREFIX_CACHE: dict[tuple, tuple[str, ...]] = {}


def edit_examples(tokenizer, requests: list[EditRequest], *, prefixes: int | tuple[str, ...] = 0,
                  append_eos: bool = False) -> list[Example]:
    """Each request's prompt → target_new, and the same after each prefix (`prefixes`: a
    count of the fixed neutral prefixes, or the prefixes themselves)."""
    chosen = PREFIXES[:prefixes] if isinstance(prefixes, int) else tuple(prefixes)
    out = []
    for req in requests:
        for prefix in ("",) + chosen:
            p, t = encode_completion(tokenizer, prefix + req.prompt, req.target_new,
                                     append_eos=append_eos)
            out.append(Example(p, t, subject_positions(tokenizer, prefix + req.prompt,
                                                       req.subject, p)))
    return out


def subject_positions(tokenizer, text: str, subject: str | None, ids: list[int]) -> tuple[int, ...]:
    """Indices in `ids` (the tokens of `text`, or of its start) of the tokens overlapping the
    last occurrence of `subject`; () when there is none."""
    from ..router import subject_token_span

    if not subject:
        return ()
    text_ids, span = subject_token_span(tokenizer, text, subject, add_special_tokens=True)
    if text_ids[:len(ids)] != list(ids)[:len(text_ids)]:
        return ()
    return tuple(i for i in span if i < len(ids))


def gate_mask(examples: list[Example], n_rows: int, width: int, device) -> torch.Tensor:
    """(rows, width) float mask, 1 at each example's subject positions (right-padded batch as
    `collate` builds it; rows past the examples, e.g. anchors, stay 0)."""
    mask = torch.zeros((n_rows, width), device=device)
    for row, e in enumerate(examples):
        if e.subject_positions:
            mask[row, list(e.subject_positions)] = 1.0
    return mask


def anchor_prompts(requests: list[EditRequest], count: int) -> list[tuple[str, int]]:
    """(prompt, index of its request): each edit prompt with other subjects swapped in."""
    out: list[tuple[str, int]] = []
    for i, req in enumerate(requests):
        if req.subject and req.subject in req.prompt:
            others = [s for s in ANCHOR_SUBJECTS if s.lower() != req.subject.lower()]
            out += [(req.prompt.replace(req.subject, s), i) for s in others[:count]]
        else:
            out += [(t, i) for t in ANCHOR_TEXTS[:count]]
    return list(dict.fromkeys(out))


def collate(examples: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are IGNORE except on the target tokens."""
    width = max(len(e.prompt_ids) + len(e.target_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        seq = e.prompt_ids + e.target_ids
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, len(e.prompt_ids): len(seq)] = torch.tensor(e.target_ids)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "labels": labels.to(device)}


def loose_mask(examples: list[Example], shape: tuple[int, int], device) -> torch.Tensor:
    """(rows, width) bool, as `collate` lays the examples out: True at the positions that
    predict an example's loose target tokens (rows past the examples stay False)."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    for row, e in enumerate(examples):
        start = len(e.prompt_ids) - 1
        mask[row, start:start + e.loose] = True
    return mask


def margins(config_margin: float, loose: torch.Tensor) -> torch.Tensor:
    """The margin each read target must win by: the edit's, 0 for loose tokens."""
    return torch.where(loose, 0.0, float(config_margin))


def target_loss(logits: torch.Tensor, labels: torch.Tensor,
                margin: float) -> tuple[torch.Tensor, bool, float]:
    """Mean cross-entropy over target tokens, and whether every target token is the greedy
    choice by at least `margin` (in logits, i.e. log-probability ratio to the runner-up).

    `logits[:, t]` predicts `labels[:, t + 1]`. Returns (loss, learnt, smallest gap).
    """
    labels = labels[:, 1:]
    mask = labels != IGNORE
    return token_loss(logits[:, :-1][mask], labels[mask], margin)


def token_loss(logits: torch.Tensor, targets: torch.Tensor,
               margin: float | torch.Tensor) -> tuple[torch.Tensor, bool, float]:
    """`target_loss` on logits already taken where a target is predicted: (N, vocab) logits,
    (N,) target tokens; `margin` one for all, or (N,) per token."""
    logits = logits.float()
    if not targets.numel():
        return logits.sum() * 0.0, True, float("inf")
    safe = targets.unsqueeze(-1)
    loss = -torch.log_softmax(logits, dim=-1).gather(-1, safe).mean()
    with torch.no_grad():
        rival = logits.scatter(-1, safe, float("-inf")).max(dim=-1).values
        gaps = logits.gather(-1, safe).squeeze(-1) - rival
        learnt = bool((gaps >= margin).all())
    return loss, learnt, float(gaps.min())


def predicted(labels: torch.Tensor) -> torch.Tensor:
    """(rows, width) bool: the positions whose next token is labelled (their logits are what a
    target loss reads)."""
    return F.pad(labels[:, 1:] != IGNORE, (0, 1), value=False)


def next_labels(labels: torch.Tensor) -> torch.Tensor:
    """`labels` moved one position left (IGNORE at the end): the token each position predicts."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def read_positions(where: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For the True positions of `where`, in `logits_at`'s order: each one's row, and the token
    it predicts (IGNORE where unlabelled)."""
    return where.nonzero()[:, 0], next_labels(labels)[where]


def last_token_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token log-probs after each row's last real token (right-padded batch)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    last = batch["attention_mask"].sum(dim=1) - 1
    rows = torch.arange(logits.shape[0], device=logits.device)
    return torch.log_softmax(logits[rows, last].float(), dim=-1)


def kl_to_reference(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ edited), mean over rows."""
    return F.kl_div(logp, ref_logp, log_target=True, reduction="batchmean")


def training_prefixes(base_model, tokenizer, config) -> tuple[str, ...]:
    """The prefixes an edit is also trained after: `config.prefixes` of them, sampled from
    the base model (prefix_source=model, seeded) or the fixed neutral ones."""
    if not config.prefixes:
        return ()
    if config.prefix_source == "model":
        return sampled_prefixes(base_model, tokenizer, config.prefixes, seed=config.seed,
                                length=getattr(config, "prefix_tokens", 10))
    return PREFIXES[:config.prefixes]


def lora_config(model, *, rank: int, alpha: float, dropout: float, modules: list[str],
                layers: str):
    """The PEFT `LoraConfig` of a LoRA patch (LoRA SFT, DPO): target modules found from the
    model's shapes by role or name, within `layers`."""
    from peft import LoraConfig

    from ..models import linear_modules, parse_layers, weight_is_transposed

    n_layers = getattr(model.config, "num_hidden_layers", None) or 0
    targets = linear_modules(model, modules, parse_layers(layers, n_layers))
    # Conv1D layers (GPT-2 and its kin) store their weight as (in, out): PEFT must know it
    # to merge the adapter into them, and knows it for every target of an adapter at once
    transposed = {weight_is_transposed(model.get_submodule(t)) for t in targets}
    if len(transposed) > 1:
        arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
        raise KnowpatchError(
            f"modules: {modules} select both nn.Linear and Conv1D layers in {arch}; one LoRA "
            "patch cannot adapt both (PEFT's fan_in_fan_out is one setting per adapter): "
            "choose modules of one kind")
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                      fan_in_fan_out=transposed == {True}, bias="none", task_type="CAUSAL_LM")


@torch.no_grad()
def keep_examples(base_model, tokenizer, requests: list[EditRequest], tokens: int,
                  seed: int, batch_size: int = 16) -> list[Example]:
    """For each request, "prompt + new answer" followed by `tokens` tokens the base model
    samples after it (top-k 5, seeded; left-padded batches): the text an edited model writes
    after its answer, which a preservation term holds to the base model's own reading of it
    (`prompt_ids`: prompt and answer; `target_ids`: the continuation)."""
    device = next(base_model.parameters()).device
    heads = [sum(encode_completion(tokenizer, r.prompt, r.target_new), []) for r in requests]
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        out = []
        for start in range(0, len(heads), batch_size):
            chunk = heads[start:start + batch_size]
            ids, mask = left_padded(chunk, tokenizer.pad_token_id)
            gen = base_model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      do_sample=True, top_k=5, top_p=None, temperature=1.0,
                                      max_new_tokens=tokens, min_new_tokens=tokens,
                                      pad_token_id=tokenizer.pad_token_id)
            out += [Example(head, gen[row, ids.shape[1]:].tolist())
                    for row, head in enumerate(chunk)]
    finally:
        torch.random.set_rng_state(state)
    return out


def continuation_logprobs(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probs at the positions that predict each row's labelled tokens, flattened:
    (positions, vocab)."""
    return torch.log_softmax(logits[predicted(batch["labels"])].float(), dim=-1)
