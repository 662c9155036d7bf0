"""Behaviour edits measured: preference pairs split into training and held-out sets, and
the held-out pairs scored before and after the patch (see `Editor.edit_preferences`)."""

from __future__ import annotations

import logging
import random
from typing import Any

from .decoding import prompt_ids
from .errors import KnowpatchError
from .evaluate import greedy, teacher_forced
from .methods import AUTO, choose_method
from .requests import EditRequest

log = logging.getLogger(__name__)


def check_pairs(pairs: list[EditRequest], heldout: float) -> None:
    """Every pair has a rejected answer; `heldout` is a share in [0, 1)."""
    for i, p in enumerate(pairs):
        if not p.rejected:
            raise KnowpatchError(f"pair {i}: field 'rejected' is missing")
    if not 0 <= heldout < 1:
        raise KnowpatchError(f"heldout: must be in [0, 1) (got {heldout})")


def split_pairs(pairs: list[EditRequest], heldout: float, seed: int
                ) -> tuple[list[EditRequest], list[EditRequest]]:
    """(training pairs, held-out pairs): a seeded shuffle, `heldout` of them kept out."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_held = round(heldout * len(pairs)) if len(pairs) > 1 else 0
    return [pairs[i] for i in order[n_held:]], [pairs[i] for i in order[:n_held]]


def measure(editor, probe: list[EditRequest], patches: list, samples: int
            ) -> tuple[float, float, list[str]]:
    """Preference accuracy (%), mean margin log P(chosen) − log P(rejected) (nats, summed
    over the answer tokens) and greedy generations of the first `samples` probe prompts."""
    with editor.using(patches) as model:
        chosen = teacher_forced(model, editor.tokenizer, [(p.prompt, p.target_new) for p in probe])
        rejected = teacher_forced(model, editor.tokenizer, [(p.prompt, p.rejected) for p in probe])
        shown = [p.prompt for p in probe[:samples]]
        context = editor.context_length or 1 << 30  # a short context: shorter samples
        budgets = [max(0, min(30, context - len(prompt_ids(editor.tokenizer, p)))) for p in shown]
        gens = greedy(model, editor.tokenizer, shown, budgets)
    margins = [c.logprob - r.logprob for c, r in zip(chosen, rejected)]
    acc = 100.0 * sum(m > 0 for m in margins) / len(margins)
    texts = [editor.tokenizer.decode(g, skip_special_tokens=True) for g in gens]
    return round(acc, 2), round(sum(margins) / len(margins), 4), texts


def edit_preferences(editor, pairs: list[EditRequest], *, heldout: float, method: str,
                     seed: int, samples: int, label: str | None = None,
                     **overrides: Any) -> tuple[Any, dict[str, Any]]:
    """`Editor.edit_preferences` without the save: train one DPO patch on the training
    pairs and measure the held-out pairs (the training pairs when none are held out) before
    and after: (patch, report), the report also in the manifest under "preference"."""
    check_pairs(pairs, heldout)
    if method == AUTO:
        method, why = choose_method(len(pairs), preferences=True)
        log.warning("method auto: chose %s (%s)", method, why)
    if method != "dpo":
        raise KnowpatchError(f"method: preference pairs are trained with dpo (got {method!r})")
    overrides.setdefault("route", False)  # a behaviour has no subject to route by
    train_set, held = split_pairs(pairs, heldout, seed)
    probe = held or train_set
    acc0, margin0, gen0 = measure(editor, probe, [], samples)
    patch = editor.edit(train_set, method, save=False, evaluate=False,
                        train_options={"pairs": True, "label": label}, **overrides)
    acc1, margin1, gen1 = measure(editor, probe, [patch], samples)
    patch.manifest["preference"] = report = {
        "pref_acc_before": acc0, "pref_acc_after": acc1, "margin_before": margin0,
        "margin_after": margin1, "steps": patch.steps, "seconds": patch.seconds,
        "pairs_trained": len(train_set), "pairs_heldout": len(held),
        "measured_on": "heldout" if held else "training pairs (heldout=0)",
        "samples": [{"prompt": p.prompt, "before": b, "after": a}
                    for p, b, a in zip(probe, gen0, gen1)],
    }
    return patch, report
