"""Paged patches: LoRA weights stay on disk until a query fires their patch.

    pager = Pager(bank, capacity=64)     # at most 64 pageable adapters resident
    pager.admit(patch)                   # a saved, keyed LoRA patch: weights stay on disk
    pager.need({"p1", "p2"})             # before a routed forward: read in what fired

With thousands of routed patches, holding every adapter in memory (about 2 MB each on
SmolLM2) is what stops a store from growing; the router's keys are small and stay in
memory. A patch is *pageable* when its weights on disk are the ones it runs with (it was
read from its folder, or saved since it last trained): only those are ever dropped from
the bank, least recently fired first, and read back when a query fires them again. A patch
that is not pageable (unsaved, trained on since its save, unkeyed, a weight delta) stays
resident as before. Whatever is resident, a query's answer is the same (tested).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import torch

from .adapters import AdapterBank
from .errors import KnowpatchError
from .patches import ADAPTER_WEIGHTS, Patch


class OnDisk(Mapping):
    """A patch's weights read from its safetensors file on each use (none held in memory)."""

    def __init__(self, file: Path):
        self.file = file

    def _read(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.file))

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._read()[key]

    def __iter__(self) -> Iterator[str]:
        from safetensors import safe_open

        with safe_open(str(self.file), framework="pt") as fh:
            return iter(list(fh.keys()))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def items(self):  # one read for all tensors, not one per key
        return self._read().items()

    def values(self):
        return self._read().values()


class Pager:
    """Which pageable LoRA patches are resident in `bank`: at most `capacity` (None: no
    paging, every patch stays resident); the least recently needed go first."""

    def __init__(self, bank: AdapterBank, capacity: int | None = None):
        if capacity is not None and capacity < 1:
            raise KnowpatchError(f"resident: must be at least 1 (got {capacity})")
        self.bank, self.capacity = bank, capacity
        self.patches: dict[str, Patch] = {}  # pageable patches, resident or not
        self.recent: OrderedDict[str, None] = OrderedDict()  # resident pageable, oldest first
        self.reads = 0  # adapters read back from disk (a measure of the cache's misses)

    def pageable(self, patch: Patch) -> bool:
        return (self.capacity is not None and patch.kind == "lora" and patch.routing is not None
                and patch.path is not None and (Path(patch.path) / ADAPTER_WEIGHTS).is_file())

    def admit(self, patch: Patch) -> bool:
        """Take `patch` (loaded from its folder, not in the bank) onto the pager's books:
        its weights are dropped from memory until a query needs them. False: not pageable."""
        if not self.pageable(patch):
            return False
        patch.weights = OnDisk(Path(patch.path) / ADAPTER_WEIGHTS)
        self.patches[patch.id] = patch
        return True

    def saved(self, patch: Patch) -> None:
        """`patch` (resident) was just written to its folder: from now on it may be paged."""
        if self.pageable(patch) and patch.id in self.bank:
            self.patches[patch.id] = patch
            self.recent[patch.id] = None
            self._evict(keep={patch.id})

    def forget(self, name: str) -> None:
        """Take `name` off the books: it is unloaded, or training (its disk copy is stale, so
        it must stay resident until saved again)."""
        self.patches.pop(name, None)
        self.recent.pop(name, None)

    def resident(self) -> list[str]:
        return [n for n in self.patches if n in self.bank]

    def need(self, names: Collection[str]) -> None:
        """Make the pageable patches among `names` resident (reading their weights), making
        room by dropping the least recently needed others. More than `capacity` patches
        needed at once are all made resident; the surplus goes at the next call."""
        wanted = [n for n in names if n in self.patches]
        for name in wanted:
            if name in self.recent:
                self.recent.move_to_end(name)
        missing = [n for n in wanted if n not in self.bank]
        self._evict(keep=set(wanted), room=len(missing))
        for name in missing:
            patch = self.patches[name]
            self.bank.add(name, patch.adapter_config)
            self.bank.load_weights(name, dict(patch.weights.items()))
            self.recent[name] = None
            self.reads += 1

    def _evict(self, keep: set[str], room: int = 0) -> None:
        if self.capacity is None:
            return
        for name in list(self.recent):
            if len(self.recent) + room <= self.capacity:
                return
            if name not in keep:
                self.bank.remove(name)
                del self.recent[name]
                patch = self.patches[name]
                patch.weights = OnDisk(Path(patch.path) / ADAPTER_WEIGHTS)
