"""`knowpatch edit`, `eval` and `generate`: make a patch, score patches, use them."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ..datasets import load_cases, load_preferences
from ..editor import Editor
from ..evaluate import SCORE_KEYS
from ..methods import AUTO, AUTO_PARALLEL, METHODS, check_settings
from ..requests import EditRequest, LocalityProbe
from .behaviour import (
    BehaviourOpt,
    BehaviourScope,
    EvalPromptsOpt,
    EverywhereOpt,
    HeldoutOpt,
    JudgeOpt,
    OutOfScopeOpt,
    PreferencesOpt,
    PromptsOpt,
    ScopeOpt,
    edit_behaviour,
    eval_behaviour,
)
from .common import (
    DeviceOpt,
    DtypeOpt,
    ModelArgs,
    ModelOpt,
    StoreOpt,
    ThreadsOpt,
    app,
    err,
    fail,
    json_scores,
    make_request,
    method_config,
    open_editor,
    open_store,
    out,
    run_body,
    scores_table,
    setup_logging,
)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def edit(
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Prompt whose answer to "
                                      "change; {} is replaced by --subject."),
    target: str | None = typer.Option(None, "--target", "-t", help="The new answer, as you "
                                      "would write it (Rome); the space before it is added."),
    requests: Path | None = typer.Option(None, "--requests", help="A JSONL file of requests "
                                         "(docs/data-formats.md), all trained into one patch; "
                                         "with --method auto, a routed patch per fact."),
    preferences: Path | None = PreferencesOpt,
    behaviour: str | None = BehaviourOpt, prompts: Path | None = PromptsOpt,
    judge: list[str] | None = JudgeOpt, scope: Path | None = ScopeOpt,
    out_of_scope: Path | None = OutOfScopeOpt, everywhere: bool = EverywhereOpt,
    heldout: float = HeldoutOpt,
    method: str = typer.Option("lora-sft", help=f"Editing method: {', '.join(METHODS)}, or "
                               "auto (facts: a routed LoRA SFT patch per fact, trained "
                               f"{AUTO_PARALLEL} side by side; preference pairs: DPO; it says "
                               "which and why; docs/methods.md)."),
    ground_truth: str | None = typer.Option(None, help="The old answer (enables es/ps/ns)."),
    subject: str | None = typer.Option(None, help="The subject the fact is about, as the prompt "
                                       "spells it (the router keys the patch by it; found in "
                                       "the prompt when not given)."),
    paraphrase: list[str] | None = typer.Option(None, help="A paraphrase that should follow "
                                                   "the edit (repeatable; scores gen)."),
    neighbor: list[str] | None = typer.Option(None, help="A prompt that must not change "
                                                 "(repeatable; scores loc)."),
    question: list[str] | None = typer.Option(None, help="The fact asked as a chat question "
                                                 "(repeatable): the first is trained on, each "
                                                 "scores chat_rel/chat_gen."),
    config: Path | None = typer.Option(None, help="YAML file of method settings."),
    store: Path | None = StoreOpt, model: str = ModelOpt, device: str = DeviceOpt,
    dtype: str | None = DtypeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout; "
                                 "progress and logs go to stderr."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    threads: int | None = ThreadsOpt,
    overrides: list[str] | None = typer.Argument(None, help="Method settings as key=value, "
                                                    "e.g. lr=1e-3 rank=4 seed=1."),
) -> None:
    """Edit one fact, score it beside the unedited model, and save it as a patch (or a
    behaviour: --behaviour TEXT --prompts FILE --judge SPEC; or preference pairs).

    Example: knowpatch edit -p "The Eiffel Tower is located in the city of" -t Rome
    --neighbor "The capital of Germany is" lr=5e-3
    """
    setup_logging(verbose)
    args = ModelArgs(model, device, dtype, store)
    kind = _kind(behaviour, preferences, bool(prompt or target or requests),
                 prompts, judge, scope or out_of_scope or everywhere)
    if kind == "behaviour":
        run_body(edit_behaviour, behaviour, prompts, judge, heldout,
                 BehaviourScope(scope, out_of_scope, everywhere), config, args, as_json, overrides)
    elif kind == "preferences":
        run_body(_edit_preferences, preferences, heldout, method, config, args, as_json, overrides)
    else:
        run_body(_edit, prompt, target, requests, method, ground_truth, subject, paraphrase,
                 neighbor, question, config, args, as_json, overrides)


def _kind(behaviour, preferences, facts: bool, prompts, judge, scoped=None) -> str:
    """Which edit the options ask for (behaviour, preferences or facts); mixed ones fail."""
    if behaviour is not None:
        if facts or preferences:
            fail("--behaviour excludes --prompt/--target, --requests and --preferences")
        return "behaviour"
    if prompts is not None or judge or scoped:
        fail("--prompts, --judge, --scope and --out-of-scope go with --behaviour")
    if preferences is not None:
        if facts:
            fail("--preferences excludes --prompt/--target and --requests")
        return "preferences"
    return "facts"


def _edit_preferences(path, heldout, method, config, args: ModelArgs, as_json, overrides) -> None:
    if method in (AUTO, "lora-sft"):  # the default method name means "not chosen"
        method = "dpo"
    method, values = method_config(method, config, overrides, check=False)
    if method != "dpo":
        fail(f"method: preference pairs are trained with dpo (got {method!r})")
    if not 0 <= heldout < 1:
        fail(f"heldout: must be in [0, 1) (got {heldout})")
    pairs = load_preferences(path)
    check_settings(method, values)  # the admission check, before the model loads
    editor = open_editor(args)
    patch, report = editor.edit_preferences(pairs, heldout=heldout, config=values)
    result = {k: report[k] for k in ("pref_acc_before", "pref_acc_after", "margin_before",
                                      "margin_after", "steps", "seconds")}
    result["patch"] = str(patch.path)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"preference edit ({report['measured_on']}: {report['pairs_heldout']} "
                  f"pairs; trained on {report['pairs_trained']})", title_justify="left")
    for col in ("", "preference accuracy (%)", "mean margin (nats)"):
        table.add_column(col)
    table.add_row("before", f"{report['pref_acc_before']:.1f}", f"{report['margin_before']:.2f}")
    table.add_row("after", f"{report['pref_acc_after']:.1f}", f"{report['margin_after']:.2f}")
    out.print(table)
    for sample in report["samples"]:
        out.print(f"[bold]{escape(sample['prompt'])}[/]\n  before: {escape(sample['before'])}"
                  f"\n  after:  {escape(sample['after'])}", highlight=False)
    out.print(f"{patch.steps} steps, {patch.seconds:.1f} s; patch saved to {patch.path}")


def _edit(prompt, target, requests_file, method, ground_truth, subject, paraphrase, neighbor,
          question, config, args: ModelArgs, as_json, overrides) -> None:
    method, values = method_config(method, config, overrides, check=False)
    if requests_file is not None:
        if prompt or target:
            fail("--requests and --prompt/--target exclude each other")
        req = [r for case in load_cases(requests_file, "jsonl") for r in case.requests]
    elif prompt is None or target is None:
        fail("give --prompt and --target (or --requests FILE.jsonl)")
    else:
        req = make_request(prompt, target, ground_truth, subject, paraphrase, neighbor, question)
    check_settings(method, values)  # the admission check, before the model loads
    editor = open_editor(args)
    if method == AUTO and isinstance(req, list) and len(req) > 1:
        _edit_facts(editor, req, values, as_json)
        return
    patch = editor.edit(req, method=method, config=values)
    result = {
        "scores": json_scores(patch.scores), "baseline": json_scores(patch.baseline),
        "steps": patch.steps, "seconds": patch.seconds,
        "peak_rss_mb": patch.manifest["peak_rss_mb"], "patch": str(patch.path),
        "subjects_inferred": patch.manifest.get("subjects_inferred", {}),
    }
    for i, subject in result["subjects_inferred"].items():
        err.print(f"request {i}: no --subject given; the patch is routed by the subject found "
                  f"in the prompt: [bold]{subject}[/]")
    if as_json:
        print(json.dumps(result))
        return
    out.print(scores_table([("unedited", patch.baseline), (method, patch.scores)]))
    out.print(f"edit: {patch.seconds:.2f} s, {patch.steps} steps, peak memory "
              f"{result['peak_rss_mb']:.0f} MB; patch saved to {patch.path}")


def _edit_facts(editor: Editor, requests, values, as_json: bool) -> None:
    """`edit --requests F --method auto`: a routed patch per fact, scores averaged."""
    patches = editor.edit_many([[r] for r in requests], method=AUTO, parallel=AUTO_PARALLEL,
                               config=values)

    def mean(key: str) -> dict:
        out = {}
        for k in SCORE_KEYS:
            vals = [v for p in patches if (v := getattr(p, key).get(k)) is not None]
            out[k] = round(sum(vals) / len(vals), 2) if vals else None
        return out

    result = {"scores": mean("scores"), "baseline": mean("baseline"),
              "chosen_by": patches[0].manifest.get("chosen_by"),
              "seconds": round(sum(p.seconds or 0 for p in patches), 2),
              "patches": [str(p.path) for p in patches]}
    if as_json:
        print(json.dumps(result))
        return
    out.print(scores_table([("unedited", result["baseline"]),
                             (f"auto: {len(patches)} patches", result["scores"])],
                            title="scores (%), the mean over the facts' patches"))
    out.print(f"{result['chosen_by']}\n{len(patches)} patches in {result['seconds']:.1f} s of "
              f"training, saved to {editor.store_root}")


@app.command("eval")
def eval_(
    patch: list[Path] = typer.Option(..., "--patch", help="Patch folder or id (repeatable: "
                                     "patches applied together)."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Prompt to score (default: "
                                      "the patch's own requests)."),
    target: str | None = typer.Option(None, "--target", "-t"),
    ground_truth: str | None = typer.Option(None), subject: str | None = typer.Option(None),
    paraphrase: list[str] | None = typer.Option(None, help="Extra paraphrase (repeatable)."),
    neighbor: list[str] | None = typer.Option(None, help="Extra neighbour (repeatable)."),
    prompts: Path | None = EvalPromptsOpt, judge: list[str] | None = JudgeOpt,
    store: Path | None = StoreOpt, model: str = ModelOpt, device: str = DeviceOpt,
    dtype: str | None = DtypeOpt,
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Score existing patches (without editing again) beside the unedited model: a fact
    patch by its requests, a behaviour patch by --prompts and --judge."""
    setup_logging(verbose)
    if prompts is not None or judge:
        run_body(eval_behaviour, patch, prompts, judge, ModelArgs(model, device, dtype, store),
                 as_json)
        return
    run_body(_eval, patch, prompt, target, ground_truth, subject, paraphrase, neighbor,
             ModelArgs(model, device, dtype, store), as_json)


def _eval(patch_refs, prompt, target, ground_truth, subject, paraphrase, neighbor,
          args: ModelArgs, as_json) -> None:
    st = open_store(args.store)
    patches = [st.load(p) for p in patch_refs]
    if prompt or target:
        if not (prompt and target):
            fail("--prompt and --target go together")
        requests = [make_request(prompt, target, ground_truth, subject, paraphrase, neighbor)]
    else:
        requests = []
        for p in patches:
            for r in p.manifest.get("requests", []):
                req = EditRequest.from_dict(r, where=f"{p.id}.requests")
                req.rephrase_prompts += list(paraphrase or [])
                req.locality += [LocalityProbe(n) for n in neighbor or []]
                requests.append(req)
    editor = open_editor(args)
    edited, baseline = editor.evaluate(requests, patches=patches)
    if as_json:
        print(json.dumps({"scores": json_scores(edited.summary),
                          "baseline": json_scores(baseline.summary),
                          "patches": [str(p.path) for p in patches]}))
        return
    out.print(scores_table([("unedited", baseline.summary),
                             ("+ " + ", ".join(p.id for p in patches), edited.summary)]))


@app.command()
def generate(
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="Prompt (repeatable)."),
    patch: list[Path] | None = typer.Option(None, "--patch", help="Patch folder or id to "
                                            "apply (repeatable); none: the base model."),
    max_new_tokens: int = typer.Option(20, help="Greedy tokens to generate."),
    store: Path | None = StoreOpt, model: str = ModelOpt, device: str = DeviceOpt,
    dtype: str | None = DtypeOpt, verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Greedy continuations of prompts, with or without patches."""
    setup_logging(verbose)
    run_body(_generate, prompt, patch, max_new_tokens, ModelArgs(model, device, dtype, store))


def _generate(prompts, patch_refs, max_new_tokens, args: ModelArgs) -> None:
    patches = [open_store(args.store).load(p) for p in patch_refs or []]
    editor = open_editor(args)
    for p, text in zip(prompts, editor.generate(prompts, patches=patches,
                                                max_new_tokens=max_new_tokens)):
        out.print(f"[bold]{p}[/]{text}", highlight=False)

