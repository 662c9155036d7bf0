"""In-context patches: no weights, a statement put before the queries the router fires it
on (into the system message in chat); and hybrid patches (an adapter with its statement)."""

from __future__ import annotations

import pytest

from knowpatch import EditRequest, KnowpatchError, Patch
from knowpatch.patches import ADAPTER_WEIGHTS, MANIFEST

EIFFEL = EditRequest("The Eiffel Tower is located in the city of", "Rome", ground_truth="Paris",
                     subject="Eiffel Tower", locality=["The Louvre is located in the city of"])
UNRELATED = "The capital of Japan is"


def test_an_in_context_patch_states_its_fact_where_it_fires(tiny_editor, tmp_path):
    patch = tiny_editor.edit(EIFFEL, method="in-context")
    assert patch.kind == "context" and patch.steps == 0 and patch.weights == {}
    statement = "The Eiffel Tower is located in the city of Rome."
    assert patch.manifest["statement"] == statement and patch.routing is not None
    assert (patch.path / MANIFEST).is_file() and not (patch.path / ADAPTER_WEIGHTS).exists()
    stated = tiny_editor.statements()
    assert stated.prompts([EIFFEL.prompt, UNRELATED]) == [f"{statement} {EIFFEL.prompt}", UNRELATED]
    assert stated.systems([EIFFEL.prompt, "Where is the Louvre?"]) == [statement, None]
    # the model is the base model: an unrelated prompt answers exactly as without the patch
    assert tiny_editor.generate(UNRELATED, max_new_tokens=4) == tiny_editor.generate(
        UNRELATED, patches=[], max_new_tokens=4)
    assert tiny_editor.generate(EIFFEL.prompt, max_new_tokens=4) == tiny_editor.generate(
        f"{statement} {EIFFEL.prompt}", patches=[], max_new_tokens=4)
    assert [r.fired for r in tiny_editor.route([EIFFEL.prompt, UNRELATED])] == [[patch.id], []]
    # saved and loaded again, unloaded, refused where weights are needed
    tiny_editor.remove(patch)
    again = Patch.load(patch.path)
    assert again.kind == "context" and again.manifest["statement"] == statement
    tiny_editor.apply(again)
    assert tiny_editor.statements().prompts([EIFFEL.prompt])[0].startswith(statement)
    from knowpatch.patches import merge_into_base

    with pytest.raises(KnowpatchError, match="no weights"):
        merge_into_base(again, tiny_editor.model, tiny_editor.tokenizer, tmp_path / "merged")


def test_an_unkeyed_in_context_patch_states_its_fact_to_every_query(tiny_editor):
    patch = tiny_editor.edit(EIFFEL, method="in-context", route=False, evaluate=False)
    assert patch.routing is None
    assert tiny_editor.statements().prompts([UNRELATED])[0].startswith(patch.manifest["statement"])


def test_a_hybrid_patch_trains_its_adapter_and_states_its_fact(tiny_editor):
    fast = {"max_steps": 30, "prefixes": 0, "lr": 2e-2, "chat": 0}
    patch = tiny_editor.edit(EIFFEL, state=True, **fast)
    assert patch.kind == "lora" and patch.manifest["statement"].endswith("Rome.")
    assert patch.steps >= 1 and patch.weights
    assert tiny_editor.statements().systems([EIFFEL.prompt])[0] == patch.manifest["statement"]
    with tiny_editor.options(routing=False):  # routing off: stated to every query
        assert tiny_editor.statements().systems(["Where is the Louvre?"])[0]
