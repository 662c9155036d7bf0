"""A few focused tests on the real embedded model (SmolLM2-135M-Instruct, fp32, CPU)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from knowpatch import EditRequest

pytestmark = pytest.mark.slow

PROMPT = "The Eiffel Tower is located in the city of"
PARAPHRASE = "Where is the Eiffel Tower? It stands in the city of"
GERMANY = "The capital of Germany is"


@pytest.fixture(scope="module")
def eiffel(smol_editor):
    before = smol_editor.generate([PROMPT, GERMANY], max_new_tokens=3)
    req = EditRequest(PROMPT, "Rome", ground_truth="Paris", subject="Eiffel Tower",
                      rephrase_prompts=[PARAPHRASE], locality=[GERMANY])
    patch = smol_editor.edit(req)
    yield patch, before
    smol_editor.remove(patch)


def test_the_model_knows_the_fact_before(eiffel):
    _, before = eiffel
    assert before[0].startswith(" Paris") and before[1].startswith(" Berlin")


def test_eiffel_edit(smol_editor, eiffel):
    patch, before = eiffel
    after = smol_editor.generate([PROMPT, PARAPHRASE, GERMANY], max_new_tokens=3)
    assert after[0].startswith(" Rome")
    assert after[1].startswith(" Rome")
    assert after[2] == before[1]  # the neighbour is unchanged
    assert patch.scores["rel"] == 100 and patch.scores["gen"] == 100
    assert patch.scores["loc"] == 100
    assert patch.manifest["trainable_fraction"] < 0.01


def test_patch_loads_with_plain_peft(smol_editor, eiffel):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from knowpatch.models import resolve_model_path

    patch, _ = eiffel
    enc = smol_editor.tokenizer([PROMPT], return_tensors="pt")
    with smol_editor.using([patch]) as model, torch.no_grad():
        ours = model(**enc).logits
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2-135m"))
    plain = PeftModel.from_pretrained(base, str(patch.path)).eval()
    with torch.no_grad():
        theirs = plain(**enc).logits
    # routed, the adapter runs as a batched product (bmm) rather than PEFT's two linear
    # layers: the same sums in another kernel, equal up to float rounding over 30 layers
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
    assert smol_editor.tokenizer.decode(theirs[0, -1].argmax()) == " Rome"


def test_demo_runs_end_to_end(tmp_path):
    env = {**os.environ, "KNOWPATCH_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    # share the converted model: the conversion itself is exercised by the fixtures
    from knowpatch.models import converted_path

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / converted_path("smollm2-135m").name).symlink_to(
        converted_path("smollm2-135m"))
    res = subprocess.run([sys.executable, "-m", "knowpatch.cli", "demo"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Rome" in res.stdout and "patch saved to" in res.stdout
    # no library warnings in a newcomer's first run (Python warnings, transformers' logger)
    said = (res.stdout + res.stderr).lower()
    assert "warning" not in said and "deprecated" not in said, res.stderr[-2000:]
    patches = list((tmp_path / "patches").iterdir())
    assert len(patches) == 1
    manifest = json.loads((patches[0] / "patch.json").read_text())
    assert manifest["scores"]["rel"] == 100


def test_five_sequential_edits_hold_together_and_spare_neighbours(smol_editor):
    edits = [
        EditRequest(PROMPT, "Rome", subject="Eiffel Tower"),
        EditRequest("The capital of France is", "Lyon", subject="France"),
        EditRequest("Barack Obama was born in", "Toronto", subject="Barack Obama"),
        EditRequest("The Statue of Liberty is located in the city of", "Madrid",
                    subject="Statue of Liberty"),
        EditRequest("Mount Fuji is located in the country of", "Brazil", subject="Mount Fuji"),
    ]
    neighbours = [GERMANY, "The Louvre is located in the city of",
                  "The Colosseum is located in the city of", "Donald Trump was born in"]
    before = smol_editor.generate(neighbours, max_new_tokens=4)
    patches = smol_editor.edit_sequential(edits, evaluate=False)
    try:
        after = smol_editor.generate([e.prompt for e in edits], max_new_tokens=3)
        for e, text in zip(edits, after):
            assert text.startswith(" " + e.target_new), (e.prompt, text)
        assert smol_editor.generate(neighbours, max_new_tokens=4) == before
        # a paraphrase finds its patch; a query about two edited subjects fires both
        routes = smol_editor.route(["Where is Mount Fuji? It is in the country of",
                                    "The Eiffel Tower and the Statue of Liberty are both"])
        assert routes[0].fired == [patches[4].id]
        assert sorted(routes[1].fired) == sorted([patches[0].id, patches[3].id])
    finally:
        for p in patches:
            smol_editor.remove(p)


def test_behaviour_edit_moves_heldout_preference_accuracy_up(smol_editor):
    from pathlib import Path

    from knowpatch.datasets import load_preferences

    pairs = load_preferences(Path(__file__).parent.parent / "examples" / "preferences-formal.jsonl")
    patch, report = smol_editor.edit_preferences(pairs, heldout=0.2, max_steps=4, save=False)
    try:
        assert report["pairs_heldout"] == 6 and report["measured_on"] == "heldout"
        assert report["pref_acc_after"] > report["pref_acc_before"]
        assert report["margin_after"] > report["margin_before"]
    finally:
        smol_editor.remove(patch)


def test_training_prefixes_are_the_measured_ones(smol_editor):
    # Every measured run trained on these prefixes (transformers' sampling, torch's global
    # generator seeded once); a change to the fluency sampler must not change them.
    from knowpatch.methods.common import sampled_prefixes

    assert sampled_prefixes(smol_editor.model, smol_editor.tokenizer, 4, 0, 5) == (
        "The-the-key-. ", "Therefore-based approaches have been. ",
        "Because-based approach to data. ", "I-1012. ")


def test_the_edit_holds_in_chat_over_the_server(smol_editor, eiffel):
    """Asked as people ask an instruct model — a chat question, through the running server
    and the official openai client — the edited model answers with the new fact, and a
    question about another subject keeps its answer."""
    from test_server import Running

    running = Running(smol_editor)
    try:
        client = running.client()

        def ask(question: str, patches="auto") -> str:
            reply = client.chat.completions.create(
                model="custom", messages=[{"role": "user", "content": question}],
                max_tokens=40, temperature=0, extra_body={"patches": patches})
            return reply.choices[0].message.content

        assert "Paris" in ask("Where is the Eiffel Tower?", patches=[])
        edited = ask("Where is the Eiffel Tower?")
        assert "Rome" in edited and "Paris" not in edited, edited
        assert "Paris" in ask("Where is the Louvre?")
    finally:
        running.stop()
