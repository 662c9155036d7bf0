"""The adapter bank: LoRA adapters added to and removed from a live model, and run per row.

    bank = AdapterBank(model)
    bank.add("p1", lora_config)          # "per-layer" (the fast path) or "peft"
    bank.load_weights("p1", tensors)     # PEFT state-dict keys
    bank.activate(["p1"])                # active on every row, as PEFT adapters are
    with bank.running(RowPlan({"p1": torch.tensor([0, 2])})):
        model(**batch)                   # p1 acts on rows 0 and 2 only

The bank owns the PEFT side of patches: adapter surgery, weights in and out, trainable
flags, LoRA dropout, the active set, and per-row execution of a routing plan. A plan is a
value handed to one `running` block, whose hooks are removed when it ends; nothing about a
call outlives it. It knows nothing of patches, routers or editors.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch


@dataclass
class RowPlan:
    """Which rows of a batch each routed adapter runs on, for one forward.

    `gates[a]` (gated adapters only) is a (len(rows[a]), seq) 0/1 mask: the adapter acts
    only at the positions where it is 1 (the subject's tokens). `steps[a]`: in how many of
    the cached generation steps that follow this forward adapter `a` still acts (absent:
    all of them)."""

    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    gates: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    handoff: frozenset[str] = frozenset()
    """Adapters (with a step limit) after whose last step the base model re-reads the
    text so far: the rows they ran on continue from a cache of the base weights' states."""
    train: bool = False
    """Gradients flow to the adapters (training side by side): each runs its own product
    on live weights, not the stacked copies inference uses."""
    stacks: dict[int, list] = field(default_factory=dict, repr=False, compare=False)
    """Per LoRA layer: the fired adapters' weights stacked for batched products (filled on
    first use, so a plan reused over many generation steps stacks them once)."""
    derived: dict[frozenset, RowPlan] = field(default_factory=dict, repr=False, compare=False)
    until: dict[str, Callable[[list[int]], bool]] = field(default_factory=dict)
    """Adapters that stop acting on a row once its generated tokens satisfy the test (the
    reply has given the answer), their step limit still a ceiling: `released`."""

    def at_step(self, step: int, released: dict[str, set[int]] | None = None) -> RowPlan:
        """The plan for the `step`-th cached generation step after this plan's forward
        (step ≥ 1): adapters past their step limit are off, so are they on the rows that
        `released` them, and gates do not apply (a new token is never the subject's). Plans
        for equal adapters on equal rows are shared."""
        rows = {a: r for a, r in self.rows.items() if self.steps.get(a, step) >= step}
        if released:
            rows = {a: (r[~torch.isin(r, torch.tensor(sorted(released[a]), device=r.device))]
                        if released.get(a) else r) for a, r in rows.items()}
            rows = {a: r for a, r in rows.items() if len(r)}
        if not self.gates and rows.keys() == self.rows.keys() and all(
                len(rows[a]) == len(self.rows[a]) for a in rows):
            return self
        key = frozenset((a, tuple(r.tolist())) for a, r in rows.items())
        if key not in self.derived:
            self.derived[key] = RowPlan(rows)
        return self.derived[key]

    def released(self, generated: torch.Tensor, done: dict[str, set[int]]) -> dict[str, set[int]]:
        """The rows each `until` adapter is done with now, given the tokens generated so far
        (rows, steps), past those in `done` (which this adds them to)."""
        fresh: dict[str, set[int]] = {}
        for a, test in self.until.items():
            for r in self.rows[a].tolist():
                if r not in done.setdefault(a, set()) and test(generated[r].tolist()):
                    fresh.setdefault(a, set()).add(r)
                    done[a].add(r)
        return fresh

    def handed_off(self, step: int, fresh: dict[str, set[int]] | None = None,
                   released: dict[str, set[int]] | None = None) -> list[int]:
        """The rows to re-read on the base weights before the `step`-th cached generation
        step: those a handoff adapter ran on until the step before (its step limit reached,
        or `fresh`ly released by its test), on which no adapter acts any longer."""
        released = released or {}
        before = {a: released.get(a, set()) - (fresh or {}).get(a, set()) for a in self.rows}
        ended = {r for a in self.handoff if a in self.rows and self.steps.get(a, step) == step - 1
                 for r in self.rows[a].tolist() if r not in before[a]}
        ended |= {r for a, rows in (fresh or {}).items() if a in self.handoff for r in rows}
        if not ended:
            return []
        acting = {r for a, rows in self.at_step(step, released).rows.items() for r in rows.tolist()}
        return sorted(ended - acting)


class AdapterBank:
    """The LoRA adapters of one model, each under its own name (a patch id)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.peft = None  # the PeftModel, once the first adapter is added
        self._layers: dict[str, Any] | None = None  # cache of `layers()`
        self._module_names: list[str] = []  # the model's modules outside LoRA layers
        self._trainable: set[str] = set()  # adapters whose weights require grad

    def __contains__(self, name: str) -> bool:
        return self.peft is not None and name in self.peft.peft_config

    def layers(self) -> dict[str, Any]:
        """{module name: PEFT LoRA layer}. Cached until a layer may appear or go. The walk
        does not enter LoRA layers (their children are the adapters), so it does not grow
        with the number of adapters."""
        if self._layers is None:
            from peft.tuners.lora import LoraLayer

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
            self._layers, self._module_names = found, names
        return self._layers

    # ---- adding and removing -----------------------------------------------------------
    def add(self, name: str, config) -> str:
        """Add adapter `name` (a PEFT `LoraConfig`), frozen and in eval mode. Returns the
        path taken: "per-layer" (into LoRA layers that exist already) or "peft" (PEFT's own
        injection: the first adapter, a new target, or a config the per-layer path does not
        cover)."""
        from peft import get_peft_model

        if self.peft is not None and self._add_per_layer(name, config):
            self.set_trainable([name], False)
            return "per-layer"
        with warnings.catch_warnings():
            # PEFT reads `is_gradient_checkpointing`, which transformers 5 deprecates: a
            # warning about library internals a user can do nothing about
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            if self.peft is None:
                self.peft = get_peft_model(self.model, config, adapter_name=name)
            else:
                self.peft.add_adapter(name, config)
        self._layers = None  # the adapter may target layers no other did
        # PEFT leaves adapters trainable and its layers in training mode: every adapter is
        # frozen (the editor unfreezes the one it trains) and answers in eval mode (a LoRA
        # dropout must not act at inference)
        for layer in self.layers().values():
            for part in (layer.lora_A, layer.lora_B):
                part.requires_grad_(False)
            layer.eval()
        self._trainable = set()
        return "peft"

    def _add_per_layer(self, name: str, config) -> bool:
        """Add `name` by calling each targeted LoRA layer's own `update_layer` (PEFT's
        initialisation), because PEFT's `add_adapter` walks every module and every adapter
        already loaded, a cost that grows with the store. False (nothing added) when a
        target has no LoRA layer yet, the config is not plain LoRA, or PEFT's signature
        differs."""
        targets = config.target_modules
        if (isinstance(targets, str) or not targets or getattr(config, "use_dora", False)
                or getattr(config, "lora_bias", False) or config.init_lora_weights is not True
                or name in self.peft.peft_config):
            return False
        try:
            from peft.tuners.tuners_utils import check_target_module_exists
        except ImportError:
            return False
        layers = self.layers()
        matched = [m for m in self._module_names if check_target_module_exists(config, m)]
        if not matched or any(m not in layers for m in matched):
            return False
        self.peft.peft_config[name] = config
        try:
            for module_name in matched:  # PEFT's module order, for the RNG
                _update_layer(layers[module_name], name, config)
        except TypeError:  # another PEFT signature: undo, let PEFT do it
            for layer in layers.values():
                layer.delete_adapter(name)
            del self.peft.peft_config[name]
            return False
        return True

    def remove(self, name: str) -> None:
        """Delete adapter `name` from every LoRA layer (each layer's own delete: PEFT's
        model-wide one walks every module of every adapter)."""
        self._trainable.discard(name)
        for layer in self.layers().values():
            layer._active_adapter = [a for a in layer.active_adapters if a != name]
            layer.delete_adapter(name)
        self.peft.peft_config.pop(name, None)
        tuner = self.peft.base_model  # as PEFT's delete does: no deleted adapter stays active
        active = tuner.active_adapter
        active = [active] if isinstance(active, str) else list(active or [])
        if name in active:
            tuner.active_adapter = [a for a in active if a != name] or list(self.peft.peft_config)[:1]

    # ---- weights -----------------------------------------------------------------------
    def weights(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s own tensors (detached, shared storage) under PEFT's state-dict
        keys: what `get_peft_model_state_dict` returns, without its walk over every adapter."""
        out = {}
        for module_name, layer in self.layers().items():
            if name in layer.lora_A:
                prefix = f"base_model.model.{module_name}"
                for part in ("lora_A", "lora_B"):
                    out[f"{prefix}.{part}.weight"] = getattr(layer, part)[name].weight.detach()
        return out

    @torch.no_grad()
    def load_weights(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy `tensors` (PEFT state-dict keys) into adapter `name`; a key that fits no
        layer, or a layer left without its weights, is a ValueError naming it."""
        layers = self.layers()
        seen = set()
        for key, value in tensors.items():
            stem, _, tail = key.rpartition(".lora_")
            module_name = stem.removeprefix("base_model.model.")
            part = "lora_" + tail.removesuffix(".weight")
            layer = layers.get(module_name)
            if (layer is None or part not in ("lora_A", "lora_B") or name not in layer.lora_A
                    or getattr(layer, part)[name].weight.shape != value.shape):
                raise ValueError(f"weights do not fit this model ({key})")
            target = getattr(layer, part)[name].weight
            target.copy_(value.to(target.device, target.dtype))
            seen.add((module_name, part))
        missing = [m for m, layer in layers.items() if name in layer.lora_A
                   and not {(m, "lora_A"), (m, "lora_B")} <= seen]
        if missing:
            raise ValueError(f"weights miss the adapter of {missing[0]}")

    def params(self, name: str) -> list[torch.nn.Parameter]:
        """Adapter `name`'s parameters (what its training optimises), found per LoRA layer
        rather than by a walk over every parameter of the model."""
        out: list[torch.nn.Parameter] = []
        for layer in self.layers().values():
            if name in layer.lora_A:
                out += [*layer.lora_A[name].parameters(), *layer.lora_B[name].parameters()]
        return out

    # ---- state -------------------------------------------------------------------------
    def activate(self, names: Sequence[str], trainable: bool = False) -> None:
        """Make exactly `names` active on every row (none: the base model's forward). With
        `trainable`, they and only they get gradients. Written by hand: PEFT's set_adapter
        also sets requires_grad on every adapter of every layer, a cost that grows with the
        store, and routing switches adapters on every batch."""
        if self.peft is None:
            if names:
                raise RuntimeError("no adapters loaded")
            return
        names = list(names)
        for layer in self.layers().values():
            layer._disable_adapters = not names
            if names:
                layer._active_adapter = names
        if trainable:
            wanted = set(names)
            self.set_trainable(self._trainable - wanted, False)
            self.set_trainable(wanted, True)

    def set_trainable(self, names: Collection[str], value: bool) -> None:
        """requires_grad of adapters `names` only (PEFT's pass covers every adapter)."""
        if not names:
            return
        for layer in self.layers().values():
            for name in names:
                if name in layer.lora_A:
                    layer.lora_A[name].requires_grad_(value)
                    layer.lora_B[name].requires_grad_(value)
        self._trainable = self._trainable | set(names) if value else self._trainable - set(names)

    def set_dropout(self, name: str, training: bool) -> None:
        """LoRA dropout of adapter `name` on (while it trains) or off."""
        for layer in self.layers().values():
            if name in layer.lora_dropout:
                layer.lora_dropout[name].train(training)

    # ---- per-row execution -------------------------------------------------------------
    def running(self, plan: RowPlan) -> contextlib.AbstractContextManager:
        """Inside the block, each adapter of `plan` adds its update to its own rows (and,
        if gated, positions) of every forward; the hooks go when the block ends."""
        return self._hooked(partial(_run_rows, plan)) if plan.rows else contextlib.nullcontext()

    def gated(self, name: str, mask: torch.Tensor) -> contextlib.AbstractContextManager:
        """Inside the block, adapter `name` acts only where the (rows, seq) `mask` is 1, with
        gradients and LoRA dropout (gated training). PEFT's own pass is switched off so the
        adapter does not also act ungated."""
        self.activate([])
        return self._hooked(partial(_run_gated, name, mask))

    @contextlib.contextmanager
    def _hooked(self, hook) -> Iterator[None]:
        """`hook` on every LoRA layer's forward for the duration of the block."""
        handles = [layer.register_forward_hook(hook) for layer in self.layers().values()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _update_layer(layer, name: str, config) -> None:
    """PEFT's `update_layer` for one layer, without its two last steps, which walk every
    adapter of the layer: the move to the base layer's device (it scans every adapter for
    meta tensors) and `set_adapter` (requires_grad on each). The move is done here for the
    new adapter only; the active set and requires_grad belong to the bank."""
    layer.set_adapter = _skip
    layer._move_adapter_to_device_of_base_layer = _skip
    try:
        layer.update_layer(name, config.r, config.lora_alpha, config=config)  # PEFT ≥ 0.18
    finally:
        del layer.set_adapter, layer._move_adapter_to_device_of_base_layer
    weight = layer.get_base_layer().weight
    for part in (layer.lora_A, layer.lora_B):
        part[name].to(weight.device, weight.dtype)
    for part in (layer.lora_A, layer.lora_B, layer.lora_dropout):
        part[name].eval()


def _skip(*_args: Any, **_kwargs: Any) -> None:
    return None


def _run_gated(name: str, mask: torch.Tensor, module, args, output):
    """Forward hook of a LoRA layer: adapter `name`'s update where `mask` is 1."""
    if name not in module.lora_A:
        return output
    x = args[0].to(module.lora_A[name].weight.dtype)
    update = module.lora_B[name](module.lora_A[name](module.lora_dropout[name](x)))
    return output + (update * module.scaling[name] * mask[..., None]).to(output.dtype)


def _run_rows(plan: RowPlan, module, args, output):
    """Forward hook of a LoRA layer: add each planned adapter's update to its own rows.

    Written by hand: PEFT's per-row `adapter_names` allows one adapter per row, and a query
    here may fire several. The (row, adapter) pairs are run as one batched product per
    adapter rank, with the weights stacked once per plan, since a Python loop over fired
    adapters costs a small product per adapter per layer."""
    x = args[0]
    dropout_free = not module.training or all(
        isinstance(module.lora_dropout[a], torch.nn.Identity)
        for a in plan.rows if a in module.lora_dropout)
    if not dropout_free or plan.train:
        for adapter, rows in plan.rows.items():
            if adapter not in module.lora_A:
                continue
            sub = x.index_select(0, rows).to(module.lora_A[adapter].weight.dtype)
            update = module.lora_B[adapter](module.lora_A[adapter](module.lora_dropout[adapter](sub)))
            update = update * module.scaling[adapter]
            if adapter in plan.gates:
                update = update * plan.gates[adapter][..., None]
            output = output.index_add(0, rows, update.to(output.dtype))
        return output
    groups = plan.stacks.get(id(module))
    if groups is None:
        groups = plan.stacks[id(module)] = _stack(module, plan)
    for rows, a, b, scale, gate in groups:
        sub = x.index_select(0, rows).to(a.dtype)
        # PEFT's order of operations (x·Aᵀ·Bᵀ, then the scaling): the same numbers as PEFT
        update = torch.bmm(torch.bmm(sub, a), b) * scale
        if gate is not None:
            update = update * gate[..., None]
        output = output.index_add(0, rows, update.to(output.dtype))
    return output


@torch.no_grad()
def _stack(module, plan: RowPlan) -> list[tuple[Any, ...]]:
    """For one LoRA layer: the planned (row, adapter) pairs grouped by rank, as
    (rows (K,), Aᵀ (K, in, r), Bᵀ (K, r, out), scaling (K, 1, 1), gate (K, seq) or None)."""
    groups: dict[int, list[tuple[Any, ...]]] = {}
    for adapter, rows in plan.rows.items():
        if adapter not in module.lora_A:
            continue
        a = module.lora_A[adapter].weight.detach().T
        b = module.lora_B[adapter].weight.detach().T
        gate = plan.gates.get(adapter)
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
