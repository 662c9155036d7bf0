"""The patch endpoints of `knowpatch serve`: list, show, edit (a background job), load and
remove patches while the server runs. Every change to the model runs on the engine thread,
between batches; the HTTP side reads a snapshot of the loaded patches."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from .config import build_config
from .editor import Editor
from .errors import KnowpatchError
from .methods import get_method
from .patches import MANIFEST, Patch
from .requests import EditRequest, check_all_fit
from .serving import Engine

log = logging.getLogger(__name__)


class EditBody(BaseModel):
    """An `EditRequest` in JSON, with the method and its settings."""

    model_config = ConfigDict(extra="allow")  # the EditRequest fields, checked by EditRequest
    method: str = "lora-sft"
    settings: dict[str, Any] = Field(default_factory=dict)


class LoadBody(BaseModel):
    id: str


def summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the patch list shows of one manifest."""
    reqs = manifest.get("requests") or [{}]
    router = manifest.get("router") or {}
    return {"id": manifest.get("id"), "object": "patch", "method": manifest.get("method"),
            "kind": manifest.get("kind", "lora"), "created": manifest.get("created"),
            "prompt": reqs[0].get("prompt"), "target_new": reqs[0].get("target_new"),
            "subject": reqs[0].get("subject"), "requests": len(manifest.get("requests") or []),
            "routed": bool(router), "scores": manifest.get("scores") or {},
            "baseline": manifest.get("baseline") or {}, "steps": manifest.get("steps"),
            "seconds": manifest.get("seconds")}


class PatchService:
    def __init__(self, editor: Editor, engine: Engine):
        self.editor, self.engine = editor, engine
        self.lock = threading.Lock()
        self.loaded: dict[str, dict[str, Any]] = {}  # id -> manifest, as the engine left it
        self.jobs: dict[str, dict[str, Any]] = {}

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return [summary(m) for m in self.loaded.values()]

    def refresh(self) -> None:
        """Called on the engine thread after each change."""
        with self.lock:
            self.loaded = {p.id: p.manifest for p in self.editor.applied}

    def load_store(self) -> None:
        """At start: every complete patch of the store made for this model (what an
        interrupted save left behind is removed first)."""
        from .server import clean_store

        root = self.editor.store.root
        for name in clean_store(root):
            log.warning("removed %s, left by an interrupted save", root / name)

        def load_all() -> None:
            for manifest in self.editor.store.list():
                try:
                    self.editor.apply(Patch.load(manifest["path"]))
                except (KnowpatchError, OSError, KeyError, ValueError) as exc:
                    log.warning("not loaded: %s (%s)", manifest.get("id"), exc)
            self.refresh()
        self.engine.call(load_all)
        log.info("serving %d patches from %s", len(self.loaded), root)

    async def on_engine(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, lambda: self.engine.call(fn))

    def mount(self, app: FastAPI, check_id: Callable[..., str]) -> None:
        from .server import ApiError, from_knowpatch

        def known(patch_id: str) -> str:
            check_id(patch_id)
            with self.lock:
                if patch_id not in self.loaded:
                    raise ApiError(404, f"id: no loaded patch {patch_id!r}", "id", "not_found_error")
            return patch_id

        @app.get("/v1/patches")
        async def list_patches() -> dict:
            return {"object": "list", "data": self.snapshot()}

        @app.get("/v1/patches/{patch_id}")
        async def show(patch_id: str) -> dict:
            known(patch_id)
            with self.lock:
                manifest = self.loaded.get(patch_id) or {}
            return {**summary(manifest), "manifest": manifest}

        @app.delete("/v1/patches/{patch_id}")
        async def delete(patch_id: str, unload_only: bool = False) -> dict:
            known(patch_id)

            def remove() -> None:
                self.editor.remove(patch_id)
                if not unload_only:
                    self.editor.store.remove(patch_id)
                self.refresh()
            await self.on_engine(remove)
            return {"id": patch_id, "object": "patch", "deleted": True, "files_kept": unload_only}

        @app.post("/v1/patches/load")
        async def load(body: LoadBody) -> dict:
            check_id(body.id)
            folder = self.editor.store.root / body.id
            if not (folder / MANIFEST).is_file():
                raise ApiError(404, f"id: no patch folder {body.id!r} in the store", "id",
                               "not_found_error")

            def apply() -> dict:
                self.editor.apply(Patch.load(folder))
                self.refresh()
                return summary(self.loaded[body.id])
            try:
                return await self.on_engine(apply)
            except KnowpatchError as exc:
                raise ApiError(400, f"id: {exc}", "id") from None

        @app.post("/v1/patches", status_code=202)
        async def create(body: EditBody) -> dict:
            try:
                job = self.new_job(body)
            except KnowpatchError as exc:
                raise from_knowpatch(exc) from None
            return job

        @app.get("/v1/jobs/{job_id}")
        async def job(job_id: str) -> dict:
            with self.lock:
                if job_id not in self.jobs:
                    raise ApiError(404, f"id: no job {job_id!r}", "id", "not_found_error")
                return dict(self.jobs[job_id])

    def new_job(self, body: EditBody) -> dict[str, Any]:
        """Check the edit now (bad input is a 400 naming the field), train it on the engine."""
        fields = {k: v for k, v in (body.model_extra or {}).items()}
        request = EditRequest.from_dict(fields)
        module = get_method(body.method)
        build_config(module.Config, body.settings, where=body.method)
        check_all_fit([request], self.editor.tokenizer,
                      getattr(self.editor.model.config, "max_position_embeddings", None))
        job_id = "job-" + uuid.uuid4().hex[:12]
        job = {"id": job_id, "object": "edit.job", "status": "queued", "created": time.time(),
               "method": body.method, "prompt": request.prompt, "target_new": request.target_new,
               "subject": request.subject, "patch": None, "error": None}
        with self.lock:
            self.jobs[job_id] = job

        def run() -> None:
            self.update(job_id, status="running", started=time.time())
            try:
                patch = self.editor.edit(request, body.method, config=dict(body.settings))
            except Exception as exc:  # reported in the job; the server keeps serving
                log.warning("job %s failed: %s", job_id, exc)
                self.update(job_id, status="failed", error=str(exc), finished=time.time())
                return
            self.refresh()
            self.update(job_id, status="succeeded", patch=patch.id, finished=time.time(),
                        scores=patch.scores, baseline=patch.baseline, steps=patch.steps,
                        seconds=patch.seconds, subject=(patch.manifest.get("requests") or [{}])[0]
                        .get("subject"))
        self.engine.submit_task(run)
        return dict(job)

    def update(self, job_id: str, **values: Any) -> None:
        with self.lock:
            self.jobs[job_id].update(values)
