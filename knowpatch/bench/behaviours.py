"""`knowpatch bench --behaviours FILE --data COUNTERFACT`: behaviour edits measured on what the
model writes, with prompts built at run time from a CounterFact file (never copied into the
repository): its records' questions (`questions.RELATION_QUESTIONS`) about each record's
subject and its neighbourhood subjects.

Per behaviour of the file (`benchmarks/behaviours.yaml`): in-scope records are those of its
relations (all, for an unscoped behaviour), shuffled and split by record — training records
give the training prompts, other records the held-out ones (no subject is shared); a scoped
behaviour's out-of-scope prompts come from records of the other relations (half calibrate
the scope, half are measured). Each behaviour's result is written as soon as it is measured
(`OUT/behaviours/NAME.json`), so a rerun resumes; `report.json` and `report.md` sum them up,
with the CounterFact neighbourhood prompts' loc (greedy answer unchanged) after each edit.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..behaviour_edit import BehaviourJob, run_behaviour
from ..chat import names
from ..datasets import load_cases
from ..errors import KnowpatchError
from ..judges import parse_judges
from ..training import peak_rss_mb

FIELDS = {"name", "behaviour", "judge", "relations", "scoped"}
COUNTS = {"train": 60, "heldout": 40, "outside": 80, "loc_records": 20}


@dataclass
class Case:
    name: str
    behaviour: str
    judge: list[str]
    relations: list[str] | None  # None: every relation
    scoped: bool


def load_spec(path: str | Path) -> tuple[list[Case], dict[str, int]]:
    """The behaviours of a benchmark file and its prompt counts; a bad entry names its field."""
    try:
        spec = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise KnowpatchError(f"behaviours: cannot read {str(path)!r} ({exc})") from None
    counts = {**COUNTS, **(spec.get("counts") or {})}
    cases = []
    for i, entry in enumerate(spec.get("behaviours") or []):
        where = f"behaviours[{i}]"
        if not isinstance(entry, dict) or not {"name", "behaviour", "judge"} <= set(entry):
            raise KnowpatchError(f"{where}: needs name, behaviour and judge")
        if set(entry) - FIELDS:
            raise KnowpatchError(f"{where}: unknown field {sorted(set(entry) - FIELDS)[0]!r}")
        judge = entry["judge"] if isinstance(entry["judge"], list) else [entry["judge"]]
        parse_judges(judge)  # an unknown judge fails here, before the model loads
        relations = entry.get("relations", "all")
        cases.append(Case(str(entry["name"]), str(entry["behaviour"]), [str(j) for j in judge],
                          None if relations == "all" else [str(r) for r in relations],
                          bool(entry.get("scoped", False))))
    if not cases:
        raise KnowpatchError("behaviours: the file lists no behaviour")
    return cases, counts


def build_prompts(records: list[tuple[str, Any]], case: Case, counts: dict[str, int],
                  seed: int = 0) -> dict[str, list[str]]:
    """train / heldout / outside / scope prompts for `case` from (relation, request) records
    (see the module). Scope keys: one question per training record."""
    inside = [r for rel, r in records if case.relations is None or rel in case.relations]
    outside = [r for rel, r in records if case.relations is not None and rel not in case.relations]
    rng = random.Random(seed)
    rng.shuffle(inside)
    rng.shuffle(outside)
    pools = [_pool(r) for r in inside if _pool(r)]
    n_held = min(counts["heldout"], len(pools) // 3)
    held_pools, train_pools = pools[:n_held], pools[n_held:]
    train = _take(train_pools, counts["train"])
    held = [p[0] for p in held_pools]
    if len(held) < counts["heldout"]:  # few records: a second subject of each
        held = _take(held_pools, counts["heldout"])
    out = [q for r in outside for q in _pool(r)[:1]][:counts["outside"]] if case.scoped else []
    return {"train": train, "heldout": held, "outside": out,
            "scope": [p[0] for p in train_pools if p[0] in train] if case.scoped else []}


def _pool(request) -> list[str]:
    """A record's questions, one per subject: its own, then its neighbourhood subjects'."""
    return ([request.questions[0]] if request.questions else []) + list(request.locality_questions)


def _take(pools: list[list[str]], n: int) -> list[str]:
    """Up to `n` prompts: the first question of every pool, then the second, …"""
    out: list[str] = []
    for depth in range(max((len(p) for p in pools), default=0)):
        out += [p[depth] for p in pools if len(p) > depth]
        if len(out) >= n:
            break
    return out[:n]


def relation_records(data: str | Path) -> list[tuple[str, Any]]:
    """(relation id, request) of each record of a CounterFact file."""
    raw = json.loads(Path(data).read_text(encoding="utf-8"))
    cases = load_cases(data)
    if len(raw) != len(cases) or not all(isinstance(r, dict) and "requested_rewrite" in r for r in raw):
        raise KnowpatchError("data: --behaviours builds prompts from a CounterFact file "
                             "(records with requested_rewrite.relation_id)")
    return [(str(r["requested_rewrite"].get("relation_id")), c.requests[0])
            for r, c in zip(raw, cases)]


def run_behaviour_bench(editor, spec: str | Path, data: str | Path, out_dir: str | Path,
                        values: dict[str, Any], only: list[str] | None = None) -> dict[str, Any]:
    """Each behaviour of `spec` edited and measured (resuming from `out_dir`; its patches
    kept in `out_dir/patches`); the report."""
    cases, counts = load_spec(spec)
    records = relation_records(data)
    out = Path(out_dir)
    (out / "behaviours").mkdir(parents=True, exist_ok=True)
    knowledge = Knowledge(editor, [r for _, r in records[:counts["loc_records"]]])
    results = []
    for case in cases:
        if only and case.name not in only:
            continue
        done = out / "behaviours" / f"{case.name}.json"
        if done.is_file():
            results.append(json.loads(done.read_text()))
            continue
        try:
            results.append(_one(editor, case, build_prompts(records, case, counts), values,
                                knowledge, out / "patches"))
        except KnowpatchError as exc:  # e.g. no pair: the model cannot show the behaviour
            results.append({"name": case.name, "behaviour": case.behaviour,
                            "scoped": case.scoped, "error": str(exc)})
        done.write_text(json.dumps(results[-1], indent=1))
    report = {"spec": str(spec), "data": str(data), "counts": counts, "behaviours": results,
              "peak_rss_mb": peak_rss_mb()}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    return report


def _one(editor, case: Case, prompts: dict[str, list[str]], values: dict[str, Any],
         knowledge: Knowledge, patches: Path) -> dict[str, Any]:
    start = time.perf_counter()
    job = BehaviourJob(case.behaviour, parse_judges(case.judge), prompts["train"],
                       prompts["heldout"], prompts["outside"],
                       prompts["scope"] if case.scoped else None)
    patch, report = run_behaviour(editor, job, dict(values))
    editor.save(patch, patches / case.name, overwrite=True)
    kept = knowledge.after(patch)
    editor.remove(patch)
    return {"name": case.name, "scoped": case.scoped, **report,
            "prompt_counts": {k: len(v) for k, v in prompts.items()}, "steps": patch.steps,
            **kept, "seconds": round(time.perf_counter() - start, 1)}


class Knowledge:
    """General knowledge kept after a behaviour edit, on CounterFact records' neighbourhood:
    `cf_loc` / `cf_loc_tf` (the bench's loc and loc_tf on the completion prompts: greedy 5
    tokens unchanged, teacher-forced answer argmax unchanged) and `chat_kept` (the
    neighbourhood questions asked in chat whose unedited reply names the true answer: the
    share of them whose edited reply still does)."""

    def __init__(self, editor, requests: list[Any]):
        from ..requests import EditRequest

        self.editor = editor
        # the records' neighbourhood only: no paraphrase, no question of the edit itself
        self.requests = [EditRequest(r.prompt, r.target_new, subject=r.subject,
                                     ground_truth=r.ground_truth, locality=r.locality)
                         for r in requests]
        self.asked = [(q, r.ground_truth) for r in requests for q in r.locality_questions]
        before = editor.chat([q for q, _ in self.asked], patches=[])
        self.named = [names(reply, answer) for reply, (_, answer) in zip(before, self.asked)]

    def after(self, patch) -> dict[str, float | None]:
        edited, _ = self.editor.evaluate(self.requests, patches=[patch])
        asked = [q for (q, _), named in zip(self.asked, self.named) if named]
        answers = [a for (_, a), named in zip(self.asked, self.named) if named]
        replies = self.editor.chat(asked, patches=[patch]) if asked else []
        kept = sum(names(reply, answer) for reply, answer in zip(replies, answers))
        return {"cf_loc": edited.summary.get("loc"), "cf_loc_tf": edited.summary.get("loc_tf"),
                "chat_kept": round(100.0 * kept / len(asked), 2) if asked else None,
                "chat_kept_of": len(asked)}


def markdown(report: dict[str, Any]) -> str:
    """report.md: one row per behaviour, then five answers before and after for each."""
    head = ("| behaviour | scoped | pass rate held-out (unedited → edited) | out-of-scope "
            "unchanged | fires in / out | fluency (unedited → edited) | CF loc / loc_tf | "
            "chat kept | pairs | s |")
    lines = ["# Behaviour edits", "", f"Prompts from `{report['data']}`; counts {report['counts']}.",
             "", head, "|" + "---|" * 10]
    for b in report["behaviours"]:
        if "error" in b:
            lines.append(f"| {b['name']} | {'yes' if b['scoped'] else 'no'} | not edited: "
                         f"{b['error']} |" + " |" * 7)
            continue
        o, s = b.get("out_of_scope") or {}, b.get("scope") or {}
        fires = (f"{s.get('heldout_fires')} / {o.get('fires')}" if b["scoped"] else
                 "chat turns" if s.get("kind") == "chat" else "all")
        lines.append(f"| {b['name']} | {'yes' if b['scoped'] else 'no'} | "
                     f"{b['pass_rate']['unedited']} → {b['pass_rate']['edited']} | "
                     f"{o.get('unchanged', '—')} | {fires} | {b['fluency']['unedited']} → "
                     f"{b['fluency']['edited']} | {b['cf_loc']} / {b['cf_loc_tf']} | "
                     f"{b['chat_kept']} (of {b['chat_kept_of']}) | {b['pairs']} | {b['seconds']} |")
    for b in (b for b in report["behaviours"] if "error" not in b):
        lines += ["", f"## {b['name']}: {b['behaviour']!r} (judge {b['judge']})", ""]
        for sample in b["samples"]:
            lines += [f"- **{sample['prompt']}**", f"  - before: {sample['before']}",
                      f"  - after: {sample['after']}"]
    return "\n".join(lines) + "\n"
