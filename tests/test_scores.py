"""Scores against hand-computed cases."""

import math

import pytest
import torch

from knowpatch import EditRequest
from knowpatch.evaluate import evaluate, greedy, harmonic, summarize, teacher_forced
from knowpatch.fluency import ngram_entropy


def test_harmonic_mean():
    assert harmonic([100.0, 50.0, None]) == pytest.approx(2 / (1 / 100 + 1 / 50))
    assert harmonic([100.0, 0.0, 90.0]) == 0.0
    assert harmonic([None, None]) is None


def test_summary_averages_per_record_then_over_records():
    recs = [dict.fromkeys(("rel", "gen", "loc", "port", "es", "ps", "ns", "rel_tf", "gen_tf",
                           "loc_tf")) for _ in range(2)]
    recs[0].update(rel=100.0, gen=50.0, loc=100.0)
    recs[1].update(rel=0.0, gen=100.0, loc=80.0)
    s = summarize(recs)
    assert s["rel"] == 50.0 and s["gen"] == 75.0 and s["loc"] == 90.0
    assert s["score"] == pytest.approx(round(3 / (1 / 50 + 1 / 75 + 1 / 90), 2))
    assert s["es"] is None and s["S"] is None


def test_ngram_entropy_by_hand():
    # words a b a b: bigrams ab, ba, ab → H = -(2/3 log2 2/3 + 1/3 log2 1/3); trigrams aba, bab → 1
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    expected = (h2 * 2 / 3 + 1.0 * 4 / 3) / 2
    assert ngram_entropy("a b a b") == pytest.approx(expected)
    assert ngram_entropy("") == 0.0


def test_scores_follow_the_model_outputs(tiny_editor):
    model, tok = tiny_editor.model, tiny_editor.tokenizer
    prompt, para, neigh = "The Eiffel Tower is in", "Where is the Eiffel Tower?", "Germany is"
    own = tok.decode(greedy(model, tok, [prompt], 3)[0], skip_special_tokens=True).strip()
    own_word = own.split()[0] if own.split() else own
    other = "Rome" if own_word != "Rome" else "Paris"
    req = EditRequest(prompt, own_word, ground_truth=other, rephrase_prompts=[para],
                      locality=[neigh])
    ev = evaluate(model, tok, [req])
    rec = ev.records[0]
    assert rec["rel"] == 100.0  # the target is what the model already says
    assert rec["loc"] == 100.0 and rec["loc_tf"] == 100.0  # baseline agrees with itself
    # es by hand: summed teacher-forced log-probs of the two answers
    f_new, f_true = teacher_forced(model, tok, [(prompt, own_word), (prompt, other)])
    enc = tok(prompt, return_tensors="pt")
    ids_new = tok(" " + own_word, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([enc.input_ids[0].tolist() + ids_new])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    n = enc.input_ids.shape[1]
    by_hand = sum(logp[n - 1 + i, t].item() for i, t in enumerate(ids_new))
    assert f_new.logprob == pytest.approx(by_hand, abs=1e-4)
    assert rec["es"] == (100.0 if f_new.logprob > f_true.logprob else 0.0)
    # a target the model does not produce scores 0 on rel
    req2 = EditRequest(prompt, other + "zz", rephrase_prompts=[para])
    assert evaluate(model, tok, [req2]).records[0]["rel"] == 0.0


def test_sampled_text_depends_on_its_prompt_and_seed_not_on_its_batch(tiny_editor):
    from knowpatch.fluency import sample

    m, tok = tiny_editor.model, tiny_editor.tokenizer
    prompts = ["The Eiffel Tower is", "Angola's surroundings include a long", "Hi"]
    alone = [sample(m, tok, [p], max_new_tokens=12)[0] for p in prompts]
    together = sample(m, tok, prompts, max_new_tokens=12)
    reordered = sample(m, tok, prompts[::-1], max_new_tokens=12, batch_size=2)[::-1]
    assert together == alone == reordered
    assert all(len(tok(t)["input_ids"]) >= 10 for t in together)  # sampled text, not empty
    # a prompt twice in one list: two draws; another seed: other texts
    twice = sample(m, tok, [prompts[0], prompts[0]], max_new_tokens=12)
    assert twice[0] == alone[0] and twice[1] != twice[0]
    assert sample(m, tok, prompts, max_new_tokens=12, seed=1) != together
