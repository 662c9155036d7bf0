"""The scores of BENCHMARK.md, by greedy generation and by teacher forcing.

Every prompt of every request is gathered first and run in batches (left padding for
generation, right padding for teacher forcing), never one by one. Locality is scored
against the unedited model's own outputs: run `evaluate(model, tok, requests)` on the base
model once to get the baseline scores and a `Reference`, then pass that reference when
scoring the edited model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .chat import CHAT_KEYS, ChatReference, chat_scores
from .decoding import greedy
from .errors import KnowpatchError
from .requests import EditRequest, encode_completion

GEN_KEYS = ("rel", "gen", "loc", "port")
PROB_KEYS = ("es", "ps", "ns")
TF_KEYS = ("rel_tf", "gen_tf", "loc_tf")
SCORE_KEYS = ("score",) + GEN_KEYS + ("S",) + PROB_KEYS + TF_KEYS
ALL_KEYS = SCORE_KEYS + CHAT_KEYS  # the completion scores, then the chat scores (`chat`)
LOC_TOKENS = 5  # greedy tokens compared for locality


@dataclass
class Reference:
    """What the unedited model does on each request's locality probes."""

    loc_continuations: list[list[list[int]]]  # [request][probe] → 5 greedy token ids
    loc_argmax: list[list[list[int]]]  # [request][probe] → argmax ids at the answer positions
    loc_answers: list[list[str]]  # [request][probe] → the answer teacher-forced for loc_tf
    chat: ChatReference | None = None  # the replies to the locality questions


@dataclass
class Evaluation:
    records: list[dict[str, float | None]]
    summary: dict[str, float | None]
    reference: Reference
    samples: list[dict[str, object]] = field(default_factory=list)


def logits_at(model, batch: dict[str, torch.Tensor], where: torch.Tensor) -> torch.Tensor:
    """The logits at the True positions of `where` (rows, width) only, row by row: (N, vocab).

    A training forward reads the logits of a few target positions; the output layer over the
    whole vocabulary at every position (SmolLM2: 49,152 × 576, a fifth of the forward) and
    its backward are work thrown away. transformers' `logits_to_keep` (a boolean mask per
    row) slices the hidden states before the output layer, and any final soft-capping still
    runs; a model whose forward lacks it gets full logits, indexed here.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if not _keeps_logits(model):
        return model(**inputs).logits[where]
    out = model(**inputs, logits_to_keep=where).logits
    if out.dim() == 2 and out.shape[0] == int(where.sum()):
        return out
    if out.shape[:2] == where.shape:  # a forward that took the mask but kept every position
        return out[where]
    raise KnowpatchError(f"logits_to_keep: {type(model).__name__} returned logits of shape "
                         f"{tuple(out.shape)} for a mask of shape {tuple(where.shape)}")


def _keeps_logits(model) -> bool:
    """Whether `model`'s forward (under any DDP-style `.module` wrappers) takes
    `logits_to_keep`."""
    import inspect

    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    kind = type(model)
    if kind not in _KEEPS:
        _KEEPS[kind] = "logits_to_keep" in inspect.signature(model.forward).parameters
    return _KEEPS[kind]


_KEEPS: dict[type, bool] = {}


@dataclass
class Forced:
    logprob: float  # summed log-prob of the completion tokens
    argmax: list[int]  # greedy token at each completion position
    target: list[int]  # the completion tokens


@torch.no_grad()
def teacher_forced(model, tokenizer, pairs: list[tuple[str, str]],
                   batch_size: int = 32) -> list[Forced]:
    """Log-probability and argmax tokens of each completion after its prompt, batched.
    Only the completion positions' logits are computed (`logits_at`): the output layer over
    the whole vocabulary at every position was a sixth of a bench's scoring time."""
    encoded = [encode_completion(tokenizer, p, c) for p, c in pairs]
    order = sorted(range(len(pairs)), key=lambda i: sum(map(len, encoded[i])))
    out: list[Forced | None] = [None] * len(pairs)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        width = max(len(encoded[i][0]) + len(encoded[i][1]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            seq = encoded[i][0] + encoded[i][1]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        where = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, i in enumerate(chunk):  # the positions that predict the completion
            p_ids, t_ids = encoded[i]
            where[row, len(p_ids) - 1: len(p_ids) - 1 + len(t_ids)] = True
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        logits = logits_at(model, batch, where.to(device)).float()  # (positions, vocab), by row
        logp = torch.log_softmax(logits, dim=-1)
        start = 0
        for i in chunk:
            t_ids = encoded[i][1]
            span = slice(start, start + len(t_ids))
            start += len(t_ids)
            tgt = torch.tensor(t_ids, device=logits.device)
            lp = logp[span].gather(-1, tgt.unsqueeze(-1)).sum()
            out[i] = Forced(float(lp), logits[span].argmax(-1).tolist(), t_ids)
    return out  # type: ignore[return-value]


def starts_with(text: str, answers: list[str], case_sensitive: bool) -> bool:
    text = text.lstrip()
    if not case_sensitive:
        text = text.lower()
        answers = [a.lower() for a in answers]
    return any(a and text.startswith(a) for a in answers)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def harmonic(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    if any(v <= 0 for v in present):
        return 0.0
    return len(present) / sum(1.0 / v for v in present)


@torch.no_grad()
def evaluate(model, tokenizer, requests: list[EditRequest],
             reference: Reference | None = None, batch_size: int = 32,
             systems: dict[str, str | None] | None = None) -> Evaluation:
    """Score `requests` on `model`; without `reference`, the model is the baseline.
    `systems`: the system message a chat question is asked with (in-context patches)."""
    gen_jobs, tf_jobs, plan = _jobs(tokenizer, requests)
    continuations = greedy(model, tokenizer, [p for p, _ in gen_jobs], [b for _, b in gen_jobs],
                           batch_size)
    # locality answers for loc_tf: given, else the base model's own continuation
    if reference is None:
        loc_answers = []
        for req, entry in zip(requests, plan):
            jobs = entry["gen"].get("loc", [])
            answers = []
            for probe, j in zip(req.locality, jobs):
                own = tokenizer.decode(continuations[j], skip_special_tokens=True).strip()
                answers.append(probe.answer or own or tokenizer.eos_token)
            loc_answers.append(answers)
    else:
        loc_answers = reference.loc_answers
    for req, answers, entry in zip(requests, loc_answers, plan):
        for probe, answer in zip(req.locality, answers):
            entry["tf"].setdefault("loc_ans", []).append(len(tf_jobs))
            tf_jobs.append((probe.prompt, answer))
    forced = teacher_forced(model, tokenizer, tf_jobs, batch_size) if tf_jobs else []
    own_ref = Reference(
        loc_continuations=[[continuations[j] for j in e["gen"].get("loc", [])] for e in plan],
        loc_argmax=[[forced[j].argmax for j in e["tf"].get("loc_ans", [])] for e in plan],
        loc_answers=loc_answers,
    )
    ref = reference or own_ref
    chat, own_ref.chat, chat_samples = chat_scores(model, tokenizer, requests, ref.chat, systems)
    records, samples = [], []
    for r_idx, (req, entry) in enumerate(zip(requests, plan)):
        rec, sample = _record(tokenizer, req, entry, continuations, forced,
                              ref.loc_continuations[r_idx], ref.loc_argmax[r_idx])
        records.append({**rec, **chat[r_idx]})
        samples.append({**sample, "chat": chat_samples[r_idx]} if chat_samples[r_idx] else sample)
    return Evaluation(records=records, summary=summarize(records), reference=own_ref,
                      samples=samples)


def _jobs(tokenizer, requests: list[EditRequest]):
    """Every generation job (prompt, token budget) and teacher-forced job (prompt,
    completion) of `requests`, and per request where its jobs are: {"gen"/"tf": {kind:
    [job indices]}}."""
    gen_jobs: list[tuple[str, int]] = []
    tf_jobs: list[tuple[str, str]] = []
    plan: list[dict[str, dict[str, list[int]]]] = []
    for req in requests:
        n_target = len(encode_completion(tokenizer, req.prompt, req.target_new)[1])
        entry: dict[str, dict[str, list[int]]] = {"gen": {}, "tf": {}}

        def add_gen(kind: str, prompt: str, budget: int, entry=entry) -> None:
            entry["gen"].setdefault(kind, []).append(len(gen_jobs))
            gen_jobs.append((prompt, budget))

        def add_tf(kind: str, prompt: str, completion: str, entry=entry) -> None:
            entry["tf"].setdefault(kind, []).append(len(tf_jobs))
            tf_jobs.append((prompt, completion))

        add_gen("rel", req.prompt, n_target + 2)
        add_tf("rel_new", req.prompt, req.target_new)
        for p in req.rephrase_prompts:
            add_gen("gen", p, n_target + 2)
            add_tf("gen_new", p, req.target_new)
        for probe in req.locality:
            add_gen("loc", probe.prompt, LOC_TOKENS)
        for probe in req.portability:
            n = max(len(encode_completion(tokenizer, probe.prompt, a)[1])
                    for a in (probe.answer,) + probe.aliases)
            add_gen("port", probe.prompt, n + 2)
        if req.ground_truth:
            add_tf("rel_true", req.prompt, req.ground_truth)
            for p in req.rephrase_prompts:
                add_tf("gen_true", p, req.ground_truth)
            for probe in req.locality:
                add_tf("loc_new", probe.prompt, req.target_new)
                add_tf("loc_true", probe.prompt, req.ground_truth)
        plan.append(entry)
    return gen_jobs, tf_jobs, plan


def _record(tokenizer, req: EditRequest, entry, continuations, forced, ref_loc, ref_argmax):
    """One request's scores (and its generated texts) from the jobs' results; `ref_loc`,
    `ref_argmax`: the baseline's locality continuations and teacher-forced argmaxes."""
    g, t = entry["gen"], entry["tf"]

    def text(j: int) -> str:
        return tokenizer.decode(continuations[j], skip_special_tokens=True)

    rec: dict[str, float | None] = dict.fromkeys(SCORE_KEYS)
    rec["rel"] = 100.0 * starts_with(text(g["rel"][0]), [req.target_new], True)
    rec["gen"] = _mean([100.0 * starts_with(text(j), [req.target_new], True)
                        for j in g.get("gen", [])])
    rec["loc"] = _mean([100.0 * (continuations[j] == ref_loc[k])
                        for k, j in enumerate(g.get("loc", []))])
    rec["port"] = _mean([100.0 * starts_with(text(j), [probe.answer, *probe.aliases], False)
                         for probe, j in zip(req.portability, g.get("port", []))])
    rec["rel_tf"] = _tf_acc(forced[t["rel_new"][0]])
    rec["gen_tf"] = _mean([_tf_acc(forced[j]) for j in t.get("gen_new", [])])
    rec["loc_tf"] = _mean([100.0 * _same(forced[j].argmax, ref_argmax[k])
                           for k, j in enumerate(t.get("loc_ans", []))])
    if req.ground_truth:
        rec["es"] = 100.0 * (forced[t["rel_new"][0]].logprob > forced[t["rel_true"][0]].logprob)
        rec["ps"] = _mean([100.0 * (forced[a].logprob > forced[b].logprob)
                           for a, b in zip(t.get("gen_new", []), t.get("gen_true", []))])
        rec["ns"] = _mean([100.0 * (forced[b].logprob > forced[a].logprob)
                           for a, b in zip(t.get("loc_new", []), t.get("loc_true", []))])
    rec["score"] = harmonic([rec["rel"], rec["gen"], rec["loc"]])
    rec["S"] = harmonic([rec["es"], rec["ps"], rec["ns"]])
    sample = {"prompt": req.prompt, "rel": text(g["rel"][0]),
              "gen": [text(j) for j in g.get("gen", [])],
              "loc": [text(j) for j in g.get("loc", [])],
              "port": [text(j) for j in g.get("port", [])]}
    return rec, sample


def _tf_acc(f: Forced) -> float:
    return 100.0 * sum(a == b for a, b in zip(f.argmax, f.target)) / max(1, len(f.target))


def _same(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(1, len(b))


def summarize(records: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Average each score over the records that have it; headline scores from the means."""
    out: dict[str, float | None] = {}
    for key in ALL_KEYS:
        if key in ("score", "S"):
            continue
        out[key] = _mean([r[key] for r in records if r.get(key) is not None])
    out["score"] = harmonic([out["rel"], out["gen"], out["loc"]])
    out["S"] = harmonic([out["es"], out["ps"], out["ns"]])
    return {k: (None if v is None or math.isnan(v) else round(v, 2)) for k, v in
            ((k, out[k]) for k in ALL_KEYS)}
