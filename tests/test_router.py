"""Knowledge isolation: router keys, per-row routing, patches that do not interfere."""

import pytest
import torch
from helpers import bank_with, lora_layers

from knowpatch import EditRequest, Patch
from knowpatch.router import Router, compute_keys, hidden_rows, subject_token_span

# A random model's early layers blur tokens with their context far more than a trained one's,
# so the tiny-model tests route with a strict threshold and paraphrases that keep the prefix.
FAST = {"lr": 3e-2, "max_steps": 60, "modules": ["all"], "layers": "all", "anchor_weight": 0.0,
        "prefixes": 0, "route_threshold": 0.9}
EIFFEL = EditRequest("The Eiffel Tower is located in the city of", "Rome", subject="Eiffel Tower")
KREMLIN = EditRequest("The Kremlin is located in the city of", "Oslo", subject="Kremlin")
UNRELATED = "My favourite food is"
UNRELATED_REQ = EditRequest(UNRELATED, "x")


def _logits(editor, prompts):
    enc = editor.tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
    with editor.using(None) as model, torch.no_grad():
        return model(**enc).logits[:, -1]


def test_router_scores_by_the_worst_matched_subject_token():
    router = Router()
    a, b, c = torch.eye(3)
    # patch p: two subject tokens (a, b) in one key variant
    router.add("p", {"keys": torch.stack([a, b]), "variant": torch.tensor([0, 0])}, 1, 0.9)
    both = {1: torch.stack([c, b, a])}  # both tokens somewhere in the query: fires
    only_b = {1: torch.stack([c, b, c])}  # one token matches, the other does not
    assert router.decide(router.score(both)).fired == ["p"]
    assert router.score(both)["p"] == pytest.approx(1.0)
    assert router.score(only_b)["p"] == pytest.approx(0.0)
    assert router.decide(router.score(only_b)).fired == []


def test_newer_patch_rewriting_the_same_fact_wins():
    router = Router()
    key = {"keys": torch.eye(2)[:1], "variant": torch.tensor([0])}
    router.add("old", key, 1, 0.5, frozenset({"fact"}))
    router.add("new", key, 1, 0.5, frozenset({"fact"}))
    route = router.decide(router.score({1: torch.eye(2)}))
    assert route.fired == ["new"] and route.superseded == {"old": "new"}
    assert router.superseded() == {"old": "new"}


def test_subject_span_and_keys_come_from_the_edit_prompt(tiny_editor):
    tok = tiny_editor.tokenizer
    ids, span = subject_token_span(tok, EIFFEL.prompt, "Eiffel Tower")
    assert tok.decode([ids[i] for i in span]).strip() == "Eiffel Tower"
    keys = compute_keys(tiny_editor.model, tok, [EIFFEL], layer=1)
    assert keys["keys"].shape == (len(span), tiny_editor.model.config.hidden_size)
    assert torch.allclose(keys["keys"].norm(dim=-1), torch.ones(len(span)))
    # a request without a subject cannot be keyed; one whose subject is not in its prompt
    # is refused when it is made
    assert compute_keys(tiny_editor.model, tok, [EditRequest("Hello there", "x")], 1) is None
    with pytest.raises(ValueError, match="subject: does not occur in the prompt"):
        EditRequest("Hello there", "x", subject="Zorro")


def test_a_token_running_past_the_subject_is_not_a_key_token(tiny_editor):
    # ")?" is one token: a key read there would miss "… (APA-56) produced?", which spells ")"
    tok = tiny_editor.tokenizer
    subject = "USS Leedstown (APA-56)"
    # nor is a punctuation token at the subject's end (")" in one question, ")?" in the other)
    for text in (f"What company made {subject}?", f"What company has {subject} produced?"):
        ids, span = subject_token_span(tok, text, subject)
        assert tok.decode([ids[i] for i in span]).strip() == "USS Leedstown (APA-56"
    ids, span = subject_token_span(tok, "Where is Washington, D.C.? It is", "Washington, D.C.")
    assert tok.decode([ids[i] for i in span]).strip().startswith("Washington, D")


def test_hidden_rows_match_unbatched_rows(tiny_editor):
    tok = tiny_editor.tokenizer
    rows = [tok(t)["input_ids"] for t in ("a b c d e f", "Hello", "The Eiffel Tower is")]
    batched = hidden_rows(tiny_editor.model, rows, 1, tok.bos_token_id)
    for row, h in zip(rows, batched):
        alone = hidden_rows(tiny_editor.model, [row], 1, tok.bos_token_id)[0]
        assert h.shape == (len(row), 64)
        torch.testing.assert_close(h, alone, atol=1e-5, rtol=1e-5)


def test_routing_picks_the_patch_of_a_stored_key_and_none_for_unrelated(tiny_editor):
    a = tiny_editor.edit(EIFFEL, evaluate=False, **FAST)
    b = tiny_editor.edit(KREMLIN, evaluate=False, **FAST)
    routes = tiny_editor.route([EIFFEL.prompt, "The Eiffel Tower stands in",
                                KREMLIN.prompt, UNRELATED])
    assert [r.fired for r in routes] == [[a.id], [a.id], [b.id], []]
    assert routes[3].scores[a.id] < a.manifest["router"]["threshold"]


def test_patches_do_not_interfere_and_rows_are_routed_apart(tiny_editor):
    base = _logits(tiny_editor, [EIFFEL.prompt, KREMLIN.prompt, UNRELATED])
    a = tiny_editor.edit(EIFFEL, evaluate=False, **FAST)
    after_a = _logits(tiny_editor, [EIFFEL.prompt, KREMLIN.prompt, UNRELATED])
    tiny_editor.edit(KREMLIN, evaluate=False, **FAST)
    after_b = _logits(tiny_editor, [EIFFEL.prompt, KREMLIN.prompt, UNRELATED])
    # editing B leaves A's prompt exactly as A made it; the unrelated prompt stays the base's
    torch.testing.assert_close(after_b[0], after_a[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(after_b[2], base[2], atol=1e-5, rtol=0)
    assert not torch.allclose(after_b[1], base[1], atol=1e-3)  # B acts on its own prompt
    # one batch, three routes: each row as if generated alone
    together = tiny_editor.generate([EIFFEL.prompt, KREMLIN.prompt, UNRELATED], max_new_tokens=3)
    alone = [tiny_editor.generate(p, max_new_tokens=3)[0]
             for p in (EIFFEL.prompt, KREMLIN.prompt, UNRELATED)]
    assert together == alone
    assert together[0].startswith(" Rome") and together[1].startswith(" Oslo")
    # removing A gives back the base model on A's prompt, B still acts
    tiny_editor.remove(a)
    after_rm = _logits(tiny_editor, [EIFFEL.prompt, KREMLIN.prompt, UNRELATED])
    torch.testing.assert_close(after_rm[0], base[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(after_rm[1], after_b[1], atol=1e-5, rtol=0)


def test_one_query_may_fire_several_patches():
    router = Router()
    a, b, c = torch.eye(3)
    router.add("p", {"keys": a[None], "variant": torch.tensor([0])}, 1, 0.9)
    router.add("q", {"keys": b[None], "variant": torch.tensor([0])}, 1, 0.9)
    assert router.decide(router.score({1: torch.stack([a, c, b])})).fired == ["p", "q"]
    assert router.decide(router.score({1: c[None]})).fired == []


def test_routing_off_applies_every_patch_to_every_query(tiny_editor):
    base = _logits(tiny_editor, [UNRELATED])
    tiny_editor.edit(EIFFEL, evaluate=False, **FAST)
    torch.testing.assert_close(_logits(tiny_editor, [UNRELATED]), base, atol=1e-5, rtol=0)
    with tiny_editor.options(routing=False):
        assert not torch.allclose(_logits(tiny_editor, [UNRELATED]), base, atol=1e-4)
    torch.testing.assert_close(_logits(tiny_editor, [UNRELATED]), base, atol=1e-5, rtol=0)


def test_unkeyed_patch_acts_everywhere(tiny_editor):
    base = _logits(tiny_editor, [UNRELATED])
    patch = tiny_editor.edit(EIFFEL, evaluate=False, route=False, **FAST)
    assert patch.keys is None and "router" not in patch.manifest
    assert not torch.allclose(_logits(tiny_editor, [UNRELATED]), base, atol=1e-4)


def test_keys_survive_save_and_load(tiny_editor, tmp_path):
    patch = tiny_editor.edit(EIFFEL, evaluate=False, **FAST)
    loaded = Patch.load(patch.path)
    assert torch.equal(loaded.keys["keys"], patch.keys["keys"])
    assert loaded.routing["facts"] == ["the eiffel tower is located in the city of"]
    tiny_editor.remove(patch)
    tiny_editor.apply(loaded)
    assert tiny_editor.route(EIFFEL.prompt)[0].fired == [patch.id]


def test_edit_sequential_makes_one_patch_per_request_and_supersedes(tiny_editor):
    again = EditRequest(EIFFEL.prompt, "Berlin", subject="Eiffel Tower")
    patches = tiny_editor.edit_sequential([EIFFEL, KREMLIN, again], evaluate=False, **FAST)
    assert len(patches) == 3 and len({p.id for p in patches}) == 3
    assert all(p.path is not None and p.path.parent == tiny_editor.store_root for p in patches)
    assert tiny_editor.superseded() == {patches[0].id: patches[2].id}
    assert tiny_editor.generate(EIFFEL.prompt, max_new_tokens=2)[0].startswith(" Berlin")
    assert tiny_editor.generate(KREMLIN.prompt, max_new_tokens=2)[0].startswith(" Oslo")


def _three_subjects(tmp_path):
    """A records file of three subjects. Paraphrases that keep the edit prompt's prefix fire
    their patch even on a random model; the neighbour names no stored subject."""
    import json

    lines = [{"prompt": f"The {name} is located in the city of", "target_new": "Rome",
              "subject": name, "rephrase_prompts": [f"The {name} is located in"],
              "locality": [{"prompt": "My favourite food is"}]}
             for name in ("Eiffel Tower", "Kremlin", "Colosseum")]
    data = tmp_path / "edits.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return data


def test_bench_router_measures_recall_and_false_fires(tiny_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from knowpatch.cli import app

    data = _three_subjects(tmp_path)
    res = CliRunner().invoke(app, ["bench-router", "--model", str(tiny_dir), "--data", str(data),
                                   "--n", "3", "--sizes", "1,3", "--queries", "4",
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.stderr
    report = json.loads((tmp_path / "out" / "router_report.json").read_text())
    assert [r["patches"] for r in report["rows"]] == [1, 3]
    last = report["rows"][-1]
    assert last["router_recall"] == 100.0 and last["paraphrases"] == 3
    assert last["neighbour_fires_any_patch"] == 0.0 and last["neighbours"] == 3
    assert last["query_cost_vs_base"] > 0 and last["weights_per_patch_mb"] > 0
    assert last["resident"] is None and last["pager_reads"] == 0
    # paged: one adapter in memory, the copies read from disk when fired; same decisions
    res = CliRunner().invoke(app, ["bench-router", "--model", str(tiny_dir), "--data", str(data),
                                   "--n", "3", "--sizes", "3", "--queries", "4", "--resident",
                                   "1", "--out", str(tmp_path / "paged")])
    assert res.exit_code == 0, res.stderr
    paged = json.loads((tmp_path / "paged" / "router_report.json").read_text())["rows"][-1]
    # the 4 timed queries fire two patches, read in; deciding recall and false fires reads none
    assert paged["resident"] == 1 and paged["pager_reads"] == 2
    for key in ("router_recall", "neighbour_fires_any_patch", "paraphrase_fires_other_patch"):
        assert paged[key] == last[key]


def test_adding_and_removing_patches_bypasses_peft_model_wide_walks(tiny_editor, tiny_dir,
                                                                    tmp_path):
    """After the first patch, adapters are added to and deleted from the existing LoRA layers
    directly (PEFT's model-wide add/delete walk every loaded adapter); the weights read and
    written by hand are exactly PEFT's state dict."""
    from peft import get_peft_model_state_dict

    a = tiny_editor.edit(EIFFEL, evaluate=False, **FAST)
    b = tiny_editor.edit(KREMLIN, evaluate=False, **FAST)
    bank, model = bank_with(tiny_dir, a)  # a bank of the test's own: PEFT's injection first

    def refuse(*_a, **_k):
        raise AssertionError("PEFT's model-wide add/delete was used")

    bank.peft.add_adapter = refuse
    bank.peft.delete_adapter = refuse
    bank.add(b.id, b.adapter_config)
    bank.load_weights(b.id, dict(b.weights))
    for patch in (a, b):
        reference = get_peft_model_state_dict(bank.peft, adapter_name=patch.id)
        assert set(patch.weights) == set(reference) == set(bank.weights(patch.id))
        for key, value in reference.items():
            assert torch.equal(patch.weights[key], value)
            assert torch.equal(bank.weights(patch.id)[key], value)
    bank.remove(b.id)
    assert b.id not in bank.peft.peft_config
    assert all(b.id not in layer.lora_A for layer in lora_layers(model).values())
    # a saved patch loaded into the editor again answers the same, through the same fast path
    b.save(tmp_path / "b")
    after = _logits(tiny_editor, [EIFFEL.prompt, KREMLIN.prompt])
    tiny_editor.remove(b)
    assert all(b.id not in layer.lora_A for layer in lora_layers(tiny_editor.model).values())
    tiny_editor.apply(Patch.load(tmp_path / "b"))
    torch.testing.assert_close(_logits(tiny_editor, [EIFFEL.prompt, KREMLIN.prompt]), after,
                               atol=1e-6, rtol=0)
    # a patch whose weights do not fit is refused by name and leaves no adapter behind
    bad = Patch.load(tmp_path / "b")
    bad.id = "bad"
    bad.weights = {k.replace("lora_A", "lora_Q"): v for k, v in bad.weights.items()}
    with pytest.raises(Exception, match="do not fit"):
        tiny_editor.apply(bad)
    assert all("bad" not in layer.lora_A for layer in lora_layers(tiny_editor.model).values())
    # targets given as PEFT suffixes (as PEFT rewrites long lists) after every adapter is gone
    from peft import LoraConfig

    bank.remove(a.id)
    bank.add("suffix", LoraConfig(r=2, lora_alpha=4, target_modules=["down_proj"]))
    with_adapter = [m for m, layer in bank.layers().items() if "suffix" in layer.lora_A]
    assert with_adapter == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_subject_gate_acts_at_the_subject_only_and_generation_agrees(tiny_editor):
    """gate=subject: trained and applied only at the subject's tokens. Greedy generation
    (cached steps run the new tokens on the base weights) then agrees with one full forward
    over prompt + generated text, where the router gates the subject positions alone."""
    from knowpatch.evaluate import greedy

    patch = tiny_editor.edit(EIFFEL, evaluate=False, gate="subject", **FAST)
    assert patch.manifest["config"]["gate"] == "subject" and patch.manifest["learnt"]
    prompts = [EIFFEL.prompt, "The Eiffel Tower stands in", UNRELATED]
    with tiny_editor.using(None) as model:
        generated = greedy(model, tiny_editor.tokenizer, prompts, 6)
    texts = [tiny_editor.tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    assert texts[0].startswith(" Rome")
    for prompt, gen in zip(prompts, generated):
        ids = tiny_editor.tokenizer(prompt)["input_ids"] + list(gen)
        with tiny_editor.using(None) as model, torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        n = len(ids) - len(gen)
        assert logits[n - 1:-1].argmax(-1).tolist() == list(gen)
    # the routed forward gates exactly the subject's tokens of the query
    routes = tiny_editor.route([prompts[1]])
    ids, span = subject_token_span(tiny_editor.tokenizer, prompts[1], "Eiffel Tower")
    assert routes[0].positions[patch.id] == span
    # a prompt without the subject is answered by the base model
    base = tiny_editor.generate(UNRELATED, patches=[], max_new_tokens=6)
    assert texts[2] == base[0]


def test_subject_gate_needs_routing(tiny_editor):
    with pytest.raises(Exception, match="gate"):
        tiny_editor.edit(EIFFEL, evaluate=False, gate="subject", route=False)
    with pytest.raises(Exception, match="gate"):
        tiny_editor.edit(EIFFEL, evaluate=False, gate="tokens")


def test_only_the_adapter_in_training_gets_gradients_and_patches_share_adapter_memory(
        tiny_editor, tmp_path, monkeypatch):
    """Training optimises exactly the new patch's adapter (its parameters handed to the loop,
    not found by a walk over every adapter); afterwards every adapter is frozen; a loaded
    patch's weights are the adapter's own tensors (held once in memory)."""
    import knowpatch.methods.sft as sft

    a = tiny_editor.edit(EIFFEL, evaluate=False, **FAST)
    seen = {}
    original = sft.sft_train

    def spy(model, *args, params=None, **kwargs):
        seen["params"] = params
        seen["grad"] = {id(p) for p in model.parameters() if p.requires_grad}
        return original(model, *args, params=params, **kwargs)

    monkeypatch.setattr(sft, "sft_train", spy)
    before_a = {k: v.clone() for k, v in a.weights.items()}
    b = tiny_editor.edit(KREMLIN, evaluate=False, **FAST)
    layers = lora_layers(tiny_editor.model).values()
    b_params = [p for layer in layers for part in (layer.lora_A, layer.lora_B)
                for p in part[b.id].parameters()]
    assert {id(p) for p in seen["params"]} == {id(p) for p in b_params} == seen["grad"]
    assert not any(p.requires_grad for p in tiny_editor.model.parameters())
    assert all(torch.equal(a.weights[k], v) for k, v in before_a.items())
    for patch in (a, b):  # same storage as the live adapter
        for layer_name, layer in lora_layers(tiny_editor.model).items():
            key = f"base_model.model.{layer_name}.lora_A.weight"
            assert patch.weights[key].data_ptr() == layer.lora_A[patch.id].weight.data_ptr()
    # a patch loaded from disk is held once too, and still saves what it loaded
    b.save(tmp_path / "b")
    tiny_editor.remove(b)
    loaded = tiny_editor.apply(Patch.load(tmp_path / "b"))
    layer_name, layer = next(iter(lora_layers(tiny_editor.model).items()))
    key = f"base_model.model.{layer_name}.lora_B.weight"
    assert loaded.weights[key].data_ptr() == layer.lora_B[loaded.id].weight.data_ptr()
    loaded.save(tmp_path / "b2")
    again = Patch.load(tmp_path / "b2")
    assert all(torch.equal(again.weights[k], v) for k, v in b.weights.items())


def test_rows_scored_together_match_rows_scored_one_by_one():
    torch.manual_seed(0)
    router = Router()
    for i in range(30):  # patches of 1..4 subject tokens, one or two key variants
        n = 1 + i % 4
        variant = torch.tensor([0] * n + ([1] * n if i % 3 == 0 else []))
        keys = torch.nn.functional.normalize(torch.randn(len(variant), 8), dim=-1)
        router.add(f"p{i}", {"keys": keys, "variant": variant}, layer=1 + i % 2,
                   threshold=0.3 + 0.01 * i)
    # 70 rows: more than one chunk of ROW_CHUNK rows per product
    hidden = [{1: torch.randn(t, 8), 2: torch.randn(t, 8)} for t in (1, 5, 9, 0, 3) * 14]
    together = router.score_rows(hidden, keep=None)
    kept = router.score_rows(hidden, keep=3)  # the default keeps 16 of the 30
    fired_any = 0
    for h, (scores, fired), (few, fired_few) in zip(hidden, together, kept):
        alone = router.score(h)
        assert scores.keys() == alone.keys()
        for p in alone:
            assert scores[p] == pytest.approx(alone[p], abs=1e-6)
        assert router.decide(scores, fired).fired == router.decide(alone).fired
        # keep=3: the same fires; the fired patches' scores and each layer's 3 best, exact
        assert fired_few == fired
        assert set(fired) <= set(few) and len(few) <= len(set(fired)) + 3 * 2
        assert (not alone) or max(alone, key=alone.get) in few
        assert all(few[p] == pytest.approx(alone[p], abs=1e-6) for p in few)
        fired_any += len(fired)
    assert fired_any > 0  # the thresholds let some fire: the comparison covers fired patches


def test_answer_gate_acts_on_the_query_and_the_answer_then_the_base_writes(tiny_editor, tiny_dir):
    """gate=answer: in a routed generation the adapter acts on the prompt and on the first
    n-1 generated tokens (n = the answer's tokens), then the base weights continue, reading
    the edited context through the cache. Checked against the same steps run by hand."""
    req = EditRequest("The Eiffel Tower is located in the city of", "Reykjavik Harbour",
                      subject="Eiffel Tower")
    patch = tiny_editor.edit(req, evaluate=False, gate="answer", **FAST)
    n = patch.manifest["router"]["answer_tokens"]
    assert n >= 2 and patch.manifest["learnt"]
    routed = tiny_editor.generate(req.prompt, max_new_tokens=n + 4)[0]
    assert routed.startswith(" Reykjavik Harbour")
    bank, model = bank_with(tiny_dir, patch)  # the same steps on a copy of the model
    ids = torch.tensor([tiny_editor.tokenizer(req.prompt)["input_ids"]])
    out, tokens = None, []
    with torch.no_grad():
        for step in range(n + 4):
            bank.activate([patch.id] if step < n else [])  # step 0: the prompt's forward
            if out is None:
                out = model(input_ids=ids, use_cache=True)
            else:
                out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=out.past_key_values,
                            use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    assert routed == tiny_editor.tokenizer.decode(tokens, skip_special_tokens=True)


def test_handoff_gate_answers_then_the_base_model_rereads_and_writes(tiny_editor, tiny_dir):
    """gate=handoff: the adapter acts on the prompt and the first n-1 generated tokens, as
    gate=answer; then the rows' cache is replaced by the base weights' states of prompt +
    answer, so the text after the answer is the base model's greedy continuation of that
    text. Checked against the same steps run by hand, alone and in a left-padded batch
    beside a row the patch does not fire on (which stays the base model's)."""
    req = EditRequest("The Eiffel Tower is located in the city of", "Reykjavik Harbour",
                      subject="Eiffel Tower")
    patch = tiny_editor.edit(req, evaluate=False, gate="handoff", **FAST)
    n = patch.manifest["router"]["answer_tokens"]
    assert n >= 2 and patch.manifest["learnt"] and patch.manifest["config"]["gate"] == "handoff"
    routed = tiny_editor.generate(req.prompt, max_new_tokens=n + 5)[0]
    assert routed.startswith(" Reykjavik Harbour")
    bank, model = bank_with(tiny_dir, patch)  # the same steps on a copy of the model
    tok = tiny_editor.tokenizer
    prompt = tok(req.prompt)["input_ids"]
    tokens: list[int] = []
    with torch.no_grad():
        bank.activate([patch.id])  # the answer: as gate=answer
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
        for _ in range(1, n):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=out.past_key_values,
                        use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
        bank.activate([])  # then the base model reads prompt + answer afresh
        out = model(input_ids=torch.tensor([prompt + tokens]), use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
        for _ in range(4):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=out.past_key_values,
                        use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    assert routed == tok.decode(tokens, skip_special_tokens=True)
    # gate=answer keeps the edited states of the prompt: another text after the answer
    answer_gate = tiny_editor.edit(req, evaluate=False, gate="answer", **FAST)
    assert tiny_editor.generate(req.prompt, patches=[answer_gate], max_new_tokens=n + 5)[0] != routed
    # a batch: the edited row padded on the left beside a longer row the patch ignores
    other = "Some unrelated and rather longer sentence about the weather in the north of"
    batch = tiny_editor.generate([req.prompt, other], patches=[patch], max_new_tokens=n + 5)
    assert batch[0] == routed
    assert batch[1] == tiny_editor.generate([req.prompt, other], patches=[],
                                            max_new_tokens=n + 5)[1]


def test_handoff_generation_logs_no_library_warning(tiny_editor):
    """The handoff's re-read takes the new cache from the model's output by its current
    name: reading the old one (`past_key_values`) logs a deprecation on transformers 5."""
    import logging

    heard: list[str] = []

    class Heard(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            heard.append(record.getMessage())

    req = EditRequest("The Eiffel Tower is located in the city of", "Reykjavik Harbour",
                      subject="Eiffel Tower")
    patch = tiny_editor.edit(req, evaluate=False, gate="handoff", **FAST)
    handler, library = Heard(logging.WARNING), logging.getLogger("transformers")
    library.addHandler(handler)
    once = getattr(logging.Logger.warning_once, "cache_clear", None)
    if once is not None:  # transformers says some things once per process
        once()
    try:
        text = tiny_editor.generate(req.prompt, patches=[patch], max_new_tokens=8)[0]
    finally:
        library.removeHandler(handler)
    assert text.startswith(" Reykjavik Harbour") and heard == []


def test_rep_counts_generations_that_repeat_the_answer():
    from knowpatch.fluency import repetition

    texts = ["Prescott Prescott and prescott.", "a Prescott b Prescott", "Prescotts x3 Prescott"]
    assert repetition(texts, ["Prescott"]) == pytest.approx(100 / 3)
    assert repetition(texts, [" Prescott", "b"]) == pytest.approx(100 / 3)
    assert repetition(texts, ["Paris"]) == 0.0
    assert repetition([], ["Paris"]) is None


def test_keep_term_trains_under_the_answer_gate_and_holds_the_text_after_the_answer(tiny_editor,
                                                                                     tiny_dir):
    """keep_weight: the text the base model writes after "prompt + answer" is trained to
    read as the base model reads it, with the adapter off on it (gate=answer) as in a routed
    generation. The edit is still learnt, and the edited model's predictions on that text
    stay closer to the base model's than without the term."""
    from knowpatch.methods import common
    from knowpatch.methods.sft import prepare_chunk

    tok = tiny_editor.tokenizer
    with tiny_editor.using([]) as base:
        keep = common.keep_examples(base, tok, [EIFFEL], tokens=8, seed=0)
    assert len(keep[0].target_ids) == 8
    head = common.encode_completion(tok, EIFFEL.prompt, EIFFEL.target_new)
    assert keep[0].prompt_ids == head[0] + head[1]
    with tiny_editor.using([]) as base:  # several requests of other lengths: one batch
        two = common.keep_examples(base, tok, [EIFFEL, UNRELATED_REQ], tokens=8, seed=0)
    assert [len(e.target_ids) for e in two] == [8, 8]
    assert two[1].prompt_ids == sum(common.encode_completion(tok, UNRELATED_REQ.prompt, "x"), [])
    assert tok.pad_token_id not in two[1].target_ids[:1]

    def kl_after_answer(patch) -> float:
        batch = common.collate(keep, tok.pad_token_id, torch.device("cpu"))
        bank, model = bank_with(tiny_dir, patch)  # the patch on a copy of the model
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            ref = common.continuation_logprobs(model(**inputs).logits, batch)
            gate = torch.ones(batch["input_ids"].shape)
            gate[0, len(keep[0].prompt_ids):] = 0
            bank.activate([patch.id])
            with bank.gated(patch.id, gate):
                logits = model(**inputs).logits
        return float(common.kl_to_reference(ref, common.continuation_logprobs(logits, batch)))

    plain = tiny_editor.edit(EIFFEL, evaluate=False, gate="answer", keep_weight=0.0, **FAST)
    without = kl_after_answer(plain)
    tiny_editor.remove(plain)
    kept = tiny_editor.edit(EIFFEL, evaluate=False, gate="answer", keep_weight=5.0,
                            keep_tokens=8, **FAST)
    assert kept.manifest["learnt"]
    assert kl_after_answer(kept) < without
    # the training gate: every edit row everywhere, the kept text not after the answer
    cfg = lora_config(gate="answer", keep_weight=1.0, keep_tokens=8, prefixes=0)
    with tiny_editor.using([]):
        chunk = prepare_chunk(tok, [EIFFEL], cfg, (), lambda: tiny_editor.using([]), True,
                              torch.device("cpu"))
    gate = chunk.batch["gate"]
    assert gate[0].all() and gate[1, :len(keep[0].prompt_ids)].all()
    assert not gate[1, len(keep[0].prompt_ids):].any()


def lora_config(**kw):
    from knowpatch.methods.lora_sft import Config

    return Config(**kw)


def test_last_gate_acts_on_the_query_last_token_and_the_answer_then_the_base_writes(tiny_editor,
                                                                                    tiny_dir):
    """gate=last: in a routed generation the adapter acts at the prompt's last token and on
    the first n-1 generated tokens, never on the rest of the prompt (whose cached states stay
    the base model's). Checked against the same steps run by hand."""
    req = EditRequest("The Eiffel Tower is located in the city of", "Reykjavik Harbour",
                      subject="Eiffel Tower")
    patch = tiny_editor.edit(req, evaluate=False, gate="last", **FAST)
    n = patch.manifest["router"]["answer_tokens"]
    assert n >= 2 and patch.manifest["learnt"] and patch.manifest["config"]["gate"] == "last"
    routed = tiny_editor.generate(req.prompt, max_new_tokens=n + 4)[0]
    assert routed.startswith(" Reykjavik Harbour")
    bank, model = bank_with(tiny_dir, patch)  # the same steps on a copy of the model
    ids = torch.tensor([tiny_editor.tokenizer(req.prompt)["input_ids"]])
    last = torch.zeros(ids.shape)
    last[0, -1] = 1.0
    with torch.no_grad():
        bank.activate([patch.id])
        with bank.gated(patch.id, last):
            out = model(input_ids=ids, use_cache=True)
        bank.activate([])
        base = model(input_ids=ids).logits[0]
        tokens = [int(out.logits[0, -1].argmax())]
        assert torch.equal(out.logits[0, :-1], base[:-1])  # the prompt before its last token
        for step in range(1, n + 4):
            bank.activate([patch.id] if step < n else [])
            out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=out.past_key_values,
                        use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    assert routed == tiny_editor.tokenizer.decode(tokens, skip_special_tokens=True)
    with pytest.raises(Exception, match="keep_weight"):
        tiny_editor.edit(req, evaluate=False, gate="last", keep_weight=1.0)
    with pytest.raises(Exception, match="gate"):
        tiny_editor.edit(req, evaluate=False, gate="last", route=False)


def test_token_index_narrows_scoring_and_keeps_the_decisions(tiny_editor):
    """The router scores a query only against patches whose subject tokens (of one key
    variant) all occur in it; on these prompts that decides exactly as scoring every patch.
    Keys without token ids (patches made before the index) are always candidates."""
    a = tiny_editor.edit(EIFFEL, evaluate=False, **FAST)
    b = tiny_editor.edit(EditRequest("Angela Merkel speaks the language", "Danish",
                                     subject="Angela Merkel"), evaluate=False, **FAST)
    from knowpatch.router import canonical_tokens, word_edges

    tok = tiny_editor.tokenizer
    router = Router(canonical=canonical_tokens(tok), edges=word_edges(tok))  # as the editor's
    for patch in (a, b):
        router.add(patch.id, patch.keys, 1, 0.75)
    assert "tokens" in a.keys and len(a.keys["tokens"]) == len(a.keys["keys"])
    prompts = [EIFFEL.prompt, "The Eiffel Tower stands in", "Angela Merkel was born in",
               "The Eiffel Tower and Angela Merkel", UNRELATED, "The Tower of London is"]
    rows = [tok(p)["input_ids"] for p in prompts]
    assert [sorted(router.candidates(r)) for r in rows] == [
        [a.id], [a.id], [b.id], sorted([a.id, b.id]), [], []]
    # a subject opening the query is spelled without its leading space: the same for the index
    assert a.id in router.candidates(tok("Eiffel Tower at night")["input_ids"])
    indexed = [r.fired for r in tiny_editor.route(prompts)]
    with tiny_editor.options(index=False):
        assert [r.fired for r in tiny_editor.route(prompts)] == indexed
    assert [r.fired for r in tiny_editor.route(prompts)] == indexed  # the index is back
    assert indexed[0] == [a.id] and indexed[4] == []
    old_style = {k: v for k, v in b.keys.items() if k != "tokens"}
    router.add(b.id, old_style, 1, 0.75)
    assert b.id in router.candidates(rows[4])  # no token ids: always scored
    router.remove(a.id)
    assert router.candidates(rows[0]) == {b.id}
    tiny_editor.remove(a)
    assert not tiny_editor.is_routed(a.id) and tiny_editor.is_routed(b.id)


def test_token_index_wants_the_subject_spelled_whole_and_in_order(tiny_editor):
    """A patch is a candidate only where the query holds its subject's tokens one after the
    other, not inside a longer word: the false fires that bench-router found at 1,000 real
    CounterFact keys ("Re!" keyed at "Re" fired on "Reuchlin"; "Bundesautobahn 5" on
    "Bundesautobahn 952"; "The Motors" on a query with "the" and "Motors" apart)."""
    from knowpatch.router import canonical_tokens, word_edges

    tok = tiny_editor.tokenizer
    router = Router(canonical=canonical_tokens(tok), edges=word_edges(tok))

    def add(name: str, subject_text: str, prompt: str) -> None:
        ids, span = subject_token_span(tok, prompt, subject_text)
        tokens = torch.tensor([ids[i] for i in span])
        router.add(name, {"keys": torch.nn.functional.normalize(torch.randn(len(span), 8), dim=-1),
                          "variant": torch.zeros(len(span), dtype=torch.long), "tokens": tokens}, 1, 0.75)

    add("re", "Re!", "Re! was written in")
    add("autobahn", "Bundesautobahn 5", "Bundesautobahn 5 is owned by")
    add("motors", "The Motors", "The Motors is owned by")

    def cands(text: str) -> list[str]:
        return sorted(router.candidates(tok(text)["input_ids"]))

    assert cands("Re! is a magazine from") == ["re"]
    assert cands("The language used by Johann Reuchlin is") == []
    assert cands("The language of Star Wars: Episode III – Revenge of the Sith is") == []
    assert cands("Bundesautobahn 5 runs through") == ["autobahn"]
    assert cands("Bundesautobahn 952, by") == []
    assert cands("the motors of the band") == ["motors"]  # case and leading space: one word
    assert cands("Then, the British team … Pak Suzuki Motors is owned by") == []
    router.opens = router.ends = frozenset()  # without the word rule, "Re" is in "Reuchlin"
    assert cands("The language used by Johann Reuchlin is") == ["re"]


def test_calibrate_measures_each_layer_and_writes_a_config(tiny_dir, tmp_path):
    import json

    import yaml
    from typer.testing import CliRunner

    from knowpatch.bench.calibrate import auc, threshold_at
    from knowpatch.cli import app

    assert auc([0.9, 0.8], [0.1, 0.8]) == pytest.approx(0.875)
    # 1 of 4 negatives may reach it: the threshold sits just above the second highest
    assert threshold_at([0.9, 0.7, 0.5], [0.95, 0.6, 0.2, 0.1], 25.0) == (0.601, pytest.approx(200 / 3), 25.0)
    data = _three_subjects(tmp_path)
    res = CliRunner().invoke(app, ["calibrate", "--model", str(tiny_dir), "--data", str(data),
                                   "--n", "3", "--layers", "1,2", "--max-false-fire", "0",
                                   "--out", str(tmp_path / "cal")])
    assert res.exit_code == 0, res.stderr
    report = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert [r["layer"] for r in report["layers"]] == [1, 2]
    for row in report["layers"]:
        assert row["positives"] == 3 and row["negatives"] >= 3 and row["false_fire"] == 0.0
    chosen = yaml.safe_load((tmp_path / "cal" / "router.yaml").read_text())
    best = max(report["layers"], key=lambda r: (r["recall"], -r["layer"]))
    assert chosen == {"route_layer": best["layer"], "route_threshold": best["threshold"]}
    assert best["recall"] == 100.0  # paraphrases keep the edit prompt's prefix
    res = CliRunner().invoke(app, ["calibrate", "--model", str(tiny_dir), "--data", str(data),
                                   "--layers", "1,9", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "layers" in res.stderr
