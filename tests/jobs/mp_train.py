"""A data-parallel training job for the multi-process test: full SFT (or DPO) on four
requests of equal token length, a fixed number of steps, on the model at argv[1]; the main
process writes the loss trajectory to argv[2] as JSON.

    python tests/jobs/mp_train.py MODEL OUT.json full-sft          # one process
    accelerate launch --cpu --num_processes 2 tests/jobs/mp_train.py MODEL OUT.json full-sft
"""

import contextlib
import json
import sys

import torch
from accelerate import PartialState

from knowpatch.config import build_config
from knowpatch.methods import get_method
from knowpatch.models import load_model
from knowpatch.requests import EditRequest

REQUESTS = [  # same template, one-token subjects and targets: equal shares per process
    EditRequest("The city of Paris is in", "Spain"),
    EditRequest("The city of Rome is in", "Egypt"),
    EditRequest("The city of Berlin is in", "Chile"),
    EditRequest("The city of Madrid is in", "Japan"),
]


def main() -> None:
    model_path, out, method = sys.argv[1], sys.argv[2], sys.argv[3]
    state = PartialState(cpu=True)
    torch.manual_seed(0)
    model, tok = load_model(model_path, device="cpu")
    module = get_method(method)
    settings = {"lr": 1e-3, "max_steps": 5, "margin": 1e9, "prefixes": 0}  # never "learnt"
    if method == "dpo":
        settings.update(train="full", modules=["*"], layers="all")
        requests = [EditRequest(r.prompt, r.target_new, rejected="France") for r in REQUESTS]
    else:
        settings.update(anchor_weight=0.0)
        requests = REQUESTS
    cfg = build_config(module.Config, settings, where=method)
    result = module.train(model, tok, requests, cfg,
                          base=lambda: contextlib.nullcontext(model), progress=False)
    if state.is_main_process:
        with open(out, "w") as fh:
            json.dump({"losses": result.losses, "steps": result.steps,
                       "processes": state.num_processes}, fh)


if __name__ == "__main__":
    main()
