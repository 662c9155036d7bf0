"""report.png: a bench run's scores, edited beside unedited."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

FIGURE_KEYS = ("rel", "gen", "loc", "port", "rep", "mention")


def figure(rows: list[dict[str, Any]], report: dict[str, Any], path: Path) -> None:
    """The scores edited beside unedited (rel, gen, loc, port, rep, mention in %; fluency on its
    own axis); in sequential mode also rel/gen/loc right after each edit as edits add up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sequential = "summary_immediate" in report
    fig, axes = plt.subplots(1, 3 if sequential else 2, figsize=(13 if sequential else 9, 3.8),
                             gridspec_kw={"width_ratios": [4, 1] + ([4] if sequential else [])})
    s, b = report["summary"], report["baseline"]
    keys = [k for k in FIGURE_KEYS if s.get(k) is not None or b.get(k) is not None]
    xs = range(len(keys))
    for offset, (label, src) in ((-0.2, ("unedited", b)), (0.2, ("edited", s))):
        axes[0].bar([x + offset for x in xs], [src.get(k) or 0 for k in keys], 0.4, label=label)
        axes[1].bar([offset], [src.get("fluency") or 0], 0.4, label=label)
    axes[0].set_xticks(list(xs), keys)
    axes[0].set_ylabel("%")
    axes[0].set_ylim(0, 105)
    axes[0].legend()
    axes[1].set_xticks([0], ["fluency"])
    axes[1].set_ylabel("n-gram entropy")
    if sequential:
        for key in ("rel", "gen", "loc"):
            vals = [v for v in (r["scores"].get(key) for r in rows) if v is not None]
            running = [t / (i + 1) for i, t in enumerate(itertools.accumulate(vals))]
            axes[2].plot(range(1, len(running) + 1), running, label=f"{key} right after each edit")
        axes[2].set_xlabel("number of edits")
        axes[2].legend()
    fig.suptitle(f"{report['config']['method']}, {report['config']['mode']}, n {s.get('n')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
