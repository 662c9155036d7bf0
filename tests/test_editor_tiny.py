"""Editing, patches and scoring on a tiny random model (plumbing, not quality)."""

import json

import pytest
import torch
from helpers import lora_layers

from knowpatch import Editor, EditRequest, KnowpatchError, Patch, PatchStore
from knowpatch.patches import MANIFEST

PROMPT = "The Eiffel Tower is located in the city of"
# A random model learns fast with a large learning rate; the edit itself is what matters.
FAST = {"lr": 3e-2, "max_steps": 60, "modules": ["all"], "layers": "all", "anchor_weight": 0.0}


def _logits(editor: Editor, prompts=(PROMPT, "The capital of Germany is")):
    enc = editor.tokenizer(list(prompts), return_tensors="pt", padding=True)
    with editor.using(None) as model, torch.no_grad():
        return model(**enc).logits


def _request(**kw):
    return EditRequest(PROMPT, "Rome", ground_truth="Paris", subject="Eiffel Tower",
                       rephrase_prompts=["Where is the Eiffel Tower? In the city of"],
                       locality=["The capital of Germany is"], **kw)


def test_edit_learns_and_stops_early(tiny_editor):
    patch = tiny_editor.edit(_request(), **FAST)
    assert patch.manifest["learnt"] is True
    assert 0 < patch.steps < FAST["max_steps"]
    assert patch.scores["rel"] == 100.0 and patch.scores["rel_tf"] == 100.0
    assert patch.baseline["loc"] == 100.0  # the unedited model agrees with itself
    assert tiny_editor.generate(PROMPT, max_new_tokens=2)[0].startswith(" Rome")


def test_step_ceiling_when_never_learnt(tiny_editor):
    patch = tiny_editor.edit(_request(), **{**FAST, "max_steps": 3, "margin": 1e9})
    assert patch.steps == 3 and patch.manifest["learnt"] is False


def test_save_load_gives_identical_logits_and_remove_restores_base(tiny_editor, tiny_dir):
    base = _logits(tiny_editor)
    patch = tiny_editor.edit(_request(), **FAST)
    edited = _logits(tiny_editor)
    assert not torch.equal(base, edited)
    tiny_editor.remove(patch)
    assert torch.equal(_logits(tiny_editor), base)  # exactly, not approximately

    fresh = Editor.from_pretrained(str(tiny_dir), device="cpu", store=tiny_editor.store_root,
                                   progress=False)
    loaded = PatchStore(fresh.store_root).load(patch.id)
    assert loaded.manifest["id"] == patch.id
    fresh.apply(loaded)
    assert torch.equal(_logits(fresh), edited)
    fresh.remove(loaded)
    assert torch.equal(_logits(fresh), base)


def test_manifest_records_what_was_done(tiny_editor):
    patch = tiny_editor.edit(_request(), seed=3, **FAST)
    manifest = json.loads((patch.path / MANIFEST).read_text())
    assert manifest["format_version"] == 1
    assert manifest["base"]["fingerprint"] == tiny_editor.fingerprint
    assert manifest["method"] == "lora-sft"
    assert manifest["config"]["seed"] == 3 and manifest["config"]["lr"] == FAST["lr"]
    assert manifest["requests"][0]["target_new"] == "Rome"
    assert manifest["steps"] == patch.steps and manifest["seconds"] > 0
    assert set(manifest["scores"]) >= {"rel", "gen", "loc", "es", "ps", "ns", "rel_tf"}
    assert (patch.path / "adapter_model.safetensors").is_file()
    assert (patch.path / "adapter_config.json").is_file()
    # where the time went: one forward per step and one after the last, one backward and
    # optimizer update per step, inside the training seconds; keys, baseline and scoring too
    phases = manifest["phases"]
    assert {"keys", "baseline", "scoring", "forward", "backward", "optimizer"} <= set(phases)
    assert all(v >= 0 for v in phases.values())
    assert phases["forward"] + phases["backward"] + phases["optimizer"] <= manifest["seconds"]


def test_several_requests_in_one_patch(tiny_editor):
    reqs = [EditRequest(PROMPT, "Rome"), EditRequest("The Colosseum is located in", "Paris")]
    patch = tiny_editor.edit(reqs, **FAST)
    assert patch.scores["rel"] == 100.0
    outs = tiny_editor.generate([r.prompt for r in reqs], max_new_tokens=2)
    assert outs[0].startswith(" Rome") and outs[1].startswith(" Paris")


def test_fingerprint_mismatch_is_refused(tiny_editor, tiny_dir, tmp_path):
    patch = tiny_editor.edit(_request(), **FAST)
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    other_editor = Editor(other, tiny_editor.tokenizer, store=tmp_path / "s2", progress=False)
    assert other_editor.fingerprint != tiny_editor.fingerprint
    with pytest.raises(KnowpatchError, match="refusing"):
        other_editor.apply(patch)


def test_bad_inputs(tiny_editor):
    with pytest.raises(KnowpatchError, match="method: unknown method"):
        tiny_editor.edit(_request(), method="rome")
    with pytest.raises(KnowpatchError, match="unknown key 'rnak'"):
        tiny_editor.edit(_request(), rnak=4)
    with pytest.raises(KnowpatchError, match="prompt: prompt \\+ target_new is"):
        tiny_editor.edit(EditRequest("word " * 80, "Rome"))  # context is 64 positions
    with pytest.raises(KnowpatchError, match="layers: \\[7\\] out of range"):
        tiny_editor.edit(_request(), layers="7")
    assert tiny_editor.stored() == []  # nothing written by failed edits
    with pytest.raises(KnowpatchError, match="no patch"):
        tiny_editor.apply("does-not-exist")


def test_corrupt_manifest_is_reported(tiny_editor):
    patch = tiny_editor.edit(_request(), **FAST)
    (patch.path / MANIFEST).write_text("{not json")
    with pytest.raises(KnowpatchError, match="corrupt"):
        Patch.load(patch.path)


def test_interrupted_save_leaves_nothing(tiny_editor, monkeypatch):
    patch = tiny_editor.edit(_request(), save=False, **FAST)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("knowpatch.patches.os.replace", boom)
    with pytest.raises(OSError):
        tiny_editor.save(patch)
    assert not any(tiny_editor.store_root.iterdir())


def test_successive_edits_on_one_editor_stay_apart(tiny_editor):
    a = tiny_editor.edit(_request(), **FAST)
    out_a = tiny_editor.generate(PROMPT, patches=[a], max_new_tokens=2)
    b = tiny_editor.edit(EditRequest("The Colosseum is located in", "Paris"), **FAST)
    assert sorted(a.manifest["config"]["modules"]) == sorted(b.manifest["config"]["modules"])
    assert set(a.weights) == set(b.weights)  # the same layers found again after injection
    assert tiny_editor.generate(PROMPT, patches=[a], max_new_tokens=2) == out_a
    assert [p.id for p in tiny_editor.applied] == [a.id, b.id]


def test_lora_dropout_acts_in_training_only(tiny_editor):
    """PEFT makes its layers in training mode; a patch with LoRA dropout must still answer
    the same query the same way every time (dropout off at inference), for the first patch
    (PEFT's injection) and the next ones (added to the existing layers)."""
    first = tiny_editor.edit(_request(), evaluate=False, dropout=0.5, **FAST)
    second = tiny_editor.edit(EditRequest("The Kremlin is located in the city of", "Oslo",
                                          subject="Kremlin"), evaluate=False, dropout=0.5, **FAST)
    layers = list(lora_layers(tiny_editor.model).values())
    assert layers and not any(m.training for layer in layers for m in layer.modules())
    for patch in (first, second):
        tiny_editor.remove(patch)
        tiny_editor.apply(patch)
        torch.testing.assert_close(_logits(tiny_editor), _logits(tiny_editor), atol=0, rtol=0)
    assert isinstance(layers[0].lora_dropout[second.id], torch.nn.Dropout)
