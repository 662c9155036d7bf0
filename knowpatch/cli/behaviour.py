"""`knowpatch edit --behaviour` and `knowpatch eval --prompts`: a behaviour described in words
made into a DPO patch, and a patch judged on what the model writes (`knowpatch.behaviour`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ..behaviour import check_prompts, judge_answers, unchanged
from ..behaviour_edit import BehaviourJob, run_behaviour, split_heldout
from ..errors import KnowpatchError
from ..judges import parse_judges
from ..methods import check_settings
from ..scope_keys import check_scope
from .common import ModelArgs, method_config, open_editor, open_store, out

BehaviourOpt = typer.Option(
    None, "--behaviour", help="A behaviour in words (e.g. \"Answer in one short sentence.\"): "
    "pairs are made from the model's answers with and without it, kept by --judge, and a DPO "
    "patch makes it hold without the instruction. Needs --prompts and --judge.")
PromptsOpt = typer.Option(None, "--prompts", help="With --behaviour: a text file of user "
                          "prompts, one per line (--heldout of them measure the patch).")
EvalPromptsOpt = typer.Option(None, "--prompts", help="A behaviour patch: a text file of "
                              "prompts, one per line, answered greedily to EOS (96 new tokens "
                              "at most) with and without the patches and judged by --judge.")
JudgeOpt = typer.Option(None, "--judge", help="What the behaviour looks like (repeatable, all "
                        "must pass): max-words:N, starts-with:TEXT, ends-with:TEXT, "
                        "contains:W, not-contains:W, regex:P, no-contractions, language:CODE, "
                        "refusal, module:function.")


PreferencesOpt = typer.Option(None, "--preferences", help="A JSONL file of "
                              '{"prompt", "chosen", "rejected"} lines: one DPO patch shifting '
                              "behaviour (e.g. examples/preferences-formal.jsonl).")
HeldoutOpt = typer.Option(0.2, "--heldout", help="With --preferences (--behaviour): share of "
                          "the pairs (prompts) kept out of training to measure the patch "
                          "before/after.")
ScopeOpt = typer.Option(None, "--scope", help="With --behaviour: a text file of in-scope "
                        "example prompts (distinct questions, one per line; may be --prompts "
                        "itself): the patch fires only on queries like them (held-out prompts "
                        "are never keys).")
OutOfScopeOpt = typer.Option(None, "--out-of-scope", help="With --behaviour: prompts the patch "
                             "must leave alone, one per line: half calibrate --scope's "
                             "threshold, half are measured (answers unchanged, fire rate).")


EverywhereOpt = typer.Option(False, "--everywhere", help="With --behaviour and no --scope: act "
                             "on completion prompts too (by default a behaviour learnt from "
                             "chat turns fires on chat prompts only).")


@dataclass
class BehaviourScope:
    prompts: Path | None = None
    outside: Path | None = None
    everywhere: bool = False


def read_prompts(path: Path | None, field: str = "prompts") -> list[str]:
    """The prompts of a text file, one per line (blank lines skipped)."""
    if path is None:
        raise KnowpatchError(f"{field}: a file of prompts is needed (--{field.replace('_', '-')} FILE)")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KnowpatchError(f"{field}: cannot read {str(path)!r} ({exc})") from None
    return check_prompts(text.splitlines(), field)


def edit_behaviour(behaviour: str, prompts_file: Path | None, judge_specs: list[str] | None,
                   heldout: float, scope: BehaviourScope, config: Path | None, args: ModelArgs,
                   as_json: bool, overrides: list[str] | None) -> None:
    """Pairs from the behaviour, a DPO patch trained on them (scoped if asked), the held-out
    prompts judged before and after; nothing is written if any input is bad."""
    judge = parse_judges(judge_specs or [])
    train, held = split_heldout(read_prompts(prompts_file), heldout)
    if not behaviour.strip():
        raise KnowpatchError("behaviour: empty (describe the behaviour in words)")
    in_scope = read_prompts(scope.prompts, "scope") if scope.prompts is not None else None
    if in_scope is not None:
        check_scope([p for p in in_scope if p not in set(held)])
    outside = read_prompts(scope.outside, "out_of_scope") if scope.outside is not None else []
    values = behaviour_settings(config, overrides)
    job = BehaviourJob(behaviour, judge, train, held, outside, in_scope, scope.everywhere)
    editor = open_editor(args)
    patch, report = run_behaviour(editor, job, values)
    editor.save(patch)
    if as_json:
        print(json.dumps({"patch_id": patch.id, "patch": str(patch.path), "behaviour": report}))
        return
    _show(report, f"behaviour edit: {behaviour.strip()!r}, judged by {judge.spec}")
    out.print(f"{patch.steps} steps, {patch.seconds:.1f} s, {report['pairs']} pairs "
              f"({len(report['skipped'])} prompts without one); patch saved to {patch.path}")
    if "scope" in report:
        s = report["scope"]
        out.print(f"scope: fires on {s['heldout_fires']} % of held-out prompts"
                  + (f", {report['out_of_scope']['fires']} % of out-of-scope ones"
                     if "out_of_scope" in report else "") + f" (threshold {s['threshold']})")


def behaviour_settings(config: Path | None, overrides: list[str] | None) -> dict:
    """DPO settings for a behaviour edit: no random prefixes (the chat prompt is the
    context), the adapter on through the whole reply (gate all); checked."""
    _, values = method_config("dpo", config, overrides, check=False)
    values.setdefault("prefixes", 0)
    values.setdefault("gate", "all")
    check_settings("dpo", values)
    return values


def eval_behaviour(patch_refs: list[Path], prompts_file: Path | None, judge_specs: list[str] | None,
                   args: ModelArgs, as_json: bool) -> None:
    """Greedy answers to the prompts, unedited and with the patches, judged."""
    judge = parse_judges(judge_specs or [])
    prompts = read_prompts(prompts_file)
    patches = [open_store(args.store).load(p) for p in patch_refs]
    editor = open_editor(args)
    before = judge_answers(editor, prompts, judge, patches=[])
    after = judge_answers(editor, prompts, judge, patches=patches)
    report = {"judge": judge.spec, "prompts": len(prompts),
              "pass_rate": {"unedited": before["pass_rate"], "edited": after["pass_rate"]},
              "fluency": {"unedited": before["fluency"], "edited": after["fluency"]},
              "truncated": {"unedited": before["truncated"], "edited": after["truncated"]},
              "unchanged": unchanged(before["answers"], after["answers"], editor.tokenizer),
              "samples": [{"prompt": p, "before": b, "after": a} for p, b, a in
                          zip(prompts[:5], before["answers"], after["answers"])]}
    if as_json:
        print(json.dumps({"behaviour": report, "patches": [str(p.path) for p in patches]}))
        return
    _show(report, f"{len(prompts)} prompts judged by {judge.spec}")
    out.print(f"answers unchanged in their first 12 tokens: {report['unchanged']} %")


def _show(report: dict, title: str) -> None:
    table = Table(title=title, title_justify="left")
    for col in ("", "unedited", "edited"):
        table.add_column(col)
    for key in ("pass_rate", "fluency", "truncated"):
        table.add_row(key.replace("_", " "), str(report[key]["unedited"]), str(report[key]["edited"]))
    out.print(table)
    for s in report["samples"]:
        out.print(f"[bold]{escape(s['prompt'])}[/]\n  before: {escape(s['before'])}\n"
                  f"  after:  {escape(s['after'])}", highlight=False)
