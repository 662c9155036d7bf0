"""The patch endpoints of `knowpatch serve`: list, show, load and remove patches while the
server runs. Every change to what is served is engine work, done between batches; the HTTP
side reads the engine's snapshot of the loaded patches."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from ..errors import KnowpatchError
from .engine import Engine
from .errors import ApiError, check_id
from .jobs import EditJobs
from .shapes import LoadBody, summary

log = logging.getLogger(__name__)


class PatchService:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.jobs = EditJobs(engine)

    def snapshot(self) -> list[dict[str, Any]]:
        return [summary(m) for m in self.engine.loaded()]

    def loaded_ids(self) -> set[str]:
        return {m["id"] for m in self.engine.loaded()}

    def load_store(self) -> None:
        """At start: every complete patch of the store made for this model (what an
        interrupted save left behind is removed first)."""
        loaded, failed = self.engine.load_store()
        for patch_id, why in failed.items():
            log.warning("not loaded: %s (%s)", patch_id, why)
        log.info("serving %d patches", len(loaded))

    @staticmethod
    async def in_thread(fn: Callable[[], Any]) -> Any:
        """Wait for blocking engine work without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, fn)

    def mount(self, app: FastAPI) -> None:
        app.get("/v1/patches")(self.list_patches)
        app.get("/v1/patches/{patch_id}")(self.show)
        app.delete("/v1/patches/{patch_id}")(self.delete)
        app.post("/v1/patches/load")(self.load)
        self.jobs.mount(app)

    def known(self, patch_id: str) -> dict[str, Any]:
        """The manifest of loaded patch `patch_id` (404 if it is not loaded)."""
        check_id(patch_id)
        for manifest in self.engine.loaded():
            if manifest["id"] == patch_id:
                return manifest
        raise ApiError(404, f"id: no loaded patch {patch_id!r}", "id", "not_found_error")

    async def list_patches(self) -> dict:
        return {"object": "list", "data": self.snapshot()}

    async def show(self, patch_id: str) -> dict:
        manifest = self.known(patch_id)
        return {**summary(manifest), "manifest": manifest}

    async def delete(self, patch_id: str, unload_only: bool = False) -> dict:
        """Unload a patch and (unless `unload_only`) delete its folder from the store."""
        self.known(patch_id)
        await self.in_thread(lambda: self.engine.unload(patch_id, delete=not unload_only))
        return {"id": patch_id, "object": "patch", "deleted": True, "files_kept": unload_only}

    async def load(self, body: LoadBody) -> dict:
        check_id(body.id)
        if not self.engine.has_stored(body.id):
            raise ApiError(404, f"id: no patch folder {body.id!r} in the store", "id",
                           "not_found_error")
        try:
            return summary(await self.in_thread(lambda: self.engine.load(body.id)))
        except KnowpatchError as exc:
            raise ApiError(400, f"id: {exc}", "id") from None
