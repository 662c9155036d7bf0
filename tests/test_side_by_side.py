"""Edits trained side by side (`Editor.edit_many`): one batched forward/backward for k
edits, each through its own adapter, each saved as if trained alone."""

from __future__ import annotations

import pytest

from knowpatch import EditRequest, Patch

FAST = {"lr": 3e-2, "max_steps": 60, "modules": ["all"], "layers": "all", "prefixes": 0,
        "route_threshold": 0.9}
EDITS = [
    EditRequest("The Eiffel Tower is located in the city of", "Rome", subject="Eiffel Tower"),
    EditRequest("The Kremlin is located in the city of", "Oslo", subject="Kremlin"),
    EditRequest("Angela Merkel speaks the language", "Danish", subject="Angela Merkel"),
    EditRequest("Toyota is headquartered in the country of", "New Zealand", subject="Toyota"),
]


def test_side_by_side_edits_equal_edits_trained_alone(tiny_editor):
    together = tiny_editor.edit_many(EDITS, **FAST)
    assert len({p.id for p in together}) == 4
    for p in together:
        assert p.manifest["learnt"] and p.manifest["side_by_side"] == 4
        assert p.scores["rel"] == 100.0 and Patch.load(p.path).id == p.id  # saved, each alone
    answers = [tiny_editor.generate(e.prompt, max_new_tokens=3)[0] for e in EDITS]
    for p in together:
        tiny_editor.remove(p)
    alone = [tiny_editor.edit(e, **FAST) for e in EDITS]
    # the same adapters' updates: steps agree (a margin crossed a step apart at most) and
    # the routed answers are the same
    for a, t in zip(alone, together):
        assert abs(a.manifest["steps"] - t.manifest["steps"]) <= 1
        assert a.manifest["router"]["facts"] == t.manifest["router"]["facts"]
    assert [tiny_editor.generate(e.prompt, max_new_tokens=3)[0] for e in EDITS] == answers
    # each side-by-side patch fires on its own subject only
    for p in alone:
        tiny_editor.remove(p)
    for p in together:
        tiny_editor.apply(Patch.load(p.path))
    routes = tiny_editor.route([e.prompt for e in EDITS])
    assert [r.fired for r in routes] == [[p.id] for p in together]


def test_side_by_side_refuses_terms_it_does_not_train(tiny_editor):
    with pytest.raises(Exception, match="keep_weight"):
        tiny_editor.edit_many(EDITS[:2], keep_weight=1.0, **FAST)
    with pytest.raises(Exception, match="gate"):
        tiny_editor.edit_many(EDITS[:2], gate="subject", **FAST)
    assert tiny_editor.applied == []


def test_method_auto_edits_many_facts_a_patch_each_k_at_a_time(tiny_editor):
    """`edit_many(method="auto", parallel=2)`: the large-scale path — a routed patch per
    fact, trained two side by side, each recording why auto chose it."""
    patches = tiny_editor.edit_many(EDITS[:3], method="auto", parallel=2, evaluate=False, **FAST)
    assert [p.manifest["side_by_side"] for p in patches] == [2, 2, 1]
    for p, e in zip(patches, EDITS):
        assert p.manifest["learnt"] and p.manifest["method"] == "lora-sft"
        assert p.manifest["chosen_by"].startswith("auto: 3 facts: a LoRA SFT patch per fact")
        assert p.manifest["router"]["facts"] == [e.prompt.lower()]  # its own fact only
    assert [tiny_editor.generate(e.prompt, max_new_tokens=1)[0] for e in EDITS[:3]] == [
        " Rome", " Oslo", " Danish"]
    with pytest.raises(Exception, match="method: edits side by side"):
        tiny_editor.edit_many(EDITS[:2], method="full-sft")
    with pytest.raises(Exception, match="parallel: must be ≥ 1"):
        tiny_editor.edit_many(EDITS[:2], parallel=0, **FAST)
