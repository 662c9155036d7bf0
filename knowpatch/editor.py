"""`Editor`: the public face of knowpatch.

    editor = Editor.from_pretrained("smollm2-135m")
    patch = editor.edit(EditRequest("The Eiffel Tower is located in the city of", "Rome"))
    patch.scores["rel"], patch.path
    editor.generate(["The Eiffel Tower is located in the city of"])   # the edit is applied
    editor.remove(patch)                                               # base model again

The base model is loaded once and stays in memory. The editor owns three parts and is the
only one to touch them: the patches loaded into the model and how a query runs through them
(`loaded.LoadedPatches`: adapter and delta banks, router, pager), the training of new ones
(`editing.Trainer`) and the store of saved patches (`patches.PatchStore`). Outside code asks
with a verb — `edit`, `apply`, `remove`, `route`, `save`, `check`, `with editor.options(…)` —
and the editor holds which patches are loaded and applied, nothing about a call in progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .chat import CHAT_TOKENS, replies
from .decoding import greedy, prompt_ids
from .editing import Trainer
from .errors import KnowpatchError
from .evaluate import Evaluation
from .evaluate import evaluate as run_evaluation
from .explain import explain_routes
from .incontext import Statements
from .jobs import EditJob
from .loaded import LoadedPatches
from .methods import AUTO, check_settings, choose_method
from .models import DEFAULT_MODEL, fingerprint, knowpatch_home, load_model
from .patches import Patch, PatchStore
from .preferences import edit_preferences
from .requests import EditRequest, as_requests, check_all_fit
from .router import Route
from .training import clocked, is_main_process

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
        self._store = store if isinstance(store, PatchStore) else (
            PatchStore(store) if store else PatchStore(knowpatch_home() / "patches"))
        self._progress = progress  # progress bars of training (`options(progress=…)`)
        self._loaded = LoadedPatches(model, tokenizer, self.fingerprint, model_name, resident)
        self._trainer = Trainer(self._loaded, self.base_info, self.base_params)

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
        return [self._loaded.patches[name] for name in self._loaded.applied]

    @property
    def shows_progress(self) -> bool:
        """Whether long work shows progress bars (`options(progress=…)`)."""
        return self._progress

    @property
    def context_length(self) -> int | None:
        """The most positions the model takes (None: not stated by its config)."""
        return getattr(self.model.config, "max_position_embeddings", None)

    # ---- settings for a block, and the admission check --------------------------------
    @contextlib.contextmanager
    def options(self, *, routing: bool | None = None, index: bool | None = None,
                progress: bool | None = None) -> Iterator[Editor]:
        """Run a block with other settings, restored on exit (exception or not). `routing`:
        keyed patches fire per query (False: every applied patch acts on every query, as a
        stack); `index`: the router scores a query only against the patches whose subject it
        spells (False: exhaustively, every patch); `progress`: training's progress bars.
        None leaves a setting as it is."""
        router = self._loaded.router
        saved = (self._loaded.routing, router.index, self._progress)
        try:
            if routing is not None:
                self._loaded.routing = routing
            if index is not None:
                router.index = index
            if progress is not None:
                self._progress = progress
            yield self
        finally:
            self._loaded.routing, router.index, self._progress = saved

    def check(self, requests: EditRequest | Sequence[EditRequest] | None, method: str = "lora-sft",
              settings: dict[str, Any] | None = None) -> Any | None:
        """Would this edit be admitted: `method` known, `settings` valid for it, every request
        within the model's context. Raises `KnowpatchError` naming the field; returns the
        method's config (None for `auto`). The CLI, the server and the bench all ask here."""
        config = check_settings(method, settings)
        if requests is not None:
            check_all_fit(as_requests(requests), self.tokenizer, self.context_length)
        return config

    # ---- the store ----------------------------------------------------------------------
    @property
    def store_root(self) -> Path:
        return self._store.root

    def stored(self, *, this_model: bool = False) -> list[dict[str, Any]]:
        """Manifests of the store's patches, oldest first (`this_model`: only those made for
        this base model)."""
        manifests = self._store.list()
        if this_model:
            manifests = [m for m in manifests
                         if (m.get("base") or {}).get("fingerprint") == self.fingerprint]
        return manifests

    def save(self, patch: Patch, folder: str | Path | None = None, *, overwrite: bool = False) -> Path:
        """Write `patch` to `folder` (None: its own folder, else the store). A saved routed
        patch may leave memory under paging (`resident`): its weights are on disk."""
        if folder is not None:
            path = patch.save(folder, overwrite=overwrite)
        elif patch.path is not None:
            path = patch.save(patch.path, overwrite=True)
        else:
            path = self._store.save(patch)
        log.info("saved patch %s to %s", patch.id, path)
        self._loaded.pager.saved(patch)
        return path

    def delete(self, ref: str | Path) -> Path:
        """Unload `ref` (if loaded) and delete its folder from the store."""
        if str(ref) in self._loaded:
            self.remove(str(ref))
        return self._store.remove(ref)

    def load_store(self) -> tuple[list[str], dict[str, str]]:
        """Apply every complete patch of the store (what an interrupted save left behind is
        removed first): the ids applied, and {id: why} for those that could not be."""
        for name in self._store.clean():
            log.warning("removed %s, left by an interrupted save", self.store_root / name)
        applied, failed = [], {}
        for manifest in self._store.list():
            try:
                applied.append(self.apply(Patch.load(manifest["path"])).id)
            except (KnowpatchError, OSError, KeyError, ValueError) as exc:
                failed[str(manifest.get("id"))] = str(exc)
        return applied, failed

    # ---- loading, applying, removing --------------------------------------------------
    def apply(self, patch: Patch | str | Path) -> Patch:
        """Make `patch` active for `generate`/`evaluate` (a Patch, an id or a folder)."""
        return self._loaded.apply(self._as_patch(patch))

    def remove(self, patch: Patch | str | Path) -> None:
        """Deactivate and unload `patch`; with nothing applied the base logits are exact."""
        self._loaded.remove(patch.id if isinstance(patch, Patch) else self._as_patch(patch).id)

    def superseded(self) -> dict[str, str]:
        """Loaded patches whose every fact a newer loaded patch rewrites: {old: new}."""
        return self._loaded.superseded()

    def is_routed(self, patch_id: str) -> bool:
        """The loaded patch `patch_id` has router keys (unkeyed ones act on every query)."""
        return self._loaded.is_routed(patch_id)

    def _as_patch(self, patch: Patch | str | Path) -> Patch:
        if isinstance(patch, Patch):
            return patch
        if str(patch) in self._loaded:
            return self._loaded.patches[str(patch)]
        return self._store.load(patch)

    # ---- routing and use --------------------------------------------------------------
    @contextlib.contextmanager
    def using(self, patches: Sequence[Patch | str | Path] | None) -> Iterator[Any]:
        """Run a block with exactly `patches` active (None: those applied now)."""
        with self._loaded.using_names(self._names(patches)) as model:
            yield model

    def _names(self, patches: Sequence[Patch | str | Path] | None) -> list[str]:
        """The ids of `patches`, each loaded (read from disk once); None: those applied."""
        return list(self._loaded.applied) if patches is None else [
            self._loaded.load(self._as_patch(p)) for p in patches]

    @contextlib.contextmanager
    def using_names(self, names: Sequence[str], on_route: Callable | None = None) -> Iterator[Any]:
        """Run a block with loaded patches `names` active; with routing on, each batch the
        block runs is routed among them (keyed patches fire per row; unkeyed ones always),
        and `on_route(routes)` (if given) sees each batch's routes."""
        with self._loaded.using_names(names, on_route) as model:
            yield model

    def route(self, prompts: str | Sequence[str], patches=None) -> list[Route]:
        """How the router decides for `prompts` among `patches` (None: those applied); no
        paged patch is read in."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.route_rows([prompt_ids(self.tokenizer, p) for p in prompts], patches)

    def route_rows(self, rows: Sequence[Sequence[int]], patches=None) -> list[Route]:
        """`route` for prompts given as token ids (an engine's rows)."""
        names = self._names(patches)
        try:
            return self._loaded.decide([list(r) for r in rows], names, run=False)[0]
        finally:
            self._loaded.activate(self._loaded.applied)

    def explain(self, prompts: str | Sequence[str], top: int = 3) -> dict[str, Any]:
        """How the router would decide for `prompts` among every patch of the store made for
        this model (their keys only; nothing is loaded): `explain.explain_routes`."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with self.using([]) as base:
            return explain_routes(base, self.tokenizer, self.stored(this_model=True), prompts, top)

    def generate(self, prompts: str | Sequence[str], *, patches=None,
                 max_new_tokens: int = 20) -> list[str]:
        """Greedy continuations of `prompts` with `patches` active (None: those applied)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        names = self._names(patches)
        prompts = self._loaded.statements(names).prompts(prompts)  # in-context: stated first
        with self._loaded.using_names(names) as model:
            ids = greedy(model, self.tokenizer, prompts, max_new_tokens)
        return [self.tokenizer.decode(i, skip_special_tokens=True) for i in ids]

    def chat(self, questions: str | Sequence[str], *, patches=None,
             max_new_tokens: int = CHAT_TOKENS) -> list[str]:
        """Greedy replies to `questions`, each asked as a user turn of the model's chat
        template, with `patches` active (None: those applied)."""
        questions = [questions] if isinstance(questions, str) else list(questions)
        names = self._names(patches)
        systems = self._loaded.statements(names).systems(questions)  # in-context: system message
        with self._loaded.using_names(names) as model:
            return replies(model, self.tokenizer, questions, max_new_tokens, systems)

    def evaluate(self, requests: EditRequest | Sequence[EditRequest], *,
                 patches=None) -> tuple[Evaluation, Evaluation]:
        """Score `requests` with `patches` active beside the unedited baseline: `(edited,
        baseline)`, `.summary` holding the scores in %."""
        requests = as_requests(requests)
        with self.using([]) as base:
            baseline = run_evaluation(base, self.tokenizer, requests)
        names = self._names(patches)
        stated, systems = self._loaded.statements(names).prepare(requests)
        with self._loaded.using_names(names) as model:
            edited = run_evaluation(model, self.tokenizer, stated, baseline.reference,
                                    systems=systems)
        return edited, baseline

    def statements(self, patches=None) -> Statements:
        """The facts that in-context (and hybrid) patches among `patches` (None: those
        applied) state, and the queries they fire on (`incontext.Statements`)."""
        return self._loaded.statements(self._names(patches))

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
        trainer = self._trainer
        with clocked() as phases:  # the manifest's `phases`: where the edit's time went
            job = trainer.job(requests, method, config, overrides, evaluate, bool(options.get("pairs")))
            job.label = options.pop("label", None)  # the patch's name, if not its subject
            patch = trainer.finish(job, trainer.train(job, into, options, self._progress), into, phases)
            self._keep(patch, save)
            return patch

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
        jobs = [self._trainer.job(g, "lora-sft", config, overrides, evaluate, False) for g in groups]
        if method == AUTO and jobs:
            why = choose_method(len(jobs), one_patch=False)[1]
            log.warning("method auto: chose lora-sft (%s)", why)
            jobs = [dataclasses.replace(j, auto_why=why) for j in jobs]
        size = parallel or max(len(jobs), 1)
        return [p for start in range(0, len(jobs), size)
                for p in self._side_by_side(jobs[start:start + size], save)]

    def _side_by_side(self, jobs: list[EditJob], save: bool) -> list[Patch]:
        patches = []
        for job, trained in zip(jobs, self._trainer.side_by_side(jobs)):
            patches.append(self._trainer.finish(job, trained, None))
            self._keep(patches[-1], save)
        return patches

    def _keep(self, patch: Patch, save: bool) -> None:
        """Save a patch just made (under accelerate launch, one process writes)."""
        if save and is_main_process():
            self.save(patch)

    def edit_preferences(self, pairs: Sequence[EditRequest], *, heldout: float = 0.2,
                         method: str = "dpo", seed: int = 0, save: bool = True,
                         samples: int = 3, label: str | None = None,
                         **overrides: Any) -> tuple[Patch, dict[str, Any]]:
        """A behaviour edit: one DPO patch over preference pairs (requests with `rejected`),
        a `heldout` share measured before and after (`preferences`): (patch, report).
        `label`: what the patch id is named after (default: the first pair's prompt)."""
        patch, report = edit_preferences(self, as_requests(pairs), heldout=heldout,
                                         method=method, seed=seed, samples=samples, label=label,
                                         **overrides)
        if save and is_main_process():
            self._store.save(patch)
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

    # ---- read-only views for measurement ------------------------------------------------
    def paging(self) -> dict[str, Any]:
        """The pager's state: `resident` (its capacity; None: no paging), `reads` (adapters
        read back from disk so far), `pageable` (patches whose weights may leave memory) and
        `in_memory` (those of them in memory now, least recently needed first)."""
        pager = self._loaded.pager
        return {"resident": pager.capacity, "reads": pager.reads,
                "pageable": list(pager.patches), "in_memory": pager.resident()}
