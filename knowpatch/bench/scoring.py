"""How a bench run scores its cases: BENCHMARK.md's scores of each case's requests, the
writing sampled from its generation prompts (fluency, rep, mention), MQuAKE's multi-hop
answers — many cases' prompts in shared batches, the unedited ones kept between runs."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..chat import ChatReference
from ..datasets import Case
from ..editor import Editor
from ..evaluate import Reference, evaluate, greedy, starts_with, summarize
from ..fluency import RowSampler, mean_fluency, repetition, sample
from ..patches import Patch
from ..questions import chat_prompt
from ..requests import LocalityProbe, PortabilityProbe, encode_completion
from .baselines import BaselineCache

SCORE_CHUNK = 16
"""Cases scored in one `evaluate` call when a whole run is scored at once (the unedited
baseline and the re-scoring after the last edit of a sequential run): their prompts run in
shared batches instead of one small batch per case."""



def with_chat_template(tokenizer, case: Case) -> Case:
    """Wrap every prompt of a case in the model's chat template (a user turn); a model
    without one gets the "Question: … Answer:" format (`questions.chat_prompt`)."""

    def wrap(prompt: str) -> str:
        return chat_prompt(tokenizer, prompt)

    reqs = [replace(
        r, prompt=wrap(r.prompt), rephrase_prompts=[wrap(p) for p in r.rephrase_prompts],
        locality=[LocalityProbe(wrap(p.prompt), p.answer) for p in r.locality],
        portability=[PortabilityProbe(wrap(p.prompt), p.answer, p.aliases) for p in r.portability],
    ) for r in case.requests]
    return replace(case, requests=reqs,
                   multihop=[PortabilityProbe(wrap(p.prompt), p.answer, p.aliases)
                             for p in case.multihop],
                   generation_prompts=[wrap(p) for p in case.generation_prompts])


def writing_scores(texts: list[str], answers: list[str]) -> dict[str, float | None]:
    """fluency of `texts`, and the shares (%) naming one of `answers` 3+ times (rep) and at
    all (mention)."""
    return {"fluency": mean_fluency(texts), "rep": repetition(texts, answers),
            "mention": repetition(texts, answers, times=1)}


def told_context(case: Case) -> str:
    """The case's new facts stated, to put before a prompt: "<edit prompt> <new target>. "."""
    return "".join(f"{r.prompt.strip()} {r.target_new.strip()}. " for r in case.requests)


def multihop_correct(model, tokenizer, probes: list[PortabilityProbe]) -> float | None:
    """MQuAKE: 100 if any of the case's questions is answered with the new answer/alias."""
    if not probes:
        return None
    budgets = [max(len(encode_completion(tokenizer, p.prompt, a)[1]) for a in (p.answer, *p.aliases)) + 2
               for p in probes]
    outs = greedy(model, tokenizer, [p.prompt for p in probes], budgets)
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    return 100.0 * any(starts_with(t, [p.answer, *p.aliases], False) for p, t in zip(probes, texts))


class Scorer:
    """Scores cases with `editor` as `settings` (seed, told) ask; `baselines` (None: none
    kept) serves the unedited model's scores stored by an earlier run."""

    def __init__(self, editor: Editor, seed: int, told: bool, baselines: BaselineCache | None):
        self.editor, self.seed, self.told, self.baselines = editor, seed, told, baselines

    def score_case(self, case: Case, reference: Reference | None, patches: list[Patch] | None,
               fluency_on: bool) -> tuple[dict[str, Any], Reference]:
        refs = None if reference is None else {case.case_id: reference}
        return self.score_cases([case], refs, patches, [fluency_on])[0]

    def score_cases(self, cases: list[Case], refs: dict[str, Reference] | None,
                    patches: list[Patch] | None, fluency_on: list[bool], bar=None
                    ) -> list[tuple[dict[str, Any], Reference]]:
        """`score_case` for many cases, SCORE_CHUNK cases per `evaluate` call. The chunks are
        always cut the same way from `cases`, so the baseline and the final scoring run every
        prompt in the same batch (with routing, a row no patch fires on then gives the base
        model's outputs bit for bit)."""
        out: list[tuple[dict[str, Any], Reference]] = []
        cache = self.baselines if refs is None and patches == [] else None
        cases, systems = self.stated(cases, patches)  # in-context patches: decided up front
        with self.editor.using(patches) as model:
            for start in range(0, len(cases), SCORE_CHUNK):
                chunk = cases[start:start + SCORE_CHUNK]
                flags = fluency_on[start:start + len(chunk)]
                scored = cache.get(chunk, flags) if cache is not None else None
                if scored is None:
                    scored = self._score_chunk(model, chunk, refs, flags, systems)
                    if cache is not None:
                        cache.put(chunk, flags, scored)
                out.extend(scored)
                if bar is not None:
                    bar.relabel_count(len(out), len(cases))
        return out

    def stated(self, cases: list[Case], patches: list[Patch] | None
               ) -> tuple[list[Case], dict[str, str | None] | None]:
        """`cases` as the patches' statements (in-context, hybrid) meet them — their prompts
        stated to where a patch fires — and the system message of each question."""
        statements = self.editor.statements(patches)
        if not statements:
            return cases, None
        stated, systems = statements.prepare([r for c in cases for r in c.requests])
        prompts = iter(statements.prompts([p for c in cases for p in c.generation_prompts]))
        out, at = [], 0
        for c in cases:
            out.append(replace(c, requests=stated[at:at + len(c.requests)],
                               generation_prompts=[next(prompts) for _ in c.generation_prompts]))
            at += len(c.requests)
        return out, systems

    def _score_chunk(self, model, chunk: list[Case], refs: dict[str, Reference] | None,
                     flags: list[bool], systems: dict[str, str | None] | None = None
                     ) -> list[tuple[dict[str, Any], Reference]]:
        """Each case's scores and reference, the chunk's prompts evaluated together."""
        tokenizer = self.editor.tokenizer
        requests = [r for c in chunk for r in c.requests]
        ref = None if refs is None else join_refs([refs[c.case_id] for c in chunk])
        ev = evaluate(model, tokenizer, requests, ref, systems=systems)
        sampled = [c for c, f in zip(chunk, flags) if f]
        texts = iter(self._samples(model, sampled))
        told = iter(self._samples(model, sampled, told=True) if refs is None and self.told else [])
        out, i = [], 0
        for case, fluency_on in zip(chunk, flags):
            n = len(case.requests)
            scores: dict[str, Any] = dict(summarize(ev.records[i:i + n]))
            chat = [ev.samples[k].get("chat") for k in range(i, i + n)]
            if chat[0]:  # the first question's reply, to read beside the unedited one
                scores["chat_texts"] = [chat[0]["questions"][0], chat[0]["replies"][0][:300]]
            scores["multihop"] = multihop_correct(model, tokenizer, case.multihop)
            if fluency_on:
                scores.update(self._fluency(case, next(texts), refs is None))
                scores.update(self._told(case, next(told, None)))
            else:
                scores["fluency"] = scores["rep"] = scores["mention"] = None
            out.append((scores, slice_ref(ev.reference, i, i + n)))
            i += n
        return out

    def _samples(self, model, cases: list[Case], told: bool = False) -> list[list[str]]:
        """Each case's texts sampled from its generation prompts, all in one batched call
        (each text has its own random stream: the same as sampled case by case). `told`: each
        prompt after the case's new facts stated ("<edit prompt> <new target>. "), with the
        streams of the prompts alone."""
        prompts = [(told_context(c) if told else "") + p for c in cases for p in c.generation_prompts]
        streams = [g for c in cases for g in RowSampler.streams(c.generation_prompts, self.seed)]
        texts = sample(model, self.editor.tokenizer, prompts, streams=streams) if prompts else []
        out, i = [], 0
        for c in cases:
            out.append(texts[i:i + len(c.generation_prompts)])
            i += len(c.generation_prompts)
        return out

    def _fluency(self, case: Case, texts: list[str], baseline: bool) -> dict[str, Any]:
        """fluency, rep and mention of the texts sampled from the case's generation prompts,
        and the first two texts. rep and mention count the new target; for the unedited
        model, the old answer (the new target where no old answer is given)."""
        answers = [(r.ground_truth or r.target_new) if baseline else r.target_new
                   for r in case.requests]
        return {**writing_scores(texts, answers), "fluency_texts": [t[:400] for t in texts[:2]]}

    @staticmethod
    def _told(case: Case, texts: list[str] | None) -> dict[str, Any]:
        """fluency, rep and mention of the new target in the texts the unedited model wrote
        told the new facts (nothing when they were not sampled)."""
        if texts is None:
            return {}
        scores = writing_scores(texts, [r.target_new for r in case.requests])
        return {f"{k}_told": v for k, v in scores.items()}


def join_refs(refs: list[Reference]) -> Reference:
    """One reference for several cases' requests, in order."""
    chats = [r.chat for r in refs]
    return Reference(loc_continuations=[x for r in refs for x in r.loc_continuations],
                     loc_argmax=[x for r in refs for x in r.loc_argmax],
                     loc_answers=[x for r in refs for x in r.loc_answers],
                     chat=None if None in chats else ChatReference(
                         [x for c in chats for x in c.loc_replies]))


def slice_ref(ref: Reference, start: int, stop: int) -> Reference:
    """The part of `ref` for requests start..stop-1."""
    return Reference(loc_continuations=ref.loc_continuations[start:stop],
                     loc_argmax=ref.loc_argmax[start:stop], loc_answers=ref.loc_answers[start:stop],
                     chat=None if ref.chat is None else ChatReference(
                         ref.chat.loc_replies[start:stop]))
