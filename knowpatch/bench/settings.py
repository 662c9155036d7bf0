"""The settings that define a `knowpatch bench` run (its `run.json` key, checked on resume)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import KnowpatchError

MODES = ("single", "batch", "sequential")
STRATEGIES = ("stack", "shared", "routed")


@dataclass
class BenchSettings:
    data: str
    method: str = "lora-sft"
    mode: str = "single"
    n: int | None = None
    format: str | None = None
    batch_size: int = 1
    strategy: str = "stack"
    chat_template: bool = False
    fluency_every: int = 5
    seed: int = 0
    score_every: int = 1
    """Sequential mode: score a record right after its own edit only every k-th record (all
    are scored again after the last edit)."""
    parallel: int = 1
    """Sequential mode (stack, routed), LoRA SFT: edits trained side by side, k at a time
    (`Editor.edit_many`); each is then saved and scored as if trained alone."""
    told: bool = False
    """Also sample the unedited model's fluency texts with the new fact stated first ("<edit
    prompt> <new target>. " before each generation prompt, the same random streams):
    `fluency_told`, `rep_told`, `mention_told` of the new target in the baseline — what the
    base model writes when it holds the new fact, the reference for an edited model's rep."""
    method_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise KnowpatchError(f"mode: unknown value {self.mode!r} (expected {', '.join(MODES)})")
        if self.strategy not in STRATEGIES:
            raise KnowpatchError(
                f"strategy: unknown value {self.strategy!r} (expected {', '.join(STRATEGIES)})")
        if self.batch_size < 1:
            raise KnowpatchError(f"batch_size: must be ≥ 1 (got {self.batch_size})")
        if self.n is not None and self.n < 1:
            raise KnowpatchError(f"n: must be ≥ 1 (got {self.n})")
        if self.score_every < 1:
            raise KnowpatchError(f"score_every: must be ≥ 1 (got {self.score_every})")
        if self.fluency_every < 0:
            raise KnowpatchError(f"fluency_every: must be ≥ 0 (got {self.fluency_every})")
        if self.parallel < 1:
            raise KnowpatchError(f"parallel: must be ≥ 1 (got {self.parallel})")
        if self.told and self.chat_template:
            raise KnowpatchError("told: the fact stated before a chat-template prompt is not "
                                 "that prompt's context; use it without --chat-template")
        if self.parallel > 1 and (self.mode != "sequential" or self.strategy == "shared"
                                  or self.method != "lora-sft"):
            raise KnowpatchError("parallel: edits side by side need --mode sequential, "
                                 "--strategy stack or routed, and --method lora-sft")
