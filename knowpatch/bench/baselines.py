"""The unedited model's scores, kept between bench runs.

Every `knowpatch bench` run scores the unedited model on the same cases before it edits;
on CounterFact-100 that is ~10 minutes on two CPU cores, the same for every method compared.
Each chunk of cases `Bench.score_cases` scores is stored under a key of everything its
result depends on: the model's weights (fingerprint), dtype and device, torch's thread count
(the matmul order), the chunk's cases as read, which of them have fluency measured, the seed,
and the source of the code that scores (so a change to scoring invalidates every entry).
A hit returns what the same scoring would compute, without running it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..chat import ChatReference
from ..evaluate import Reference
from ..models import knowpatch_home

# the modules whose code decides a baseline score
_SCORING_SOURCES = ("bench/scoring.py", "evaluate.py", "chat.py", "decoding.py", "questions.py",
                    "fluency.py", "requests.py", "datasets.py")


def code_digest() -> str:
    """A digest of the scoring code's source files."""
    h = hashlib.sha256()
    here = Path(__file__).parents[1]
    for name in _SCORING_SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


class BaselineCache:
    """Baseline chunks on disk, one JSON file per chunk (`folder`: default
    `$KNOWPATCH_HOME/baselines`)."""

    def __init__(self, editor, seed: int, folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else knowpatch_home() / "baselines"
        param = next(editor.model.parameters())
        self.context = {"fingerprint": editor.fingerprint, "dtype": str(param.dtype),
                        "device": str(param.device), "threads": torch.get_num_threads(),
                        "seed": seed, "code": code_digest()}
        self.hits = 0

    def key(self, cases: list, fluency: list[bool]) -> str:
        body = {**self.context, "cases": [asdict(c) for c in cases], "fluency": fluency}
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, cases: list, fluency: list[bool]) -> list[tuple[dict[str, Any], Reference]] | None:
        path = self.folder / f"{self.key(cases, fluency)}.json"
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # none stored, or a file cut short: score again
        self.hits += 1
        return [(s, Reference(**{**r, "chat": r.get("chat") and ChatReference(**r["chat"])}))
                for s, r in stored]

    def put(self, cases: list, fluency: list[bool],
            scored: list[tuple[dict[str, Any], Reference]]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.key(cases, fluency)}.json"
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
        with os.fdopen(fd, "w") as fh:
            json.dump([(s, asdict(r)) for s, r in scored], fh)
        os.replace(tmp, path)  # whole or not at all
