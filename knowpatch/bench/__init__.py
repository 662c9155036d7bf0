"""Measurement, kept apart from the product: `knowpatch bench` (the runner, its settings,
its scoring and reports), `bench-router` (routing at scale), `bench-serve` (the server's
throughput) and `calibrate` (the router's layer and threshold for a model).

    report = Bench(editor, BenchSettings(data="counterfact_500.json", n=20), "runs/x").run()
"""

from .baselines import BaselineCache
from .report import loc_without_edited_subjects, markdown, summarize_rows
from .runner import Bench
from .settings import MODES, STRATEGIES, BenchSettings

__all__ = ["MODES", "STRATEGIES", "BaselineCache", "Bench", "BenchSettings",
           "loc_without_edited_subjects", "markdown", "summarize_rows"]
