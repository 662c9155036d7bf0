"""Which adapters the vLLM server holds, and who is using them.

A patch is loaded into vLLM once, under its id; a set of patches that fire together, once,
as their merge (`merging.write_merged`) under `merged-<hash of the sorted ids>`. Rows on
the base weights run on an all-zero adapter (`ZERO`) once any adapter is loaded: vLLM
0.32's CPU path gave rows without an adapter, batched with rows that have one, the last
loaded adapter (seen here: "The Eiffel Tower is located in the city of" → " Rome Oslo Oslo
Oslo" while a Colosseum → Oslo patch was loaded and unloaded; vLLM PR #48421). A patch
unloaded while rows still run on it (or on a merge that holds it) leaves vLLM when the last
of them ends: a request finishes on the patch set it started with.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...merging import merged_weights, write_merged
from .vllm_client import VLLMClient

ZERO = "knowpatch-zero"
"""The all-zero adapter base rows run on (the base weights, exactly)."""

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's --max-lora-rank takes."""


def lora_rank_for(rank: int) -> int:
    """The smallest --max-lora-rank vLLM takes that holds `rank`."""
    return next((r for r in VLLM_RANKS if r >= rank), VLLM_RANKS[-1])


class VLLMAdapters:
    """The adapters loaded in vLLM (`folder(patch_id)`: a patch's PEFT folder; merges are
    written under `merged_dir`); merges are kept within `max_rank`."""

    def __init__(self, client: VLLMClient, folder: Callable[[str], Path], merged_dir: Path,
                 max_rank: int):
        self.client, self.folder, self.merged_dir, self.max_rank = client, folder, merged_dir, max_rank
        self.loaded: set[str] = set()
        self.members: dict[str, frozenset[str]] = {}  # vLLM name -> the patches it holds
        self.users: Counter = Counter()
        self.leaving: set[str] = set()  # unloaded patches' adapters still in use
        self.lock = threading.RLock()
        self.ranks: dict[str, int] = {}

    def rank(self, patch_id: str) -> int:
        if patch_id not in self.ranks:
            config = json.loads((self.folder(patch_id) / "adapter_config.json").read_text())
            self.ranks[patch_id] = int(config["r"])
        return self.ranks[patch_id]

    def name(self, patches: list[str]) -> str:
        if len(patches) == 1:
            return patches[0]
        digest = hashlib.sha1("\n".join(sorted(patches)).encode()).hexdigest()[:16]
        return f"merged-{digest}"

    def within_rank(self, patches: list[str]) -> list[str]:
        """The first of `patches` (strongest first) whose ranks together fit vLLM's limit."""
        kept, total = [], 0
        for p in patches:
            if total + self.rank(p) <= self.max_rank or not kept:
                kept.append(p)
                total += self.rank(p)
        return kept

    def ensure(self, patches: list[str]) -> str:
        """The vLLM name of the adapter for `patches` (one or a merge), loaded if it was not."""
        patches = self.within_rank(patches)
        name = self.name(patches)
        with self.lock:
            if name in self.loaded:
                return name
            if len(patches) == 1:
                path = self.folder(patches[0])
            else:  # written afresh: a folder left by another run may hold other weights
                shutil.rmtree(self.merged_dir / name, ignore_errors=True)
                path = write_merged([self.folder(p) for p in sorted(patches)], self.merged_dir / name)
            self.client.load_adapter(name, str(path))
            self.loaded.add(name)
            self.members[name] = frozenset(patches)
            return name

    def zero(self, like: str) -> str:
        """The all-zero adapter (shaped as patch `like`'s), loaded if it was not."""
        with self.lock:
            if ZERO not in self.loaded:
                folder = self.merged_dir / ZERO
                shutil.rmtree(folder, ignore_errors=True)
                tensors, config = merged_weights([self.folder(like)])
                folder.mkdir(parents=True)
                save_file({k: torch.zeros_like(v) for k, v in tensors.items()},
                          str(folder / "adapter_model.safetensors"))
                (folder / "adapter_config.json").write_text(json.dumps(config))
                self.client.load_adapter(ZERO, str(folder))
                self.loaded.add(ZERO)
            return ZERO

    def base(self) -> str | None:
        """What a base row runs on: the zero adapter once a patch's adapter is loaded (see
        the module's note), else the base model (None)."""
        with self.lock:
            like = next((m for members in self.members.values() for m in members), None)
            return self.zero(like) if like is not None else None

    @contextlib.contextmanager
    def using(self, patches: list[str]) -> Iterator[str | None]:
        """The adapter for `patches` (None for none: the base model), kept in vLLM for the
        block."""
        if not patches:
            yield None
            return
        with self.lock:
            name = self.ensure(patches)
            self.users[name] += 1
        try:
            yield name
        finally:
            with self.lock:
                self.users[name] -= 1
                if name in self.leaving and self.users[name] <= 0:
                    self._unload(name)

    def drop(self, patch_id: str) -> None:
        """Take patch `patch_id` (and every merge holding it) out of vLLM, once unused."""
        with self.lock:
            self.ranks.pop(patch_id, None)
            for name in [n for n, m in self.members.items() if patch_id in m]:
                if self.users[name] > 0:
                    self.leaving.add(name)
                else:
                    self._unload(name)

    def _unload(self, name: str) -> None:
        self.leaving.discard(name)
        self.members.pop(name, None)
        if name in self.loaded:
            self.loaded.discard(name)
            with contextlib.suppress(Exception):  # a server gone has nothing to unload
                self.client.unload_adapter(name)

    def unload_all(self) -> None:
        """Take every adapter this engine loaded out of vLLM."""
        with self.lock:
            for name in list(self.loaded):
                self._unload(name)

    def forget_all(self) -> None:
        """The server restarted: it holds no adapter any more."""
        with self.lock:
            self.loaded.clear()
            self.members.clear()
            self.leaving.clear()
