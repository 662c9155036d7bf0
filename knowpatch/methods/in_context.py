"""In-context editing: no weight changes. The patch keeps the fact stated ("<prompt> <new
answer>.") and router keys for its subject; when a query fires it, the statement is put
before the prompt, or into the system message in chat (`incontext.Statements`).

The baseline every weight edit is set beside (IKE, SCR): it is only as local as the router
that decides when to state the fact, and only as reliable as the model's reading of it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from ..requests import EditRequest
from ..training import LoopResult

NAME = "in-context"


@dataclass
class Config:
    """In-context settings: only where the statement is routed."""

    route: bool = True
    """Router keys for the subjects: the fact is stated only to the queries that name them
    (False: to every query)."""
    route_layer: int = 1
    """Decoder layer whose output the router keys are read at."""
    route_threshold: float = 0.75
    """A query fires the patch when each subject token matches it at least this well (cos)."""
    seed: int = 0
    """Unused (no training); kept so every method takes a seed."""

    def __post_init__(self) -> None:
        if self.route_layer < 1:
            raise ValueError(f"route_layer must be ≥ 1, got {self.route_layer}")
        if not -1 <= self.route_threshold <= 1:
            raise ValueError(f"route_threshold must be in [-1, 1], got {self.route_threshold}")


def kind(config: Config) -> str:
    """Patches of this method hold a statement, no weights."""
    return "context"


def train(model, tokenizer, requests: list[EditRequest], config: Config, *,
          base: Callable[[], AbstractContextManager], progress: bool = True,
          **options) -> LoopResult:
    """Nothing to train: the statement is the patch."""
    return LoopResult(steps=0, learnt=True, seconds=0.0, losses=[],
                      extra={"statement": statement(requests)})


def statement(requests: list[EditRequest]) -> str:
    """The facts stated, as the edit prompts complete them."""
    return " ".join(f"{r.prompt.strip()} {r.target_new}." for r in requests)
