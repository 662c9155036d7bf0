"""Why a query would fire the patches it fires: `knowpatch patches route`.

    explain_routes(base_model, tokenizer, editor.stored(this_model=True), ["Where is …?"])

Reads the router keys of stored patches into a router of its own (no adapter weights enter
the model) and routes each prompt as a query would be routed: the patches it fires, the
best-scoring ones against their thresholds, and those dropped as superseded by a newer
patch rewriting the same fact.
"""

from __future__ import annotations

from typing import Any

from .decoding import prompt_ids
from .patches import Patch
from .router import Router, canonical_tokens, word_edges
from .scope import chat_turn


def explain_routes(base, tokenizer, manifests: list[dict[str, Any]], prompts: list[str],
                   top: int = 3) -> dict[str, Any]:
    """Route `prompts` among the patches of `manifests` on the base model `base`."""
    router = Router(canonical=canonical_tokens(tokenizer), edges=word_edges(tokenizer),
                    turn=chat_turn(tokenizer))
    unkeyed, labels = [], {}
    for manifest in manifests:
        patch = Patch.load(manifest["path"])
        reqs = manifest.get("requests") or [{}]
        labels[patch.id] = f"{reqs[0].get('prompt', '?')} → {reqs[0].get('target_new', '?')}"
        if patch.routing is None:
            unkeyed.append(patch.id)
        else:
            info = patch.routing
            router.add(patch.id, patch.keys, info["layer"], info["threshold"],
                       frozenset(info.get("facts", [])))
    superseded = router.superseded()
    candidates = [p for p in router.entries if p not in superseded]
    routes = router.route_rows(base, [prompt_ids(tokenizer, p) for p in prompts],
                               tokenizer.bos_token_id, candidates) if candidates else []
    result = []
    for i, prompt in enumerate(prompts):
        route = routes[i] if routes else None
        best = sorted((route.scores if route else {}).items(), key=lambda kv: -kv[1])[:top]
        result.append({
            "prompt": prompt, "fired": (route.fired if route else []) + unkeyed,
            "scores": [{"patch": p, "score": round(sc, 4),
                        "threshold": router.entries[p].threshold, "edit": labels[p]}
                       for p, sc in best],
            "superseded_dropped": route.superseded if route else {},
        })
    return {"routes": result, "superseded": superseded, "always_active": unkeyed,
            "patches": len(manifests)}
