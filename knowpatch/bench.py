"""`knowpatch bench`: one editing method over a dataset, scored by BENCHMARK.md's protocol.

Modes: `single` (edit one case, score, remove, next), `batch` (k cases in one patch; with
`--method auto`, in what auto chooses: a routed patch per case, trained side by side),
`sequential` (edits accumulate; each case is scored right after its own edit and again
after the last edit). In sequential mode `stack` keeps every patch active; `shared` keeps
training one adapter, edit after edit (EasyEdit's way, kept for comparison).

The run folder holds `run.json` (the settings that define the run), `rows.jsonl` (one line
per case, appended as it finishes, so a rerun with the same settings resumes where it
stopped), `report.json`, `report.md` and `report.png`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .baselines import BaselineCache
from .datasets import Case, load_cases
from .editor import Editor
from .errors import KnowpatchError
from .evaluate import SCORE_KEYS, Reference, evaluate, greedy, harmonic, starts_with, summarize
from .fluency import RowSampler, mean_fluency, repetition, sample
from .methods import AUTO, AUTO_PARALLEL
from .patches import Patch
from .requests import EditRequest, LocalityProbe, PortabilityProbe, encode_completion
from .training import peak_rss_mb

log = logging.getLogger(__name__)

MODES = ("single", "batch", "sequential")
STRATEGIES = ("stack", "shared", "routed")
SUMMARY_KEYS = SCORE_KEYS + ("fluency", "rep", "mention", "multihop",
                              "fluency_told", "rep_told", "mention_told")
SCORE_CHUNK = 16
"""Cases scored in one `evaluate` call when a whole run is scored at once (the unedited
baseline and the re-scoring after the last edit of a sequential run): their prompts run in
shared batches instead of one small batch per case."""


@dataclass
class BenchSettings:
    data: str
    method: str = "lora-sft"
    mode: str = "single"
    n: int | None = None
    format: str | None = None
    batch_size: int = 1
    strategy: str = "stack"
    chat_template: bool = False
    fluency_every: int = 5
    seed: int = 0
    score_every: int = 1
    """Sequential mode: score a record right after its own edit only every k-th record (all
    are scored again after the last edit)."""
    parallel: int = 1
    """Sequential mode (stack, routed), LoRA SFT: edits trained side by side, k at a time
    (`Editor.edit_many`); each is then saved and scored as if trained alone."""
    told: bool = False
    """Also sample the unedited model's fluency texts with the new fact stated first ("<edit
    prompt> <new target>. " before each generation prompt, the same random streams):
    `fluency_told`, `rep_told`, `mention_told` of the new target in the baseline — what the
    base model writes when it holds the new fact, the reference for an edited model's rep."""
    method_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise KnowpatchError(f"mode: unknown value {self.mode!r} (expected {', '.join(MODES)})")
        if self.strategy not in STRATEGIES:
            raise KnowpatchError(
                f"strategy: unknown value {self.strategy!r} (expected {', '.join(STRATEGIES)})")
        if self.batch_size < 1:
            raise KnowpatchError(f"batch_size: must be ≥ 1 (got {self.batch_size})")
        if self.n is not None and self.n < 1:
            raise KnowpatchError(f"n: must be ≥ 1 (got {self.n})")
        if self.score_every < 1:
            raise KnowpatchError(f"score_every: must be ≥ 1 (got {self.score_every})")
        if self.fluency_every < 0:
            raise KnowpatchError(f"fluency_every: must be ≥ 0 (got {self.fluency_every})")
        if self.parallel < 1:
            raise KnowpatchError(f"parallel: must be ≥ 1 (got {self.parallel})")
        if self.told and self.chat_template:
            raise KnowpatchError("told: the fact stated before a chat-template prompt is not "
                                 "that prompt's context; use it without --chat-template")
        if self.parallel > 1 and (self.mode != "sequential" or self.strategy == "shared"
                                  or self.method != "lora-sft"):
            raise KnowpatchError("parallel: edits side by side need --mode sequential, "
                                 "--strategy stack or routed, and --method lora-sft")


def with_chat_template(tokenizer, case: Case) -> Case:
    """Wrap every prompt of a case in the model's chat template (a user turn)."""
    if not getattr(tokenizer, "chat_template", None):
        raise KnowpatchError("chat_template: this model's tokenizer has no chat template")

    def wrap(prompt: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)

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


class Bench:
    def __init__(self, editor: Editor, settings: BenchSettings, out: str | Path,
                 keep_patches: bool = False, progress: bool = True,
                 baselines: BaselineCache | None = None):
        self.editor = editor
        self.baselines = baselines  # None: the unedited model is scored afresh
        if baselines is not None and settings.told:  # stored baselines without told texts differ
            baselines.context["told"] = True
        self.s = settings
        self.out = Path(out)
        self.keep = keep_patches or settings.mode == "sequential"
        self.progress = progress
        self.editor.progress = False  # one bar for the whole run
        # sequential stack/shared: every patch acts on every query (the comparison);
        # routed, single and batch: keyed patches act only on the queries they match
        self.editor.routing = not (settings.mode == "sequential" and settings.strategy != "routed")

    # ---- run bookkeeping ------------------------------------------------------------
    def _run_key(self) -> dict[str, Any]:
        from .config import build_config
        from .methods import get_method

        # the method's full settings, defaults included: a run resumed after the defaults
        # changed would mix two configurations
        resolved = None if self.s.method == "auto" else asdict(build_config(
            get_method(self.s.method).Config, self.s.method_config, where=self.s.method))
        key = {**asdict(self.s), "data": str(Path(self.s.data).resolve()),
               "model": self.editor.model_name, "fingerprint": self.editor.fingerprint,
               "method_settings": resolved}
        for name, default in (("parallel", 1), ("told", False)):
            if key[name] == default:  # as runs made before the setting existed recorded it
                del key[name]
        return key

    def _check_resume(self) -> list[dict[str, Any]]:
        self.out.mkdir(parents=True, exist_ok=True)
        run_file = self.out / "run.json"
        key = self._run_key()
        if run_file.is_file():
            old = json.loads(run_file.read_text())
            differ = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            if differ:
                raise KnowpatchError(
                    f"out: {self.out} holds a run with other settings ({', '.join(differ)} "
                    "differ); use another --out or the same settings to resume")
        else:
            run_file.write_text(json.dumps(key, indent=2))
        rows_file = self.out / "rows.jsonl"
        rows = []
        if rows_file.is_file():
            for line in rows_file.read_text().splitlines():
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        break  # a line cut by an interruption: redo from there
        return rows

    def _append(self, row: dict[str, Any]) -> None:
        with open(self.out / "rows.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    # ---- scoring ----------------------------------------------------------------------
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
        with self.editor.using(patches) as model:
            for start in range(0, len(cases), SCORE_CHUNK):
                chunk = cases[start:start + SCORE_CHUNK]
                flags = fluency_on[start:start + len(chunk)]
                scored = cache.get(chunk, flags) if cache is not None else None
                if scored is None:
                    scored = self._score_chunk(model, chunk, refs, flags)
                    if cache is not None:
                        cache.put(chunk, flags, scored)
                out.extend(scored)
                if bar is not None:
                    bar.relabel_count(len(out), len(cases))
        return out

    def _score_chunk(self, model, chunk: list[Case], refs: dict[str, Reference] | None,
                     flags: list[bool]) -> list[tuple[dict[str, Any], Reference]]:
        """Each case's scores and reference, the chunk's prompts evaluated together."""
        tokenizer = self.editor.tokenizer
        requests = [r for c in chunk for r in c.requests]
        ref = None if refs is None else _join_refs([refs[c.case_id] for c in chunk])
        ev = evaluate(model, tokenizer, requests, ref)
        sampled = [c for c, f in zip(chunk, flags) if f]
        texts = iter(self._samples(model, sampled))
        told = iter(self._samples(model, sampled, told=True) if refs is None and self.s.told else [])
        out, i = [], 0
        for case, fluency_on in zip(chunk, flags):
            n = len(case.requests)
            scores: dict[str, Any] = dict(summarize(ev.records[i:i + n]))
            scores["multihop"] = multihop_correct(model, tokenizer, case.multihop)
            if fluency_on:
                scores.update(self._fluency(case, next(texts), refs is None))
                scores.update(self._told(case, next(told, None)))
            else:
                scores["fluency"] = scores["rep"] = scores["mention"] = None
            out.append((scores, _slice_ref(ev.reference, i, i + n)))
            i += n
        return out

    def _samples(self, model, cases: list[Case], told: bool = False) -> list[list[str]]:
        """Each case's texts sampled from its generation prompts, all in one batched call
        (each text has its own random stream: the same as sampled case by case). `told`: each
        prompt after the case's new facts stated ("<edit prompt> <new target>. "), with the
        streams of the prompts alone."""
        prompts = [(told_context(c) if told else "") + p for c in cases for p in c.generation_prompts]
        streams = [g for c in cases for g in RowSampler.streams(c.generation_prompts, self.s.seed)]
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

    def edit_records(self, requests: list[EditRequest], into: Patch | None = None) -> tuple[Patch, float]:
        started = time.perf_counter()
        patch = self.editor.edit(requests, method=self.s.method, config=self.s.method_config,
                                 save=False, evaluate=False, into=into)
        return patch, time.perf_counter() - started

    def edit_side_by_side(self, cases: list[Case], method: str = "lora-sft",
                          parallel: int | None = None) -> dict[str, tuple[Patch, float]]:
        """Each case's patch, trained side by side (`parallel` at a time), and the wall
        time's share of each."""
        started = time.perf_counter()
        patches = self.editor.edit_many([c.requests for c in cases], method=method,
                                        parallel=parallel, config=self.s.method_config,
                                        save=False, evaluate=False)
        share = (time.perf_counter() - started) / len(cases)
        return {c.case_id: (p, share) for c, p in zip(cases, patches)}

    # ---- modes ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        torch.manual_seed(self.s.seed)
        cases = load_cases(self.s.data, self.s.format, self.s.n)
        if self.s.chat_template:
            cases = [with_chat_template(self.editor.tokenizer, c) for c in cases]
        rows = self._check_resume()
        done = {r["case_id"] for r in rows}
        todo = [c for c in cases if c.case_id not in done]
        if rows:
            log.info("resuming: %d of %d cases already done", len(rows), len(cases))
        bar = _Bar(len(cases), len(rows), enabled=self.progress)
        try:
            if self.s.mode == "sequential":
                rows = self._sequential(cases, rows, bar)
            else:
                k = self.s.batch_size if self.s.mode == "batch" else 1
                for start in range(0, len(todo), k):
                    for row in self._group(todo[start: start + k], len(rows)):
                        rows.append(row)
                        self._append(row)
                        bar.advance(rows)
        finally:
            bar.stop()
        report = self.report(rows, cases)
        return report

    def _group(self, group: list[Case], index: int) -> list[dict[str, Any]]:
        """Edit `group` (single: a group of one), score each case, remove. One patch for the
        group, or with `--method auto` what it chooses (a patch per case, side by side). The
        cases are scored SCORE_CHUNK at a time, before and after (batch mode: a large group
        scored case by case took most of the run)."""
        flags = [bool(self.s.fluency_every) and (index + i) % self.s.fluency_every == 0
                 for i in range(len(group))]
        before = self.score_cases(group, None, [], flags)
        refs = {c.case_id: ref for c, (_, ref) in zip(group, before)}
        if self.s.method == AUTO and len(group) > 1:
            edited = self.edit_side_by_side(group, AUTO, AUTO_PARALLEL)
            own = [edited[c.case_id][0] for c in group]
            seconds = sum(t for _, t in edited.values())
        else:
            patch, seconds = self.edit_records([r for c in group for r in c.requests])
            own = [patch] * len(group)
        patches = list({p.id: p for p in own}.values())
        try:
            t0 = time.perf_counter()
            after = self.score_cases(group, refs, patches, flags)
            share = (time.perf_counter() - t0) / len(group)
            rows = [self._row(case, scores, base, p, seconds, share, group_size=len(group))
                    for case, (scores, _), (base, _), p in zip(group, after, before, own)]
            for p in patches if self.keep else []:
                p.save(self.out / "patches" / p.id)
        finally:
            for p in patches:
                self.editor.remove(p)
        return rows

    def _sequential(self, cases: list[Case], rows: list[dict[str, Any]], bar) -> list[dict[str, Any]]:
        ed = self.editor
        patch_dir = self.out / "patches"
        refs: dict[str, Reference] = {}
        base: dict[str, dict[str, Any]] = {}
        done = {r["case_id"] for r in rows}
        shared: Patch | None = None
        # resume: put back what earlier edits left
        if rows and self.s.strategy in ("stack", "routed"):
            for r in rows:
                ed.apply(Patch.load(patch_dir / r["patch_id"]))
        if rows and self.s.strategy == "shared":
            shared = ed.apply(Patch.load(patch_dir / "shared"))
        flags = [bool(self.s.fluency_every) and i % self.s.fluency_every == 0
                 for i in range(len(cases))]
        bar.relabel("scoring the unedited model")
        for case, (scores, ref) in zip(cases, self.score_cases(cases, None, [], flags, bar)):
            base[case.case_id], refs[case.case_id] = scores, ref
        edited: dict[str, tuple[Patch, float]] = {}  # trained side by side, not yet scored
        for index, case in enumerate(cases):
            fl = flags[index]
            if case.case_id in done:
                continue
            if self.s.parallel > 1 and case.case_id not in edited:
                todo = [c for c in cases[index:] if c.case_id not in done][:self.s.parallel]
                edited = self.edit_side_by_side(todo)
            if case.case_id in edited:
                patch, seconds = edited.pop(case.case_id)
            else:
                patch, seconds = self.edit_records(case.requests, into=shared)
            if self.s.strategy == "shared":
                shared = patch
                patch.save(patch_dir / "shared", overwrite=True)
            else:
                patch.save(patch_dir / patch.id)
                ed.pager.saved(patch)  # with --resident, it may now leave memory
            t0 = time.perf_counter()
            scores = {}  # not scored right after its edit (--score-every): only after the last
            if index % self.s.score_every == 0:
                scores, _ = self.score_case(case, refs[case.case_id], None, fl)  # all applied
            row = self._row(case, scores, base[case.case_id], patch, seconds,
                            time.perf_counter() - t0, group_size=1)
            rows.append(row)
            self._append(row)
            bar.advance(rows)
        # after the last edit: every case again, with everything applied
        final_file = self.out / "final.jsonl"
        bar.relabel("re-scoring after the last edit")
        final = self.score_cases(cases, refs, None, flags, bar)  # all applied patches
        final_rows = [{"case_id": case.case_id, "final": scores}
                      for case, (scores, _) in zip(cases, final)]
        final_file.write_text("".join(json.dumps(r) + "\n" for r in final_rows))
        by_id = {r["case_id"]: r["final"] for r in final_rows}
        for r in rows:
            r["final"] = by_id.get(r["case_id"])
        return rows

    def _row(self, case: Case, scores: dict[str, Any], baseline: dict[str, Any], patch: Patch,
             seconds: float, eval_seconds: float, group_size: int) -> dict[str, Any]:
        return {
            "case_id": case.case_id, "prompt": case.requests[0].prompt,
            "target_new": case.requests[0].target_new, "scores": scores, "baseline": baseline,
            "steps": patch.steps, "learnt": patch.manifest.get("learnt"),
            "edit_seconds": round(seconds / group_size, 4), "eval_seconds": round(eval_seconds, 4),
            "group_size": group_size, "patch_id": patch.id, "patch_bytes": patch.nbytes,
            "phases": patch.manifest.get("phases"), "chosen_by": patch.manifest.get("chosen_by"),
            "precision": patch.manifest.get("precision"),
        }

    # ---- report -----------------------------------------------------------------------
    def report(self, rows: list[dict[str, Any]], cases: list[Case] | None = None) -> dict[str, Any]:
        sequential = self.s.mode == "sequential"
        after = [r.get("final") or r["scores"] for r in rows] if sequential else [r["scores"] for r in rows]
        edit_s = [r["edit_seconds"] for r in rows]
        summary = summarize_rows(after)
        if sequential and cases:
            summary.update(loc_without_edited_subjects(rows, cases))
        summary.update({
            "s_per_edit_median": _round(statistics.median(edit_s)) if edit_s else None,
            "s_per_edit_p90": _round(_quantile(edit_s, 0.9)) if edit_s else None,
            "steps_median": statistics.median([r["steps"] for r in rows]) if rows else None,
            "eval_s_per_record": _round(statistics.mean([r["eval_seconds"] for r in rows])) if rows else None,
            "peak_rss_mb": peak_rss_mb(), "n": len(rows), **patch_sizes(rows),
            "phases_median": phase_medians(rows),
        })
        report = {
            "config": {**asdict(self.s), "keep_patches": self.keep},
            "environment": environment(self.editor),
            "baseline": summarize_rows([r["baseline"] for r in rows]),
            "summary": summary,
            "notes": NOTES,
            "chosen_by": sorted({r["chosen_by"] for r in rows if r.get("chosen_by")}) or None,
            "precision": sorted({r["precision"] for r in rows if r.get("precision")}) or None,
            "baseline_cache": None if self.baselines is None else {
                "folder": str(self.baselines.folder), "chunks_reused": self.baselines.hits},
        }
        if sequential:
            immediate = [r["scores"] for r in rows if r["scores"]]
            report["summary_immediate"] = {**summarize_rows(immediate), "n": len(immediate)}
        (self.out / "report.json").write_text(json.dumps(report, indent=2))
        (self.out / "report.md").write_text(markdown([(self.out.name, report)]) + "\n"
                                            + phase_line(summary) + writing(rows, report))
        try:
            figure(rows, report, self.out / "report.png")
        except Exception as exc:  # noqa: BLE001 - a missing figure must not lose the report
            log.warning("no figure: %s", exc)
        return report


NOTES = (
    "Scores in %, averaged per record then over records. loc compares the 5-token greedy "
    "continuation with the unedited model's own. score = harmonic mean of rel, gen, loc (over "
    "those present); S = harmonic mean of es, ps, ns. s_per_edit is the wall time of the edit "
    "alone (training, adapter creation), not of evaluation. In sequential mode, summary is "
    "measured after the last edit and summary_immediate right after each case's own edit; "
    "loc_clean is loc (after the last edit) over the cases none of whose locality prompts "
    "names a subject edited in the run (loc_clean_n of them): a locality prompt about an "
    "edited subject may rightly change (another case edits that very fact). score uses loc, "
    "not loc_clean."
)


def loc_without_edited_subjects(rows: list[dict[str, Any]], cases: list[Case]) -> dict[str, Any]:
    """loc after the last edit over the cases whose locality prompts name no subject that a
    case of the run edits (whole words, case-sensitive), and how many such cases there are.
    In a sequential run a locality prompt can be about a subject another case edits (on
    EasyEdit's CounterFact file, "Windows 98, a product of" is one case's locality prompt and
    another case's edit): its answer may rightly change, and loc counts that as a failure."""
    import re

    subjects = sorted({r.subject for c in cases for r in c.requests if r.subject}, key=len,
                      reverse=True)
    if not subjects:
        return {"loc_clean": None, "loc_clean_n": 0}
    named = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, subjects)) + r")(?!\w)")
    clean = {c.case_id for c in cases
             if not any(named.search(p.prompt) for r in c.requests for p in r.locality)}
    vals = [s["loc"] for r in rows if r["case_id"] in clean
            for s in [r.get("final") or r["scores"]] if s.get("loc") is not None]
    return {"loc_clean": _round(sum(vals) / len(vals)) if vals else None, "loc_clean_n": len(vals)}


def summarize_rows(scores: list[dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in SUMMARY_KEYS:
        if key in ("score", "S"):
            continue
        vals = [s[key] for s in scores if s.get(key) is not None]
        out[key] = _round(sum(vals) / len(vals)) if vals else None
    out["score"] = _round(harmonic([out["rel"], out["gen"], out["loc"]]))
    out["S"] = _round(harmonic([out["es"], out["ps"], out["ns"]]))
    return {k: out[k] for k in SUMMARY_KEYS}


def _join_refs(refs: list[Reference]) -> Reference:
    """One reference for several cases' requests, in order."""
    return Reference(loc_continuations=[x for r in refs for x in r.loc_continuations],
                     loc_argmax=[x for r in refs for x in r.loc_argmax],
                     loc_answers=[x for r in refs for x in r.loc_answers])


def _slice_ref(ref: Reference, start: int, stop: int) -> Reference:
    """The part of `ref` for requests start..stop-1."""
    return Reference(loc_continuations=ref.loc_continuations[start:stop],
                     loc_argmax=ref.loc_argmax[start:stop], loc_answers=ref.loc_answers[start:stop])


def _round(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(float(x), nd)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def environment(editor: Editor) -> dict[str, Any]:
    import peft
    import transformers

    from . import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "knowpatch": __version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "resident": editor.pager.capacity, "pager_reads": editor.pager.reads,
        "device": str(editor.device), "model": editor.model_name,
        "fingerprint": editor.fingerprint, "git_commit": commit,
    }


TABLE_KEYS = ("score", "rel", "gen", "loc", "port", "S", "es", "ps", "ns", "rel_tf", "gen_tf",
              "loc_tf", "fluency", "rep", "mention", "multihop")


def patch_sizes(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """What the run's patches hold (MB; each patch counted once, shared and batch patches
    too): in all, and per edited record."""
    sizes = {r["patch_id"]: r["patch_bytes"] for r in rows if r.get("patch_bytes") is not None}
    if not sizes:
        return {"patches_mb": None, "patch_mb_per_record": None}
    total = sum(sizes.values()) / 1e6
    return {"patches_mb": _round(total, 3), "patch_mb_per_record": _round(total / len(rows), 4)}


def phase_medians(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """Per phase of an edit (training.phase: keys, prefixes, forward, backward, ...), the
    median over the records of its seconds per edit (0 where a record's edit skipped it)."""
    timed = [r["phases"] for r in rows if r.get("phases")]
    if not timed:
        return None
    names = dict.fromkeys(k for t in timed for k in t)
    return {k: _round(statistics.median([t.get(k, 0.0) for t in timed]), 4) for k in names}


def phase_line(summary: dict[str, Any]) -> str:
    """Markdown: where an edit's time goes (median seconds per phase)."""
    phases = summary.get("phases_median")
    if not phases:
        return ""
    return ("Where an edit's time goes (median s per edit; the rest of s/edit is the patch's "
            "install): " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items())
            + f"; s/edit {summary.get('s_per_edit_median')}.\n")


def markdown(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """One table: the baseline (of the first run) first, then each run's summary."""
    cols = ["run", *TABLE_KEYS, "s/edit", "steps/edit", "peak MB", "patches MB", "n"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def cell(v: Any) -> str:
        return "–" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))

    if runs:
        base = runs[0][1]["baseline"]
        lines.append("| unedited | " + " | ".join(cell(base.get(k)) for k in TABLE_KEYS)
                     + " | – | – | – | – | " + cell(runs[0][1]["summary"].get("n")) + " |")
    for name, rep in runs:
        s = rep["summary"]
        c = rep["config"]
        label = f"{name} ({c['method']}, {c['mode']})"
        lines.append(f"| {label} | " + " | ".join(cell(s.get(k)) for k in TABLE_KEYS) + " | "
                     + " | ".join(cell(s.get(k)) for k in ("s_per_edit_median", "steps_median",
                                                            "peak_rss_mb", "patches_mb", "n"))
                     + " |")
    return "\n".join(lines) + "\n"


def writing(rows: list[dict[str, Any]], report: dict[str, Any], k: int = 5) -> str:
    """Markdown: a flag when fluency falls below 95 % of the unedited model's, and the `k`
    records with the lowest edited fluency, with their unedited and edited texts."""
    s, b = report["summary"], report["baseline"]
    out = []
    if s.get("fluency") is not None and b.get("fluency"):
        ratio = s["fluency"] / b["fluency"]
        flag = "**below 95 % of the unedited model's: flagged**" if ratio < 0.95 else "kept"
        out.append(f"Fluency {s['fluency']:.2f} against {b['fluency']:.2f} unedited "
                   f"({100 * ratio:.0f} %): {flag}; rep {s.get('rep')} % against "
                   f"{b.get('rep')} % unedited.\n")
    if b.get("rep_told") is not None:
        out.append(f"The unedited model told the new fact (`--told`): rep {b['rep_told']} %, "
                   f"mention {b.get('mention_told')} %, fluency {_fmt(b.get('fluency_told'))} "
                   f"(edited: rep {s.get('rep')} %, mention {s.get('mention')} %).\n")
    scored = [(r, r.get("final") or r["scores"]) for r in rows]
    lowest = sorted([x for x in scored if x[1].get("fluency") is not None],
                    key=lambda x: x[1]["fluency"])[:k]
    if lowest:
        out.append(f"## The {len(lowest)} records with the lowest edited fluency\n")
    for r, sc in lowest:
        base = r["baseline"]
        out.append(f"- **{r['case_id']}** {r['prompt']!r} → {r['target_new']!r}: fluency "
                   f"{sc['fluency']:.2f} (unedited {_fmt(base.get('fluency'))}), rep "
                   f"{_fmt(sc.get('rep'))} (unedited {_fmt(base.get('rep'))})")
        for label, texts in (("unedited", base.get("fluency_texts")),
                             ("edited", sc.get("fluency_texts"))):
            if texts:
                out.append(f"  - {label}: " + texts[0].replace("\n", " ⏎ ").replace("|", "\\|"))
    return "\n".join(out) + "\n"


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.2f}"


FIGURE_KEYS = ("rel", "gen", "loc", "port", "rep", "mention")


def figure(rows: list[dict[str, Any]], report: dict[str, Any], path: Path) -> None:
    """The scores edited beside unedited (rel, gen, loc, port, rep, mention in %; fluency on its
    own axis); in sequential mode also rel/gen/loc right after each edit as edits add up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sequential = "summary_immediate" in report
    fig, axes = plt.subplots(1, 3 if sequential else 2, figsize=(13 if sequential else 9, 3.8),
                             gridspec_kw={"width_ratios": [4, 1] + ([4] if sequential else [])})
    s, b = report["summary"], report["baseline"]
    keys = [k for k in FIGURE_KEYS if s.get(k) is not None or b.get(k) is not None]
    xs = range(len(keys))
    for offset, (label, src) in ((-0.2, ("unedited", b)), (0.2, ("edited", s))):
        axes[0].bar([x + offset for x in xs], [src.get(k) or 0 for k in keys], 0.4, label=label)
        axes[1].bar([offset], [src.get("fluency") or 0], 0.4, label=label)
    axes[0].set_xticks(list(xs), keys)
    axes[0].set_ylabel("%")
    axes[0].set_ylim(0, 105)
    axes[0].legend()
    axes[1].set_xticks([0], ["fluency"])
    axes[1].set_ylabel("n-gram entropy")
    if sequential:
        for key in ("rel", "gen", "loc"):
            vals = [v for v in (r["scores"].get(key) for r in rows) if v is not None]
            running = [t / (i + 1) for i, t in enumerate(itertools.accumulate(vals))]
            axes[2].plot(range(1, len(running) + 1), running, label=f"{key} right after each edit")
        axes[2].set_xlabel("number of edits")
        axes[2].legend()
    fig.suptitle(f"{report['config']['method']}, {report['config']['mode']}, n {s.get('n')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class _Bar:
    """Records done, running scores and ETA on stderr."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.progress = None
        self.label = "bench"
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True))
        self.progress.start()
        self.task = self.progress.add_task("bench", total=total, completed=done)

    def advance(self, rows: list[dict[str, Any]]) -> None:
        if self.progress is None:
            return
        s = summarize_rows([r["scores"] for r in rows])
        desc = " ".join(f"{k} {s[k]:.0f}" for k in ("rel", "gen", "loc") if s.get(k) is not None)
        self.progress.update(self.task, completed=len(rows), description=f"bench {desc}")

    def relabel(self, text: str) -> None:
        self.label = text
        if self.progress is not None:
            self.progress.update(self.task, description=text)

    def relabel_count(self, done: int, total: int) -> None:
        """Show how far a whole-run scoring pass is (`done` of `total` cases)."""
        if self.progress is not None:
            self.progress.update(self.task, description=f"{self.label}: {done}/{total} cases")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
