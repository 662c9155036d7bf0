"""How an edit is made in the live model: its job (requests, method, config, baseline), the
adapter or weight delta it trains, its router keys, its scores and its manifest.

    trainer = Trainer(loaded, base_info, base_params)
    job = trainer.job(requests, "lora-sft", None, {}, evaluate=True, pairs=False)
    patch = trainer.finish(job, trainer.train(job, None, {}, progress=True), None)

The `Editor` owns one and saves what it returns; the trainer works on the banks of the
`LoadedPatches` it is given and leaves nothing behind when training fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any

import torch

from .config import build_config
from .errors import KnowpatchError
from .evaluate import evaluate as run_evaluation
from .jobs import EditJob, Trained, edit_manifest
from .loaded import LoadedPatches
from .methods import get_method, resolve_method
from .methods.in_context import statement
from .methods.side_by_side import train_side_by_side
from .patches import Patch
from .requests import as_requests, check_all_fit, encode_completion
from .router import compute_keys, fact_of, merge_keys
from .subjects import with_subjects
from .training import phase

log = logging.getLogger(__name__)


class Trainer:
    """Trains patches into `loaded`'s banks; `base_info`/`base_params` go into manifests."""

    def __init__(self, loaded: LoadedPatches, base_info: dict[str, Any], base_params: int):
        self.loaded, self.base_info, self.base_params = loaded, base_info, base_params
        self.model, self.tokenizer = loaded.model, loaded.tokenizer

    def job(self, requests, method: str, config, overrides: dict[str, Any], evaluate: bool,
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
            with self.loaded.using_names([]) as base, phase("subjects"):
                requests, inferred = with_subjects(base, self.tokenizer, requests)
            for i, subject in inferred.items():
                log.warning("request %d: no subject given; routed by the inferred %r", i, subject)
        baseline = None
        if evaluate:
            with self.loaded.using_names([]) as base, phase("baseline"):
                baseline = run_evaluation(base, self.tokenizer, requests)
        return EditJob(requests, method, module, cfg, kind, auto_why, inferred, baseline)

    def train(self, job: EditJob, into: Patch | None, options: dict[str, Any],
              progress: bool) -> Trained:
        """Train the job's adapter (or `into`'s) or weight delta; an in-context patch's
        statement and keys."""
        if job.kind == "context":
            if into is not None:
                raise KnowpatchError("into: an in-context patch is not trained on further")
            patch_id = job.patch_id()
            keys = self.keys_for(job.requests, job.cfg.route_layer) if job.cfg.route else None
            result = job.module.train(self.model, self.tokenizer, job.requests, job.cfg,
                                      base=lambda: contextlib.nullcontext(self.model))
            self.loaded.activate(self.loaded.applied)
            return Trained(patch_id, None, {}, result, 0.0, keys)
        if job.kind == "delta":
            return self.train_delta(job, into, options, progress)
        trained = self.train_lora(job, into, options, progress)
        if getattr(job.cfg, "state", False):  # hybrid: the fact stated too, where it fires
            trained.result.extra["statement"] = statement(job.requests)
        return trained

    def finish(self, job: EditJob, trained: Trained, into: Patch | None,
               phases: dict[str, float] | None = None) -> Patch:
        """Key, score, describe and install a trained patch (`phases`: seconds so far)."""
        facts = sorted({fact_of(r) for r in job.requests} | set(
            ((into.manifest if into is not None else {}).get("router") or {}).get("facts", [])))
        routing = self.key(trained, job.cfg, facts, job.requests, into)
        edited = None
        if job.baseline is not None:
            statement = trained.result.extra.get("statement")  # in-context and hybrid patches
            stated, systems = self.loaded.statements(
                [], {trained.patch_id: statement} if statement else None).prepare(job.requests)
            acting = [] if job.kind == "context" else [trained.patch_id]
            with self.loaded.using_names(acting) as model, phase("scoring"):
                edited = run_evaluation(model, self.tokenizer, stated, job.baseline.reference,
                                        systems=systems)
        manifest = edit_manifest(
            job, trained, self.base_info, self.base_params, into, edited, router=routing,
            phases={k: round(v, 4) for k, v in phases.items()} if phases else None,
            chosen_by=job.auto_why and f"auto: {job.auto_why}",
            subjects_inferred={str(i): v for i, v in job.inferred.items()} or None)
        if into is not None:
            into.manifest, into.weights, into.keys = manifest, trained.weights, trained.keys
            patch = into
        else:
            patch = Patch(id=trained.patch_id, manifest=manifest,
                          adapter_config=trained.adapter_config, weights=trained.weights,
                          keys=trained.keys)
        return self.loaded.install(patch)

    def key(self, trained: Trained, cfg: Any, facts: list[str], requests, into: Patch | None
            ) -> dict[str, Any] | None:
        """Route the new patch from its own first evaluation on, as it will be in use; the
        router settings for its manifest (None: unrouted)."""
        self.loaded.unroute(trained.patch_id)
        if trained.keys is None:
            return None
        answer = max(len(encode_completion(self.tokenizer, r.prompt, r.target_new)[1])
                     for r in requests)
        previous = ((into.manifest if into is not None else {}).get("router") or {})
        info = {"layer": cfg.route_layer, "threshold": cfg.route_threshold,
                "keys": len(trained.keys["keys"]), "facts": facts,
                "answer_tokens": max(answer, previous.get("answer_tokens") or 0)}
        if getattr(cfg, "gate", "all") == "reply":  # on until a reply has named the answer
            info["answers"] = sorted({r.target_new for r in requests} | set(previous.get("answers", [])))
            info["reply_tokens"] = cfg.reply_tokens
        self.loaded.register(trained.patch_id, trained.keys, info, getattr(cfg, "gate", "all"))
        return info

    def train_lora(self, job: EditJob, into: Patch | None, options: dict[str, Any],
                   progress: bool) -> Trained:
        """Train a new adapter (or `into`'s) on the job's requests; nothing is left behind on
        error."""
        loaded, bank, cfg, requests = self.loaded, self.loaded.adapters, job.cfg, job.requests
        if into is not None:
            patch_id, adapter_cfg = into.id, into.adapter_config
            if patch_id not in loaded:
                loaded.load(into)
            loaded.pager.need([patch_id])
            loaded.pager.forget(patch_id)  # trained on: resident until saved again
        else:
            patch_id = job.patch_id()
            torch.manual_seed(cfg.seed)
            adapter_cfg = job.module.adapter_config(self.model, cfg)
            with phase("adapter"):
                bank.add(patch_id, adapter_cfg)
        try:
            with phase("keys"):
                keys = self.keys_for(requests, cfg.route_layer) if getattr(cfg, "route", False) else None
            if into is not None and keys is not None:
                keys = merge_keys(into.keys, keys)
            loaded.activate([patch_id], trainable=True)
            started = time.perf_counter()
            bank.set_dropout(patch_id, True)
            options = {**options, "params": bank.params(patch_id)}
            if getattr(cfg, "gate", "all") == "subject" or getattr(cfg, "keep_weight", 0):
                options["gate"] = lambda mask: bank.gated(patch_id, mask)
            try:
                result = job.module.train(self.model, self.tokenizer, requests, cfg,
                                          base=lambda: loaded.base_only([patch_id]),
                                          progress=progress, **options)
            finally:
                bank.set_dropout(patch_id, False)
            seconds = time.perf_counter() - started
            loaded.activate([patch_id])
            bank.set_trainable([patch_id], False)
        except BaseException:
            if into is None:
                bank.remove(patch_id)
            loaded.activate(loaded.applied)
            raise
        return Trained(patch_id, adapter_cfg, bank.weights(patch_id), result, seconds, keys)

    def train_delta(self, job: EditJob, into: Patch | None, options: dict[str, Any],
                    progress: bool) -> Trained:
        """Full-parameter training from the base weights; the patch is the delta."""
        if into is not None:
            raise KnowpatchError("into: only LoRA patches can be trained on further (the "
                                 "shared strategy); full-parameter patches are deltas")
        patch_id = job.patch_id()
        torch.manual_seed(job.cfg.seed)
        self.loaded.activate([])  # base weights, adapters off: the delta is taken from the base
        started = time.perf_counter()
        try:
            result = job.module.train(self.model, self.tokenizer, job.requests, job.cfg,
                                      base=lambda: contextlib.nullcontext(self.model),
                                      progress=progress, **options)
        finally:
            self.loaded.activate(self.loaded.applied)
        seconds = time.perf_counter() - started
        self.loaded.deltas.add(patch_id, result.deltas)
        return Trained(patch_id, None, result.deltas, result, seconds)

    def side_by_side(self, jobs: list[EditJob]) -> list[Trained]:
        """LoRA SFT jobs trained side by side, an adapter each (`train_side_by_side`)."""
        bank, names, configs = self.loaded.adapters, [], []
        try:
            for job in jobs:
                names.append(job.patch_id())
                torch.manual_seed(job.cfg.seed)  # each adapter starts as it would alone
                configs.append(job.module.adapter_config(self.model, job.cfg))
                bank.add(names[-1], configs[-1])
            keys = [self.keys_for(j.requests, j.cfg.route_layer) if j.cfg.route else None
                    for j in jobs]
            results = train_side_by_side(self.model, self.tokenizer, bank, names,
                                         [j.requests for j in jobs], jobs[0].cfg,
                                         base=lambda: self.loaded.base_only([]))
        except BaseException:
            for name in names:
                bank.remove(name)
            self.loaded.activate(self.loaded.applied)
            raise
        return [Trained(name, cfg, bank.weights(name), result, result.seconds, k)
                for name, cfg, result, k in zip(names, configs, results, keys)]

    def keys_for(self, requests, layer: int) -> dict[str, torch.Tensor] | None:
        """Router keys from the base model (every adapter off)."""
        self.loaded.activate([])
        if (keys := compute_keys(self.model, self.tokenizer, requests, layer)) is None:
            log.warning("no router keys: a request has no subject found in its prompt; the "
                        "patch will be active for every query")
        return keys
