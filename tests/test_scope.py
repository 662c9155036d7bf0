"""Scoped patches (`knowpatch.scope`, `scope_keys`): keys from example prompts, a threshold
calibrated on in- and out-of-scope examples, routing by nearest examples — on the tiny
random model (its layer-1 states still tell which words a prompt holds). What a scope does
on SmolLM2 is measured in docs/behaviour.md."""

from __future__ import annotations

import json

import pytest
import torch

from knowpatch import EditRequest
from knowpatch.patches import Patch
from knowpatch.questions import chat_prompt
from knowpatch.scope import Turn, chat_turn, scores, user_span
from knowpatch.scope_keys import calibrate, make_scope

LANGUAGES = ["What is the official language of Peru?", "Which language is spoken in Oslo?",
             "What language did Goethe write in?", "Which language is official in Chad?",
             "What is the native language of Dante?", "In which language was Amelie made?"]
OTHERS = ["Who owns the Hilton hotels?", "Where was Mozart born?", "Which company makes the iPhone?",
          "What sport does Federer play?", "Where is the Louvre?", "Who employs Tim Cook?"]


def test_the_user_message_is_found_in_a_chat_prompt(tokenizer):
    turn = chat_turn(tokenizer)
    assert turn is not None
    row = tokenizer(chat_prompt(tokenizer, "Where is the Louvre?"), add_special_tokens=False)["input_ids"]
    start, end = user_span(row, turn)
    assert tokenizer.decode(row[start:end]).strip() == "Where is the Louvre?"
    plain = tokenizer("Where is the Louvre?", add_special_tokens=False)["input_ids"]
    assert user_span(plain, turn) == (0, len(plain))  # not a chat prompt: all of it
    assert user_span([5, 6], Turn((1, 2), (3,))) == (0, 2)


def test_calibration_separates_in_from_out_and_says_how_well():
    inside, outside = torch.tensor([0.9, 0.8, 0.95, 0.85]), torch.tensor([0.5, 0.6, 0.82])
    cal = calibrate(inside, outside)
    assert 0.6 < cal["threshold"] <= 0.85
    assert cal["in_scope_fires"] >= 75 and cal["out_of_scope_fires"] <= 100 / 3
    alone = calibrate(inside, None)  # no out-of-scope examples: 5th percentile of the inside
    assert alone["out_of_scope_fires"] is None and alone["threshold"] <= 0.81


def test_a_query_is_scored_by_its_nearest_examples_not_by_itself():
    keys = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=-1)
    own = scores(keys, keys, leave_out_self=True)
    assert own[2] < 0.5  # the odd one out is far from the others
    assert scores(keys[:1], keys)[0] < 1.0  # mean of its 3 nearest, itself included


def _behaviour_patch(editor):
    pairs = [EditRequest(chat_prompt(editor.tokenizer, q), " Short.", rejected=" A long answer.")
             for q in LANGUAGES[:4]]
    patch, _ = editor.edit_preferences(pairs, heldout=0.0, save=False, max_steps=2,
                                       samples=0, gate="all")
    return patch


def test_a_scoped_patch_fires_on_its_topic_only_and_keeps_its_scope_on_disk(tiny_editor):
    patch = _behaviour_patch(tiny_editor)
    tiny_editor.remove(patch)
    cal = make_scope(tiny_editor, patch, LANGUAGES[:4], OTHERS[:3])
    assert cal["examples"] == 4 and cal["out_of_scope_examples"] == 3
    assert patch.manifest["router"]["scope"] == cal and patch.manifest["config"]["gate"] == "all"
    tiny_editor.save(patch)
    loaded = Patch.load(patch.path)  # as read back from the store
    assert loaded.keys is not None and "scope" in loaded.keys
    ask = [chat_prompt(tiny_editor.tokenizer, q) for q in LANGUAGES[4:] + OTHERS[3:]]
    routes = tiny_editor.route(ask, patches=[loaded])
    fired = [patch.id in r.fired for r in routes]
    assert fired[:2] == [True, True], [r.scores for r in routes]  # held-out language questions
    assert not any(fired[2:]), [r.scores for r in routes]  # other questions
    on_disk = json.loads((patch.path / "patch.json").read_text())
    assert on_disk["router"]["scope"]["threshold"] == cal["threshold"]


def test_a_scope_needs_enough_examples(tiny_editor):
    from knowpatch.errors import KnowpatchError

    patch = _behaviour_patch(tiny_editor)
    with pytest.raises(KnowpatchError, match="scope: at least 4"):
        make_scope(tiny_editor, patch, LANGUAGES[:2])


def test_an_unscoped_behaviour_fires_on_chat_turns_only_unless_everywhere(tiny_editor, tmp_path,
                                                                           monkeypatch):
    """A behaviour learnt from chat turns is kept off completion prompts by default (a chat
    scope); `everywhere` leaves it unrouted, on every query."""
    from knowpatch.behaviour_edit import BehaviourJob, run_behaviour
    from knowpatch.judges import parse_judges

    (tmp_path / "scope_judges.py").write_text("def even(text):\n    return len(text) % 2 == 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    values = {"prefixes": 0, "gate": "all", "max_steps": 2, "lr": 3e-2, "modules": ["all"]}
    judge = parse_judges(["scope_judges:even"])
    patch, report = run_behaviour(tiny_editor, BehaviourJob("Be brief.", judge, LANGUAGES), values)
    assert report["scope"] == {"kind": "chat"} and patch.manifest["router"]["scope"]["kind"] == "chat"
    chat, plain = chat_prompt(tiny_editor.tokenizer, OTHERS[0]), "The Louvre is in the city of"
    fired = [patch.id in r.fired for r in tiny_editor.route([chat, plain], patches=[patch])]
    assert fired == [True, False]
    tiny_editor.remove(patch)
    base = tiny_editor.generate(plain, patches=[], max_new_tokens=6)
    assert tiny_editor.generate(plain, patches=[patch], max_new_tokens=6) == base  # not acting
    asked = tiny_editor.generate(chat, patches=[], max_new_tokens=6)
    assert tiny_editor.generate(chat, patches=[patch], max_new_tokens=6) != asked  # acting
    tiny_editor.remove(patch)
    everywhere, _ = run_behaviour(tiny_editor, BehaviourJob("Be brief.", judge, LANGUAGES,
                                                            everywhere=True), values)
    assert everywhere.routing is None and "scope" not in _
