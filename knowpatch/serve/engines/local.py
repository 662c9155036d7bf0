"""knowpatch's own serving engine (`Engine` protocol): one thread owns the `Editor` and runs,
in arrival order, batches of generation requests and patch work (edits, loads, removals).

Requests that arrive within `batch_window` seconds of each other and share their sampling
settings and candidate patches run as one left-padded batch: the router decides per row
(`Editor.using_names`), each row's tokens stream out as they are made, and a row stops at
EOS, at one of its stop strings or at its own `max_tokens`. Patch work waits for the batch
in progress, so a request always finishes on the patch set it started with.

transformers' `generate` does the decoding; what is written here is what it does not do:
per-row budgets and stop strings in one batch (a `StoppingCriteria` that returns a flag per
row) and streaming of several rows at once (its streamers take one row).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ...behaviour_edit import BehaviourJob, run_behaviour
from ...decoding import left_padded
from ...editor import Editor
from ...patches import MANIFEST, Patch
from ...requests import EditRequest
from ...router import Route
from ..engine import Generation
from ..rows import RowText

log = logging.getLogger(__name__)

@dataclass
class Task:
    """Patch work for the engine thread: `run()` there, its result into `future`."""

    run: Callable[[], Any]
    future: Future = field(default_factory=Future)
    reads: bool = False
    """It only reads (routing, statements): run at once, even while a batch is being
    collected, which goes on; work that changes patches waits for the batch."""


class RowWatch(StoppingCriteria):
    """Called by `generate` after every step: sends each row's new token to its choice's
    `RowText` and says which rows are done (EOS, a stop string, or their own budget)."""

    def __init__(self, tokenizer, rows: list[tuple[Generation, int]], fired: Callable[[int], list[str]]):
        self.rows = [RowText(tokenizer, req, choice) for req, choice in rows]
        self.fired = fired

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        last = input_ids[:, -1].tolist()
        done = [row.push(last[r], lambda r=r: self.fired(r)) for r, row in enumerate(self.rows)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def finish_all(self) -> None:
        """Rows `generate` ended without a verdict (it stops at the longest budget)."""
        for r, row in enumerate(self.rows):
            row.finish("length", self.fired(r))


class LocalEngine:
    """The thread that owns the editor. `submit` a `Generation`; patch work runs there too."""

    def __init__(self, editor: Editor, *, max_batch: int = 64, batch_window: float = 0.01):
        self.editor, self.max_batch, self.batch_window = editor, max_batch, batch_window
        self.model_name, self.tokenizer = editor.model_name, editor.tokenizer
        self.context = editor.context_length or 2048
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self.loop, name="knowpatch-engine", daemon=True)
        self.batches: list[int] = []  # rows of each batch run (for the throughput report)
        self.lock = threading.Lock()
        self.manifests: dict[str, dict[str, Any]] = {}  # loaded patches, as the engine left them

    def start(self) -> LocalEngine:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)

    def submit(self, item: Generation | Task) -> None:
        self.queue.put(item)

    def submit_task(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread after what is queued; don't wait."""
        task = Task(fn)
        self.submit(task)
        return task.future

    def call(self, fn: Callable[[], Any], timeout: float | None = None, reads: bool = False) -> Any:
        """Run `fn` on the engine thread and wait for its result (its exception re-raised);
        `reads`: it changes nothing (see `Task.reads`)."""
        task = Task(fn, reads=reads)
        self.submit(task)
        return task.future.result(timeout)

    def loop(self) -> None:
        pending = None
        while True:
            item = pending if pending is not None else self.queue.get()
            pending = None
            if item is None:
                return
            if isinstance(item, Task):
                self.run_task(item)
                continue
            batch, pending = self.collect(item)
            self.run_batch(batch)

    def collect(self, first: Generation) -> tuple[list[Generation], Any]:
        """`first` and the generations that arrive within the batch window (up to
        `max_batch` rows); a reading task that arrives meanwhile runs at once (each
        completion asks for its in-context statements first), other tasks end the batch."""
        batch, rows = [first], len(first.rows)
        deadline = time.monotonic() + self.batch_window
        while rows < self.max_batch:
            try:
                nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return batch, None
            if isinstance(nxt, Task) and nxt.reads:
                self.run_task(nxt)
                continue
            if not isinstance(nxt, Generation):
                return batch, nxt
            batch.append(nxt)
            rows += len(nxt.rows)
        return batch, None

    @staticmethod
    def run_task(task: Task) -> None:
        if not task.future.set_running_or_notify_cancel():
            return
        try:
            task.future.set_result(task.run())
        except BaseException as exc:  # the caller gets it; the engine keeps serving
            task.future.set_exception(exc)

    def run_batch(self, batch: list[Generation]) -> None:
        groups: dict[tuple, list[Generation]] = {}
        for req in batch:
            groups.setdefault(req.group(), []).append(req)
        for reqs in groups.values():
            chunk: list[Generation] = []
            for req in reqs:
                if chunk and sum(len(r.rows) for r in chunk) + len(req.rows) > self.max_batch:
                    self.run_group(chunk)
                    chunk = []
                chunk.append(req)
            self.run_group(chunk)

    def run_group(self, reqs: list[Generation]) -> None:
        try:
            self.generate(reqs)
        except Exception as exc:  # one bad batch must not stop the server
            log.exception("generation failed")
            for req in reqs:
                for choice in range(len(req.rows)):
                    req.emit(choice, "", f"error: {exc}", [], 0)

    def candidates(self, req: Generation) -> list[str]:
        loaded = [p.id for p in self.editor.applied]
        if req.patches is None:
            return loaded
        missing = [p for p in req.patches if p not in loaded]
        if missing:
            raise LookupError(f"patches: {missing[0]!r} was removed before the request ran")
        return list(req.patches)

    @torch.no_grad()
    def generate(self, reqs: list[Generation]) -> None:
        editor, tok = self.editor, self.editor.tokenizer
        names = self.candidates(reqs[0])
        always = [n for n in names if not editor.is_routed(n)]  # unkeyed: act on every row
        rows = [(req, c) for req in reqs for c in range(len(req.rows))]
        routes: list = []
        watch = RowWatch(tok, rows, lambda r: (routes[0][r].fired if routes else []) + always)
        ids, mask = left_padded([req.rows[c] for req, c in rows], tok.pad_token_id)
        first = reqs[0]
        sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if first.temperature > 0:
            sampling = {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p,
                        "top_k": None}
            if first.seed is not None:
                torch.manual_seed(first.seed)
        self.batches.append(len(rows))
        device = editor.device
        with editor.using_names(names, on_route=lambda r: routes or routes.append(r)) as model:
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                           max_new_tokens=max(req.max_tokens for req in reqs),
                           stopping_criteria=StoppingCriteriaList([watch]),
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **sampling)
        watch.finish_all()

    # ---- patch work, on the engine thread between batches ------------------------------
    def refresh(self) -> None:
        """Take a snapshot of the loaded patches (on the engine thread, after each change)."""
        with self.lock:
            self.manifests = {p.id: p.manifest for p in self.editor.applied}

    def changing(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """`fn`, then a fresh snapshot (also when `fn` failed half-way)."""
        def run() -> Any:
            try:
                return fn()
            finally:
                self.refresh()
        return run

    def loaded(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.manifests.values())

    def load_store(self) -> tuple[list[str], dict[str, str]]:
        return self.call(self.changing(self.editor.load_store))

    def has_stored(self, patch_id: str) -> bool:
        return (self.editor.store_root / patch_id / MANIFEST).is_file()

    def load(self, patch_id: str) -> dict[str, Any]:
        folder = Path(self.editor.store_root) / patch_id
        return self.call(self.changing(lambda: self.editor.apply(Patch.load(folder)).manifest))

    def unload(self, patch_id: str, delete: bool) -> None:
        editor = self.editor
        self.call(self.changing(lambda: editor.delete(patch_id) if delete else editor.remove(patch_id)))

    def check(self, request: EditRequest, method: str, settings: dict[str, Any]) -> None:
        self.editor.check(request, method, settings)

    def edit(self, request: EditRequest, method: str, settings: dict[str, Any],
             started: Callable[[], None] | None = None) -> Future:
        def run() -> Patch:
            started() if started else None
            return self.editor.edit(request, method, config=dict(settings))
        return self.submit_task(self.changing(run))

    def edit_behaviour(self, job: BehaviourJob, settings: dict[str, Any],
                       started: Callable[[], None] | None = None) -> Future:
        def run() -> Patch:
            started() if started else None
            patch, _ = run_behaviour(self.editor, job, dict(settings))
            self.editor.save(patch)
            return self.editor.apply(patch)
        return self.submit_task(self.changing(run))

    def statements(self, texts: list[str], patches: list[str] | None) -> list[str]:
        with self.lock:
            stating = [m for pid, m in self.manifests.items()
                       if m.get("statement") and (patches is None or pid in patches)]
        if not stating:  # no in-context patch: no task on the engine thread, whose arrival
            return [""] * len(texts)  # would close the batch being collected (1-row batches)
        return self.call(lambda: self.editor.statements(patches).stated(texts), reads=True)

    def route(self, prompt: str, patches: list[str] | None) -> Route:
        return self.call(lambda: self.editor.route(prompt, patches), reads=True)[0]
