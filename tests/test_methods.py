"""Full SFT, FT-M and DPO (tiny model), the DPO losses by hand, `method="auto"`."""

import json
import math

import pytest
import torch

from knowpatch import EditRequest, KnowpatchError, Patch
from knowpatch.methods import choose_method
from knowpatch.methods.dpo import completion_logprobs, preference_loss
from knowpatch.patches import ADAPTER_WEIGHTS, DELTA_WEIGHTS

PROMPT = "The Eiffel Tower is located in the city of"
GERMANY = "The capital of Germany is"
FULL = {"lr": 1e-2, "max_steps": 30, "prefixes": 0, "anchor_weight": 0.0}


def _req(**kw):
    return EditRequest(PROMPT, "Rome", subject="Eiffel Tower", locality=[GERMANY], **kw)


def _logits(editor, prompts=(PROMPT, GERMANY)):
    enc = editor.tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
    with editor.using(None) as model, torch.no_grad():
        return model(**enc).logits


# ---- DPO losses against hand computation ------------------------------------------------
def test_preference_losses_by_hand():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    # h = (pc - rc) - (pr - rr) = [1 - (-1), 0 - 1] = [2, -1]
    beta = 0.5
    sig = preference_loss(pc, pr, rc, rr, loss="sigmoid", beta=beta)
    assert sig.tolist() == pytest.approx([math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(0.5))])
    ipo = preference_loss(pc, pr, rc, rr, loss="ipo", beta=beta)
    assert ipo.tolist() == pytest.approx([(2 - 1) ** 2, (-1 - 1) ** 2])  # 1/(2β) = 1
    hinge = preference_loss(pc, pr, rc, rr, loss="hinge", beta=beta)
    assert hinge.tolist() == pytest.approx([0.0, 1.5])  # max(0, 1 - βh)


def test_completion_logprobs_sum_only_the_labelled_tokens():
    logits = torch.zeros(1, 4, 3)
    logits[0, 1, 2] = math.log(2.0)  # position 1 predicts token 2 with p = 2/4
    labels = torch.tensor([[-100, -100, 2, 0]])  # tokens 2 and 3 are the completion
    # p(label 2 at pos 2 | pos 1) = 0.5 ; p(label 0 at pos 3 | pos 2) = 1/3
    assert completion_logprobs(logits, labels).item() == pytest.approx(math.log(0.5) + math.log(1 / 3))


# ---- full SFT ------------------------------------------------------------------------------
def test_full_sft_delta_patch_restores_base_bit_for_bit(tiny_editor):
    base = _logits(tiny_editor)
    patch = tiny_editor.edit(_req(), method="full-sft", **FULL)
    assert patch.kind == "delta" and patch.manifest["learnt"] is True
    assert patch.scores["rel"] == 100.0
    assert (patch.path / DELTA_WEIGHTS).is_file() and not (patch.path / ADAPTER_WEIGHTS).exists()
    # the tied embedding / output matrix is one tensor, stored once
    names = set(patch.weights)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    edited = _logits(tiny_editor)
    assert not torch.equal(edited, base)
    tiny_editor.remove(patch)
    assert torch.equal(_logits(tiny_editor), base)  # bit for bit
    loaded = Patch.load(patch.path)
    assert loaded.kind == "delta"
    tiny_editor.apply(loaded)
    torch.testing.assert_close(_logits(tiny_editor), edited, atol=1e-5, rtol=0)
    tiny_editor.remove(loaded)
    assert torch.equal(_logits(tiny_editor), base)


def test_delta_and_lora_patches_stack_and_unstack(tiny_editor):
    base = _logits(tiny_editor)
    delta = tiny_editor.edit(_req(), method="full-sft", evaluate=False, **FULL)
    # the LoRA patch is trained on the base weights and answers on top of the delta, whose
    # edit spills onto every prompt of this tiny model: it needs the full margin it learnt
    # (keep_weight's preservation term trades some of it for text after the answer)
    lora = tiny_editor.edit(EditRequest(GERMANY, "Paris"), evaluate=False, lr=3e-2,
                            modules=["all"], layers="all", prefixes=0, max_steps=60,
                            keep_weight=0.0)
    assert lora.manifest["subjects_inferred"] == {"0": "Germany"}
    assert tiny_editor.route([GERMANY])[0].fired == [lora.id]
    assert tiny_editor.generate([PROMPT, GERMANY], max_new_tokens=1) == [" Rome", " Paris"]
    tiny_editor.remove(delta)
    tiny_editor.remove(lora)
    assert torch.equal(_logits(tiny_editor), base)


def test_ft_m_trains_one_projection_of_one_layer(tiny_editor):
    patch = tiny_editor.edit(_req(), method="ft-m", evaluate=False, layers="1", lr=5e-2,
                             max_steps=40, prefixes=0)
    assert list(patch.weights) == ["model.layers.1.mlp.down_proj.weight"]
    assert patch.manifest["config"]["modules"] == ["mlp_out"]


def test_norm_bound_keeps_every_weight_in_its_box(tiny_editor):
    eps = 1e-3
    patch = tiny_editor.edit(_req(), method="full-sft", evaluate=False,
                             **{**FULL, "norm_bound": eps, "max_steps": 5})
    assert max(d.abs().max().item() for d in patch.weights.values()) <= eps * (1 + 1e-4)


def test_bfloat16_delta_halves_the_storage(tiny_editor):
    patch = tiny_editor.edit(_req(), method="full-sft", evaluate=False,
                             **{**FULL, "delta_dtype": "bfloat16"})
    assert all(d.dtype == torch.bfloat16 for d in patch.weights.values())


def test_full_sft_bad_settings_name_the_field(tiny_editor):
    with pytest.raises(KnowpatchError, match="norm_bound"):
        tiny_editor.edit(_req(), method="full-sft", norm_bound=0)
    with pytest.raises(KnowpatchError, match="layers"):
        tiny_editor.edit(_req(), method="ft-m", layers="7")  # the tiny model has 2 layers
    with pytest.raises(KnowpatchError, match="modules"):
        tiny_editor.edit(_req(), method="full-sft", modules=["no_such_proj"])
    assert tiny_editor.stored() == []  # nothing written


# ---- DPO --------------------------------------------------------------------------------
def test_dpo_fact_edit_rejects_the_ground_truth(tiny_editor):
    patch = tiny_editor.edit(_req(ground_truth="Paris"), method="dpo", evaluate=False,
                             lr=3e-2, modules=["all"], layers="all", prefixes=0, max_steps=60)
    assert patch.manifest["rejected"] == ["Paris"]
    assert tiny_editor.generate(PROMPT, max_new_tokens=1) == [" Rome"]


def test_dpo_without_ground_truth_rejects_the_models_own_answer(tiny_editor):
    own = tiny_editor.generate(PROMPT, max_new_tokens=8)[0]
    patch = tiny_editor.edit(_req(), method="dpo", evaluate=False, lr=3e-2, modules=["all"],
                             layers="all", prefixes=0, max_steps=60, loss="ipo")
    rejected = patch.manifest["rejected"][0]
    assert rejected and own.strip().startswith(rejected)


def test_dpo_full_parameters_gives_a_delta_patch(tiny_editor):
    base = _logits(tiny_editor)
    patch = tiny_editor.edit(_req(ground_truth="Paris"), method="dpo", evaluate=False,
                             train="full", modules=["*"], layers="all", lr=1e-2, prefixes=0,
                             loss="hinge", max_steps=30)
    assert patch.kind == "delta"
    assert tiny_editor.generate(PROMPT, max_new_tokens=1) == [" Rome"]
    tiny_editor.remove(patch)
    assert torch.equal(_logits(tiny_editor), base)


def test_dpo_bad_loss_is_refused(tiny_editor):
    with pytest.raises(KnowpatchError, match="loss"):
        tiny_editor.edit(_req(), method="dpo", loss="cubic")


# ---- method auto -----------------------------------------------------------------------
def test_auto_picks_by_the_documented_rule(tiny_editor):
    # measured (README "Many facts at once"): routed LoRA at every size; a patch per fact
    # where the caller allows it, otherwise one patch keyed by all the subjects
    assert choose_method(1) == ("lora-sft", "1 fact: LoRA SFT, a small patch routed by its subject")
    for n in (2, 100, 1000):
        assert choose_method(n)[0] == choose_method(n, one_patch=False)[0] == "lora-sft"
        assert choose_method(n, one_patch=False)[1].startswith(f"{n} facts: a LoRA SFT patch per fact")
        assert choose_method(n)[1].startswith(f"{n} facts in one patch: LoRA SFT routed by all")
    assert choose_method(3, preferences=True)[0] == "dpo"
    patch = tiny_editor.edit(_req(), method="auto", evaluate=False, prefixes=0)
    assert patch.manifest["method"] == "lora-sft"
    assert patch.manifest["chosen_by"].startswith("auto: 1 fact")


def test_patch_json_records_the_kind(tiny_editor):
    patch = tiny_editor.edit(_req(), method="ft-m", evaluate=False, layers="0", lr=5e-2,
                             prefixes=0)
    manifest = json.loads((patch.path / "patch.json").read_text())
    assert manifest["kind"] == "delta" and manifest["method"] == "ft-m"


def test_row_logprobs_from_the_labelled_positions_equal_completion_logprobs():
    from knowpatch.methods.common import IGNORE, next_labels, predicted
    from knowpatch.methods.dpo import row_logprobs

    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.full((3, 6), IGNORE)
    labels[0, 2:5] = torch.tensor([1, 2, 3])
    labels[1, 1] = 7
    labels[2, 4:6] = torch.tensor([9, 10])
    where = predicted(labels)
    got = row_logprobs(logits[where], next_labels(labels)[where], where.nonzero()[:, 0], 3)
    torch.testing.assert_close(got, completion_logprobs(logits, labels))


# ---- training precision (bf16 autocast) -------------------------------------------------
def test_training_precision_rule(tiny_editor):
    from knowpatch.methods.lora_sft import Config
    from knowpatch.training import cpu_has_bf16, training_dtype

    model = tiny_editor.model
    assert training_dtype(model, "fp32") is None
    assert training_dtype(model, "bf16") is torch.bfloat16
    assert training_dtype(model, "auto") is (torch.bfloat16 if cpu_has_bf16() else None)
    assert training_dtype(torch.nn.Linear(2, 2).to(torch.bfloat16), "auto") is None
    with pytest.raises(ValueError, match="precision"):
        training_dtype(model, "fp16")
    with pytest.raises(ValueError, match="precision"):
        Config(precision="half")


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_bf16_training_runs_the_forward_in_bf16_and_keeps_fp32_weights(tiny_editor, precision):
    seen = []
    layer = next(m for n, m in tiny_editor.model.named_modules() if n.endswith("q_proj"))
    hook = layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        patch = tiny_editor.edit(_req(), method="lora-sft", precision=precision, lr=1e-2,
                                 prefixes=0, evaluate=False)
    finally:
        hook.remove()
    assert (torch.bfloat16 in seen) is (precision == "bf16")
    assert patch.manifest["precision"] == precision
    assert all(w.dtype == torch.float32 for w in patch.weights.values())
    with tiny_editor.using([]) as base, torch.no_grad():  # inference stays fp32
        seen.clear()
        hook = layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        base(**tiny_editor.tokenizer([PROMPT], return_tensors="pt"))
        hook.remove()
    assert seen == [torch.float32]


def test_bf16_training_forward_keeps_padding_masks_and_restores_the_model(tiny_editor):
    """Under `frozen_cast` (bf16 weight copies, SDPA switched to fp32) a left-padded short
    row gives the logits it gives alone, as in fp32; on exit the model is as it was."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from knowpatch.training import attention_implementation, autocast, frozen_cast

    model, tok = tiny_editor.model, tiny_editor.tokenizer
    weights = {n: p for n, p in model.named_parameters()}
    implementation = attention_implementation(model)
    texts = ["The Eiffel Tower is located in the city of", "Paris is"]
    batch = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    alone = tok(texts[1:], return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch).logits[:, -1].float()
        with frozen_cast(model, torch.bfloat16), autocast(model, torch.bfloat16):
            switched = attention_implementation(model)
            assert switched != implementation
            # the layers look the function up by that name at each forward: count the calls
            calls = []
            function = ALL_ATTENTION_FUNCTIONS[switched]
            AttentionInterface.register(switched, lambda *a, **k: calls.append(1) or function(*a, **k))
            try:
                low = model(**batch).logits[:, -1].float()
            finally:
                AttentionInterface.register(switched, function)
            assert len(calls) == model.config.num_hidden_layers
            low_alone = model(**alone).logits[:, -1].float()
    scale = ref.abs().max()
    assert (low - ref).abs().max() < 0.05 * scale
    assert (low[1] - low_alone[0]).abs().max() < 0.05 * scale
    assert attention_implementation(model) == implementation
    assert all(p is weights[n] and p.dtype == torch.float32 for n, p in model.named_parameters())


def test_bf16_weight_copies_are_kept_between_runs_until_the_weight_changes(tiny_editor):
    """The frozen weights' bf16 copies are made once and reused by the next training run;
    a weight written in place since (a delta applied, a restore) gets a fresh copy."""
    from knowpatch.training import frozen_cast

    layer = tiny_editor.model.model.layers[0].mlp.down_proj
    weight = layer.weight
    with frozen_cast(tiny_editor.model, torch.bfloat16):
        first = layer.weight
    with frozen_cast(tiny_editor.model, torch.bfloat16):
        second = layer.weight
    assert first.dtype == torch.bfloat16 and second is first
    assert layer.weight is weight
    with torch.no_grad():
        weight.add_(1.0)
    try:
        with frozen_cast(tiny_editor.model, torch.bfloat16):
            third = layer.weight
        assert third is not first
        assert torch.equal(third, weight.detach().to(torch.bfloat16))
    finally:
        with torch.no_grad():
            weight.sub_(1.0)


def test_dpo_micro_batches_train_as_one_batch(tiny_editor):
    """Pairs split into micro-batches (gradients summed over them) train the same adapter as
    all pairs in one batch: the loss is the same sum, only the memory a step holds differs."""
    pairs = [EditRequest(f"Question {i}: what is {w}?", f" {w} is fine.",
                         rejected=f" No {w} here at all, sorry.")
             for i, w in enumerate(["tea", "rain", "a boat", "the sea", "my cat"])]
    common = dict(heldout=0.0, save=False, max_steps=3, lr=1e-2, pref_margin=1e9, samples=0)
    one, _ = tiny_editor.edit_preferences(pairs, micro_batch_tokens=100_000, **common)
    many, _ = tiny_editor.edit_preferences(pairs, micro_batch_tokens=1, **common)
    assert one.steps == many.steps == 3
    assert one.weights.keys() == many.weights.keys()
    for name, w in one.weights.items():
        torch.testing.assert_close(many.weights[name], w, atol=1e-5, rtol=1e-4)
    assert max(float(w.abs().max()) for n, w in one.weights.items() if "lora_B" in n) > 1e-4


def test_dpo_micro_batches_keep_each_pair_whole():
    from knowpatch.methods.common import Example
    from knowpatch.methods.preference_batches import micro_batches

    pairs = [(Example([1, 2], [3] * k), Example([1, 2], [4] * (k + 1)) if k % 2 else None)
             for k in range(1, 7)]
    chunks = micro_batches(pairs, 0, torch.device("cpu"), budget=20)
    assert sum(c.n for c in chunks) == 6 and len(chunks) > 1
    for c in chunks:
        assert len(c.batch["input_ids"]) == c.n + len(c.rej_rows)  # chosen rows, then their rejected
        width = c.batch["input_ids"].shape[1]
        assert c.n == 1 or len(c.batch["input_ids"]) * width <= 20
