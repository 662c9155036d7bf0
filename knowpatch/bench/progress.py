"""The bench's progress bar on stderr: records done, running scores, ETA."""

from __future__ import annotations

from typing import Any

from .report import summarize_rows


class Bar:
    """Records done, running scores and ETA on stderr."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.progress = None
        self.label = "bench"
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True))
        self.progress.start()
        self.task = self.progress.add_task("bench", total=total, completed=done)

    def advance(self, rows: list[dict[str, Any]]) -> None:
        if self.progress is None:
            return
        s = summarize_rows([r["scores"] for r in rows])
        desc = " ".join(f"{k} {s[k]:.0f}" for k in ("rel", "gen", "loc") if s.get(k) is not None)
        self.progress.update(self.task, completed=len(rows), description=f"bench {desc}")

    def relabel(self, text: str) -> None:
        self.label = text
        if self.progress is not None:
            self.progress.update(self.task, description=text)

    def relabel_count(self, done: int, total: int) -> None:
        """Show how far a whole-run scoring pass is (`done` of `total` cases)."""
        if self.progress is not None:
            self.progress.update(self.task, description=f"{self.label}: {done}/{total} cases")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()

