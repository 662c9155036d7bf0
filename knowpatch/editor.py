"""`Editor`: the public face of knowpatch.

    editor = Editor.from_pretrained("smollm2-135m")
    patch = editor.edit(EditRequest("The Eiffel Tower is located in the city of", "Rome"))
    patch.scores["rel"], patch.path
    editor.generate(["The Eiffel Tower is located in the city of"])   # the edit is applied
    editor.remove(patch)                                               # base model again

The base model is loaded once and stays in memory. The editor composes the owners of each
concern: LoRA patches in the adapter bank (`adapters`), weight deltas in the delta bank
(`deltas`), router keys in the router (`router`), saved patches in the store (`patches`).
It holds which patches are loaded and applied, nothing about a call in progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .adapters import AdapterBank, RowPlan
from .config import build_config
from .deltas import DeltaBank
from .dispatch import Placement, RoutedForwards
from .errors import KnowpatchError
from .evaluate import Evaluation, greedy, prompt_ids
from .evaluate import evaluate as run_evaluation
from .jobs import EditJob, Trained, edit_manifest
from .methods import AUTO, Method, choose_method, get_method, resolve_method
from .methods.side_by_side import train_side_by_side
from .models import DEFAULT_MODEL, fingerprint, knowpatch_home, load_model
from .paging import Pager
from .patches import Patch, PatchStore, new_patch_id
from .preferences import edit_preferences
from .requests import EditRequest, as_requests, check_all_fit, encode_completion
from .router import Route, Router, canonical_tokens, compute_keys, fact_of, merge_keys, word_edges
from .subjects import with_subjects
from .training import clocked, is_main_process, phase

log = logging.getLogger(__name__)


class Editor:
    def __init__(self, model, tokenizer, *, model_name: str = "custom",
                 store: PatchStore | str | Path | None = None, progress: bool = True,
                 resident: int | None = None):
        self.model = model  # the base model; PEFT injects LoRA layers into it in place
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.fingerprint = fingerprint(model)
        self.base_params = sum(p.numel() for p in model.parameters())
        self.store = store if isinstance(store, PatchStore) else (
            PatchStore(store) if store else PatchStore(knowpatch_home() / "patches"))
        self.progress = progress
        self.routing = True  # route keyed patches per query (False: all act on every query)
        self.router = Router(canonical=canonical_tokens(tokenizer), edges=word_edges(tokenizer))
        self.adapters = AdapterBank(model)
        self.deltas = DeltaBank(model)
        self._loaded: dict[str, Patch] = {}  # patches in a bank
        self._applied: list[str] = []  # patches active for generate/evaluate
        self.placement = Placement()  # where each keyed patch's adapter acts in a query
        self.pager = Pager(self.adapters, resident)  # at most `resident` routed adapters in RAM

    @classmethod
    def from_pretrained(cls, name: str = DEFAULT_MODEL, *, device: str = "auto",
                        dtype: str | torch.dtype | None = None, **kwargs: Any) -> Editor:
        model, tokenizer = load_model(name, device=device, dtype=dtype)
        return cls(model, tokenizer, model_name=name, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def base_info(self) -> dict[str, Any]:
        cfg = self.model.config
        return {"model": self.model_name, "fingerprint": self.fingerprint,
                "architecture": (getattr(cfg, "architectures", None) or ["?"])[0],
                "dtype": str(next(self.model.parameters()).dtype).replace("torch.", "")}

    @property
    def applied(self) -> list[Patch]:
        return [self._loaded[name] for name in self._applied]

    # ---- loading, applying, removing --------------------------------------------------
    def apply(self, patch: Patch | str | Path) -> Patch:
        """Make `patch` active for `generate`/`evaluate` (a Patch, an id or a folder)."""
        patch = self._as_patch(patch)
        name = self._load(patch)
        if name not in self._applied:
            self._applied.append(name)
        self._activate(self._applied)
        return patch

    def remove(self, patch: Patch | str | Path) -> None:
        """Deactivate and unload `patch`; with nothing applied the base logits are exact."""
        name = patch.id if isinstance(patch, Patch) else self._as_patch(patch).id
        if name in self._applied:
            self._applied.remove(name)
        self._unload(name)
        self._activate(self._applied)

    def register_keys(self, patch: Patch) -> None:
        """Give the router `patch`'s keys (if it has any), as its manifest sets them."""
        if patch.routing is not None:
            self._register(patch.id, patch.keys, patch.routing,
                           (patch.manifest.get("config") or {}).get("gate", "all"))

    def _register(self, patch_id: str, keys: dict[str, torch.Tensor], info: dict[str, Any],
                  gate: str) -> None:
        """Route `patch_id` by `keys`; `gate` says where its adapter acts (`Placement`)."""
        self.router.add(patch_id, keys, info["layer"], info["threshold"],
                        frozenset(info.get("facts", [])))
        self.placement.set(patch_id, gate, info.get("answer_tokens"))

    def _unroute(self, name: str) -> None:
        self.router.remove(name)
        self.placement.forget(name)

    def superseded(self) -> dict[str, str]:
        """Loaded patches whose every fact a newer loaded patch rewrites: {old: new}."""
        return self.router.superseded()

    def _as_patch(self, patch: Patch | str | Path) -> Patch:
        if isinstance(patch, Patch):
            return patch
        if str(patch) in self._loaded:
            return self._loaded[str(patch)]
        return self.store.load(patch)

    def _load(self, patch: Patch) -> str:
        if patch.fingerprint != self.fingerprint:
            raise KnowpatchError(
                f"patch {patch.id}: made for base model {patch.fingerprint} "
                f"({patch.manifest['base'].get('model', '?')}), but this model is "
                f"{self.fingerprint} ({self.model_name}); refusing to apply it")
        if patch.id in self._loaded:
            return patch.id
        try:
            if patch.kind == "delta":
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
        self._loaded[patch.id] = patch
        self.register_keys(patch)
        return patch.id

    def _unload(self, name: str) -> None:
        if name in self.deltas:
            self.deltas.remove(name)
            self._loaded.pop(name, None)
        elif name in self._loaded:
            if name in self.adapters:
                self.adapters.remove(name)
            self.pager.forget(name)
            del self._loaded[name]
            self._unroute(name)

    def _activate(self, names: Sequence[str], trainable: bool = False) -> None:
        """Make exactly `names` active on every row (none: the base model's exact forward)."""
        self.deltas.set_active([n for n in names if n in self.deltas])
        self.adapters.activate([n for n in names if n not in self.deltas and n in self.adapters],
                               trainable)

    # ---- routing and use --------------------------------------------------------------
    @contextlib.contextmanager
    def using(self, patches: Sequence[Patch | str | Path] | None) -> Iterator[Any]:
        """Run a block with exactly `patches` active (None: those applied now)."""
        names = list(self._applied) if patches is None else [
            self._load(self._as_patch(p)) for p in patches]
        with self.using_names(names) as model:
            yield model

    @contextlib.contextmanager
    def using_names(self, names: Sequence[str], on_route: Callable | None = None) -> Iterator[Any]:
        """Run a block with loaded patches `names` active; with routing on, each batch the
        block runs is routed among them (keyed patches fire per row; unkeyed ones always),
        and `on_route(routes)` (if given) sees each batch's routes."""
        names = list(names)
        routed = self.routing and any(n in self.router for n in names)
        if not routed:  # every patch acts on every row: all of them resident
            self.pager.need(names)
        self._activate(names)

        def plan(rows, columns, width):
            routes, decided = self.decide(rows, names, columns, width)
            on_route(routes) if on_route else None
            return decided
        try:
            forwards = RoutedForwards(self.model, self.adapters, plan)
            with forwards if routed else contextlib.nullcontext():
                yield self.model
        finally:
            self._activate(self._applied)

    def route(self, prompts: str | Sequence[str], patches=None) -> list[Route]:
        """How the router decides for `prompts` among `patches` (None: those applied)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        names = list(self._applied) if patches is None else [
            self._load(self._as_patch(p)) for p in patches]
        try:
            return self.decide([prompt_ids(self.tokenizer, p) for p in prompts], names, run=False)[0]
        finally:
            self._activate(self._applied)

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
        self._activate([c for c in candidates if c not in self.router])
        return routes, self.placement.plan(routes, keyed, columns, width, self.device) if run else None

    def generate(self, prompts: str | Sequence[str], *, patches=None,
                 max_new_tokens: int = 20) -> list[str]:
        """Greedy continuations of `prompts` with `patches` active (None: those applied)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with self.using(patches) as model:
            ids = greedy(model, self.tokenizer, prompts, max_new_tokens)
        return [self.tokenizer.decode(i, skip_special_tokens=True) for i in ids]

    def evaluate(self, requests: EditRequest | Sequence[EditRequest], *,
                 patches=None) -> tuple[Evaluation, Evaluation]:
        """Score `requests` with `patches` active beside the unedited baseline: `(edited,
        baseline)`, `.summary` holding the scores in %."""
        requests = as_requests(requests)
        with self.using([]) as base:
            baseline = run_evaluation(base, self.tokenizer, requests)
        with self.using(patches) as model:
            edited = run_evaluation(model, self.tokenizer, requests, baseline.reference)
        return edited, baseline

    # ---- editing ----------------------------------------------------------------------
    def edit(self, requests: EditRequest | Sequence[EditRequest], method: str = "lora-sft", *,
             config: dict[str, Any] | Any | None = None, save: bool = True,
             evaluate: bool = True, into: Patch | None = None,
             train_options: dict[str, Any] | None = None, **overrides: Any) -> Patch:
        """Train one patch for `requests`, score it against the baseline, save it, apply it.

        `config` is a method config (or a mapping); `overrides` are its keys, e.g. `lr=1e-3`.
        `into`: keep training that (loaded) patch's adapter on the new requests instead of
        making a new one — EasyEdit's way of sequential editing, kept for comparison."""
        options = dict(train_options or {})
        with clocked() as phases:  # the manifest's `phases`: where the edit's time went
            job = self._job(requests, method, config, overrides, evaluate, bool(options.get("pairs")))
            if job.kind == "delta":
                trained = self._train_delta(job.module, job.requests, job.cfg, into, options)
            else:
                trained = self._train_lora(job.module, job.requests, job.cfg, into, options)
            return self._finish(job, trained, into, save, phases)

    def edit_many(self, groups: Sequence[EditRequest | Sequence[EditRequest]], *,
                  method: str = "lora-sft", parallel: int | None = None,
                  config: dict[str, Any] | Any | None = None, save: bool = True,
                  evaluate: bool = True, **overrides: Any) -> list[Patch]:
        """LoRA SFT edits trained side by side, `parallel` at a time (None: all): a patch per
        group, each adapter on its own rows and stopped once its own target is learnt, then
        each keyed, scored, saved and applied as `edit` does it alone. `method="auto"`: the
        large-scale path (`methods.choose_method`), recorded as each patch's `chosen_by`."""
        if method not in ("lora-sft", AUTO):
            raise KnowpatchError(f"method: edits side by side are LoRA SFT or auto (got {method!r})")
        if parallel is not None and parallel < 1:  # before any job's baseline is scored
            raise KnowpatchError(f"parallel: must be ≥ 1 (got {parallel})")
        jobs = [self._job(g, "lora-sft", config, overrides, evaluate, False) for g in groups]
        if method == AUTO and jobs:
            why = choose_method(len(jobs), one_patch=False)[1]
            log.warning("method auto: chose lora-sft (%s)", why)
            jobs = [dataclasses.replace(j, auto_why=why) for j in jobs]
        size = parallel or max(len(jobs), 1)
        return [p for start in range(0, len(jobs), size)
                for p in self._side_by_side(jobs[start:start + size], save)]

    def _side_by_side(self, jobs: list[EditJob], save: bool) -> list[Patch]:
        names, configs = [], []
        try:
            for job in jobs:
                names.append(new_patch_id(job.requests[0].subject or job.requests[0].prompt))
                torch.manual_seed(job.cfg.seed)  # each adapter starts as it would alone
                configs.append(job.module.adapter_config(self.model, job.cfg))
                self.adapters.add(names[-1], configs[-1])
            keys = [self._keys_for(j.requests, j.cfg.route_layer) if j.cfg.route else None
                    for j in jobs]
            results = train_side_by_side(self.model, self.tokenizer, self.adapters, names,
                                         [j.requests for j in jobs], jobs[0].cfg,
                                         base=lambda: self._base_only([]))
        except BaseException:
            for name in names:
                self.adapters.remove(name)
            self._activate(self._applied)
            raise
        return [self._finish(job, Trained(name, cfg, self.adapters.weights(name), result,
                                          result.seconds, k), None, save)
                for job, name, cfg, result, k in zip(jobs, names, configs, results, keys)]

    def _job(self, requests, method: str, config, overrides: dict[str, Any], evaluate: bool,
             pairs: bool) -> EditJob:
        """What an edit trains and how: the requests (subjects found where missing), the
        method and its config, and the unedited baseline's scores."""
        requests = as_requests(requests)
        check_all_fit(requests, self.tokenizer,
                      getattr(self.model.config, "max_position_embeddings", None))
        method, auto_why = resolve_method(method, len(requests), pairs)
        module = get_method(method)
        cfg = build_config(module.Config, config if config is None or isinstance(config, dict)
                           else dataclasses.asdict(config), overrides, where=method)
        kind = module.kind(cfg)
        inferred = {}
        if kind == "lora" and getattr(cfg, "route", False):  # routed by subject: find missing ones
            with self.using([]) as base, phase("subjects"):
                requests, inferred = with_subjects(base, self.tokenizer, requests)
            for i, subject in inferred.items():
                log.warning("request %d: no subject given; routed by the inferred %r", i, subject)
        baseline = None
        if evaluate:
            with self.using([]) as base, phase("baseline"):
                baseline = run_evaluation(base, self.tokenizer, requests)
        return EditJob(requests, method, module, cfg, kind, auto_why, inferred, baseline)

    def _finish(self, job: EditJob, trained: Trained, into: Patch | None, save: bool,
                phases: dict[str, float] | None = None) -> Patch:
        """Key, score, describe, install and save a trained patch (`phases`: seconds so far)."""
        facts = sorted({fact_of(r) for r in job.requests} | set(
            ((into.manifest if into is not None else {}).get("router") or {}).get("facts", [])))
        routing = self._key(trained, job.cfg, facts, job.requests, into)
        edited = None
        if job.baseline is not None:
            with self.using_names([trained.patch_id]) as model, phase("scoring"):
                edited = run_evaluation(model, self.tokenizer, job.requests, job.baseline.reference)
        manifest = edit_manifest(
            job, trained, self.base_info, self.base_params, into, edited, router=routing,
            phases={k: round(v, 4) for k, v in phases.items()} if phases else None,
            chosen_by=job.auto_why and f"auto: {job.auto_why}",
            subjects_inferred={str(i): v for i, v in job.inferred.items()} or None)
        patch = self._install(trained, manifest, into)
        if save and is_main_process():  # under accelerate launch, one process writes
            if patch.path is not None:
                patch.save(patch.path, overwrite=True)
            else:
                self.store.save(patch)
            log.info("saved patch %s to %s", patch.id, patch.path)
            self.pager.saved(patch)
        return patch

    def _key(self, trained: Trained, cfg: Any, facts: list[str], requests: list[EditRequest],
             into: Patch | None) -> dict[str, Any] | None:
        """Route the new patch from its own first evaluation on, as it will be in use; the
        router settings for its manifest (None: unrouted)."""
        self._unroute(trained.patch_id)
        if trained.keys is None:
            return None
        answer = max(len(encode_completion(self.tokenizer, r.prompt, r.target_new)[1])
                     for r in requests)
        previous = ((into.manifest if into is not None else {}).get("router") or {})
        info = {"layer": cfg.route_layer, "threshold": cfg.route_threshold,
                "keys": len(trained.keys["keys"]), "facts": facts,
                "answer_tokens": max(answer, previous.get("answer_tokens") or 0)}
        self._register(trained.patch_id, trained.keys, info, getattr(cfg, "gate", "all"))
        return info

    def _install(self, trained: Trained, manifest: dict[str, Any], into: Patch | None) -> Patch:
        """Register the trained patch as loaded, keyed and applied."""
        if into is not None:
            into.manifest, into.weights, into.keys = manifest, trained.weights, trained.keys
            patch = into
        else:
            patch = Patch(id=trained.patch_id, manifest=manifest,
                          adapter_config=trained.adapter_config, weights=trained.weights,
                          keys=trained.keys)
        self._loaded[patch.id] = patch
        self.router.remove(patch.id)
        self.register_keys(patch)
        if patch.id not in self._applied:
            self._applied.append(patch.id)
        self._activate(self._applied)
        return patch

    def _train_lora(self, module: Method, requests: list[EditRequest], cfg: Any,
                    into: Patch | None, options: dict[str, Any]) -> Trained:
        """Train a new adapter (or `into`'s) on `requests`; nothing is left behind on error."""
        if into is not None:
            patch_id, adapter_cfg = into.id, into.adapter_config
            if patch_id not in self._loaded:
                self._load(into)
            self.pager.need([patch_id])
            self.pager.forget(patch_id)  # trained on: resident until saved again
        else:
            patch_id = new_patch_id(requests[0].subject or requests[0].prompt)
            torch.manual_seed(cfg.seed)
            adapter_cfg = module.adapter_config(self.model, cfg)
            with phase("adapter"):
                self.adapters.add(patch_id, adapter_cfg)
        try:
            with phase("keys"):
                keys = self._keys_for(requests, cfg.route_layer) if getattr(cfg, "route", False) else None
            if into is not None and keys is not None:
                keys = merge_keys(into.keys, keys)
            self._activate([patch_id], trainable=True)
            started = time.perf_counter()
            self.adapters.set_dropout(patch_id, True)
            options = {**options, "params": self.adapters.params(patch_id)}
            if getattr(cfg, "gate", "all") == "subject" or getattr(cfg, "keep_weight", 0):
                options["gate"] = lambda mask: self.adapters.gated(patch_id, mask)
            try:
                result = module.train(self.model, self.tokenizer, requests, cfg,
                                      base=lambda: self._base_only([patch_id]),
                                      progress=self.progress, **options)
            finally:
                self.adapters.set_dropout(patch_id, False)
            seconds = time.perf_counter() - started
            self._activate([patch_id])
            self.adapters.set_trainable([patch_id], False)
        except BaseException:
            if into is None:
                self.adapters.remove(patch_id)
            self._activate(self._applied)
            raise
        return Trained(patch_id, adapter_cfg, self.adapters.weights(patch_id), result,
                       seconds, keys)

    def _train_delta(self, module: Method, requests: list[EditRequest], cfg: Any,
                     into: Patch | None, options: dict[str, Any]) -> Trained:
        """Full-parameter training from the base weights; the patch is the delta."""
        if into is not None:
            raise KnowpatchError("into: only LoRA patches can be trained on further (the "
                                 "shared strategy); full-parameter patches are deltas")
        patch_id = new_patch_id(requests[0].subject or requests[0].prompt)
        torch.manual_seed(cfg.seed)
        self._activate([])  # base weights, adapters off: the delta is taken from the base
        started = time.perf_counter()
        try:
            result = module.train(self.model, self.tokenizer, requests, cfg,
                                  base=lambda: contextlib.nullcontext(self.model),
                                  progress=self.progress, **options)
        finally:
            self._activate(self._applied)
        seconds = time.perf_counter() - started
        self.deltas.add(patch_id, result.deltas)
        return Trained(patch_id, None, result.deltas, result, seconds)

    def _keys_for(self, requests: list[EditRequest], layer: int) -> dict[str, torch.Tensor] | None:
        """Router keys from the base model (every adapter off)."""
        self._activate([])
        if (keys := compute_keys(self.model, self.tokenizer, requests, layer)) is None:
            log.warning("no router keys: a request has no subject found in its prompt; the "
                        "patch will be active for every query")
        return keys

    @contextlib.contextmanager
    def _base_only(self, training: list[str]) -> Iterator[Any]:
        """The base model's exact forward inside a training run (e.g. for KL references)."""
        self._activate([])
        try:
            yield self.model
        finally:
            self._activate(training, trainable=True)

    def edit_preferences(self, pairs: Sequence[EditRequest], *, heldout: float = 0.2,
                         method: str = "dpo", seed: int = 0, save: bool = True,
                         samples: int = 3, **overrides: Any) -> tuple[Patch, dict[str, Any]]:
        """A behaviour edit: one DPO patch over preference pairs (requests with `rejected`),
        a `heldout` share measured before and after (`preferences`): (patch, report)."""
        patch, report = edit_preferences(self, as_requests(pairs), heldout=heldout,
                                         method=method, seed=seed, samples=samples, **overrides)
        if save and is_main_process():
            self.store.save(patch)
        return patch, report

    def edit_sequential(self, requests: EditRequest | Sequence[EditRequest],
                        method: str = "lora-sft", *, group: int = 1, **kwargs: Any) -> list[Patch]:
        """Edit `requests` one after another, a patch per `group` requests, each saved and
        left applied; with routing, a query is answered by the patches its keys match."""
        requests = as_requests(requests)
        if group < 1:
            raise KnowpatchError(f"group: must be ≥ 1 (got {group})")
        return [self.edit(requests[i:i + group], method, **kwargs)
                for i in range(0, len(requests), group)]
