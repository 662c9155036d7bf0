"""Editing methods: one module per method, each following the `Method` protocol."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from ..errors import KnowpatchError
from ..training import LoopResult
from . import dpo, ft_m, full_sft, lora_sft

log = logging.getLogger(__name__)


@runtime_checkable
class Method(Protocol):
    """What the editor needs of a method (each method is a module that provides it)."""

    NAME: str
    Config: type
    """The method's settings: a dataclass whose defaults work on the embedded model."""

    def kind(self, config: Any) -> str:
        """The kind of patch it makes with `config`: "lora" (an adapter) or "delta"."""
        ...

    def train(self, model: Any, tokenizer: Any, requests: list, config: Any, *,
              base: Callable[[], AbstractContextManager], progress: bool = True,
              **options: Any) -> LoopResult:
        """Train until learnt. `base()`: a context in which `model` runs as the unedited
        base. A "lora" method trains the active adapter (its parameters in `params`); a
        "delta" method returns the deltas in the result."""
        ...


@runtime_checkable
class AdapterMethod(Method, Protocol):
    """A method whose patches are LoRA adapters: it also says how to build one."""

    def adapter_config(self, model: Any, config: Any) -> Any:
        """The PEFT `LoraConfig` of a new patch on `model`."""
        ...


METHODS: dict[str, Method] = {m.NAME: m for m in (lora_sft, full_sft, ft_m, dpo)}


def get_method(name: str) -> Method:
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


def resolve_method(method: str, n_requests: int, pairs: bool) -> tuple[str, str | None]:
    """The method to train with, and why when `auto` chose it (None: it was named)."""
    if method != AUTO:
        return method, None
    method, why = choose_method(n_requests, pairs)
    log.warning("method auto: chose %s (%s)", method, why)
    return method, why


def choose_method(n_requests: int, preferences: bool = False) -> tuple[str, str]:
    """The method `auto` picks, as DESIGN.md advises, and why (one line)."""
    if preferences:
        return dpo.NAME, "preference pairs: DPO shifts behaviour from (chosen, rejected) pairs"
    if n_requests >= AUTO_FULL_SFT_FROM:
        return full_sft.NAME, (f"{n_requests} facts in one patch (≥ {AUTO_FULL_SFT_FROM}): "
                               "full SFT has the capacity for large-scale editing")
    return lora_sft.NAME, (f"{n_requests} fact(s) (< {AUTO_FULL_SFT_FROM}): LoRA SFT is fast, "
                           "small and routable per subject")
