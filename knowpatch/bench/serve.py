"""`knowpatch bench-serve`: throughput and latency of `knowpatch serve` over real HTTP.

A server runs in this process on 127.0.0.1; `edits` patches are trained from the first
records of a benchmark file; the prompts are those records' prompts (the first `edits` of
them fire their patches, the rest route to none). The same `requests` completions are sent
one at a time and then all at once, with `patches: []` (base) and `"auto"` (routed).
"""

from __future__ import annotations

import concurrent.futures
import json
import statistics
import time
from pathlib import Path
from typing import Any

from ..datasets import load_cases
from ..editor import Editor
from ..serve import InThread, ServeSettings, create_app


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _one(client, base: str, prompt: str, patches: Any, tokens: int) -> dict:
    start = time.perf_counter()
    r = client.post(base + "/v1/completions", json={
        "model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0,
        "patches": patches}, timeout=600)
    r.raise_for_status()
    body = r.json()
    return {"seconds": time.perf_counter() - start, "tokens": body["usage"]["completion_tokens"],
            "fired": body["choices"][0]["knowpatch"]["patches"]}


def _measure(base: str, prompts: list[str], patches: Any, tokens: int, at_once: bool) -> dict:
    import httpx

    with httpx.Client() as client:
        _one(client, base, prompts[0], patches, tokens)  # warm-up
        start = time.perf_counter()
        if at_once:
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(prompts)) as pool:
                rows = list(pool.map(lambda p: _one(client, base, p, patches, tokens), prompts))
        else:
            rows = [_one(client, base, p, patches, tokens) for p in prompts]
        wall = time.perf_counter() - start
    latency = [r["seconds"] for r in rows]
    total = sum(r["tokens"] for r in rows)
    return {"mode": "concurrent" if at_once else "one at a time",
            "patches": "routed (auto)" if patches == "auto" else "base ([])",
            "requests": len(rows), "wall_s": round(wall, 2), "tokens": total,
            "tokens_per_s": round(total / wall, 1), "p50_s": round(statistics.median(latency), 2),
            "p95_s": round(_percentile(latency, 0.95), 2),
            "rows_fired": sum(bool(r["fired"]) for r in rows)}


def _texts(base: str, prompts: list[str], chat: bool, tokens: int) -> list[str]:
    """Greedy texts of `prompts` (completions, or chat questions), routed, one at a time."""
    import httpx

    out = []
    with httpx.Client(timeout=600) as client:
        for p in prompts:
            body = {"model": "bench", "max_tokens": tokens, "temperature": 0, "patches": "auto"}
            if chat:
                r = client.post(base + "/v1/chat/completions",
                                json={**body, "messages": [{"role": "user", "content": p}]})
                r.raise_for_status()
                out.append(r.json()["choices"][0]["message"]["content"])
            else:
                r = client.post(base + "/v1/completions", json={**body, "prompt": p})
                r.raise_for_status()
                out.append(r.json()["choices"][0]["text"])
    return out


def _engine_app(editor: Editor, engine: str, settings: ServeSettings, vllm: dict[str, Any]):
    if engine == "local":
        return create_app(editor, settings)
    from ..serve.engines.vllm import open_vllm_engine

    return create_app(open_vllm_engine(editor, **vllm), settings)


def _compare(texts: dict[str, dict[str, list[str]]], prompts: dict[str, list[str]]) -> dict:
    """How many greedy texts the vLLM engine wrote as the local engine did, token for token."""
    local, remote = texts["local"], texts["vllm"]
    out = {}
    for kind in local:
        same = [a == b for a, b in zip(local[kind], remote[kind])]
        out[kind] = {"prompts": len(same), "identical": sum(same),
                     "differ": [{"prompt": p, "local": a, "vllm": b} for p, a, b, s in
                                zip(prompts[kind], local[kind], remote[kind], same) if not s][:5]}
    return out


def run_serve_bench(editor: Editor, data: str, out: Path, *, requests: int = 64, tokens: int = 32,
                    edits: int = 8, max_batch: int = 64, engines: tuple[str, ...] = ("local",),
                    vllm: dict[str, Any] | None = None, check: int = 0, log=print) -> dict:
    """Each engine in turn over the same patches: throughput rows, and (`check` > 0, both
    engines) the first `check` records' completions and chat questions compared."""
    cases = load_cases(data, n=max(requests, edits, check))
    prompts = [c.requests[0].prompt.replace("{}", c.requests[0].subject or "") for c in cases][:requests]
    checked = {"completion": [c.requests[0].prompt.replace("{}", c.requests[0].subject or "")
                              for c in cases[:check]],
               "chat": [(list(c.requests[0].questions) or [c.requests[0].prompt])[0]
                        for c in cases[:check]]}
    trained = []
    for case in cases[:edits]:
        patch = editor.edit(case.requests[0])
        trained.append(patch.id)
        log(f"edit {len(trained)}/{edits}: {patch.id} ({patch.seconds:.1f} s)")
    rows, texts, batches = [], {}, {}
    for engine in engines:
        served = InThread(_engine_app(editor, engine, ServeSettings(max_batch=max_batch,
                                                                    served_name="bench"), vllm or {}))
        try:
            for patches in ([], "auto"):
                for at_once in (False, True):
                    rows.append({"engine": engine, **_measure(served.base, prompts, patches,
                                                              tokens, at_once)})
                    log(json.dumps(rows[-1]))
            if check:
                texts[engine] = {k: _texts(served.base, v, k == "chat", tokens)
                                 for k, v in checked.items()}
            batches[engine] = getattr(served.app.state.engine, "batches", None)
        finally:
            served.stop()
    for engine in engines:
        for patches in ("base ([])", "routed (auto)"):
            one, many = [r for r in rows if r["patches"] == patches and r["engine"] == engine]
            many["speedup"] = round(many["tokens_per_s"] / one["tokens_per_s"], 2)
    import torch

    report = {"data": data, "requests": requests, "max_tokens": tokens, "patches_loaded": len(trained),
              "max_batch": max_batch, "torch_threads": torch.get_num_threads(),
              "engines": list(engines), "batches_run": batches, "rows": rows}
    if check and {"local", "vllm"} <= set(texts):
        report["same_text"] = _compare(texts, checked)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_report.json").write_text(json.dumps(report, indent=2))
    return report
