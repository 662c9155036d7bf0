"""Editing methods: one module per method, each following the `Method` protocol."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from ..config import build_config
from ..errors import KnowpatchError
from ..training import LoopResult
from . import dpo, ft_m, full_sft, in_context, lora_sft

log = logging.getLogger(__name__)


@runtime_checkable
class Method(Protocol):
    """What the editor needs of a method (each method is a module that provides it)."""

    NAME: str
    Config: type
    """The method's settings: a dataclass whose defaults work on the embedded model."""

    def kind(self, config: Any) -> str:
        """The kind of patch it makes with `config`: "lora" (an adapter), "delta" (weight
        deltas) or "context" (a statement, no weights)."""
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


METHODS: dict[str, Method] = {m.NAME: m for m in (lora_sft, full_sft, ft_m, dpo, in_context)}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise KnowpatchError(
            f"method: unknown method {name!r} (available: {', '.join(METHODS)})"
        ) from None


AUTO = "auto"
AUTO_PARALLEL = 4
"""`auto` on many facts trains their patches this many side by side (`Editor.edit_many`)."""


MEASURED = {
    "per_fact": "rel 99.0, gen 97.5, loc 99.4, 1.4 s and 2 MB per fact",
    "one_lora": "rel 100, gen 54.5, loc 99.3, 9.3 s per fact",
    "full_sft": "rel 15.0, gen 6.5, loc 34.9 after its 40 steps, 16 s per fact, a 538 MB delta",
}
"""The table in docs/methods.md (CounterFact-100, 2 CPU cores) that `auto` follows, quoted in its why."""


def resolve_method(method: str, n_requests: int, pairs: bool) -> tuple[str, str | None]:
    """The method to train one patch with, and why when `auto` chose it (None: named)."""
    if method != AUTO:
        return method, None
    method, why = choose_method(n_requests, pairs)
    log.warning("method auto: chose %s (%s)", method, why)
    return method, why


def choose_method(n_facts: int, preferences: bool = False, one_patch: bool = True
                  ) -> tuple[str, str]:
    """The method `auto` picks, and why (one line), following the measurements in docs/methods.md
    ("Many facts at once"). `one_patch`: every fact must go into one patch (`Editor.edit`);
    False: a patch per fact is allowed (`Editor.edit_many`, `knowpatch edit --requests`,
    `bench --mode batch`)."""
    if preferences:
        return dpo.NAME, "preference pairs: DPO shifts behaviour from (chosen, rejected) pairs"
    if n_facts == 1:
        return lora_sft.NAME, "1 fact: LoRA SFT, a small patch routed by its subject"
    if not one_patch:
        return lora_sft.NAME, (
            f"{n_facts} facts: a LoRA SFT patch per fact, each routed by its subject, trained "
            f"{AUTO_PARALLEL} side by side (CounterFact, 100 facts: {MEASURED['per_fact']}; "
            f"one LoRA patch for all: {MEASURED['one_lora']}; full SFT: {MEASURED['full_sft']})")
    return lora_sft.NAME, (
        f"{n_facts} facts in one patch: LoRA SFT routed by all {n_facts} subjects "
        f"(CounterFact, 100 facts: {MEASURED['one_lora']}; full SFT, whose delta cannot be "
        f"routed: {MEASURED['full_sft']}); a patch per fact generalizes better "
        f"({MEASURED['per_fact']}: Editor.edit_many)")



def check_settings(method: str, settings: dict[str, Any] | None = None) -> Any | None:
    """The admission check of an edit's method: `method` is known and `settings` fill its
    config (an unknown key or a bad value raises `KnowpatchError` naming it). The config, or
    None for `auto` (its method is chosen per edit, from what is edited)."""
    if method == AUTO:
        return None
    return build_config(get_method(method).Config, dict(settings or {}), where=method)
