"""Architectures found by shape: the same edits, routes, PEFT files, deltas and merges on
tiny random models of several families (Llama, Qwen2, Gemma3, GPT-2's Conv1D layers,
Phi-3's fused projections, Mistral), each built here from its transformers config class
with the real SmolLM2 tokenizer. Nothing in knowpatch may dispatch on a family's name: if a
family works, it is because its modules were found by their shapes."""

from __future__ import annotations

import pytest
import torch

from knowpatch import Editor, EditRequest, Patch
from knowpatch.patches import merge_into_base

PROMPT = "The Eiffel Tower is located in the city of"
PARAPHRASE = "Where is the Eiffel Tower? In"
UNRELATED = "The capital of Germany is"
EIFFEL = EditRequest(PROMPT, "Rome", subject="Eiffel Tower")
# The tiny-model settings of tests/test_editor_tiny.py and tests/test_router.py: a random
# model learns fast with a large learning rate, and routes with a strict threshold.
FAST = {"lr": 3e-2, "max_steps": 60, "modules": ["all"], "layers": "all", "anchor_weight": 0.0,
        "prefixes": 0, "route_threshold": 0.9}
FULL = {"lr": 1e-2, "max_steps": 30, "prefixes": 0, "anchor_weight": 0.0}

# Shared by every family: 2 layers, hidden 64, a context of 64, wide random weights (logits
# wide enough to express an edit).
COMMON = {"num_hidden_layers": 2, "max_position_embeddings": 64, "initializer_range": 0.2}


def _llama(t):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=True, **t)


def _qwen2(t):
    from transformers import Qwen2Config  # q/k/v biases, untied output matrix

    return Qwen2Config(hidden_size=64, intermediate_size=176, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=False, **t)


def _gemma3(t):
    from transformers import Gemma3TextConfig  # scaled embeddings, sliding + full attention

    return Gemma3TextConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                            sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                            **t)


def _gpt2(t):
    from transformers import GPT2Config  # Conv1D layers: weights stored (in, out)

    return GPT2Config(n_embd=64, n_inner=176, n_head=4, n_layer=t.pop("num_hidden_layers"),
                      n_positions=t.pop("max_position_embeddings"), **t)


def _phi3(t):
    from transformers import Phi3Config  # fused qkv_proj and gate_up_proj

    return Phi3Config(hidden_size=64, intermediate_size=176, num_attention_heads=4,
                      num_key_value_heads=4, original_max_position_embeddings=64, **t)


def _mistral(t):
    from transformers import MistralConfig

    return MistralConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, sliding_window=32, **t)


ARCHITECTURES = {"llama": _llama, "qwen2": _qwen2, "gemma3": _gemma3, "gpt2": _gpt2,
                 "phi3": _phi3, "mistral": _mistral}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch_dir(request, tmp_path_factory, tokenizer):
    """The family's tiny random model, saved as an HF folder with the SmolLM2 tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = ARCHITECTURES[request.param]({
        **COMMON, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id})
    model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _editor(folder, store) -> Editor:
    return Editor.from_pretrained(str(folder), device="cpu", store=store, progress=False)


@pytest.fixture(scope="module")
def lora(arch_dir, tmp_path_factory):
    """One routed LoRA SFT edit per family, shared by the checks below: (editor, patch)."""
    editor = _editor(arch_dir, tmp_path_factory.mktemp("store"))
    patch = editor.edit(EIFFEL, "lora-sft", **FAST)
    return editor, patch


def _logits(model, tokenizer, prompts=(PROMPT, PARAPHRASE, UNRELATED)):
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        return model(**enc).logits


def _forced(editor: Editor, patch: Patch, prompts=(PROMPT, PARAPHRASE, UNRELATED)):
    """The editor's logits with `patch` on for every prompt (routing off)."""
    editor.routing = False
    try:
        with editor.using([patch]) as model:
            return _logits(model, editor.tokenizer, prompts)
    finally:
        editor.routing = True


def test_lora_edit_learns(lora):
    editor, patch = lora
    assert patch.manifest["learnt"] is True
    assert patch.scores["rel"] == 100.0
    assert editor.generate(PROMPT, max_new_tokens=2)[0].startswith(" Rome")


def test_routed_patch_fires_on_its_subject_only(lora):
    editor, patch = lora
    routes = editor.route([PROMPT, PARAPHRASE, UNRELATED, "The Eiffel Tower stands in", "My favourite food is", "I visited the Eiffel Tower in"])
    print("SCORES", [round(list(r.scores.values())[0],3) for r in routes])
    routes = routes[:3]
    assert [r.fired for r in routes] == [[patch.id], [patch.id], []], [r.scores for r in routes]
    # routed, the unrelated prompt is answered by the base model exactly
    with editor.using([]) as base:
        plain = _logits(base, editor.tokenizer, [UNRELATED])
    with editor.using([patch]) as model:
        routed = _logits(model, editor.tokenizer, [UNRELATED])
    assert torch.equal(routed, plain)


def test_patch_loads_in_plain_peft(lora, arch_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    editor, patch = lora
    ours = _forced(editor, patch)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(arch_dir),
                                      str(patch.path)).eval()
    theirs = _logits(plain, editor.tokenizer)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # routed, the patch fires on its own prompt and runs as a batched product: the same
    # sums in another kernel
    with editor.using([patch]) as model:
        routed = _logits(model, editor.tokenizer, [PROMPT])
    torch.testing.assert_close(routed, theirs[:1, -routed.shape[1]:], atol=1e-4, rtol=1e-4)


def test_merged_lora_patch_gives_the_patched_logits(lora, arch_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    editor, patch = lora
    base = AutoModelForCausalLM.from_pretrained(arch_dir)
    out = merge_into_base(Patch.load(patch.path), base, editor.tokenizer, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(merged, editor.tokenizer), _forced(editor, patch),
                               atol=1e-4, rtol=1e-4)


def test_full_sft_learns_merges_and_removes_bit_for_bit(arch_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    editor = _editor(arch_dir, tmp_path / "store")
    before = {n: t.clone() for n, t in editor.model.state_dict().items()}
    patch = editor.edit(EIFFEL, "full-sft", **FULL)
    assert patch.kind == "delta" and patch.manifest["learnt"] is True
    assert patch.scores["rel"] == 100.0
    edited = _logits(editor.model, editor.tokenizer)
    base = AutoModelForCausalLM.from_pretrained(arch_dir)
    out = merge_into_base(Patch.load(patch.path), base, editor.tokenizer, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(merged, editor.tokenizer), edited, atol=1e-5, rtol=1e-5)
    editor.remove(patch)
    after = editor.model.state_dict()
    assert after.keys() == before.keys()
    assert [n for n, t in before.items() if not torch.equal(after[n], t)] == []
