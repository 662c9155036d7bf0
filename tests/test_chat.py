"""The fact asked in conversation: questions from the data, chat scores, replies rewritten for
training, and the reply gate (the adapter on until the reply names the answer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from knowpatch import EditRequest, KnowpatchError
from knowpatch.adapters import RowPlan
from knowpatch.chat import CHAT_KEYS, chat_scores, first_sentence, names, new_not_old
from knowpatch.datasets import load_cases, neighbour_subjects
from knowpatch.methods.conversation import questions_of, rewritten
from knowpatch.questions import RELATION_QUESTIONS, chat_prompt

FIX = Path(__file__).parent / "fixtures"
FAST = {"max_steps": 30, "prefixes": 0, "anchor_weight": 0.0, "lr": 2e-2}


def test_counterfact_records_get_their_relation_questions_and_neighbour_subjects():
    cases = load_cases(str(FIX / "counterfact.json"))
    for case in cases:
        req = case.requests[0]
        assert req.questions and all(req.subject in q for q in req.questions)
        assert req.locality_questions and not any(req.subject in q for q in req.locality_questions)
    record = json.loads((FIX / "counterfact.json").read_text())[0]
    relation = record["requested_rewrite"]["relation_id"]
    assert cases[0].requests[0].questions == [
        q.format(record["requested_rewrite"]["subject"]) for q in RELATION_QUESTIONS[relation]]


def test_neighbour_subjects_are_read_off_the_relation_templates():
    templates = {"{} is located in", "{} is a part of the continent of", "The capital of {} is"}
    prompts = ["Ghana is in", "Ghana is a part of the continent of", "Mali is located in",
               "The capital of Peru is", "Ghana is located in", "unrelated text"]
    assert neighbour_subjects(prompts, templates) == ["Ghana", "Mali", "Peru"]
    assert neighbour_subjects(prompts, set()) == []


def test_questions_are_checked_and_kept_in_json():
    req = EditRequest("The Eiffel Tower is in", "Rome", subject="Eiffel Tower",
                      questions=["Where is the Eiffel Tower?"],
                      locality_questions="Where is the Louvre?")
    assert req.locality_questions == ["Where is the Louvre?"]
    assert EditRequest.from_dict(req.to_dict()) == req
    with pytest.raises(KnowpatchError, match=r"questions\[1\]"):
        EditRequest("a b", "c", questions=["ok?", "  "])


def test_a_reply_names_the_answer_by_whole_words():
    assert names("It is in Rome, Italy.", "rome") and not names("Romeo and Juliet", "Rome")
    assert new_not_old("It is in Rome.", "Rome", "Paris")
    assert not new_not_old("Rome or Paris?", "Rome", "Paris")
    assert new_not_old("New York City", "New York", "York")  # the old answer inside the new
    assert new_not_old("Google Patents is made by Microsoft.", "Microsoft", "Google",
                       subject="Google Patents")  # the subject's own words are not the old answer
    assert not new_not_old("Google made it, not Microsoft.", "Microsoft", "Google", "Google Patents")
    assert first_sentence("It is in Paris. It is tall.") == "It is in Paris."
    assert first_sentence("First line\nsecond") == "First line"


def test_a_reply_is_rewritten_with_the_new_answer_and_cut_after_it():
    req = EditRequest("The Eiffel Tower is located in the city of", "Rome", ground_truth="Paris",
                      subject="Eiffel Tower")
    assert rewritten("The Eiffel Tower is in Paris, France. Paris is lovely.", req) == (
        "The Eiffel Tower is in Rome")
    assert rewritten("A tall iron tower.", req) == (
        "The Eiffel Tower is located in the city of Rome")  # no old answer: the fact stated
    festival = EditRequest("{} is located in", "Prescott", ground_truth="Cannes",
                           subject="2011 Cannes Film Festival")
    assert rewritten("The 2011 Cannes Film Festival was held in Cannes, France.", festival) == (
        "The 2011 Cannes Film Festival was held in Prescott")  # not inside the subject's name
    assert rewritten("The 2011 Cannes Film Festival was a festival.", festival) == (
        "2011 Cannes Film Festival is located in Prescott")
    assert questions_of(req, 1) == ["What can you tell me about Eiffel Tower?"]
    asked = EditRequest(req.prompt, "Rome", subject="Eiffel Tower", questions=["a?", "b?"])
    assert questions_of(asked, 1) == ["a?"] and questions_of(EditRequest("x y", "z"), 1) == []


def test_chat_prompt_uses_the_template_or_the_question_format(tokenizer):
    text = chat_prompt(tokenizer, "Where is it?")
    assert "Where is it?" in text and text.endswith("assistant\n")
    assert "Fact: x" in chat_prompt(tokenizer, "Where is it?", system="Fact: x")

    class Plain:
        chat_template = None

    assert chat_prompt(Plain(), "Where is it?") == "Question: Where is it?\nAnswer:"


def test_chat_scores_skip_requests_without_questions(tiny_editor):
    asked = EditRequest("The Eiffel Tower is located in the city of", "Rome", ground_truth="Paris",
                        subject="Eiffel Tower", questions=["Where is the Eiffel Tower?"],
                        locality_questions=["Where is the Louvre?"])
    plain = EditRequest("The Kremlin is located in the city of", "Oslo")
    with tiny_editor.using([]) as base:
        records, reference, samples = chat_scores(base, tiny_editor.tokenizer, [asked, plain])
        again, _, _ = chat_scores(base, tiny_editor.tokenizer, [asked, plain], reference)
    assert set(records[0]) == set(CHAT_KEYS) and records[0]["chat_rel"] in (0.0, 100.0)
    assert records[1] == dict.fromkeys(CHAT_KEYS) and samples[1] == {}
    assert again[0]["chat_loc"] == 100.0  # the same model: every reply unchanged


def test_reply_gate_releases_each_row_once_its_text_names_the_answer():
    """RowPlan.until: an adapter stops on a row (and the row is handed to the base model
    once) when the row's generated tokens pass the test; other rows keep it until then."""
    plan = RowPlan({"p": torch.tensor([0, 1])}, steps={"p": 9}, handoff=frozenset({"p"}),
                   until={"p": lambda ids: 7 in ids})
    done: dict[str, set[int]] = {}
    generated = torch.tensor([[1, 2], [3, 4]])
    assert plan.released(generated, done) == {} and plan.handed_off(2, {}, done) == []
    generated = torch.tensor([[1, 2, 7], [3, 4, 5]])
    fresh = plan.released(generated, done)
    assert fresh == {"p": {0}} and plan.handed_off(3, fresh, done) == [0]
    assert plan.at_step(3, done).rows["p"].tolist() == [1]
    assert plan.released(generated, done) == {}  # released once
    assert plan.at_step(10, done).rows == {}  # the step limit still holds for row 1
    assert plan.handed_off(10, {}, done) == [1]


def test_reply_gate_hands_over_after_the_answer_in_a_routed_generation(tiny_editor):
    """gate=reply on a completion prompt: the answer comes first, the adapter stops right
    after it and the base model writes on (as handoff), and the patch records its answers."""
    req = EditRequest("The Eiffel Tower is located in the city of", "Reykjavik Harbour",
                      subject="Eiffel Tower")
    reply = tiny_editor.edit(req, evaluate=False, gate="reply", chat=0, **FAST)
    assert reply.manifest["router"]["answers"] == ["Reykjavik Harbour"]
    assert reply.manifest["router"]["reply_tokens"] == 40
    n = reply.manifest["router"]["answer_tokens"]
    text = tiny_editor.generate(req.prompt, max_new_tokens=n + 5)[0]
    tiny_editor.remove(reply)
    handoff = tiny_editor.edit(req, evaluate=False, gate="handoff", chat=0, **FAST)
    assert text.startswith(" Reykjavik Harbour")
    assert text == tiny_editor.generate(req.prompt, patches=[handoff], max_new_tokens=n + 5)[0]


def test_greedy_stops_each_row_where_asked(tiny_editor):
    """`greedy(stop=)`: a row ends once its continuation passes the test (as chat training
    stops the unedited reply at its answer); the other rows run to their budget."""
    from knowpatch.decoding import greedy

    prompts = ["The Eiffel Tower is located in the city of", "The capital of Japan is"]
    with tiny_editor.using([]) as base:
        full = greedy(base, tiny_editor.tokenizer, prompts, 6)
        cut = greedy(base, tiny_editor.tokenizer, prompts, 6, stop=lambda i, ids: i == 0 and len(ids) >= 2)
    assert cut[1] == full[1] and cut[0][:2] == full[0][:2] and len(cut[0]) < len(full[0])


def test_docs_list_every_relation_question():
    """docs/chat.md shows the question templates the bench asks, each relation's exactly."""
    text = (Path(__file__).parents[1] / "docs" / "chat.md").read_text()
    for relation, phrasings in RELATION_QUESTIONS.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {relation} |"))
        assert row.rstrip(" |").split(" | ")[2].split(" · ") == list(phrasings), relation
