"""A patch is one edit task kept apart: a PEFT adapter folder plus `patch.json`.

On disk:

    <store>/<patch id>/
        patch.json                  manifest (format_version, base fingerprint, method,
                                    config, requests, scores, steps, seconds, ...)
        adapter_config.json         standard PEFT files: `PeftModel.from_pretrained`
        adapter_model.safetensors   loads the folder as it is
        router_keys.safetensors     the router's keys (optional; see `router`)

or, for full-parameter patches (`"kind": "delta"` in patch.json), `delta.safetensors`: the
changed tensors' deltas by parameter name (no adapter files).

Nothing is pickled. `PatchStore.save` writes into a hidden temporary folder beside the
target and renames it into place, so a crash never leaves half a patch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .errors import KnowpatchError
from .version import __version__

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "patch.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ROUTER_KEYS = "router_keys.safetensors"
DELTA_WEIGHTS = "delta.safetensors"


def new_patch_id(hint: str = "") -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-")[:32].strip("-")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{slug + '-' if slug else ''}{uuid.uuid4().hex[:6]}"


@dataclass
class Patch:
    """An adapter's weights + config, and the manifest describing the edit."""

    id: str
    manifest: dict[str, Any]
    adapter_config: Any  # peft.LoraConfig (None for a delta patch)
    weights: dict[str, torch.Tensor] = field(repr=False)
    path: Path | None = None
    keys: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    """Router keys (see `router`); None: the patch is active for every query."""

    @property
    def kind(self) -> str:
        """lora (a PEFT adapter), delta (weight deltas of full-parameter training) or context
        (a statement put before the queries it fires on; no weights)."""
        return self.manifest.get("kind", "lora")

    @property
    def routing(self) -> dict[str, Any] | None:
        """The router settings of the manifest (layer, threshold, facts) when keyed."""
        return self.manifest.get("router") if self.keys is not None else None

    @property
    def scores(self) -> dict[str, float | None]:
        return self.manifest.get("scores") or {}

    @property
    def baseline(self) -> dict[str, float | None]:
        return self.manifest.get("baseline") or {}

    @property
    def fingerprint(self) -> str:
        return self.manifest["base"]["fingerprint"]

    @property
    def steps(self) -> int | None:
        return self.manifest.get("steps")

    @property
    def seconds(self) -> float | None:
        return self.manifest.get("seconds")

    @property
    def nbytes(self) -> int:
        """Bytes of its tensors (weights and router keys): about its size on disk."""
        tensors = [*self.weights.values(), *(self.keys or {}).values()]
        return sum(v.numel() * v.element_size() for v in tensors)

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write the patch as `folder` (atomically: temp folder, then rename)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        if folder.exists() and not overwrite:
            raise KnowpatchError(f"patch: {folder} already exists")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.weights.items()}
            if self.kind == "delta":
                if (size := self.nbytes) > 100e6:
                    log.warning("writing a %.0f MB weight delta to %s", size / 1e6, folder)
                save_file(tensors, str(tmp / DELTA_WEIGHTS), metadata={"format": "pt"})
            elif self.kind == "context":
                pass  # the statement is in the manifest
            else:
                save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
                self.adapter_config.save_pretrained(str(tmp))
            if self.keys is not None:
                save_file({k: v.contiguous().cpu() for k, v in self.keys.items()},
                          str(tmp / ROUTER_KEYS))
            (tmp / MANIFEST).write_text(json.dumps(self.manifest, indent=2, ensure_ascii=False))
            if pause := float(os.environ.get("KNOWPATCH_FAULT_SAVE_PAUSE") or 0):
                time.sleep(pause)  # fault injection: lets a test kill the process mid-save
            if folder.exists():  # overwrite: move the old one aside first, drop it after
                old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:6]}")
                os.replace(folder, old)
                os.replace(tmp, folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self.path = folder
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Patch:
        from peft import LoraConfig
        from safetensors.torch import load_file

        folder = Path(folder)
        if not folder.is_dir():
            raise KnowpatchError(f"patch: no patch folder at {str(folder)!r}")
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            raise KnowpatchError(f"patch: {folder} has no {MANIFEST}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise KnowpatchError(f"patch: {manifest_path} is corrupt ({exc})") from None
        if not isinstance(manifest, dict):
            raise KnowpatchError(f"patch: {manifest_path} is corrupt (not a JSON object)")
        for key in ("id", "format_version", "base", "method"):
            if key not in manifest:
                raise KnowpatchError(f"patch: {manifest_path} is corrupt (no {key!r})")
        if manifest["format_version"] > FORMAT_VERSION:
            raise KnowpatchError(
                f"patch: {folder} has format_version {manifest['format_version']}; this "
                f"knowpatch reads up to {FORMAT_VERSION}: upgrade knowpatch")
        if not isinstance(manifest["base"], dict) or "fingerprint" not in manifest["base"]:
            raise KnowpatchError(f"patch: {manifest_path} is corrupt (no base.fingerprint)")
        delta, context = manifest.get("kind") == "delta", manifest.get("kind") == "context"
        if context and not isinstance(manifest.get("statement"), str):
            raise KnowpatchError(f"patch: {manifest_path} is corrupt (no statement)")
        needed = () if context else (DELTA_WEIGHTS,) if delta else (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
        for name in needed:
            if not (folder / name).is_file():
                raise KnowpatchError(f"patch: {folder} has no {name}")
        try:
            config = None if delta or context else LoraConfig.from_pretrained(str(folder))
            weights = {} if context else load_file(
                str(folder / (DELTA_WEIGHTS if delta else ADAPTER_WEIGHTS)))
            keys = load_file(str(folder / ROUTER_KEYS)) if (folder / ROUTER_KEYS).is_file() else None
        except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt patch
            raise KnowpatchError(f"patch: {folder} has a corrupt adapter ({exc})") from None
        known = {"keys", "variant", "tokens", "scope"}
        if keys is not None and (not {"keys", "variant"} <= set(keys) <= known
                                 or "router" not in manifest):
            raise KnowpatchError(f"patch: {folder} has corrupt router keys")
        return cls(id=manifest["id"], manifest=manifest, adapter_config=config,
                   weights=weights, path=folder, keys=keys)


class PatchStore:
    """A folder of patches, one sub-folder each, named by patch id."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"PatchStore({str(self.root)!r})"

    def save(self, patch: Patch) -> Path:
        return patch.save(self.root / patch.id)

    def list(self) -> list[dict[str, Any]]:
        """Manifests of the patches in the store, oldest first (unreadable ones skipped)."""
        if not self.root.is_dir():
            return []
        out = []
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".") or not (folder / MANIFEST).is_file():
                continue
            try:
                manifest = json.loads((folder / MANIFEST).read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            manifest["path"] = str(folder)
            out.append(manifest)
        return sorted(out, key=lambda m: m.get("created", ""))

    def resolve(self, ref: str | Path) -> Path:
        """A patch id in this store, or a path to a patch folder."""
        path = Path(ref).expanduser()
        if path.is_dir():
            return path
        candidate = self.root / str(ref)
        if candidate.is_dir():
            return candidate
        matches = [p for p in self.root.glob(f"*{ref}*") if p.is_dir()] if self.root.is_dir() else []
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise KnowpatchError(f"patch: {str(ref)!r} matches {len(matches)} patches; give more "
                                 "of the id")
        raise KnowpatchError(f"patch: no patch {str(ref)!r} (not a folder, not an id in {self.root})")

    def load(self, ref: str | Path) -> Patch:
        return Patch.load(self.resolve(ref))

    def clean(self) -> list[str]:
        """Remove what an interrupted atomic save left behind (hidden temp folders): their
        names."""
        removed = []
        if self.root.is_dir():
            for folder in self.root.iterdir():
                if folder.is_dir() and folder.name.startswith("."):
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder.name)
        return removed

    def remove(self, ref: str | Path) -> Path:
        folder = self.resolve(ref)
        if not (folder / MANIFEST).is_file():
            raise KnowpatchError(f"patch: {folder} is not a patch folder (no {MANIFEST})")
        shutil.rmtree(folder)
        return folder


def make_manifest(*, patch_id: str, base: dict[str, Any], method: str, config: dict[str, Any],
                  requests: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:

    return {
        "format_version": FORMAT_VERSION,
        "id": patch_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "knowpatch_version": __version__,
        "threads": torch.get_num_threads(),  # torch's CPU threads when the patch was trained
        "base": base,
        "method": method,
        "config": config,
        "requests": requests,
        **extra,
    }


def merge_into_base(patch: Patch, model, tokenizer, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a standalone HF model folder: `model` (the unedited base this patch was made
    for) with the patch baked into its weights. A LoRA patch is merged with PEFT's
    `merge_and_unload`; a delta patch is added to the weights. Routing does not survive a
    merge: the merged model applies the edit to every query. Written atomically."""
    from .methods.full_sft import canonical_parameters
    from .models import fingerprint

    out = Path(out)
    if out.exists() and not overwrite:
        raise KnowpatchError(f"out: {out} already exists")
    if fingerprint(model) != patch.fingerprint:
        raise KnowpatchError(f"patch {patch.id}: made for another base model "
                             f"({patch.manifest['base'].get('model', '?')}); refusing to merge")
    if patch.kind == "context":
        raise KnowpatchError(f"patch {patch.id}: an in-context patch has no weights to merge")
    if patch.kind == "delta":
        params = canonical_parameters(model)
        with torch.no_grad():
            for name, delta in patch.weights.items():
                if name not in params or params[name].shape != delta.shape:
                    raise KnowpatchError(f"patch {patch.id}: delta {name!r} does not fit the model")
                params[name].add_(delta.to(params[name].dtype))
        merged = model
    else:
        from peft import get_peft_model, set_peft_model_state_dict

        peft_model = get_peft_model(model, patch.adapter_config, adapter_name=patch.id)
        set_peft_model_state_dict(peft_model, patch.weights, adapter_name=patch.id)
        merged = peft_model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "knowpatch_merge.json").write_text(json.dumps(
            {"patch": patch.id, "kind": patch.kind, "base": patch.manifest["base"],
             "requests": patch.manifest.get("requests", [])}, indent=2, ensure_ascii=False))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
