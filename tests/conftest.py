"""Fixtures: a tiny random Llama-style model with the real SmolLM2 tokenizer (fast plumbing
tests), and the real embedded SmolLM2 (a few focused tests)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

from knowpatch.models import ALIASES, converted_path


def _real_tokenizer():
    from transformers import AutoTokenizer

    cached = converted_path("smollm2-135m")
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    spec = ALIASES["smollm2-135m"]
    gguf = Path(str(importlib.metadata.distribution(spec.package).locate_file(spec.file)))
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="session")
def tokenizer():
    tok = _real_tokenizer()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer, hidden-64 random model saved as an HF folder (loadable by path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=176,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=True,
                         initializer_range=0.2,  # logits wide enough to express an edit
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_editor(tiny_dir, tmp_path):
    from knowpatch import Editor

    return Editor.from_pretrained(str(tiny_dir), device="cpu", store=tmp_path / "store",
                                  progress=False)


@pytest.fixture(scope="session")
def smol_editor(tmp_path_factory):
    from knowpatch import Editor

    return Editor.from_pretrained("smollm2-135m", device="cpu",
                                  store=tmp_path_factory.mktemp("smol-store"), progress=False)
