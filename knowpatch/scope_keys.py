"""Making a scoped patch (`scope`): its keys from in-scope example prompts, and the threshold
calibrated on them and on out-of-scope examples.

    report = make_scope(editor, patch, in_scope, out_of_scope)   # keys set, manifest routed
"""

from __future__ import annotations

import torch

from .decoding import prompt_ids
from .errors import KnowpatchError
from .questions import chat_prompt
from .router import hidden_rows
from .scope import SCOPE_LAYER, Turn, chat_scope_keys, chat_turn, pool, scores

MIN_EXAMPLES = 4
"""Fewer in-scope examples cannot calibrate a threshold (each is scored against the others)."""


def pooled_rows(model, rows: list[list[int]], layer: int, bos: int | None,
                turn: Turn | None) -> torch.Tensor:
    """(rows, hidden): `pool` of each row at `layer` (runs the first `layer` blocks)."""
    hidden = hidden_rows(model, rows, layer, bos)
    return torch.stack([pool(h, r, turn) for h, r in zip(hidden, rows)])


def scope_keys(pooled: torch.Tensor) -> dict[str, torch.Tensor]:
    """A scoped patch's router keys: one pooled vector per example (`"scope"` marks them)."""
    n = pooled.shape[0]
    return {"keys": pooled.contiguous(), "variant": torch.arange(n), "scope": torch.ones(1)}


def calibrate(inside: torch.Tensor, outside: torch.Tensor | None) -> dict[str, float]:
    """A threshold from in-scope scores (each example against the others) and out-of-scope
    ones: the one that best separates them (in-scope fire rate minus out-of-scope fire rate,
    ties: the midpoint of the gap); with no out-of-scope examples, the 5th percentile of the
    in-scope scores. Returned with both fire rates at it (%)."""
    inside = inside.float()
    if outside is None or not len(outside):
        threshold = float(torch.quantile(inside, 0.05))
    else:
        outside = outside.float()
        values = torch.cat([inside, outside]).sort().values
        cuts = torch.cat([values[:1] - 1e-4, (values[1:] + values[:-1]) / 2, values[-1:] + 1e-4])
        gain = torch.stack([(inside >= c).float().mean() - (outside >= c).float().mean() for c in cuts])
        best = (gain == gain.max()).nonzero().flatten()
        threshold = float(cuts[best].mean()) if len(best) > 1 else float(cuts[best[0]])
    return {"threshold": round(threshold, 6),
            "in_scope_fires": round(100.0 * float((inside >= threshold).float().mean()), 2),
            "out_of_scope_fires": None if outside is None or not len(outside) else
            round(100.0 * float((outside >= threshold).float().mean()), 2)}


def check_scope(in_scope: list[str]) -> list[str]:
    """The in-scope prompts, stripped; too few to calibrate on → an error naming the field."""
    in_scope = [p.strip() for p in in_scope if p.strip()]
    if len(in_scope) < MIN_EXAMPLES:
        raise KnowpatchError(f"scope: at least {MIN_EXAMPLES} in-scope prompts are needed "
                             f"(got {len(in_scope)})")
    return in_scope


def make_scope(editor, patch, in_scope: list[str], out_of_scope: list[str] | None = None,
               layer: int = SCOPE_LAYER) -> dict:
    """Route `patch` by a scope: keys from `in_scope` prompts (user messages, read as chat
    turns and as plain text), the threshold calibrated with `out_of_scope` ones; the adapter then acts on the
    whole of a query it fires on (gate all). Returns the calibration (also in the manifest
    under router.scope)."""
    in_scope = check_scope(in_scope)
    tok = editor.tokenizer
    turn = chat_turn(tok)
    with editor.using([]) as base:
        inside = _pooled(base, tok, [chat_prompt(tok, p) for p in in_scope], layer, turn)
        outside = (_pooled(base, tok, [chat_prompt(tok, p) for p in out_of_scope], layer, turn)
                   if out_of_scope else None)
        # the same prompts sent as plain text (a completion request): keys too, added after
        # calibration (each would be its own twin's nearest neighbour)
        plain = _pooled(base, tok, in_scope, layer, turn) if turn is not None else None
    calibration = calibrate(scores(inside, inside, leave_out_self=True),
                            None if outside is None else scores(outside, inside))
    calibration.update(kind="examples", examples=len(in_scope),
                       out_of_scope_examples=len(out_of_scope or []))
    patch.keys = scope_keys(inside if plain is None else torch.cat([inside, plain]))
    patch.manifest["router"] = {"layer": layer, "threshold": calibration["threshold"],
                                "keys": len(in_scope), "facts": [], "scope": calibration}
    patch.manifest.setdefault("config", {})["gate"] = "all"
    return calibration


def make_chat_scope(editor, patch) -> dict:
    """Route `patch` to every chat prompt and nothing else (its adapter on the whole of such
    a query, gate all): how a behaviour learnt from chat turns is kept off completions."""
    hidden = int(editor.model.config.hidden_size)
    patch.keys = chat_scope_keys(hidden)
    scope = {"kind": "chat"}
    patch.manifest["router"] = {"layer": 1, "threshold": 0.5, "keys": 0, "facts": [],
                                "scope": scope}
    patch.manifest.setdefault("config", {})["gate"] = "all"
    return scope


def _pooled(model, tokenizer, texts: list[str], layer: int, turn: Turn | None) -> torch.Tensor:
    rows = [prompt_ids(tokenizer, t) for t in texts]
    return pooled_rows(model, rows, layer, tokenizer.bos_token_id, turn)
