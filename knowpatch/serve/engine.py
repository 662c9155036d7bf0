"""What the HTTP layer needs of whatever generates: the `Engine` protocol.

The API layer (`app`, `patches`, `jobs`) turns OpenAI requests into `Generation`s and patch
work into engine calls; an engine decides how rows are batched, routed and decoded. Today's
engine is `engines.local.LocalEngine` (transformers' `generate` on one thread, over an
`Editor`); another engine (e.g. one that hands generation to a vLLM server and keeps routing
and training here) implements the same protocol and plugs in without touching the API.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..behaviour_edit import BehaviourJob
from ..requests import EditRequest
from ..router import Route

# An event for one choice: (choice index, new text, finish reason or None, fired patch ids,
# tokens made so far). A finish reason "error: …" ends the choice with that error.
Emit = Callable[[int, str, "str | None", list[str], int], None]


@dataclass
class Generation:
    """One API request: its rows (token ids of each choice) and how to continue them."""

    rows: list[list[int]]
    max_tokens: int
    emit: Emit
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    patches: list[str] | None = None  # None: every loaded patch, routed ("auto")

    def group(self) -> tuple:
        """Requests with equal groups can share a batch."""
        sampling = (self.temperature, self.top_p, self.seed) if self.temperature > 0 else ()
        return (tuple(self.patches) if self.patches is not None else None, sampling)


@runtime_checkable
class Engine(Protocol):
    """Generation with per-row patches, and the patch work that changes what is served.

    Every patch change (`load`, `unload`, `edit`) takes effect between batches: a request
    finishes on the patch set it started with. Methods that return a value block until the
    engine has done the work; `submit` and `edit` return at once."""

    model_name: str
    """The base model's name (the API's default `model` id)."""
    tokenizer: Any
    context: int
    """The most positions a row (prompt and completion) may take."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def submit(self, generation: Generation) -> None:
        """Queue `generation`; its rows' text streams out through `generation.emit`."""

    def loaded(self) -> list[dict[str, Any]]:
        """The manifests of the loaded patches (each one served, routed per row)."""

    def load_store(self) -> tuple[list[str], dict[str, str]]:
        """Load every complete patch of the store: (ids loaded, {id: why not} for the rest)."""

    def load(self, patch_id: str) -> dict[str, Any]:
        """Load the store's patch `patch_id`; its manifest."""

    def unload(self, patch_id: str, delete: bool) -> None:
        """Stop serving `patch_id`; `delete`: also remove its folder from the store."""

    def has_stored(self, patch_id: str) -> bool:
        """The store holds a complete patch folder `patch_id`."""

    def check(self, request: EditRequest, method: str, settings: dict[str, Any]) -> None:
        """Would this edit be admitted (`Editor.check`); raises `KnowpatchError` if not."""

    def edit(self, request: EditRequest, method: str, settings: dict[str, Any],
             started: Callable[[], None] | None = None) -> Future:
        """Train, save and load a patch for `request` after the queued work: a future of
        the `Patch` (`started` is called when training begins)."""

    def edit_behaviour(self, job: BehaviourJob, settings: dict[str, Any],
                       started: Callable[[], None] | None = None) -> Future:
        """`edit` for a behaviour (`behaviour_edit.run_behaviour`): a future of the saved and
        loaded `Patch`, its report in the manifest under "behaviour"."""

    def statements(self, texts: list[str], patches: list[str] | None) -> list[str]:
        """For each text, the facts that the in-context patches among `patches` (None: every
        loaded one) it fires state ("" for none): the API puts them before a completion
        prompt, or into the system message of a chat."""

    def route(self, prompt: str, patches: list[str] | None) -> Route:
        """How the router decides for `prompt` among `patches` (None: every loaded one)."""

