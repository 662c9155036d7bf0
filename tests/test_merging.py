"""Merged adapters (`knowpatch.merging`): one adapter whose ranks are two patches' ranks
concatenated gives the logits of the two applied together in PEFT."""

from __future__ import annotations

import json

import pytest
import torch

from knowpatch.errors import KnowpatchError
from knowpatch.merging import merged_weights, write_merged


def _adapter(model_dir, folder, seed, rank, alpha, modules, rslora=False):
    """A LoRA adapter of random (non-zero) weights saved by PEFT into `folder`."""
    from peft import LoraConfig, get_peft_model

    from knowpatch.models import load_model

    model, _ = load_model(str(model_dir), device="cpu")
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules,
                                            use_rslora=rslora, init_lora_weights=False))
    peft.save_pretrained(str(folder))
    return folder


def test_merged_adapter_equals_both_patches_applied_together(tiny_dir, tmp_path, tokenizer):
    from peft import PeftModel

    from knowpatch.models import load_model

    one = _adapter(tiny_dir, tmp_path / "one", 1, 4, 8, ["down_proj"])
    two = _adapter(tiny_dir, tmp_path / "two", 2, 8, 32, ["down_proj", "q_proj"], rslora=True)
    merged = write_merged([one, two], tmp_path / "merged")
    config = json.loads((merged / "adapter_config.json").read_text())
    assert config["r"] == 12 and config["lora_alpha"] == 12.0
    assert config["target_modules"] == ["down_proj", "q_proj"]

    ids = tokenizer(["The Eiffel Tower is located in the city of"], return_tensors="pt")
    model, _ = load_model(str(tiny_dir), device="cpu")
    base = model(**ids).logits
    both = PeftModel.from_pretrained(model, str(one), adapter_name="one")
    both.load_adapter(str(two), adapter_name="two")
    both.base_model.set_adapter(["one", "two"])
    together = both(**ids).logits
    alone, _ = load_model(str(tiny_dir), device="cpu")
    as_one = PeftModel.from_pretrained(alone, str(merged))(**ids).logits
    assert (together - base).abs().max() > 1e-2  # the patches change the logits
    assert torch.allclose(as_one, together, atol=1e-4)


def test_a_module_one_patch_leaves_alone_gets_a_zero_block(tiny_dir, tmp_path):
    one = _adapter(tiny_dir, tmp_path / "one", 1, 4, 8, ["down_proj"])
    two = _adapter(tiny_dir, tmp_path / "two", 2, 4, 8, ["q_proj"])
    tensors, config = merged_weights([one, two])
    a = next(v for k, v in tensors.items() if k.endswith("q_proj.lora_A.weight"))
    b = next(v for k, v in tensors.items() if k.endswith("q_proj.lora_B.weight"))
    assert a.shape[0] == b.shape[1] == config["r"] == 8
    assert not a[:4].any() and not b[:, :4].any() and a[4:].any()


def test_a_non_lora_adapter_is_refused(tiny_dir, tmp_path):
    one = _adapter(tiny_dir, tmp_path / "one", 1, 4, 8, ["down_proj"])
    config = json.loads((one / "adapter_config.json").read_text())
    config["use_dora"] = True
    (one / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(KnowpatchError, match="DoRA"):
        merged_weights([one, one])
