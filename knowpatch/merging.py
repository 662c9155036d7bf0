"""Several LoRA patches as one adapter: their ranks concatenated, so the merged adapter's
weight delta is exactly the sum of theirs.

An engine that runs one LoRA per row (vLLM: "one LoRA per prompt") serves a row that fires
two patches with the merge of the two. For each adapted module, with scalings s_i (PEFT's
lora_alpha / r, or / sqrt(r) for rsLoRA):

    A = [A_1; A_2; …]   (rows stacked: rank r_1 + r_2 + …)
    B = [s_1 B_1, s_2 B_2, …]   (columns side by side)

and the merged adapter has lora_alpha = r (scaling 1), so B A = Σ s_i B_i A_i. A module
that one patch does not adapt gets zeros in its block. PEFT's `add_weighted_adapter` with
combination_type="cat" does the same inside a loaded model; this writes a folder an
external engine can load without loading the base model.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import KnowpatchError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def scaling(config: dict) -> float:
    """PEFT's LoRA scaling of an adapter config: lora_alpha / r (rsLoRA: / sqrt(r))."""
    r, alpha = config["r"], config.get("lora_alpha", config["r"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _check(folder: Path, config: dict) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise KnowpatchError(f"{folder}: not a LoRA adapter ({config.get('peft_type')})")
    for name in ("rank_pattern", "alpha_pattern"):
        if config.get(name):
            raise KnowpatchError(f"{folder}: {name} is not supported in a merge")
    if config.get("use_dora") or config.get("modules_to_save"):
        raise KnowpatchError(f"{folder}: DoRA or modules_to_save cannot be merged by ranks")


def merged_weights(folders: list[Path]) -> tuple[dict[str, torch.Tensor], dict]:
    """The merged adapter's tensors and config for the adapter folders `folders`."""
    configs, weights = [], []
    for folder in folders:
        config = json.loads((Path(folder) / CONFIG).read_text())
        _check(Path(folder), config)
        configs.append(config)
        weights.append(load_file(str(Path(folder) / WEIGHTS)))
    modules = sorted({k.rsplit(".lora_", 1)[0] for w in weights for k in w if ".lora_A." in k})
    ranks = [c["r"] for c in configs]
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        a_key, b_key = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        shapes = [(w[a_key].shape[1], w[b_key].shape[0]) for w in weights if a_key in w]
        fan_in, fan_out = shapes[0]
        dtype = next(w[a_key].dtype for w in weights if a_key in w)
        blocks_a, blocks_b = [], []
        for w, c, r in zip(weights, configs, ranks):
            if a_key in w:
                blocks_a.append(w[a_key].float())
                blocks_b.append(w[b_key].float() * scaling(c))
            else:  # this patch leaves the module alone: a zero block of its rank
                blocks_a.append(torch.zeros(r, fan_in))
                blocks_b.append(torch.zeros(fan_out, r))
        out[a_key] = torch.cat(blocks_a, dim=0).to(dtype).contiguous()
        out[b_key] = torch.cat(blocks_b, dim=1).to(dtype).contiguous()
    rank = sum(ranks)
    targets = sorted({t for c in configs for t in _targets(c)})
    config = {"peft_type": "LORA", "task_type": configs[0].get("task_type", "CAUSAL_LM"),
              "base_model_name_or_path": configs[0].get("base_model_name_or_path"),
              "r": rank, "lora_alpha": float(rank), "lora_dropout": 0.0, "bias": "none",
              "target_modules": targets, "use_rslora": False, "use_dora": False,
              "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None}
    return out, config


def _targets(config: dict) -> list[str]:
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        raise KnowpatchError(f"target_modules given as a pattern ({targets!r}) cannot be merged")
    return list(targets)


def write_merged(folders: list[Path], into: Path) -> Path:
    """Write the merge of `folders` as a PEFT adapter folder `into` (atomically: a folder is
    complete or absent)."""
    into = Path(into)
    tensors, config = merged_weights(folders)
    into.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{into.name}.", dir=into.parent))
    save_file(tensors, str(tmp / WEIGHTS))
    (tmp / CONFIG).write_text(json.dumps(config, indent=2))
    try:
        os.replace(tmp, into)
    except OSError:  # written meanwhile by another merge of the same patches
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return into
