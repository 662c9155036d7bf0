"""A behaviour edit from start to report: pairs from the behaviour (`behaviour`), a DPO patch,
optionally a scope (`scope_keys`), and what the model writes measured before and after —
used by `knowpatch edit --behaviour` and `knowpatch bench --behaviours`.

    job = BehaviourJob("Answer in one short sentence.", parse_judges("max-words:20"),
                       train=[...], heldout=[...], outside=[...])
    patch, report = run_behaviour(editor, job, {"prefixes": 0})
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from .behaviour import behaviour_pairs, check_prompts, judge_answers, unchanged
from .errors import KnowpatchError
from .judges import Judges, parse_judges
from .questions import chat_prompt, has_chat_template
from .scope_keys import check_scope, make_chat_scope, make_scope

SAMPLES_SHOWN = 5


@dataclass
class BehaviourJob:
    behaviour: str
    judge: Judges
    train: list[str]
    """Prompts the pairs are made from."""
    heldout: list[str] = field(default_factory=list)
    """In-scope prompts kept out of training, measured (none: the training prompts are)."""
    outside: list[str] = field(default_factory=list)
    """Out-of-scope prompts: measured (answers unchanged?) and, when scoped, half of them
    calibrate the scope's threshold."""
    scope: list[str] | None = None
    """In-scope example prompts the patch is keyed by (None: it fires on every chat prompt,
    or with `everywhere` on every query)."""
    everywhere: bool = False
    """Without `scope`: act on completion prompts too, not only on chat turns."""


def split_heldout(prompts: list[str], heldout: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training, held-out) prompts: a `heldout` share, drawn with `seed`, kept out."""
    if not 0 <= heldout < 1:
        raise KnowpatchError(f"heldout: must be in [0, 1) (got {heldout})")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    n_held = round(heldout * len(prompts))
    return ([prompts[i] for i in sorted(order[n_held:])],
            [prompts[i] for i in sorted(order[:n_held])])


def job_from_dict(data: dict[str, Any]) -> BehaviourJob:
    """A behaviour edit as JSON (the server's `POST /v1/patches` with `behaviour`): behaviour,
    prompts, judge (a spec or a list), heldout (0.2), scope and out_of_scope (lists of
    prompts); a bad field is named, before anything is trained."""
    known = {"behaviour", "prompts", "judge", "heldout", "scope", "out_of_scope", "everywhere"}
    if set(data) - known:
        raise KnowpatchError(f"{sorted(set(data) - known)[0]}: not a field of a behaviour edit "
                             f"({', '.join(sorted(known))})")
    behaviour = data.get("behaviour")
    if not isinstance(behaviour, str) or not behaviour.strip():
        raise KnowpatchError("behaviour: empty (describe the behaviour in words)")
    judge = data.get("judge") or []
    judge = parse_judges([judge] if isinstance(judge, str) else list(judge))
    prompts = _prompts(data, "prompts")
    heldout = data.get("heldout", 0.2)
    if not isinstance(heldout, (int, float)) or isinstance(heldout, bool):
        raise KnowpatchError(f"heldout: a number in [0, 1) (got {heldout!r})")
    train, held = split_heldout(prompts, float(heldout))
    scope = _prompts(data, "scope") if data.get("scope") is not None else None
    if scope is not None:
        check_scope([p for p in scope if p not in set(held)])
    outside = _prompts(data, "out_of_scope") if data.get("out_of_scope") is not None else []
    everywhere = data.get("everywhere", False)
    if not isinstance(everywhere, bool):
        raise KnowpatchError(f"everywhere: true or false (got {everywhere!r})")
    return BehaviourJob(behaviour, judge, train, held, outside, scope, everywhere)


def _prompts(data: dict[str, Any], name: str) -> list[str]:
    value = data.get(name)
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise KnowpatchError(f"{name}: a list of prompts (strings) is needed")
    return check_prompts(value, name)


def run_behaviour(editor, job: BehaviourJob, values: dict[str, Any]) -> tuple[Any, dict]:
    """Train the job's patch (not saved) and measure it: (patch, report)."""
    start = time.perf_counter()
    if job.scope is not None:
        check_scope([p for p in job.scope if p not in set(job.heldout)])
    pairs, made = behaviour_pairs(editor, job.behaviour, job.train, job.judge)
    patch, _ = editor.edit_preferences(pairs, heldout=0.0, save=False, config=values,
                                       label=job.behaviour, samples=0)
    calibrate_on, measure_on = _split(job.outside) if job.scope is not None else ([], job.outside)
    report: dict[str, Any] = {**made, "seconds_to_edit": None}
    editor.remove(patch)  # loaded unkeyed while pairs were measured: keyed from here on
    if job.scope is not None:
        held = set(job.heldout)
        report["scope"] = make_scope(editor, patch, [p for p in job.scope if p not in held],
                                     calibrate_on or None)
    elif not job.everywhere and has_chat_template(editor.tokenizer):
        report["scope"] = make_chat_scope(editor, patch)
    report["seconds_to_edit"] = round(time.perf_counter() - start, 1)
    probe = job.heldout or job.train
    report["measured_on"] = "heldout" if job.heldout else "training prompts (no heldout)"
    report.update(_judged(editor, patch, probe, job.judge))
    if measure_on:
        report["out_of_scope"] = _outside(editor, patch, measure_on, job.judge)
    if job.scope is not None:
        report["scope"]["heldout_fires"] = fire_rate(editor, patch, probe)
    patch.manifest["behaviour"] = report
    return patch, report


def _split(prompts: list[str]) -> tuple[list[str], list[str]]:
    """Alternate prompts: (calibration, measurement)."""
    return prompts[::2], prompts[1::2]


def _judged(editor, patch, prompts: list[str], judge: Judges) -> dict[str, Any]:
    before = judge_answers(editor, prompts, judge, patches=[])
    after = judge_answers(editor, prompts, judge, patches=[patch])
    return {"pass_rate": {"unedited": before["pass_rate"], "edited": after["pass_rate"]},
            "fluency": {"unedited": before["fluency"], "edited": after["fluency"]},
            "truncated": {"unedited": before["truncated"], "edited": after["truncated"]},
            "samples": [{"prompt": p, "before": b, "after": a} for p, b, a in
                        zip(prompts[:SAMPLES_SHOWN], before["answers"], after["answers"])]}


def _outside(editor, patch, prompts: list[str], judge: Judges) -> dict[str, Any]:
    """Out-of-scope prompts: how many answers stay as they were, the judge's pass rates, how
    often the patch fires on them."""
    before = judge_answers(editor, prompts, judge, patches=[])
    after = judge_answers(editor, prompts, judge, patches=[patch])
    return {"prompts": len(prompts),
            "unchanged": unchanged(before["answers"], after["answers"], editor.tokenizer),
            "pass_rate": {"unedited": before["pass_rate"], "edited": after["pass_rate"]},
            "fluency": {"unedited": before["fluency"], "edited": after["fluency"]},
            "fires": fire_rate(editor, patch, prompts)}


def fire_rate(editor, patch, prompts: list[str]) -> float:
    """The share (%) of `prompts`, asked in chat, on which `patch` fires (100 when unkeyed)."""
    if patch.routing is None:
        return 100.0
    routes = editor.route([chat_prompt(editor.tokenizer, p) for p in prompts], patches=[patch])
    return round(100.0 * sum(patch.id in r.fired for r in routes) / max(1, len(routes)), 2)
