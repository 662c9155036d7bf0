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

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..datasets import Case, load_cases
from ..editor import Editor
from ..errors import KnowpatchError
from ..evaluate import Reference
from ..methods import AUTO, AUTO_PARALLEL, check_settings
from ..patches import Patch
from ..questions import has_chat_template
from ..requests import EditRequest
from .baselines import BaselineCache
from .progress import Bar
from .report import write_report
from .scoring import Scorer, with_chat_template
from .settings import BenchSettings

log = logging.getLogger(__name__)


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
        self.scorer = Scorer(editor, settings.seed, settings.told, baselines)

    # ---- run bookkeeping ------------------------------------------------------------
    def _run_key(self) -> dict[str, Any]:
        # the method's full settings, defaults included: a run resumed after the defaults
        # changed would mix two configurations
        resolved = check_settings(self.s.method, self.s.method_config)
        key = {**asdict(self.s), "data": str(Path(self.s.data).resolve()),
               "model": self.editor.model_name, "fingerprint": self.editor.fingerprint,
               "method_settings": None if resolved is None else asdict(resolved)}
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

    # ---- scoring (`scoring.Scorer`) -----------------------------------------------------
    def score_case(self, case: Case, reference: Reference | None, patches: list[Patch] | None,
                   fluency_on: bool) -> tuple[dict[str, Any], Reference]:
        return self.scorer.score_case(case, reference, patches, fluency_on)

    def score_cases(self, cases: list[Case], refs: dict[str, Reference] | None,
                    patches: list[Patch] | None, fluency_on: list[bool], bar=None
                    ) -> list[tuple[dict[str, Any], Reference]]:
        return self.scorer.score_cases(cases, refs, patches, fluency_on, bar)

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
        """Run (or resume) the benchmark; the report. Sequential stack/shared: every patch
        acts on every query (the comparison); routed, single and batch: keyed patches act
        only on the queries they match. One progress bar for the whole run."""
        routing = not (self.s.mode == "sequential" and self.s.strategy != "routed")
        with self.editor.options(routing=routing, progress=False):
            return self._run()

    def _run(self) -> dict[str, Any]:
        torch.manual_seed(self.s.seed)
        cases = load_cases(self.s.data, self.s.format, self.s.n)
        tokenizer = self.editor.tokenizer
        if not has_chat_template(tokenizer):
            log.warning("chat: %s has no chat template; questions (and --chat-template prompts) "
                        "are asked in the 'Question: … Answer:' format", self.editor.model_name)
        if self.s.chat_template:
            cases = [with_chat_template(tokenizer, c) for c in cases]
        unasked = sum(1 for c in cases if not any(r.questions for r in c.requests))
        if unasked:
            log.warning("chat: %d of %d records have no question (no template for their "
                        "relation, or none in their format): their chat scores are skipped "
                        "and counted (chat_skipped)", unasked, len(cases))
        rows = self._check_resume()
        done = {r["case_id"] for r in rows}
        todo = [c for c in cases if c.case_id not in done]
        if rows:
            log.info("resuming: %d of %d cases already done", len(rows), len(cases))
        bar = Bar(len(cases), len(rows), enabled=self.progress)
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
            else:  # with --resident, it may now leave memory
                ed.save(patch, patch_dir / patch.id)
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
        return write_report(self.out, self.s, self.keep, self.editor, self.baselines, rows, cases)
