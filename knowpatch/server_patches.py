"""The patch endpoints of `knowpatch serve`: list, show, edit (a background job), load and
remove patches while the server runs. Every change to the model runs on the engine thread,
between batches; the HTTP side reads a snapshot of the loaded patches."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
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
PATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(message: str, param: str | None, kind: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_knowpatch(exc: KnowpatchError, status: int = 400) -> ApiError:
    """A KnowpatchError's message starts with the field it names (`field: problem`)."""
    message = str(exc)
    param = message.split(":", 1)[0] if ":" in message else None
    return ApiError(status, message, param if param and " " not in param else None)


def check_id(ref: str, param: str = "id") -> str:
    """A patch id as the API takes it: a folder name in the store, never a path."""
    if not PATCH_ID.match(ref) or ".." in ref:
        raise ApiError(400, f"{param}: {ref!r} is not a patch id (letters, digits, '-', '_', '.'; "
                       "no path)", param)
    return ref


def clean_store(root: Path) -> list[str]:
    """Remove what an interrupted atomic save left behind (hidden temp folders)."""
    removed = []
    if root.is_dir():
        for folder in root.iterdir():
            if folder.is_dir() and folder.name.startswith("."):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
    return removed


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

    def mount(self, app: FastAPI) -> None:
        app.get("/v1/patches")(self.list_patches)
        app.get("/v1/patches/{patch_id}")(self.show)
        app.delete("/v1/patches/{patch_id}")(self.delete)
        app.post("/v1/patches/load")(self.load)
        app.post("/v1/patches", status_code=202)(self.create)
        app.get("/v1/jobs/{job_id}")(self.job)

    def known(self, patch_id: str) -> str:
        check_id(patch_id)
        with self.lock:
            if patch_id not in self.loaded:
                raise ApiError(404, f"id: no loaded patch {patch_id!r}", "id", "not_found_error")
        return patch_id

    async def list_patches(self) -> dict:
        return {"object": "list", "data": self.snapshot()}

    async def show(self, patch_id: str) -> dict:
        self.known(patch_id)
        with self.lock:
            manifest = self.loaded.get(patch_id) or {}
        return {**summary(manifest), "manifest": manifest}

    async def delete(self, patch_id: str, unload_only: bool = False) -> dict:
        """Unload a patch and (unless `unload_only`) delete its folder from the store."""
        self.known(patch_id)

        def remove() -> None:
            self.editor.remove(patch_id)
            if not unload_only:
                self.editor.store.remove(patch_id)
            self.refresh()
        await self.on_engine(remove)
        return {"id": patch_id, "object": "patch", "deleted": True, "files_kept": unload_only}

    async def load(self, body: LoadBody) -> dict:
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

    async def create(self, body: EditBody) -> dict:
        try:
            return self.new_job(body)
        except KnowpatchError as exc:
            raise from_knowpatch(exc) from None

    async def job(self, job_id: str) -> dict:
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
