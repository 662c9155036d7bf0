"""Editing methods: one module per method, each with its `Config` and its `train`."""

from __future__ import annotations

from types import ModuleType

from ..errors import KnowpatchError
from . import lora_sft

METHODS: dict[str, ModuleType] = {lora_sft.NAME: lora_sft}


def get_method(name: str) -> ModuleType:
    try:
        return METHODS[name]
    except KeyError:
        raise KnowpatchError(
            f"method: unknown method {name!r} (available: {', '.join(METHODS)})"
        ) from None
