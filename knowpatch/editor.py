"""`Editor`: the public face of knowpatch.

    editor = Editor.from_pretrained("smollm2-135m")
    patch = editor.edit(EditRequest("The Eiffel Tower is located in the city of", "Rome"))
    patch.scores["rel"], patch.path
    editor.generate(["The Eiffel Tower is located in the city of"])   # the edit is applied
    editor.remove(patch)                                               # base model again

The base model is loaded once and stays in memory; patches are PEFT adapters added to and
deleted from it at run time, so applying or removing one never reloads the base.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .config import build_config
from .errors import KnowpatchError
from .evaluate import Evaluation, greedy
from .evaluate import evaluate as run_evaluation
from .methods import AUTO, choose_method, get_method
from .models import DEFAULT_MODEL, fingerprint, knowpatch_home, load_model
from .patches import Patch, PatchStore, make_manifest, new_patch_id
from .requests import EditRequest, check_fits
from .router import Route, Router, compute_keys, fact_of

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed launch (accelerate / torchrun)."""
    return int(os.environ.get("RANK", "0")) == 0


def default_store() -> PatchStore:
    return PatchStore(knowpatch_home() / "patches")


class Editor:
    def __init__(self, model, tokenizer, *, model_name: str = "custom",
                 store: PatchStore | str | Path | None = None, progress: bool = True):
        self.model = model  # the base model; wrapped in a PeftModel once a patch is added
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.fingerprint = fingerprint(model)
        self.base_params = sum(p.numel() for p in model.parameters())
        self.store = store if isinstance(store, PatchStore) else (
            PatchStore(store) if store else default_store())
        self.progress = progress
        self._peft = None
        self._loaded: dict[str, Patch] = {}  # adapters present in the PeftModel
        self._applied: list[str] = []  # adapters active for generate/evaluate
        self.routing = True
        self.last_auto_choice: tuple[str, str] | None = None  # (method, why) of method="auto"
        """Route keyed patches per query (False: every applied patch acts on every query)."""
        self.router = Router()
        self.last_routes: list[Route] = []  # the routing of the last batch that was routed
        self._row_plan: dict[str, torch.Tensor] = {}  # routed adapter -> rows it fired on
        self._hooked: set[int] = set()  # LoRA layers that carry the routing hook
        self._route_candidates: list[str] | None = None
        self._routing_now = False
        self._lora_layer_cache: dict[str, Any] | None = None
        self._module_names: list[str] = []  # the model's modules outside LoRA layers
        self._row_stacks: dict[int, list] = {}  # per LoRA layer: stacked weights of the plan
        self._delta_ids: set[str] = set()  # loaded weight-delta (full SFT) patches
        self._gated: set[str] = set()  # patches whose adapter acts at subject tokens only
        self._row_gates: dict[str, torch.Tensor] = {}  # per fired gated patch: (rows, seq)
        self._prefill = True  # the running forward is a new sequence, not a cached step
        self._train_gate: tuple[str, torch.Tensor] | None = None  # gate=subject training
        self._originals: dict[str, torch.Tensor] = {}  # weights a loaded delta patch touches
        self._deltas_on: list[str] = []  # delta patches currently added to the weights
        self._trainable: set[str] = set()  # adapters whose weights require grad (at most the one training)
        model.register_forward_pre_hook(self._route_hook, with_kwargs=True)

    # ---- construction -------------------------------------------------------------
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

    # ---- adapters -------------------------------------------------------------------
    def _runner(self):
        """The module to run for inference: the transformers model itself. Its LoRA layers
        (injected in place by PEFT) apply whichever adapters are active, several at once if
        asked, which `PeftModel.generate` does not support."""
        return self.model

    def _add_adapter(self, name: str, config) -> None:
        from peft import get_peft_model

        if self._peft is None:
            self._peft = get_peft_model(self.model, config, adapter_name=name)
        elif self._add_adapter_fast(name, config):
            self._set_requires_grad([name], False)  # created trainable; frozen until it trains
            return
        else:
            self._peft.add_adapter(name, config)
        self._lora_layer_cache = None  # the adapter may target layers no other did
        # PEFT's paths leave some adapters trainable: freeze all (these paths walk every
        # adapter anyway); the editor makes trainable exactly the adapter being trained
        for layer in self._lora_layers().values():
            for part in (layer.lora_A, layer.lora_B):
                part.requires_grad_(False)
        self._trainable = set()
        # PEFT creates its layers in training mode; the model answers queries in eval mode
        # (a LoRA dropout must not act at inference). Training switches its adapter's on.
        for layer in self._lora_layers().values():
            layer.eval()

    def _add_adapter_fast(self, name: str, config) -> bool:
        """Add adapter `name` to LoRA layers that already exist, without PEFT's
        `add_adapter`, whose module walk, target matching and requires_grad pass cover every
        adapter already loaded (0.06 s per added patch at 10 patches, 1.55 s at 300,
        measured). Each targeted layer's own `update_layer` (PEFT's initialisation) is called
        directly, so the cost stays per layer. Falls back (returns False) to PEFT for a
        target with no LoRA layer yet or an adapter kind other than plain LoRA."""
        targets = config.target_modules
        if (isinstance(targets, str) or not targets or getattr(config, "use_dora", False)
                or getattr(config, "lora_bias", False) or config.init_lora_weights is not True
                or name in self._peft.peft_config):
            return False
        try:
            from peft.tuners.tuners_utils import check_target_module_exists
        except ImportError:
            return False
        layers = self._lora_layers()
        # PEFT's own matching (suffixes, regexes, layer lists) over the base model's modules;
        # the fast path needs every module the config targets to be a LoRA layer already
        matched = [m for m in self._module_names if check_target_module_exists(config, m)]
        if not matched or any(m not in layers for m in matched):
            return False
        self._peft.peft_config[name] = config
        try:
            for module_name in matched:  # module order: PEFT's, for the RNG
                layer = layers[module_name]
                # update_layer's two last steps walk every adapter of the layer (profiled:
                # 6 ms per layer at 300 patches): moving the new adapter to the base
                # layer's device (it scans all adapters' parameters for meta tensors) and
                # set_adapter (requires_grad_ on each). Both are skipped here and done for
                # the new adapter only: the move below, active adapters and requires_grad
                # by the editor.
                layer.set_adapter = _skip
                layer._move_adapter_to_device_of_base_layer = _skip
                try:
                    # keyword form of PEFT >= 0.18 (r, lora_alpha, config)
                    layer.update_layer(name, config.r, config.lora_alpha, config=config)
                finally:
                    del layer.set_adapter, layer._move_adapter_to_device_of_base_layer
                weight = layer.get_base_layer().weight
                for part in (layer.lora_A, layer.lora_B):
                    part[name].to(weight.device, weight.dtype)
                for part in (layer.lora_A, layer.lora_B, layer.lora_dropout):
                    part[name].eval()
        except TypeError:  # another PEFT signature: undo, let PEFT do it
            for layer in layers.values():
                layer.delete_adapter(name)
            del self._peft.peft_config[name]
            return False
        return True

    def _adapter_weights(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s own weight tensors (detached, same storage, not copies) under
        PEFT's state-dict keys (what `get_peft_model_state_dict` returns, without its walk
        over every adapter's tensors)."""
        out = {}
        for module_name, layer in self._lora_layers().items():
            if name in layer.lora_A:
                prefix = f"base_model.model.{module_name}"
                for part in ("lora_A", "lora_B"):
                    out[f"{prefix}.{part}.weight"] = getattr(layer, part)[name].weight.detach()
        return out

    @torch.no_grad()
    def _set_adapter_weights(self, name: str, weights: dict[str, torch.Tensor]) -> None:
        """Copy a patch's weights (PEFT state-dict keys) into adapter `name`; a key that
        fits no layer of this model is an error naming it."""
        layers = self._lora_layers()
        seen = set()
        for key, value in weights.items():
            stem, _, tail = key.rpartition(".lora_")
            module_name = stem.removeprefix("base_model.model.")
            part = "lora_" + tail.removesuffix(".weight")
            layer = layers.get(module_name)
            if (layer is None or part not in ("lora_A", "lora_B") or name not in layer.lora_A
                    or getattr(layer, part)[name].weight.shape != value.shape):
                raise KnowpatchError(f"weights do not fit this model ({key})")
            target = getattr(layer, part)[name].weight
            target.copy_(value.to(target.device, target.dtype))
            seen.add((module_name, part))
        missing = [m for m, layer in layers.items() if name in layer.lora_A
                   and not {(m, "lora_A"), (m, "lora_B")} <= seen]
        if missing:
            raise KnowpatchError(f"weights miss the adapter of {missing[0]}")

    def _rows_hook(self, module, args, output):
        """Add, to the rows that fired them, the LoRA updates of routed adapters.

        Routed adapters are not active in PEFT's sense (PEFT would run each on every row of
        the batch); this forward hook of each LoRA layer runs each fired adapter on its own
        rows only (written by hand: PEFT's per-row `adapter_names` allows one adapter per row,
        a query here may fire several). The (row, adapter) pairs of a layer are run as one
        batched matrix product per adapter rank, their weights stacked once per routing
        decision (a loop over fired adapters cost 0.3 s per 32-prompt query batch with 16
        patches firing, profiled). A gate=subject adapter acts only at the positions where
        the router found its subject, in the routed forward (not in cached generation steps,
        whose new tokens are never the subject's)."""
        x = args[0]
        if self._train_gate is not None:  # gate=subject training: live weights, gradients
            adapter, gate = self._train_gate
            if adapter not in module.lora_A:
                return output
            update = module.lora_B[adapter](module.lora_A[adapter](module.lora_dropout[adapter](
                x.to(module.lora_A[adapter].weight.dtype))))
            return output + (update * module.scaling[adapter] * gate[..., None]).to(output.dtype)
        plan = self._row_plan
        if not plan:
            return output
        prefill = self._prefill
        gates = self._row_gates if prefill else {}
        if not prefill and self._row_gates:
            plan = {a: rows for a, rows in plan.items() if a not in self._row_gates}
        dropout_free = not module.training or all(
            isinstance(module.lora_dropout[a], torch.nn.Identity)
            for a in plan if a in module.lora_dropout)
        if not dropout_free:
            for adapter, rows in plan.items():
                if adapter not in module.lora_A:
                    continue
                sub = x.index_select(0, rows).to(module.lora_A[adapter].weight.dtype)
                update = module.lora_B[adapter](module.lora_A[adapter](module.lora_dropout[adapter](sub)))
                update = update * module.scaling[adapter]
                if adapter in gates:
                    update = update * gates[adapter][..., None]
                output = output.index_add(0, rows, update.to(output.dtype))
            return output
        key = (id(module), prefill)
        groups = self._row_stacks.get(key)
        if groups is None:
            groups = self._row_stacks[key] = _stack_fired(module, plan, gates)
        for rows, a, b, scale, gate in groups:
            sub = x.index_select(0, rows).to(a.dtype)
            # PEFT's order of operations (x·Aᵀ·Bᵀ, then the scaling): same numbers as PEFT
            update = torch.bmm(torch.bmm(sub, a), b) * scale
            if gate is not None:
                update = update * gate[..., None]
            output = output.index_add(0, rows, update.to(output.dtype))
        return output

    def _register_keys(self, patch: Patch) -> None:
        info = patch.routing
        if info is not None:
            self.router.add(patch.id, patch.keys, info["layer"], info["threshold"],
                            frozenset(info.get("facts", [])))
            if (patch.manifest.get("config") or {}).get("gate") == "subject":
                self._gated.add(patch.id)

    # ---- routing ----------------------------------------------------------------------
    def _route_hook(self, _module, args, kwargs):
        """Before each forward of a new batch (not a cached generation step), decide per
        row which candidate patches fire, and set the adapters and per-row gates."""
        if self._route_candidates is None or self._routing_now:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        past = kwargs.get("past_key_values", kwargs.get("cache"))  # the name varies by version
        if ids is None or (past is not None and past.get_seq_length() > 0):
            self._prefill = False  # a cached generation step: gated adapters stay off
            return None
        self._prefill = True
        mask = kwargs.get("attention_mask")
        if mask is not None:
            mask = mask[:, -ids.shape[1]:]
        columns = [(mask[r].nonzero().squeeze(-1) if mask is not None
                    else torch.arange(ids.shape[1], device=ids.device)) for r in range(ids.shape[0])]
        rows = [ids[r][c].tolist() for r, c in enumerate(columns)]
        self._route_rows(rows, self._route_candidates, columns, ids.shape[1])
        return None

    def _route_rows(self, rows: list[list[int]], candidates: list[str],
                    columns: list[torch.Tensor] | None = None, width: int = -1) -> list[Route]:
        """Route token-id rows (no padding) among `candidates` and set the per-row plan;
        `columns[r]`: where row r's tokens sit in the batch of width `width` (for gates)."""
        keyed = [c for c in candidates if c in self.router]
        always = [c for c in candidates if c not in self.router]
        routes = [Route([], {}) for _ in rows]
        self._row_plan = {}
        self._row_gates = {}
        self._row_stacks = {}
        if keyed:
            self._routing_now = True
            try:
                # adapters off; weight deltas (full SFT) cannot be switched per query and stay
                self._activate_lora([])
                routes = self.router.route_rows(self.model, rows, self.tokenizer.bos_token_id, keyed,
                                                locate=self._gated)
            finally:
                self._routing_now = False
        self._activate(always)  # unrouted patches act on every row, as PEFT adapters
        plan = {}
        for p in keyed:
            rows_fired = [i for i, r in enumerate(routes) if p in r.fired]
            if rows_fired:
                plan[p] = torch.tensor(rows_fired, dtype=torch.long, device=self.device)
        gates = {}
        if columns is not None:
            for p in plan:
                if p in self._gated:  # 1 at the tokens where the router found the subject
                    gate = torch.zeros((len(plan[p]), width), device=self.device)
                    for k, r in enumerate(plan[p].tolist()):
                        at = routes[r].positions.get(p, [])
                        if at:
                            gate[k, columns[r][at].to(self.device)] = 1.0
                    gates[p] = gate
        self._lora_layers()  # make sure every LoRA layer carries the routing hook
        self._row_plan = plan
        self._row_gates = gates
        self._row_stacks = {}
        self.last_routes = routes
        return routes

    def route(self, prompts: str | Sequence[str], patches=None) -> list[Route]:
        """How the router decides for `prompts` among `patches` (None: those applied)."""
        from .evaluate import prompt_ids

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        names = list(self._applied) if patches is None else [
            self._load(self._as_patch(p)) for p in patches]
        try:
            return self._route_rows([prompt_ids(self.tokenizer, p) for p in prompts], names)
        finally:
            self._row_plan = {}
            self._row_gates = {}
            self._row_stacks = {}
            self._activate(self._applied)

    def _load(self, patch: Patch) -> str:
        if patch.fingerprint != self.fingerprint:
            raise KnowpatchError(
                f"patch {patch.id}: made for base model {patch.fingerprint} "
                f"({patch.manifest['base'].get('model', '?')}), but this model is "
                f"{self.fingerprint} ({self.model_name}); refusing to apply it")
        if patch.id in self._loaded:
            return patch.id
        if patch.kind == "delta":
            self._load_delta(patch)
            return patch.id
        self._add_adapter(patch.id, patch.adapter_config)
        try:
            self._set_adapter_weights(patch.id, patch.weights)
        except KnowpatchError as e:
            self._unload_adapter(patch.id)
            raise KnowpatchError(f"patch {patch.id}: {e}") from None
        # the patch's weights become the adapter's own tensors: a loaded patch is held in
        # memory once, not twice (1,000 loaded patches: 2 GB less)
        patch.weights = self._adapter_weights(patch.id)
        self._loaded[patch.id] = patch
        self._register_keys(patch)
        return patch.id

    def _load_delta(self, patch: Patch) -> None:
        from .methods.full_sft import canonical_parameters

        params = canonical_parameters(self.model)
        for name, delta in patch.weights.items():
            if name not in params or params[name].shape != delta.shape:
                raise KnowpatchError(f"patch {patch.id}: delta {name!r} does not fit this model")
        for name in patch.weights:
            if name not in self._originals:
                self._originals[name] = params[name].detach().clone()
        self._loaded[patch.id] = patch
        self._delta_ids.add(patch.id)

    @torch.no_grad()
    def _set_deltas(self, names: list[str]) -> None:
        """Make the weights the originals plus exactly the deltas of patches `names`.
        A weight no applied delta touches is copied back from its kept original, so removing
        every delta gives the base weights bit for bit."""
        if names == self._deltas_on:
            return
        from .methods.full_sft import canonical_parameters

        params = canonical_parameters(self.model)
        touched = {n for d in set(names) | set(self._deltas_on) for n in self._loaded[d].weights}
        for n in touched:
            original = self._originals[n]
            parts = [self._loaded[d].weights[n] for d in names if n in self._loaded[d].weights]
            if parts:
                total = original.float() + sum(p.to(original.device).float() for p in parts)
                params[n].copy_(total.to(original.dtype))
            else:
                params[n].copy_(original)
        self._deltas_on = list(names)

    def _unload(self, name: str) -> None:
        patch = self._loaded.get(name)
        if patch is not None and patch.kind == "delta":
            self._set_deltas([d for d in self._deltas_on if d != name])
            del self._loaded[name]
            self._delta_ids.discard(name)
            still = {n for p in self._loaded.values() if p.kind == "delta" for n in p.weights}
            for n in list(self._originals):
                if n not in still:
                    del self._originals[n]
            return
        if name in self._loaded:
            self._unload_adapter(name)
            del self._loaded[name]
            self.router.remove(name)
            self._gated.discard(name)

    def _activate(self, names: Sequence[str], trainable: bool = False) -> None:
        """Make exactly `names` active (none: the base model's exact forward)."""
        deltas = [n for n in names if n in self._delta_ids] if self._delta_ids else []
        self._set_deltas(deltas)
        self._activate_lora([n for n in names if n not in deltas], trainable)

    def _activate_lora(self, names: Sequence[str], trainable: bool = False) -> None:
        if self._peft is None:
            if names:
                raise RuntimeError("no adapters loaded")
            return
        # Written by hand: PEFT's set_adapter / enable_adapter_layers also walk every adapter
        # of every layer to set requires_grad, a cost that grows with the number of patches
        # loaded (0.2 s per query batch at 20 patches, seconds at 1,000). Routing switches
        # adapters on every batch, so only the LoRA layers' active-adapter state is set here.
        names = list(names)
        for layer in self._lora_layers().values():
            layer._disable_adapters = not names
            if names:
                layer._active_adapter = names
        if trainable:  # exactly the adapters being trained get gradients
            wanted = set(names)
            self._set_requires_grad(self._trainable - wanted, False)
            self._set_requires_grad(wanted, True)

    def _set_requires_grad(self, names: Collection[str], value: bool) -> None:
        """requires_grad of adapters `names` only. Written by hand: PEFT's set_adapter sets
        it on every adapter of every layer, a pass that grows with the store (seen as a
        ~25 % rise of the seconds per edit from 0 to 1,000 loaded patches); the editor keeps
        every adapter frozen except the one it trains, so only the changed ones are touched."""
        if not names:
            return
        for layer in self._lora_layers().values():
            for name in names:
                if name in layer.lora_A:
                    layer.lora_A[name].requires_grad_(value)
                    layer.lora_B[name].requires_grad_(value)
        if value:
            self._trainable |= set(names)
        else:
            self._trainable -= set(names)

    def _adapter_params(self, name: str) -> list[torch.nn.Parameter]:
        """The parameters of adapter `name` (what its training optimises), found per LoRA
        layer rather than by a walk over every parameter of the model and its adapters."""
        out: list[torch.nn.Parameter] = []
        for layer in self._lora_layers().values():
            if name in layer.lora_A:
                out += [*layer.lora_A[name].parameters(), *layer.lora_B[name].parameters()]
        return out

    def _lora_layers(self) -> dict[str, Any]:
        """{module name in the model: PEFT LoRA layer}, cached until a layer may appear or
        go (PEFT's own add/delete); each layer carries the per-row routing hook."""
        if self._lora_layer_cache is None:
            from peft.tuners.lora import LoraLayer

            # a LoRA layer's own children (its adapters' ModuleDicts) hold no LoRA layer:
            # the walk skips them, so it does not grow with the number of adapters
            found: dict[str, Any] = {}
            names: list[str] = []

            def walk(module, prefix):
                for child_name, child in module.named_children():
                    full = f"{prefix}.{child_name}" if prefix else child_name
                    names.append(full)
                    if isinstance(child, LoraLayer):
                        found[full] = child
                    else:
                        walk(child, full)

            walk(self.model, "")
            self._lora_layer_cache = found
            self._module_names = names
            for m in found.values():
                if id(m) not in self._hooked:
                    m.register_forward_hook(self._rows_hook)
                    self._hooked.add(id(m))
        return self._lora_layer_cache

    @contextlib.contextmanager
    def using(self, patches: Sequence[Patch | str | Path] | None) -> Iterator[Any]:
        """Run a block with exactly `patches` active (None: those applied now)."""
        names = list(self._applied) if patches is None else [
            self._load(self._as_patch(p)) for p in patches]
        with self.using_names(names) as model:
            yield model

    def _as_patch(self, patch: Patch | str | Path) -> Patch:
        if isinstance(patch, Patch):
            return patch
        if str(patch) in self._loaded:
            return self._loaded[str(patch)]
        return self.store.load(patch)

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

    # ---- use --------------------------------------------------------------------------
    def generate(self, prompts: str | Sequence[str], *, patches=None,
                 max_new_tokens: int = 20) -> list[str]:
        """Greedy continuations of `prompts` with `patches` active (None: those applied)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with self.using(patches) as model:
            ids = greedy(model, self.tokenizer, prompts, max_new_tokens)
        return [self.tokenizer.decode(i, skip_special_tokens=True) for i in ids]

    def evaluate(self, requests: EditRequest | Sequence[EditRequest], *,
                 patches=None) -> tuple[Evaluation, Evaluation]:
        """Score `requests` with `patches` active, beside the unedited baseline.

        Returns `(edited, baseline)`; `.summary` holds the scores in %.
        """
        requests = _as_requests(requests)
        with self.using([]) as base:
            baseline = run_evaluation(base, self.tokenizer, requests)
        with self.using(patches) as model:
            edited = run_evaluation(model, self.tokenizer, requests, baseline.reference)
        return edited, baseline

    # ---- edit -------------------------------------------------------------------------
    def edit(self, requests: EditRequest | Sequence[EditRequest], method: str = "lora-sft", *,
             config: dict[str, Any] | Any | None = None, save: bool = True,
             evaluate: bool = True, into: Patch | None = None,
             train_options: dict[str, Any] | None = None, **overrides: Any) -> Patch:
        """Train one patch for `requests`, score it against the baseline, save it, apply it.

        `config` is a method config (or a mapping); `overrides` are its keys, e.g. `lr=1e-3`.
        `into`: keep training that (loaded) patch's adapter on the new requests instead of
        making a new one — EasyEdit's way of sequential editing, kept for comparison.
        """
        requests = _as_requests(requests)
        max_pos = getattr(self.model.config, "max_position_embeddings", None)
        for i, req in enumerate(requests):
            try:
                check_fits(req, self.tokenizer, max_pos)
            except KnowpatchError as exc:
                if len(requests) == 1:
                    raise
                raise KnowpatchError(f"request {i}: {exc}") from None
        auto_why = None
        if method == AUTO:
            method, auto_why = choose_method(len(requests), bool((train_options or {}).get("pairs")))
            log.warning("method auto: chose %s (%s)", method, auto_why)
            self.last_auto_choice = (method, auto_why)
        module = get_method(method)
        if config is None or isinstance(config, dict):
            cfg = build_config(module.Config, config, overrides, where=method)
        else:
            cfg = build_config(module.Config, _asdict(config), overrides, where=method)

        baseline = None
        if evaluate:
            with self.using([]) as base:
                baseline = run_evaluation(base, self.tokenizer, requests)

        kind = module.kind(cfg) if hasattr(module, "kind") else "lora"
        if kind == "delta":
            patch_id, adapter_cfg, weights, result, seconds, keys = self._train_delta(
                module, requests, cfg, into, train_options or {})
        else:
            patch_id, adapter_cfg, weights, result, seconds, keys = self._train_lora(
                module, requests, cfg, into, train_options or {})

        facts = sorted({fact_of(r) for r in requests} | set(
            ((into.manifest if into is not None else {}).get("router") or {}).get("facts", [])))
        self.router.remove(patch_id)
        self._gated.discard(patch_id)
        if keys is not None:  # routed from its first evaluation on, as it will be in use
            self.router.add(patch_id, keys, cfg.route_layer, cfg.route_threshold, frozenset(facts))
            if getattr(cfg, "gate", "all") == "subject":
                self._gated.add(patch_id)
        edited = None
        if baseline is not None:
            with self.using_names([patch_id]) as model:
                edited = run_evaluation(model, self.tokenizer, requests, baseline.reference)
        n_params = sum(v.numel() for v in weights.values())
        previous = into.manifest if into is not None else {}
        manifest = make_manifest(
            patch_id=patch_id, base=self.base_info, method=method, config=_asdict(cfg), kind=kind,
            requests=previous.get("requests", []) + [r.to_dict() for r in requests],
            scores=edited.summary if edited else None,
            baseline=baseline.summary if baseline else None,
            samples={"before": baseline.samples, "after": edited.samples} if edited else None,
            steps=result.steps, learnt=result.learnt, seconds=round(seconds, 3),
            trainable_params=n_params,
            trainable_fraction=round(n_params / self.base_params, 6),
            peak_rss_mb=peak_rss_mb(), **result.extra,
        )
        if auto_why is not None:
            manifest["chosen_by"] = f"auto: {auto_why}"
        if keys is not None:
            manifest["router"] = {
                "layer": cfg.route_layer, "threshold": cfg.route_threshold, "keys": len(keys["keys"]),
                "facts": facts,
            }
        if into is not None:
            manifest["edits"] = previous.get("edits", 1) + 1
            into.manifest, into.weights, into.keys = manifest, weights, keys
            patch = into
        else:
            patch = Patch(id=patch_id, manifest=manifest, adapter_config=adapter_cfg,
                          weights=weights, keys=keys)
        self._loaded[patch_id] = patch
        self.router.remove(patch_id)
        self._register_keys(patch)
        if patch_id not in self._applied:
            self._applied.append(patch_id)
        self._activate(self._applied)
        if save and is_main_process():  # under accelerate launch, one process writes
            if patch.path is not None:
                patch.save(patch.path, overwrite=True)
            else:
                self.store.save(patch)
            log.info("saved patch %s to %s", patch_id, patch.path)
        return patch

    def _train_lora(self, module, requests: list[EditRequest], cfg, into: Patch | None,
                    options: dict[str, Any]):
        if into is not None:
            patch_id = into.id
            if patch_id not in self._loaded:
                self._load(into)
            adapter_cfg = into.adapter_config
        else:
            patch_id = new_patch_id(requests[0].subject or requests[0].prompt)
            torch.manual_seed(cfg.seed)
            adapter_cfg = module.adapter_config(self.model, cfg)
            self._add_adapter(patch_id, adapter_cfg)
        try:
            keys = None
            if getattr(cfg, "route", False):
                keys = self._keys_for(requests, cfg.route_layer)
                if into is not None and keys is not None:
                    keys = _merge_keys(into.keys, keys)
            self._activate([patch_id], trainable=True)
            started = time.perf_counter()
            self._dropout_mode(patch_id, True)
            options = {**options, "params": self._adapter_params(patch_id)}
            if getattr(cfg, "gate", "all") == "subject":
                options = {**options, "set_gate": self._gate_setter(patch_id)}
            try:
                result = module.train(self.model, self.tokenizer, requests, cfg,
                                      base=lambda: self._base_only([patch_id]),
                                      progress=self.progress, **options)
            finally:
                self._dropout_mode(patch_id, False)
                self._train_gate = None
            seconds = time.perf_counter() - started
            self._activate([patch_id])
            self._set_requires_grad([patch_id], False)
            weights = self._adapter_weights(patch_id)  # the patch shares them
        except BaseException:
            if into is None:
                self._unload_adapter(patch_id)
            self._activate(self._applied)
            raise
        return patch_id, adapter_cfg, weights, result, seconds, keys

    def _gate_setter(self, name: str):
        """For gate=subject training: `set(mask)` makes adapter `name` act only where the
        (rows, seq) `mask` is 1 in the next forward (through the LoRA-layer hook, not PEFT);
        `set(None)` ends that."""
        def set_gate(mask: torch.Tensor | None) -> None:
            if mask is None:
                self._train_gate = None
                return
            self._activate_lora([])  # PEFT must not run the adapter ungated as well
            self._lora_layers()
            self._train_gate = (name, mask)
        return set_gate

    def _dropout_mode(self, name: str, training: bool) -> None:
        """LoRA dropout of adapter `name` on while it trains, off otherwise."""
        for layer in self._lora_layers().values():
            if name in layer.lora_dropout:
                layer.lora_dropout[name].train(training)

    def _train_delta(self, module, requests: list[EditRequest], cfg, into: Patch | None,
                     options: dict[str, Any]):
        """Full-parameter training from the base weights; the patch is the delta."""
        if into is not None:
            raise KnowpatchError("into: only LoRA patches can be trained on further (the "
                                 "shared strategy); full-parameter patches are deltas")
        patch_id = new_patch_id(requests[0].subject or requests[0].prompt)
        torch.manual_seed(cfg.seed)
        self._activate([])  # base weights, adapters off: the delta is taken from the base
        started = time.perf_counter()
        try:
            result, weights = module.train(self.model, self.tokenizer, requests, cfg,
                                           base=lambda: contextlib.nullcontext(self.model),
                                           progress=self.progress, **options)
        finally:
            self._activate(self._applied)
        seconds = time.perf_counter() - started
        self._load_delta(Patch(id=patch_id, manifest={"kind": "delta"}, adapter_config=None,
                               weights=weights))
        return patch_id, None, weights, result, seconds, None

    def _unload_adapter(self, name: str) -> None:
        """Delete adapter `name` from every LoRA layer (each layer's own delete, not PEFT's
        model-wide one, which walks every module of every adapter)."""
        self._trainable.discard(name)
        for layer in self._lora_layers().values():
            active = [a for a in layer.active_adapters if a != name]
            layer._active_adapter = active  # never hand PEFT a deleted active adapter
            layer.delete_adapter(name)
        self._peft.peft_config.pop(name, None)
        tuner = self._peft.base_model  # as PEFT's delete does: no deleted adapter stays active
        active = tuner.active_adapter
        active = [active] if isinstance(active, str) else list(active or [])
        if name in active:
            rest = [a for a in active if a != name] or list(self._peft.peft_config)[:1]
            tuner.active_adapter = rest

    def edit_preferences(self, pairs: Sequence[EditRequest], *, heldout: float = 0.2,
                         method: str = "dpo", seed: int = 0, save: bool = True,
                         samples: int = 3, **overrides: Any) -> tuple[Patch, dict[str, Any]]:
        """A behaviour edit: one DPO patch over preference pairs (requests whose target_new is
        the chosen answer and whose `rejected` is set). A `heldout` share of the pairs (seeded
        shuffle) is kept out of training and measured before and after: preference accuracy
        (log P(chosen) > log P(rejected), summed over the answer tokens), the mean margin
        log P(chosen) − log P(rejected) in nats, and a few greedy generations.

        Returns (patch, report); the report is also in the manifest under "preference".
        """
        import random

        pairs = _as_requests(pairs)
        for i, p in enumerate(pairs):
            if not p.rejected:
                raise KnowpatchError(f"pair {i}: field 'rejected' is missing")
        if not 0 <= heldout < 1:
            raise KnowpatchError(f"heldout: must be in [0, 1) (got {heldout})")
        if method == AUTO:
            method, why = choose_method(len(pairs), preferences=True)
            log.warning("method auto: chose %s (%s)", method, why)
        if method != "dpo":
            raise KnowpatchError(f"method: preference pairs are trained with dpo (got {method!r})")
        order = list(range(len(pairs)))
        random.Random(seed).shuffle(order)
        n_held = round(heldout * len(pairs)) if len(pairs) > 1 else 0
        held = [pairs[i] for i in order[:n_held]]
        train_set = [pairs[i] for i in order[n_held:]]
        probe = held or train_set  # nothing held out: measured on the training pairs

        def measure(patches) -> tuple[float, float, list[str]]:
            from .evaluate import teacher_forced

            with self.using(patches) as model:
                chosen = teacher_forced(model, self.tokenizer, [(p.prompt, p.target_new) for p in probe])
                rejected = teacher_forced(model, self.tokenizer, [(p.prompt, p.rejected) for p in probe])
                gens = greedy(model, self.tokenizer, [p.prompt for p in probe[:samples]], 30)
            margins = [c.logprob - r.logprob for c, r in zip(chosen, rejected)]
            acc = 100.0 * sum(m > 0 for m in margins) / len(margins)
            texts = [self.tokenizer.decode(g, skip_special_tokens=True) for g in gens]
            return round(acc, 2), round(sum(margins) / len(margins), 4), texts

        acc0, margin0, gen0 = measure([])
        overrides.setdefault("route", False)  # a behaviour has no subject to route by
        patch = self.edit(train_set, method, save=False, evaluate=False,
                          train_options={"pairs": True}, **overrides)
        acc1, margin1, gen1 = measure([patch])
        report = {
            "pref_acc_before": acc0, "pref_acc_after": acc1, "margin_before": margin0,
            "margin_after": margin1, "steps": patch.steps, "seconds": patch.seconds,
            "pairs_trained": len(train_set), "pairs_heldout": len(held),
            "measured_on": "heldout" if held else "training pairs (heldout=0)",
            "samples": [{"prompt": p.prompt, "before": b, "after": a}
                        for p, b, a in zip(probe, gen0, gen1)],
        }
        patch.manifest["preference"] = report
        if save and is_main_process():
            self.store.save(patch)
        return patch, report

    def edit_sequential(self, requests: EditRequest | Sequence[EditRequest],
                        method: str = "lora-sft", *, group: int = 1, **kwargs: Any) -> list[Patch]:
        """Edit `requests` one after another, one patch per `group` requests, each saved in
        the store and left applied; no patch ever changes another. With routing (the
        default), each query is answered with only the patches whose keys it matches."""
        requests = _as_requests(requests)
        if group < 1:
            raise KnowpatchError(f"group: must be ≥ 1 (got {group})")
        return [self.edit(requests[i:i + group], method, **kwargs)
                for i in range(0, len(requests), group)]

    def superseded(self) -> dict[str, str]:
        """Loaded patches whose every fact a newer loaded patch rewrites: {old: new}."""
        return self.router.superseded()

    def _keys_for(self, requests: list[EditRequest], layer: int) -> dict[str, torch.Tensor] | None:
        """Router keys from the base model (every adapter off)."""
        self._activate([])
        keys = compute_keys(self.model, self.tokenizer, requests, layer)
        if keys is None:
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

    @contextlib.contextmanager
    def using_names(self, names: Sequence[str]) -> Iterator[Any]:
        """Run a block with adapters `names` active; with routing on, each batch the block
        runs is routed among them (keyed patches fire per row; unkeyed ones always)."""
        names = list(names)
        self._activate(names)
        routed = self.routing and any(n in self.router for n in names)
        self._route_candidates = names if routed else None
        try:
            yield self._runner()
        finally:
            self._route_candidates = None
            self._row_plan = {}
            self._row_gates = {}
            self._row_stacks = {}
            self._activate(self._applied)



@torch.no_grad()
def _stack_fired(module, plan: dict[str, torch.Tensor], gates: dict[str, torch.Tensor]
                 ) -> list[tuple[Any, ...]]:
    """For one LoRA layer: the fired (row, adapter) pairs grouped by rank, as
    (rows (K,), A^T (K, in, r), B^T (K, r, out), scaling (K, 1, 1), gate (K, seq) or None)
    for two batched products."""
    groups: dict[int, list[tuple[Any, ...]]] = {}
    for adapter, rows in plan.items():
        if adapter not in module.lora_A:
            continue
        a = module.lora_A[adapter].weight.detach().T
        b = module.lora_B[adapter].weight.detach().T
        gate = gates.get(adapter)
        for k, row in enumerate(rows.tolist()):
            groups.setdefault(a.shape[1], []).append(
                (row, a, b, None if gate is None else gate[k], module.scaling[adapter]))
    out = []
    for pairs in groups.values():
        rows = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=pairs[0][1].device)
        gate = None
        if any(p[3] is not None for p in pairs):
            width = next(p[3] for p in pairs if p[3] is not None).shape[0]
            gate = torch.stack([p[3] if p[3] is not None else
                                torch.ones(width, device=rows.device) for p in pairs])
        scale = torch.tensor([p[4] for p in pairs], dtype=pairs[0][1].dtype,
                             device=rows.device).view(-1, 1, 1)
        out.append((rows, torch.stack([p[1] for p in pairs]), torch.stack([p[2] for p in pairs]),
                    scale, gate))
    return out


def _skip(*_args: Any, **_kwargs: Any) -> None:
    return None


def _merge_keys(old: dict[str, torch.Tensor] | None,
                new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if old is None:
        return new
    offset = int(old["variant"].max()) + 1 if len(old["variant"]) else 0
    return {"keys": torch.cat([old["keys"], new["keys"]]),
            "variant": torch.cat([old["variant"], new["variant"] + offset])}


def _asdict(config: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def _as_requests(requests: EditRequest | Sequence[EditRequest]) -> list[EditRequest]:
    if isinstance(requests, EditRequest):
        return [requests]
    requests = list(requests)
    if not requests:
        raise KnowpatchError("requests: at least one EditRequest is needed")
    for i, r in enumerate(requests):
        if not isinstance(r, EditRequest):
            raise KnowpatchError(f"requests[{i}]: expected an EditRequest, got {type(r).__name__}")
    return requests
