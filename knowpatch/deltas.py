"""The delta bank: weight-delta patches (full SFT, FT-M) on a live model.

A delta patch is a set of tensors added to the base weights. The bank keeps the original
of every tensor a loaded delta touches, so the active set can change in any order and
removing every delta gives the base weights back bit for bit. Deltas cannot be switched
per row or per query: the active ones act on every forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .methods.full_sft import canonical_parameters


class DeltaBank:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.deltas: dict[str, dict[str, torch.Tensor]] = {}  # patch id -> {param name: delta}
        self.active: list[str] = []  # the deltas now added to the weights, in order
        self._originals: dict[str, torch.Tensor] = {}  # every weight a loaded delta touches

    def __contains__(self, name: str) -> bool:
        return name in self.deltas

    def add(self, name: str, deltas: dict[str, torch.Tensor]) -> None:
        """Load (not yet activate) delta patch `name`; a tensor that fits no parameter of
        the model is a ValueError naming it."""
        params = canonical_parameters(self.model)
        for key, delta in deltas.items():
            if key not in params or params[key].shape != delta.shape:
                raise ValueError(f"delta {key!r} does not fit this model")
        for key in deltas:
            if key not in self._originals:
                self._originals[key] = params[key].detach().clone()
        self.deltas[name] = deltas

    def remove(self, name: str) -> None:
        """Deactivate and forget `name`, and the originals no other delta needs."""
        self.set_active([d for d in self.active if d != name])
        del self.deltas[name]
        still = {key for d in self.deltas.values() for key in d}
        for key in list(self._originals):
            if key not in still:
                del self._originals[key]

    @torch.no_grad()
    def set_active(self, names: Sequence[str]) -> None:
        """Make the weights the originals plus exactly the deltas of `names`. A weight no
        active delta touches is copied back from its original (bit-exact removal)."""
        names = list(names)
        if names == self.active:
            return
        params = canonical_parameters(self.model)
        touched = {key for d in set(names) | set(self.active) for key in self.deltas[d]}
        for key in touched:
            original = self._originals[key]
            parts = [self.deltas[d][key] for d in names if key in self.deltas[d]]
            if parts:
                total = original.float() + sum(p.to(original.device).float() for p in parts)
                params[key].copy_(total.to(original.dtype))
            else:
                params[key].copy_(original)
        self.active = names
