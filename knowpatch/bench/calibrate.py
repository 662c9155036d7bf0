"""`knowpatch calibrate`: the router's layer and threshold for a model, from a benchmark file.

The router's settings (layer 1, threshold 0.75) were chosen on SmolLM2. For another model
this measures, at each candidate layer, how well a record's key tells the prompts that
should fire it from those that must not:

- should fire: the record's paraphrases (scored against its own key);
- must not: its neighbourhood prompts (same relation, other subject) against its own key,
  and every probe prompt against the keys of the *other* records (those with another
  subject), taking the highest.

Per layer it reports the AUC of the two score sets and, for the lowest threshold (rounded
up to 0.001) whose false-fire rate is at most `max_false_fire` %, the recall. The chosen
layer has the highest recall there (ties: the lower, cheaper layer). It writes
calibration.json and router.yaml, a method config of the two settings to pass as
`--config` (edit, bench) — nothing changes silently: a patch records the layer and
threshold it was keyed with and is always routed by its own, whatever the defaults.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..datasets import load_cases
from ..decoding import prompt_ids
from ..errors import KnowpatchError
from ..models import decoder_layers
from ..router import Router, compute_keys, hidden_rows


def auc(positives: list[float], negatives: list[float]) -> float | None:
    """P(a positive scores above a negative), ties counted half (the rank statistic)."""
    if not positives or not negatives:
        return None
    neg = torch.tensor(negatives)
    wins = sum(float((neg < p).sum()) + 0.5 * float((neg == p).sum()) for p in positives)
    return wins / (len(positives) * len(negatives))


def threshold_at(positives: list[float], negatives: list[float], max_false_fire: float
                 ) -> tuple[float, float, float]:
    """(threshold, recall %, false-fire %): the lowest threshold, on a grid of 0.001 (deep
    layers' cosines crowd near 1, where 0.01 is too coarse), at which at most
    `max_false_fire` % of the negatives reach it."""
    allowed = math.floor(len(negatives) * max_false_fire / 100)
    ranked = sorted(negatives, reverse=True)
    edge = ranked[allowed] if allowed < len(ranked) else -1.0  # must be above this one
    threshold = min(1.0, round(math.floor(edge * 1000) / 1000 + 0.001, 3))
    recall = 100 * sum(p >= threshold for p in positives) / max(len(positives), 1)
    false = 100 * sum(n >= threshold for n in negatives) / max(len(negatives), 1)
    return threshold, recall, false


@torch.no_grad()
def calibrate(editor, data: str, n: int, layers: list[int] | None = None,
              max_false_fire: float = 1.0, out: Path | None = None) -> dict[str, Any]:
    """Measure each candidate layer (default: 1–8) on the first `n` records of `data`."""
    model, tok = editor.model, editor.tokenizer
    depth = len(decoder_layers(model)[1])
    layers = layers or list(range(1, min(8, depth) + 1))
    if min(layers) < 1 or max(layers) > depth:
        raise KnowpatchError(f"layers: each must be in 1..{depth} (this model's depth)")
    requests = [c.requests[0] for c in load_cases(data, None, n)]
    records = [r for r in requests if r.subject and r.subject in r.prompt and r.rephrase_prompts]
    if len(records) < 2:
        raise KnowpatchError(f"data: {data} has fewer than 2 records with a subject in the "
                             "prompt and paraphrases; nothing to calibrate on")
    probes = [(i, "para", p) for i, r in enumerate(records) for p in r.rephrase_prompts]
    probes += [(i, "neigh", lp.prompt) for i, r in enumerate(records) for lp in r.locality]
    rows = [prompt_ids(tok, text) for _, _, text in probes]
    subjects = [r.subject.lower() for r in records]
    result: dict[str, Any] = {"data": str(Path(data).resolve()), "n": len(records),
                              "probes": len(probes), "max_false_fire": max_false_fire,
                              "model": editor.model_name, "fingerprint": editor.fingerprint,
                              "layers": []}
    with editor.using([]) as base:
        for layer in layers:
            router = Router(index=False)
            for i, r in enumerate(records):
                keys = compute_keys(base, tok, [r], layer)
                if keys is not None:
                    router.add(f"r{i}", keys, layer, 0.0)
            hidden = hidden_rows(base, rows, layer, tok.bos_token_id)
            scored = router.score_rows([{layer: h} for h in hidden], keep=None)
            pos, neg = [], []
            for (i, kind, text), (scores, _) in zip(probes, scored):
                own = scores.get(f"r{i}")
                if own is not None:
                    (pos if kind == "para" else neg).append(own)
                others = [s for p, s in scores.items()
                          if p != f"r{i}" and subjects[int(p[1:])] != subjects[i]
                          and subjects[int(p[1:])] not in text.lower()]
                if others:
                    neg.append(max(others))
            threshold, recall, false = threshold_at(pos, neg, max_false_fire)
            result["layers"].append({"layer": layer, "auc": round(auc(pos, neg) or 0, 4),
                                     "threshold": threshold, "recall": round(recall, 2),
                                     "false_fire": round(false, 2), "positives": len(pos),
                                     "negatives": len(neg)})
    best = max(result["layers"], key=lambda x: (x["recall"], -x["layer"]))
    result["chosen"] = {"route_layer": best["layer"], "route_threshold": best["threshold"]}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "calibration.json").write_text(json.dumps(result, indent=2))
        (out / "router.yaml").write_text(
            f"# knowpatch calibrate: {editor.model_name}, {len(records)} records of "
            f"{Path(data).name}; pass as --config\n"
            f"route_layer: {best['layer']}\nroute_threshold: {best['threshold']}\n")
    return result
