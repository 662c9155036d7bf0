"""`knowpatch bench-router`: the router and the patch store at scale, without training.

What routing costs and how well it finds patches depend on the keys and on how many
adapters are loaded, not on what each adapter learnt. So this benchmark computes the real
keys of N requests of a benchmark file (from their edit prompts, as `edit` does) and loads
N adapters that are copies of one really trained patch, each under its own keys. It then
measures, at several store sizes:

- router recall: a paraphrase of record i fires record i's patch;
- false fires: a record's neighbourhood (locality) prompt fires any patch, and a paraphrase
  fires some *other* record's patch (keys of records with the same subject excluded);
- seconds per query (a batch of greedy generations) with all N patches loaded and routed,
  against the base model with none, and seconds to add one patch at that size;
- memory per loaded patch: its adapter weights and keys exactly, and the growth of the
  resident set divided by the patches loaded (noisier: the allocator keeps and frees pages).
  With paging (`Editor(resident=k)`), the copies share the template's folder on disk and
  only the k most recently fired adapters are in memory: what grows is the keys.

The quality of N real sequential edits is what `knowpatch bench --mode sequential
--strategy routed` measures; this one only answers "does routing scale".
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..datasets import load_cases
from ..editor import Editor
from ..patches import Patch
from ..router import compute_keys, fact_of
from ..training import peak_rss_mb


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def run_router_bench(editor: Editor, data: str, n: int, sizes: list[int], out: Path,
                     queries: int = 32, progress: bool = True) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import Progress

    out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    requests = [c.requests[0] for c in load_cases(data, None, n)]
    layer, threshold = 1, 0.75
    with Progress(console=console, transient=True, disable=not progress) as bar:
        task = bar.add_task("router keys", total=len(requests))
        with editor.using([]) as base:
            keys = [compute_keys(base, editor.tokenizer, [req], layer)
                    for req in bar.track(requests, task_id=task)]
    subjects = [(req.subject or "").lower() for req in requests]
    usable = [i for i, k in enumerate(keys) if k is not None]

    template = _template(editor, requests[usable[0]], out)
    # exact size of one loaded patch (adapter weights + router keys); RSS growth is noisier
    weight_bytes = sum(v.numel() * v.element_size() for k in (template.weights, keys[usable[0]])
                       for v in k.values())
    results: list[dict[str, Any]] = []
    loaded: list[str] = []  # ids of the copies applied so far
    base_rss = _rss_mb()
    query_prompts = _query_prompts(requests, usable, queries)
    base_seconds = _time_queries(editor, query_prompts, [])
    add_seconds: list[float] = []
    for size in sorted(sizes):
        target = [i for i in usable[:size]]
        with Progress(console=console, transient=True, disable=not progress) as bar:
            task = bar.add_task(f"loading {len(target)} patches", total=len(target))
            bar.advance(task, len(loaded))
            for i in target[len(loaded):]:
                add_seconds.append(_add_copy(editor, template, f"p{i:05d}", keys[i], layer,
                                             threshold, fact_of(requests[i])))
                loaded.append(f"p{i:05d}")
                bar.advance(task)
        rss = _rss_mb()
        quality = _route_quality(editor, requests, target, subjects)
        quality.update(_index_against_exhaustive(editor, requests, target, query_prompts))
        seconds = _time_queries(editor, query_prompts, [p.id for p in editor.applied])
        row = {
            "patches": len(target), **quality,
            "s_per_query_batch": round(seconds, 4), "s_per_query_batch_base": round(base_seconds, 4),
            "query_cost_vs_base": round(seconds / base_seconds, 3),
            "s_to_add_a_patch": round(statistics.median(add_seconds[-min(len(add_seconds), 20):]), 4),
            "memory_per_patch_mb": round((rss - base_rss) / max(len(target), 1), 3),
            "weights_per_patch_mb": round(weight_bytes / 2**20, 3),
            "query_batch": len(query_prompts),
            "resident": editor.paging()["resident"], "pager_reads": editor.paging()["reads"],
            "peak_rss_mb": peak_rss_mb(),
        }
        results.append(row)
        console.print(row)
    for name in loaded:
        editor.remove(name)
    report = {"data": str(Path(data).resolve()), "n": len(requests), "keyed": len(usable),
              "layer": layer, "threshold": threshold, "rows": results}
    (out / "router_report.json").write_text(json.dumps(report, indent=2))
    return report


def _template(editor: Editor, request, out: Path) -> Patch:
    """One real patch whose weights every stored patch copies; saved when patches are paged
    (the copies then read its file)."""
    template = editor.edit(request, save=False, evaluate=False)
    editor.remove(template)
    if editor.paging()["resident"] is not None:
        template.save(out / "template", overwrite=True)
    return template


def _query_prompts(requests, usable: list[int], queries: int) -> list[str]:
    """The timed query batch: a locality prompt and a paraphrase of each record in turn."""
    return [p for i in usable for p in ([lp.prompt for lp in requests[i].locality[:1]] +
                                        list(requests[i].rephrase_prompts[:1]))][:queries]


def _add_copy(editor: Editor, template: Patch, patch_id: str, keys, layer: int,
              threshold: float, fact: str) -> float:
    """Apply a copy of `template` under `patch_id` and `keys`; the seconds it took."""
    patch = Patch(id=patch_id, manifest={
        **template.manifest, "id": patch_id,
        "router": {"layer": layer, "threshold": threshold, "facts": [fact]}},
        adapter_config=template.adapter_config, weights=template.weights, keys=keys,
        path=template.path)
    t0 = time.perf_counter()
    editor.apply(patch)
    return time.perf_counter() - t0


def _route_quality(editor: Editor, requests, target: list[int], subjects: list[str]
                   ) -> dict[str, Any]:
    """Route every paraphrase and neighbour prompt of the stored records among the stored
    patches. A fired patch whose subject the prompt names (the record's own, or another
    record's subject that a neighbour prompt happens to mention) is a right fire."""
    candidates = [f"p{i:05d}" for i in target]
    owners, kinds, texts = [], [], []  # in the order of `_probe_prompts`
    for i in target:
        for p in requests[i].rephrase_prompts:
            owners.append(i)
            kinds.append("para")
            texts.append(p.lower())
        for lp in requests[i].locality:
            owners.append(i)
            kinds.append("neigh")
            texts.append(lp.prompt.lower())
    routes = editor.route(_probe_prompts(requests, target), patches=candidates)
    recall = own_total = wrong = para_total = neigh_fire = neigh_total = 0
    for route, i, kind, text in zip(routes, owners, kinds, texts):
        fired = {int(p[1:]) for p in route.fired}
        named = {j for j in fired if subjects[j] and subjects[j] in text}
        if kind == "para":
            para_total += 1
            own_total += 1
            recall += i in fired or subjects[i] in {subjects[j] for j in fired}
            wrong += bool(fired - named - {i})
        else:
            neigh_total += 1
            neigh_fire += bool(fired - named)
    return {"router_recall": round(100 * recall / max(own_total, 1), 2),
            "paraphrase_fires_other_patch": round(100 * wrong / max(para_total, 1), 2),
            "neighbour_fires_any_patch": round(100 * neigh_fire / max(neigh_total, 1), 2),
            "paraphrases": para_total, "neighbours": neigh_total}


def _probe_prompts(requests, target: list[int]) -> list[str]:
    """Each stored record's paraphrases, then its locality prompts, record after record."""
    return [p for i in target for p in
            [*requests[i].rephrase_prompts, *(lp.prompt for lp in requests[i].locality)]]


@torch.no_grad()
def _index_against_exhaustive(editor: Editor, requests, target: list[int], timed: list[str]
                              ) -> dict[str, Any]:
    """The router's token index against exhaustive scoring: rows whose fired patches differ
    (paraphrase and neighbour prompts of the stored records), and the seconds of routing
    the timed query batch either way (the part of a query whose cost grows with the store)."""
    candidates = [f"p{i:05d}" for i in target]
    prompts = _probe_prompts(requests, target)
    out: dict[str, Any] = {}
    fired = {}
    for index in (True, False):
        with editor.options(index=index):
            fired[index] = [sorted(r.fired) for r in editor.route(prompts, patches=candidates)]
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                editor.route(timed, patches=candidates)
                times.append(time.perf_counter() - t0)
        out[f"s_route_batch_{'index' if index else 'exhaustive'}"] = round(statistics.median(times), 4)
    differ = [i for i, (a, b) in enumerate(zip(fired[True], fired[False])) if a != b]
    out["index_differs_rows"] = len(differ)
    out["index_misses"] = sum(len(set(fired[False][i]) - set(fired[True][i])) for i in differ)
    out["index_extra"] = sum(len(set(fired[True][i]) - set(fired[False][i])) for i in differ)
    return out


@torch.no_grad()
def _time_queries(editor: Editor, prompts: list[str], patches: list[str], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        editor.generate(prompts, patches=patches, max_new_tokens=5)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
