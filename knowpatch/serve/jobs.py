"""Edits while serving: `POST /v1/patches` checks the edit at once (bad input is a 400
naming the field) and trains it as a background job on the engine; `GET /v1/jobs/ID` says
how it went. A failed job is reported in the job; the server keeps serving."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any

from fastapi import FastAPI

from ..behaviour_edit import job_from_dict
from ..errors import KnowpatchError
from ..methods import check_settings
from ..requests import EditRequest
from .engine import Engine
from .errors import ApiError, from_knowpatch
from .shapes import EditBody

log = logging.getLogger(__name__)


class EditJobs:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.lock = threading.Lock()
        self.jobs: dict[str, dict[str, Any]] = {}

    def mount(self, app: FastAPI) -> None:
        app.post("/v1/patches", status_code=202)(self.create)
        app.get("/v1/jobs/{job_id}")(self.job)

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
        """Check the edit now (the admission check of `Editor.check`), train it on the engine."""
        if "behaviour" in (body.model_extra or {}):
            return self.new_behaviour_job(body)
        request = EditRequest.from_dict(dict(body.model_extra or {}))
        self.engine.check(request, body.method, body.settings)
        job_id = "job-" + uuid.uuid4().hex[:12]
        job = {"id": job_id, "object": "edit.job", "status": "queued", "created": time.time(),
               "method": body.method, "prompt": request.prompt, "target_new": request.target_new,
               "subject": request.subject, "patch": None, "error": None}
        with self.lock:
            self.jobs[job_id] = job
        future = self.engine.edit(request, body.method, body.settings,
                                  started=lambda: self.update(job_id, status="running",
                                                              started=time.time()))
        future.add_done_callback(lambda done: self.finished(job_id, done))
        return dict(job)

    def new_behaviour_job(self, body: EditBody) -> dict[str, Any]:
        """A behaviour edit (`behaviour_edit.job_from_dict`): checked now, trained as a job."""
        if body.method != "dpo" and "method" in body.model_fields_set:
            raise KnowpatchError(f"method: a behaviour is trained with dpo (got {body.method!r})")
        job_spec = job_from_dict(dict(body.model_extra or {}))
        settings = {"prefixes": 0, "gate": "all", **body.settings}
        check_settings("dpo", settings)
        job_id = "job-" + uuid.uuid4().hex[:12]
        job = {"id": job_id, "object": "edit.job", "status": "queued", "created": time.time(),
               "method": "dpo", "behaviour": job_spec.behaviour, "patch": None, "error": None}
        with self.lock:
            self.jobs[job_id] = job
        future = self.engine.edit_behaviour(job_spec, settings, started=lambda: self.update(
            job_id, status="running", started=time.time()))
        future.add_done_callback(lambda done: self.finished(job_id, done))
        return dict(job)

    def finished(self, job_id: str, done: Future) -> None:
        if (exc := done.exception()) is not None:
            log.warning("job %s failed: %s", job_id, exc)
            self.update(job_id, status="failed", error=str(exc), finished=time.time())
            return
        patch = done.result()
        self.update(job_id, status="succeeded", patch=patch.id, finished=time.time(),
                    scores=patch.scores, baseline=patch.baseline, steps=patch.steps,
                    seconds=patch.seconds,
                    subject=(patch.manifest.get("requests") or [{}])[0].get("subject"),
                    **({"report": patch.manifest["behaviour"]} if "behaviour" in patch.manifest
                       else {}))

    def update(self, job_id: str, **values: Any) -> None:
        with self.lock:
            self.jobs[job_id].update(values)
