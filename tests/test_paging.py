"""Paged patches: at most `resident` routed adapters in memory, the rest read from the
store when a query fires them; answers equal those with every patch resident."""

from __future__ import annotations

import pytest
from helpers import lora_layers

from knowpatch import Editor, EditRequest
from knowpatch.paging import OnDisk

FAST = {"lr": 3e-2, "max_steps": 60, "modules": ["all"], "layers": "all", "anchor_weight": 0.0,
        "prefixes": 0, "route_threshold": 0.9}
EDITS = [
    EditRequest("The Eiffel Tower is located in the city of", "Rome", subject="Eiffel Tower"),
    EditRequest("The Kremlin is located in the city of", "Oslo", subject="Kremlin"),
    EditRequest("Angela Merkel speaks the language", "Danish", subject="Angela Merkel"),
    EditRequest("The Colosseum was built by", "Vikings", subject="Colosseum"),
    EditRequest("Toyota is headquartered in", "Lagos", subject="Toyota"),
]
PROMPTS = [e.prompt for e in EDITS] + [
    "Where is the Eiffel Tower? The Eiffel Tower is located in the city of",
    "My favourite food is",
    "The Kremlin and the Colosseum are",
]


def test_paged_store_answers_as_if_every_patch_were_resident(tiny_dir, tmp_path):
    full = Editor.from_pretrained(str(tiny_dir), device="cpu", store=tmp_path / "store",
                                  progress=False)
    patches = [full.edit(e, evaluate=False, **FAST) for e in EDITS]
    assert all(p.manifest["learnt"] for p in patches)
    ids = [p.id for p in patches]
    expected = full.generate(PROMPTS, patches=ids, max_new_tokens=4)
    alone = [full.generate(p, patches=ids, max_new_tokens=4)[0] for p in PROMPTS]
    base = full.generate(PROMPTS, patches=[], max_new_tokens=4)
    assert all(expected[k] != base[k] for k in range(5)) and expected[6] == base[6]

    paged = Editor.from_pretrained(str(tiny_dir), device="cpu", store=tmp_path / "store",
                                   progress=False, resident=2)
    for i in ids:
        paged.apply(i)
    def pager():
        return paged.paging()

    assert pager()["in_memory"] == [] and len(pager()["pageable"]) == 5  # loaded: keys only
    assert all(isinstance(paged.applied[k].weights, OnDisk) for k in range(5))
    # deciding only (route) reads nothing in, and decides as the resident store does
    assert [r.fired for r in paged.route(PROMPTS)] == [r.fired for r in full.route(PROMPTS, ids)]
    assert pager()["reads"] == 0 and pager()["in_memory"] == []
    # a batch that fires more patches than fit: all read in for it, answers unchanged
    assert paged.generate(PROMPTS, max_new_tokens=4) == expected
    assert pager()["reads"] == 5
    # one prompt at a time, in another order: the cache holds two, answers unchanged
    for k in [4, 0, 5, 1, 0, 2, 3, 6, 7]:
        assert paged.generate(PROMPTS[k], max_new_tokens=4)[0] == alone[k]
        assert len(pager()["in_memory"]) <= 2
    reads = pager()["reads"]
    assert reads > 5  # patches were dropped and read back
    dropped = [p for p in paged.applied if p.id not in pager()["in_memory"]]
    assert len(dropped) == 3 and all(isinstance(p.weights, OnDisk) for p in dropped)
    in_layers = {name for layer in lora_layers(paged.model).values() for name in layer.lora_A}
    assert all(p.id not in in_layers for p in dropped)
    paged.generate(PROMPTS[3], max_new_tokens=4)  # just needed: still resident
    assert pager()["reads"] == reads
    # removing a patch that is not resident; the others still answer as before
    gone = next(i for i in ids if i not in pager()["in_memory"])
    paged.remove(gone)
    assert gone not in pager()["pageable"] and not paged.is_routed(gone)
    kept = [k for k, i in enumerate(ids) if i != gone]
    for k in kept:
        assert paged.generate(PROMPTS[k], max_new_tokens=4)[0] == full.generate(
            PROMPTS[k], patches=[i for i in ids if i != gone], max_new_tokens=4)[0]
    # a new edit, saved by the editor: resident while it trains, pageable once saved
    new = paged.edit(EditRequest("The Louvre is located in the city of", "Cairo",
                                 subject="Louvre"), evaluate=False, **FAST)
    assert new.id in pager()["pageable"] and len(pager()["in_memory"]) <= 2
    assert paged.generate("The Louvre is located in the city of",
                          max_new_tokens=2)[0].startswith(" Cairo")


def test_unsaved_and_unrouted_patches_stay_resident(tiny_dir, tmp_path):
    ed = Editor.from_pretrained(str(tiny_dir), device="cpu", store=tmp_path / "store",
                                progress=False, resident=1)
    a = ed.edit(EDITS[0], evaluate=False, save=False, **FAST)
    b = ed.edit(EDITS[1], evaluate=False, save=False, **FAST)
    c = ed.edit(EDITS[2], evaluate=False, route=False, **FAST)  # saved, but acts everywhere
    assert ed.paging()["pageable"] == []  # none of them may be dropped from memory
    assert {a.id, b.id, c.id} <= {n for layer in lora_layers(ed.model).values() for n in layer.lora_A}
    with pytest.raises(ValueError, match="resident"):
        Editor.from_pretrained(str(tiny_dir), device="cpu", store=tmp_path / "s2",
                               progress=False, resident=0)
