"""A bench run's report: the summary of its rows (BENCHMARK.md's scores, the unedited
baseline first, cost), written as report.json, report.md (the table, where an edit's time
goes, the writing after the edit) and report.png."""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..chat import CHAT_KEYS
from ..datasets import Case
from ..editor import Editor
from ..evaluate import SCORE_KEYS, harmonic
from ..training import peak_rss_mb
from .baselines import BaselineCache
from .environment import environment
from .figure import figure
from .settings import BenchSettings

log = logging.getLogger(__name__)

SUMMARY_KEYS = SCORE_KEYS + CHAT_KEYS + ("fluency", "rep", "mention", "multihop",
                              "fluency_told", "rep_told", "mention_told")


def write_report(out: Path, settings: BenchSettings, keep: bool, editor: Editor,
                 baselines: BaselineCache | None, rows: list[dict[str, Any]],
                 cases: list[Case] | None = None) -> dict[str, Any]:
    """Summarize a run's `rows` and write report.json, report.md and report.png into `out`."""
    sequential = settings.mode == "sequential"
    after = [r.get("final") or r["scores"] for r in rows] if sequential else [r["scores"] for r in rows]
    edit_s = [r["edit_seconds"] for r in rows]
    summary = summarize_rows(after)
    if sequential and cases:
        summary.update(loc_without_edited_subjects(rows, cases))
    summary.update({
        "s_per_edit_median": rounded(statistics.median(edit_s)) if edit_s else None,
        "s_per_edit_p90": rounded(quantile(edit_s, 0.9)) if edit_s else None,
        "steps_median": statistics.median([r["steps"] for r in rows]) if rows else None,
        "eval_s_per_record": rounded(statistics.mean([r["eval_seconds"] for r in rows])) if rows else None,
        "peak_rss_mb": peak_rss_mb(), "n": len(rows), **patch_sizes(rows),
        "phases_median": phase_medians(rows),
    })
    report = {
        "config": {**asdict(settings), "keep_patches": keep},
        "environment": environment(editor),
        "baseline": summarize_rows([r["baseline"] for r in rows]),
        "summary": summary,
        "notes": NOTES,
        "chosen_by": sorted({r["chosen_by"] for r in rows if r.get("chosen_by")}) or None,
        "precision": sorted({r["precision"] for r in rows if r.get("precision")}) or None,
        "baseline_cache": None if baselines is None else {
            "folder": str(baselines.folder), "chunks_reused": baselines.hits},
    }
    if sequential:
        immediate = [r["scores"] for r in rows if r["scores"]]
        report["summary_immediate"] = {**summarize_rows(immediate), "n": len(immediate)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown([(out.name, report)]) + "\n" + phase_line(summary)
                                   + writing(rows, report) + chat_section(rows, report))
    try:
        figure(rows, report, out / "report.png")
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
    return {"loc_clean": rounded(sum(vals) / len(vals)) if vals else None, "loc_clean_n": len(vals)}


def summarize_rows(scores: list[dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in SUMMARY_KEYS:
        if key in ("score", "S"):
            continue
        vals = [s[key] for s in scores if s.get(key) is not None]
        out[key] = rounded(sum(vals) / len(vals)) if vals else None
    out["score"] = rounded(harmonic([out["rel"], out["gen"], out["loc"]]))
    out["S"] = rounded(harmonic([out["es"], out["ps"], out["ns"]]))
    # records asked their fact as a question; the others (no question for them) are counted
    out["chat_n"] = sum(1 for s in scores if s.get("chat_rel") is not None)
    out["chat_skipped"] = len(scores) - out["chat_n"] if out["chat_n"] else None
    return {k: out[k] for k in (*SUMMARY_KEYS, "chat_n", "chat_skipped")}



def rounded(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(float(x), nd)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


TABLE_KEYS = ("score", "rel", "gen", "loc", "port", "S", "es", "ps", "ns", "rel_tf", "gen_tf",
              "loc_tf", "fluency", "rep", "mention", "multihop", "chat_rel", "chat_gen", "chat_loc",
              "chat_rep", "chat_fluency")


def patch_sizes(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """What the run's patches hold (MB; each patch counted once, shared and batch patches
    too): in all, and per edited record."""
    sizes = {r["patch_id"]: r["patch_bytes"] for r in rows if r.get("patch_bytes") is not None}
    if not sizes:
        return {"patches_mb": None, "patch_mb_per_record": None}
    total = sum(sizes.values()) / 1e6
    return {"patches_mb": rounded(total, 3), "patch_mb_per_record": rounded(total / len(rows), 4)}


def phase_medians(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """Per phase of an edit (training.phase: keys, prefixes, forward, backward, ...), the
    median over the records of its seconds per edit (0 where a record's edit skipped it)."""
    timed = [r["phases"] for r in rows if r.get("phases")]
    if not timed:
        return None
    names = dict.fromkeys(k for t in timed for k in t)
    return {k: rounded(statistics.median([t.get(k, 0.0) for t in timed]), 4) for k in names}


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



def chat_section(rows: list[dict[str, Any]], report: dict[str, Any], k: int = 5) -> str:
    """Markdown: the chat scores beside the unedited model's, and `k` records' replies to
    their first question, unedited and edited (the first k records asked one)."""
    s, b = report["summary"], report["baseline"]
    if not s.get("chat_n"):
        return ""
    out = [f"\n## The fact asked in chat ({s['chat_n']} records; {s.get('chat_skipped') or 0} "
           "without a question)\n",
           "chat_rel / chat_gen / chat_loc / chat_rep / chat_fluency: edited "
           + " / ".join(_fmt(s.get(key)) for key in CHAT_KEYS) + "; unedited "
           + " / ".join(_fmt(b.get(key)) for key in CHAT_KEYS) + ".\n"]
    shown = [r for r in rows if (r.get("final") or r["scores"]).get("chat_texts")][:k]
    for r in shown:
        question, edited = (r.get("final") or r["scores"])["chat_texts"]
        unedited = (r["baseline"].get("chat_texts") or ["", ""])[1]
        out.append(f"- **{r['case_id']}** {question!r} (new answer {r['target_new']!r})")
        for label, text in (("unedited", unedited), ("edited", edited)):
            out.append(f"  - {label}: " + text.replace("\n", " ⏎ ").replace("|", "\\|"))
    return "\n".join(out) + "\n"
