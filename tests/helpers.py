"""Helpers for white-box tests of the parts an `Editor` owns: its model's LoRA layers read
from the model itself, and an adapter bank of the tests' own over a fresh copy of a model
(the editor's bank is its own; tests reach it only through the editor's verbs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def lora_layers(model) -> dict[str, Any]:
    """{module name: PEFT LoRA layer} of `model`: where adapters were added to it."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def bank_with(model_dir: str | Path, *patches):
    """A fresh copy of the model in `model_dir` with an adapter bank of its own holding
    `patches` (none active): `(bank, model)`."""
    from knowpatch.adapters import AdapterBank
    from knowpatch.models import load_model

    model, _ = load_model(str(model_dir), device="cpu")
    bank = AdapterBank(model)
    for patch in patches:
        bank.add(patch.id, patch.adapter_config)
        bank.load_weights(patch.id, dict(patch.weights.items()))
    bank.activate([])
    return bank, model
