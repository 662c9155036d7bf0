"""Editing methods: one module per method, each with its `Config` and its `train`."""

from __future__ import annotations

from types import ModuleType

from ..errors import KnowpatchError
from . import dpo, ft_m, full_sft, lora_sft

METHODS: dict[str, ModuleType] = {m.NAME: m for m in (lora_sft, full_sft, ft_m, dpo)}


def get_method(name: str) -> ModuleType:
    try:
        return METHODS[name]
    except KeyError:
        raise KnowpatchError(
            f"method: unknown method {name!r} (available: {', '.join(METHODS)})"
        ) from None


AUTO = "auto"
AUTO_FULL_SFT_FROM = 100
"""`method="auto"` trains full SFT from this many facts in one patch on (LoRA's small adapter
is the better fit below it: fast, small, routable; large batches need the capacity)."""


def choose_method(n_requests: int, preferences: bool = False) -> tuple[str, str]:
    """The method `auto` picks, as DESIGN.md advises, and why (one line)."""
    if preferences:
        return dpo.NAME, "preference pairs: DPO shifts behaviour from (chosen, rejected) pairs"
    if n_requests >= AUTO_FULL_SFT_FROM:
        return full_sft.NAME, (f"{n_requests} facts in one patch (≥ {AUTO_FULL_SFT_FROM}): "
                               "full SFT has the capacity for large-scale editing")
    return lora_sft.NAME, (f"{n_requests} fact(s) (< {AUTO_FULL_SFT_FROM}): LoRA SFT is fast, "
                           "small and routable per subject")
