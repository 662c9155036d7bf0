"""Measurement commands: `knowpatch bench`, `compare`, `bench-router`, `calibrate` and
`bench-serve` (`knowpatch.bench`)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import typer
from rich.table import Table

from ..bench import BaselineCache, Bench, BenchSettings, markdown
from ..bench.behaviours import load_spec, run_behaviour_bench
from ..bench.behaviours import markdown as behaviours_markdown
from ..bench.calibrate import calibrate as calibrate_router
from ..bench.router import run_router_bench
from ..errors import KnowpatchError
from ..methods import METHODS, check_settings
from .behaviour import behaviour_settings
from .common import (
    DeviceOpt,
    DtypeOpt,
    ModelArgs,
    ModelOpt,
    ResidentOpt,
    ThreadsOpt,
    app,
    err,
    fail,
    method_config,
    open_editor,
    out,
    run_body,
    setup_logging,
)

ToldOpt = typer.Option(False, "--told", help="Also sample the unedited model's fluency texts "
                       "with the new fact stated first ('<prompt> <new target>. ' before each "
                       "generation prompt): rep_told, mention_told and fluency_told in the "
                       "baseline, what the base model writes when it holds the new fact — the "
                       "reference for the edited rep.")
FreshBaselineOpt = typer.Option(False, "--fresh-baseline", help="Score the unedited model afresh "
                                "instead of reusing the scores an earlier run stored for the "
                                "same cases, model, seed and code (in $KNOWPATCH_HOME/baselines).")
BehavioursOpt = typer.Option(None, "--behaviours", help="Behaviour edits instead of facts: a "
                             "YAML file of behaviours (e.g. benchmarks/behaviours.yaml), prompts "
                             "built from --data (a CounterFact file); DPO settings apply.")


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
    told: bool = ToldOpt, fresh_baseline: bool = FreshBaselineOpt,
    behaviours: Path | None = BehavioursOpt,
    config: Path | None = typer.Option(None, help="YAML file of method settings."),
    model: str = ModelOpt, device: str = DeviceOpt, dtype: str | None = DtypeOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    threads: int | None = ThreadsOpt,
    resident: int | None = ResidentOpt,
    overrides: list[str] | None = typer.Argument(None, help="Method settings as key=value."),
) -> None:
    """Run an editing method over a benchmark file and write a report (BENCHMARK.md's scores,
    the unedited baseline first, seconds and steps per edit, peak memory); with --behaviours,
    behaviour edits judged on what the model writes (docs/behaviour.md)."""
    setup_logging(verbose)
    if behaviours is not None:
        run_body(_bench_behaviours, behaviours, data, out, config, overrides,
                 ModelArgs(model, device, dtype))
        return
    run_body(lambda: _bench(
        BenchSettings(data=str(data), method=method, mode=mode, n=n, format=fmt,
                      batch_size=batch_size, strategy=strategy, chat_template=chat_template,
                      fluency_every=fluency_every, seed=seed, score_every=score_every,
                      parallel=parallel, told=told),
        config, overrides, out, ModelArgs(model, device, dtype, None, resident), keep_patches,
        fresh_baseline))


def _bench(settings: BenchSettings, config: Path | None, overrides: list[str] | None,
           out_dir: Path, args: ModelArgs, keep_patches: bool, fresh_baseline: bool) -> None:
    method, values = method_config(settings.method, config, overrides, check=False)
    values.setdefault("seed", settings.seed)
    check_settings(method, values)  # the admission check, before the model loads
    if not Path(settings.data).is_file():
        fail(f"data: no such file {settings.data!r}")
    settings = replace(settings, method=method, method_config=values)
    editor = open_editor(args)
    cache = None if fresh_baseline else BaselineCache(editor, settings.seed)
    report = Bench(editor, settings, out_dir, keep_patches=keep_patches, baselines=cache).run()
    out.print(markdown([(out_dir.name, report)]), highlight=False)
    out.print(f"report: {out_dir / 'report.json'}, {out_dir / 'report.md'}")


def _bench_behaviours(spec: Path, data: Path, out_dir: Path, config: Path | None,
                      overrides: list[str] | None, args: ModelArgs) -> None:
    load_spec(spec)  # a bad file fails before the model loads
    if not data.is_file():
        fail(f"data: no such file {str(data)!r}")
    values = behaviour_settings(config, overrides)
    report = run_behaviour_bench(open_editor(args), spec, data, out_dir, values)
    out.print(behaviours_markdown(report).split("\n## ")[0], highlight=False)
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
    setup_logging(verbose)

    def body():
        try:
            size_list = sorted({int(x) for x in sizes.split(",") if x.strip()})
        except ValueError:
            fail(f"sizes: expected comma-separated integers, got {sizes!r}")
        if not size_list or min(size_list) < 1 or max(size_list) > n:
            fail(f"sizes: each must be in 1..{n} (--n)")
        if not data.is_file():
            fail(f"data: no such file {str(data)!r}")
        editor = open_editor(ModelArgs(model, device, dtype, None, resident), progress=False)
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
    run_body(body)


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
    setup_logging(verbose)

    def body():
        try:
            layer_list = [int(x) for x in layers.split(",") if x.strip()] if layers else None
        except ValueError:
            fail(f"layers: expected comma-separated integers, got {layers!r}")
        if not data.is_file():
            fail(f"data: no such file {str(data)!r}")
        if not 0 <= max_false_fire < 100:
            fail(f"max_false_fire: must be in [0, 100) (got {max_false_fire})")
        editor = open_editor(ModelArgs(model, device, dtype))
        report = calibrate_router(editor, str(data), n, layer_list, max_false_fire, out_dir)
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
    run_body(body)


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
    engine: list[str] = typer.Option(["local"], "--engine", help="Engine to measure "
                                     "(repeatable: --engine local --engine vllm measures both "
                                     "over the same patches)."),
    engine_url: str | None = typer.Option(None, help="vllm: a running vLLM server (none: one "
                                          "is started)."),
    vllm_python: str | None = typer.Option(None, help="vllm: the Python that runs vLLM."),
    check: int = typer.Option(0, help="With both engines: compare the greedy completions and "
                              "chat replies of the first N records, token for token."),
    model: str = ModelOpt, device: str = DeviceOpt, dtype: str | None = DtypeOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    threads: int | None = ThreadsOpt,
) -> None:
    """Throughput of `knowpatch serve` over real HTTP: the same completions sent one at a
    time and all at once, base and routed; tokens/s, speed-up, p50/p95 latency — per
    engine, and with --check the text of the two engines compared."""
    setup_logging(verbose)

    def body():
        from ..bench.serve import run_serve_bench  # the server's packages: only here

        for name, value in (("requests", requests), ("tokens", tokens), ("max_batch", max_batch)):
            if value < 1:
                fail(f"{name}: must be at least 1 (got {value})")
        if bad := [e for e in engine if e not in ("local", "vllm")]:
            fail(f"engine: must be local or vllm (got {bad[0]!r})")
        editor = open_editor(ModelArgs(model, device, dtype, out_dir / "patches"), progress=False)
        report = run_serve_bench(editor, str(data), out_dir, requests=requests, tokens=tokens,
                                 edits=edits, max_batch=max_batch, engines=tuple(engine),
                                 vllm={"url": engine_url, "python": vllm_python}, check=check,
                                 log=err.print)
        table = Table(title=f"serve: {requests} completions of {tokens} tokens, "
                      f"{report['patches_loaded']} patches loaded", title_justify="left")
        cols = ["engine", "patches", "mode", "wall_s", "tokens_per_s", "speedup", "p50_s", "p95_s",
                "rows_fired"]
        for c in cols:
            table.add_column(c.replace("_", " "), justify="right")
        for row in report["rows"]:
            table.add_row(*(str(row.get(c, "–")) for c in cols))
        out.print(table)
        for kind, same in (report.get("same_text") or {}).items():
            out.print(f"{kind}: the vLLM engine's greedy text equals the local engine's on "
                      f"{same['identical']} of {same['prompts']} prompts")
        out.print(f"report: {out_dir / 'serve_report.json'}")
    run_body(body)


@app.command()
def compare(runs: list[Path] = typer.Argument(..., help="Run folders of `knowpatch bench`.")) -> None:
    """One Markdown table of several bench runs, the unedited baseline first."""
    def body():
        reports = []
        for r in runs:
            f = r / "report.json"
            if not f.is_file():
                raise KnowpatchError(f"compare: {r} holds no report.json")
            reports.append((r.name, json.loads(f.read_text())))
        print(markdown(reports), end="")
    run_body(body)

