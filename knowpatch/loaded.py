"""The patches loaded into the live model, and how a query runs through them.

    loaded = LoadedPatches(model, tokenizer, resident=64)
    loaded.load(patch)                    # into the adapter or delta bank, keyed in the router
    loaded.apply(patch.id)                # active for generate/evaluate
    with loaded.using_names(["p1", "p2"]) as model:
        model.generate(...)               # each row runs the patches its subject fires

One owner for the run-time side of patches, as vLLM's LoRA manager is for its adapters:
the adapter bank (LoRA), the delta bank (weight deltas), the router (keys), the placement
(where a fired adapter acts in a query), the pager (which routed adapters are resident)
and the books of which patches are loaded and applied. The `Editor` composes it with the
store and training; nothing else touches these parts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .adapters import AdapterBank, RowPlan
from .decoding import prompt_ids
from .deltas import DeltaBank
from .dispatch import Placement, RoutedForwards
from .errors import KnowpatchError
from .incontext import NONE as NO_STATEMENTS
from .incontext import Statements
from .paging import Pager
from .patches import Patch
from .router import Route, Router, canonical_tokens, word_edges
from .scope import chat_turn


class LoadedPatches:
    """Patches loaded into `model` (made for the base `fingerprint`), applied or not."""

    def __init__(self, model, tokenizer, fingerprint: str, model_name: str,
                 resident: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.fingerprint, self.model_name = fingerprint, model_name
        self.routing = True  # route keyed patches per query (False: all act on every query)
        self.router = Router(canonical=canonical_tokens(tokenizer), edges=word_edges(tokenizer),
                             turn=chat_turn(tokenizer))
        self.adapters = AdapterBank(model)
        self.deltas = DeltaBank(model)
        self.placement = Placement(tokenizer)  # where each keyed patch's adapter acts
        self.pager = Pager(self.adapters, resident)  # at most `resident` routed adapters in RAM
        self.patches: dict[str, Patch] = {}  # patches in a bank
        self.applied: list[str] = []  # patches active for generate/evaluate

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __contains__(self, name: str) -> bool:
        return name in self.patches

    def is_routed(self, name: str) -> bool:
        """`name` has router keys (it fires per row; unkeyed patches act on every row)."""
        return name in self.router

    # ---- loading, applying, removing --------------------------------------------------
    def apply(self, patch: Patch) -> Patch:
        """Load `patch` (if it is not) and make it active for generate/evaluate."""
        name = self.load(patch)
        if name not in self.applied:
            self.applied.append(name)
        self.activate(self.applied)
        return patch

    def remove(self, name: str) -> None:
        """Deactivate and unload `name`; with nothing applied the base logits are exact."""
        if name in self.applied:
            self.applied.remove(name)
        self.unload(name)
        self.activate(self.applied)

    def load(self, patch: Patch) -> str:
        """Put `patch` into its bank (a routed LoRA patch under paging: on the pager's books,
        its weights on disk) and give the router its keys."""
        if patch.fingerprint != self.fingerprint:
            raise KnowpatchError(
                f"patch {patch.id}: made for base model {patch.fingerprint} "
                f"({patch.manifest['base'].get('model', '?')}), but this model is "
                f"{self.fingerprint} ({self.model_name}); refusing to apply it")
        if patch.id in self.patches:
            return patch.id
        try:
            if patch.kind == "context":
                pass  # a statement: nothing enters the model
            elif patch.kind == "delta":
                self.deltas.add(patch.id, patch.weights)
            elif not self.pager.admit(patch):  # paged: read in when a query fires it
                self.adapters.add(patch.id, patch.adapter_config)
                try:
                    self.adapters.load_weights(patch.id, patch.weights)
                except ValueError:
                    self.adapters.remove(patch.id)
                    raise
                # the patch's weights become the adapter's own tensors: held in memory once
                patch.weights = self.adapters.weights(patch.id)
        except ValueError as e:
            raise KnowpatchError(f"patch {patch.id}: {e}") from None
        self.patches[patch.id] = patch
        self.register_keys(patch)
        return patch.id

    def unload(self, name: str) -> None:
        if name in self.patches and self.patches[name].kind == "context":
            del self.patches[name]
            self.unroute(name)
        elif name in self.deltas:
            self.deltas.remove(name)
            self.patches.pop(name, None)
        elif name in self.patches:
            if name in self.adapters:
                self.adapters.remove(name)
            self.pager.forget(name)
            del self.patches[name]
            self.unroute(name)

    def install(self, patch: Patch) -> Patch:
        """A patch just trained in the banks (or trained on further): loaded, keyed, applied."""
        self.patches[patch.id] = patch
        self.router.remove(patch.id)
        self.register_keys(patch)
        if patch.id not in self.applied:
            self.applied.append(patch.id)
        self.activate(self.applied)
        return patch

    def activate(self, names: Sequence[str], trainable: bool = False) -> None:
        """Make exactly `names` active on every row (none: the base model's exact forward)."""
        self.deltas.set_active([n for n in names if n in self.deltas])
        self.adapters.activate([n for n in names if n not in self.deltas and n in self.adapters],
                               trainable)

    @contextlib.contextmanager
    def base_only(self, training: list[str]) -> Iterator[Any]:
        """The base model's exact forward inside a training run (e.g. for KL references)."""
        self.activate([])
        try:
            yield self.model
        finally:
            self.activate(training, trainable=True)

    # ---- router keys ------------------------------------------------------------------
    def register_keys(self, patch: Patch) -> None:
        """Give the router `patch`'s keys (if it has any), as its manifest sets them."""
        if patch.routing is not None:
            self.register(patch.id, patch.keys, patch.routing,
                          (patch.manifest.get("config") or {}).get("gate", "all"))

    def register(self, patch_id: str, keys: dict[str, torch.Tensor], info: dict[str, Any],
                 gate: str) -> None:
        """Route `patch_id` by `keys`; `gate` says where its adapter acts (`Placement`)."""
        self.router.add(patch_id, keys, info["layer"], info["threshold"],
                        frozenset(info.get("facts", [])))
        self.placement.set(patch_id, gate, info.get("answer_tokens"), info.get("answers", ()),
                           info.get("reply_tokens"))

    def unroute(self, name: str) -> None:
        self.router.remove(name)
        self.placement.forget(name)

    def superseded(self) -> dict[str, str]:
        """Loaded patches whose every fact a newer loaded patch rewrites: {old: new}."""
        return self.router.superseded()

    def stated_only(self, name: str) -> bool:
        """`name` is an in-context patch: it acts through its statement, not on the model."""
        return name in self.patches and self.patches[name].kind == "context"

    def statements(self, names: Sequence[str], pending: dict[str, str] | None = None) -> Statements:
        """The statements of the patches among `names` that carry one (in-context, hybrid;
        `pending`: those of patches keyed but not installed yet), and which a query fires:
        keyed ones by the router (all with routing off), unkeyed ones always. Decided outside
        any `using_names` block."""
        stated = {n: self.patches[n].manifest["statement"] for n in names
                  if n in self.patches and self.patches[n].manifest.get("statement")}
        stated.update(pending or {})
        if not stated:
            return NO_STATEMENTS
        keyed = [n for n in stated if n in self.router] if self.routing else []

        def decide(texts: list[str]) -> list[list[str]]:
            routes = [Route([], {}) for _ in texts]
            if keyed:
                try:
                    rows = [prompt_ids(self.tokenizer, t) for t in texts]
                    routes = self.decide(rows, keyed, run=False)[0]
                finally:
                    self.activate(self.applied)
            return [[n for n in stated if n not in keyed or n in r.fired] for r in routes]
        return Statements(decide, stated)

    # ---- routing and use --------------------------------------------------------------
    @contextlib.contextmanager
    def using_names(self, names: Sequence[str], on_route: Callable | None = None) -> Iterator[Any]:
        """Run a block with loaded patches `names` active; with routing on, each batch the
        block runs is routed among them (keyed patches fire per row; unkeyed ones always),
        and `on_route(routes)` (if given) sees each batch's routes."""
        names = [n for n in names if not self.stated_only(n)]  # they act on the prompt's text
        routed = self.routing and any(n in self.router for n in names)
        if not routed:  # every patch acts on every row: all of them resident
            self.pager.need(names)
        self.activate(names)

        def plan(rows, columns, width):
            routes, decided = self.decide(rows, names, columns, width)
            on_route(routes) if on_route else None
            return decided
        try:
            forwards = RoutedForwards(self.model, self.adapters, plan)
            with forwards if routed else contextlib.nullcontext():
                yield self.model
        finally:
            self.activate(self.applied)

    def decide(self, rows: list[list[int]], candidates: list[str],
               columns: list[torch.Tensor] | None = None, width: int = -1, run: bool = True
               ) -> tuple[list[Route], RowPlan | None]:
        """Route token-id rows (no padding) among `candidates`: the routes, and (`run`) the
        plan that runs each fired adapter on its rows, paged ones read in. Unkeyed candidates
        stay active on every row. `columns[r]`: where row r's tokens sit in a batch of `width`."""
        keyed = [c for c in candidates if c in self.router]
        routes = [Route([], {}) for _ in rows]
        if keyed:  # the router reads the base model, as the keys were read
            self.deltas.set_active([])
            self.adapters.activate([])
            routes = self.router.route_rows(self.model, rows, self.tokenizer.bos_token_id,
                                            keyed, locate=self.placement.gated)
            self.pager.need({p for r in routes for p in r.fired}) if run else None
        self.activate([c for c in candidates if c not in self.router])
        return routes, self.placement.plan(routes, keyed, columns, width, self.device) if run else None
