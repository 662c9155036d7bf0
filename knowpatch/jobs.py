"""An edit between its steps: the job before training (`EditJob`), what training gives
(`Trained`), and the manifest made from both (`edit_manifest`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .evaluate import Evaluation
from .methods import Method
from .patches import Patch, make_manifest
from .requests import EditRequest
from .training import LoopResult, peak_rss_mb


@dataclasses.dataclass
class EditJob:
    """An edit before training: its requests, method, config and unedited baseline."""

    requests: list[EditRequest]
    method: str
    module: Method
    cfg: Any
    kind: str
    auto_why: str | None  # why `method auto` chose the method (None: it was named)
    inferred: dict[int, str]  # request index -> subject found in its prompt
    baseline: Evaluation | None
    label: str | None = None  # what the patch id is made from (None: the first subject or prompt)

    def patch_id(self) -> str:
        """A new patch id, named after the label, the first subject or the first prompt."""
        from .patches import new_patch_id

        first = self.requests[0]
        return new_patch_id(self.label or first.subject or first.prompt)


@dataclasses.dataclass
class Trained:
    """What training a patch gives, before it is scored and installed."""

    patch_id: str
    adapter_config: Any  # peft.LoraConfig; None for a delta patch
    weights: dict[str, torch.Tensor]
    result: LoopResult
    seconds: float
    keys: dict[str, torch.Tensor] | None = None  # router keys; None: acts on every query


def edit_manifest(job: EditJob, trained: Trained, base_info: dict[str, Any], base_params: int,
                  into: Patch | None, edited: Evaluation | None, **extra: Any) -> dict[str, Any]:
    """The patch's manifest; `extra` entries that are not None are added as they are."""
    n_params = sum(v.numel() for v in trained.weights.values())
    previous = into.manifest if into is not None else {}
    baseline = job.baseline
    manifest = make_manifest(
        patch_id=trained.patch_id, base=base_info, method=job.method,
        config=dataclasses.asdict(job.cfg), kind=job.kind,
        requests=previous.get("requests", []) + [r.to_dict() for r in job.requests],
        scores=edited.summary if edited else None,
        baseline=baseline.summary if baseline else None,
        samples={"before": baseline.samples, "after": edited.samples} if edited else None,
        steps=trained.result.steps, learnt=trained.result.learnt,
        seconds=round(trained.seconds, 3), trainable_params=n_params,
        trainable_fraction=round(n_params / base_params, 6),
        peak_rss_mb=peak_rss_mb(), **trained.result.extra,
    )
    manifest.update({k: v for k, v in extra.items() if v is not None})
    if into is not None:
        manifest["edits"] = previous.get("edits", 1) + 1
    return manifest
