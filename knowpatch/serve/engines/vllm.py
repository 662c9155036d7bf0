"""The vLLM engine (`Engine` protocol): knowpatch routes, trains and keeps the patches; a
vLLM OpenAI server generates.

knowpatch keeps its base model for what only it does — training edits, router keys, routing
each row — on a `LocalEngine`'s thread. Each row goes to vLLM with the adapter of the
patches it fires: one patch is loaded into vLLM under its id; several, as one adapter whose
ranks are theirs concatenated (`merging`: an exact sum of their deltas), cached under a name
derived from the sorted ids. The answer gate is reproduced in two phases (`phases`): the
row is written with the adapter until its gate lets go (the answer named, or its token
limit), then vLLM continues prompt + those tokens on the base weights — what the local
engine does when the base weights re-read the text so far. A row's text streams out as one.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ...behaviour_edit import BehaviourJob
from ...editor import Editor
from ...errors import KnowpatchError
from ...requests import EditRequest
from ...router import Route
from ..engine import Generation
from ..rows import RowText
from .local import LocalEngine
from .phases import Phases, servable
from .vllm_adapters import VLLMAdapters, lora_rank_for
from .vllm_client import AdapterRefused, EngineUnavailable, Sampling, UnknownAdapter, VLLMClient
from .vllm_process import VLLMProcess, vllm_python

log = logging.getLogger(__name__)


class VLLMEngine:
    """Generation on the vLLM server behind `client` (started as `process`, if knowpatch runs
    it); patch work and routing on a local engine over `editor`."""

    def __init__(self, editor: Editor, client: VLLMClient, process: VLLMProcess | None = None,
                 *, workers: int = 256, max_lora_rank: int = 64, merged_dir: Path | None = None,
                 own_process: bool = True):
        self.editor, self.client, self.process = editor, client, process
        self.own_process = own_process  # stopped with the engine (False: someone else's)
        self.local = LocalEngine(editor)
        self.model_name, self.tokenizer = editor.model_name, editor.tokenizer
        self.context = editor.context_length or 2048
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="knowpatch-vllm")
        merged_dir = merged_dir or Path(editor.store_root).parent / "merged"
        self.adapters = VLLMAdapters(client, lambda p: Path(editor.store_root) / p, merged_dir,
                                     max_lora_rank)
        self.stopping = threading.Event()
        self.restarting = threading.Lock()
        self.watcher = threading.Thread(target=self.watch, name="knowpatch-vllm-watch", daemon=True)

    # ---- life -------------------------------------------------------------------------
    def start(self) -> VLLMEngine:
        self.local.start()
        if self.process is not None:
            self.watcher.start()
        return self

    def stop(self) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        if self.local.thread.is_alive():
            self.local.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.process is not None and self.own_process:
            self.process.stop()
        else:  # a server that outlives this engine keeps none of its adapters
            self.adapters.unload_all()
        self.client.close()

    def watch(self) -> None:
        """Restart the child vLLM server when it dies, and load the served patches into it
        again (requests in flight when it died were answered 503)."""
        while not self.stopping.wait(1.0):
            if self.process is None or self.process.alive() or self.stopping.is_set():
                continue
            with self.restarting:
                log.warning("the vLLM server died (exit %s); restarting it",
                            self.process.proc.returncode if self.process.proc else None)
                self.adapters.forget_all()
                try:
                    self.process.restart()
                    for manifest in self.local.loaded():
                        if manifest.get("kind") == "lora":
                            self.adapters.ensure([manifest["id"]])
                    log.warning("the vLLM server is back, %d patches loaded",
                                len(self.adapters.loaded))
                except Exception:  # the next round tries again
                    log.exception("restarting the vLLM server failed")

    # ---- generation -------------------------------------------------------------------
    def submit(self, gen: Generation) -> None:
        self.pool.submit(self.run, gen)

    def run(self, gen: Generation) -> None:
        """Route the generation's rows, then write each on vLLM (a task per row)."""
        try:
            manifests = {m["id"]: m for m in self.local.loaded()}
            names = list(manifests) if gen.patches is None else list(gen.patches)
            missing = [p for p in names if p not in manifests]
            if missing:
                raise LookupError(f"patches: {missing[0]!r} was removed before the request ran")
            keyed = [n for n in names if (manifests[n].get("router") or {}).get("keys")]
            always = [n for n in names if n not in keyed]
            routes = (self.local.call(lambda: self.editor.route_rows(gen.rows, keyed))
                      if keyed and gen.rows else [Route([], {}) for _ in gen.rows])
        except Exception as exc:
            for choice in range(len(gen.rows)):
                gen.emit(choice, "", f"error: {exc}", [], 0)
            return
        for choice, route in enumerate(routes):
            fired = list(route.fired) + always
            phases = Phases.of([manifests[p] for p in fired], route.scores)
            self.pool.submit(self.run_row, gen, choice, fired, phases)

    def run_row(self, gen: Generation, choice: int, fired: list[str], phases: Phases) -> None:
        text = RowText(self.tokenizer, gen, choice)
        try:
            try:
                self.write(gen, choice, text, fired, phases)
            except UnknownAdapter:  # a server restarted by others: load the adapters again
                if text.ids:
                    raise
                self.adapters.forget_all()
                self.write(gen, choice, text, fired, phases)
        except EngineUnavailable as exc:
            text.finish(f"unavailable: the vLLM engine {exc}", fired)
        except Exception as exc:  # one bad row must not stop the others
            log.exception("generation failed")
            text.finish(f"error: {exc}", fired)

    def write(self, gen: Generation, choice: int, text: RowText, fired: list[str],
              phases: Phases) -> None:
        """Phase 1 on the row's adapter until its gate lets go; phase 2 on the base weights."""
        sampling = Sampling(gen.temperature, gen.top_p, gen.seed, list(gen.stop))
        row, written = list(gen.rows[choice]), []
        with self.adapters.using(phases.patches) as adapter:
            if adapter is not None:
                limit = gen.max_tokens if phases.limit is None else min(phases.limit, gen.max_tokens)
                for ids, finish in self.client.stream(adapter, row, limit, sampling):
                    for token in ids:
                        written.append(token)
                        if text.push(token, lambda: fired):
                            return
                        if phases.released(self.tokenizer, written):
                            break
                    else:
                        if finish == "stop":  # EOS (or a stop string) ended it in vLLM
                            text.finish("stop", fired)
                            return
                        continue
                    break  # released: the base weights write on
        remaining = gen.max_tokens - len(written)
        if remaining > 0 and not text.done:
            base = self.adapters.base()
            for ids, finish in self.client.stream(base, row + written, remaining, sampling):
                for token in ids:
                    if text.push(token, lambda: fired):
                        return
                if finish == "stop":
                    break
        text.finish("stop" if len(text.ids) < gen.max_tokens else "length", fired)

    # ---- patch work: the local engine, then vLLM ----------------------------------------
    def admit(self, patch_id: str) -> None:
        """Check that vLLM can serve loaded patch `patch_id` and load it there; if not, it is
        unloaded here (its folder stays) and the reason raised."""
        manifest = next((m for m in self.local.loaded() if m["id"] == patch_id), None)
        try:
            if manifest is None:
                raise KnowpatchError(f"patch {patch_id} is not loaded")
            servable(manifest)
            if manifest.get("kind") == "lora":
                self.adapters.ensure([patch_id])
        except AdapterRefused as exc:
            self.local.unload(patch_id, delete=False)
            raise KnowpatchError(f"patch {patch_id}: vLLM refused it: {exc}") from None
        except KnowpatchError:
            self.local.unload(patch_id, delete=False)
            raise

    def loaded(self) -> list[dict[str, Any]]:
        return self.local.loaded()

    def load_store(self) -> tuple[list[str], dict[str, str]]:
        ids, failed = self.local.load_store()
        kept = []
        for patch_id in ids:
            try:
                self.admit(patch_id)
                kept.append(patch_id)
            except KnowpatchError as exc:
                failed[patch_id] = str(exc)
        return kept, failed

    def load(self, patch_id: str) -> dict[str, Any]:
        manifest = self.local.load(patch_id)
        self.adapters.drop(patch_id)  # a reloaded patch may hold other weights
        self.admit(patch_id)
        return manifest

    def unload(self, patch_id: str, delete: bool) -> None:
        self.local.unload(patch_id, delete)
        self.adapters.drop(patch_id)

    def has_stored(self, patch_id: str) -> bool:
        return self.local.has_stored(patch_id)

    def check(self, request: EditRequest, method: str, settings: dict[str, Any]) -> None:
        self.local.check(request, method, settings)

    def edit(self, request: EditRequest, method: str, settings: dict[str, Any],
             started=None) -> Future:
        """The local engine trains and saves the patch; then it is loaded into vLLM (refused:
        the job fails with vLLM's reason, the patch stays on disk)."""
        return self.admitted(self.local.edit(request, method, settings, started))

    def edit_behaviour(self, job: BehaviourJob, settings: dict[str, Any],
                       started=None) -> Future:
        return self.admitted(self.local.edit_behaviour(job, settings, started))

    def admitted(self, trained_future: Future) -> Future:
        """A future of the patch `trained_future` brings, once vLLM has loaded it too."""
        done: Future = Future()

        def trained(future: Future) -> None:
            if (exc := future.exception()) is not None:
                done.set_exception(exc)
                return
            try:
                self.admit(future.result().id)
                done.set_result(future.result())
            except Exception as exc:
                done.set_exception(exc)
        trained_future.add_done_callback(lambda f: self.pool.submit(trained, f))
        return done

    def statements(self, texts: list[str], patches: list[str] | None) -> list[str]:
        return self.local.statements(texts, patches)

    def route(self, prompt: str, patches: list[str] | None) -> Route:
        return self.local.route(prompt, patches)


def open_vllm_engine(editor: Editor, *, url: str | None = None, python: str | None = None,
                     merge_width: int = 4, log_dir: Path | None = None) -> VLLMEngine:
    """The vLLM engine over `editor`: talking to the server at `url`, or to a server started
    here as a child process (with `python`'s vLLM) for the editor's model; `merge_width`
    patches of the store's largest rank fit in one merged adapter."""
    from ...models import knowpatch_home, resolve_model_path

    ranks = [int((m.get("config") or {}).get("rank") or 8) for m in editor.stored(this_model=True)
             if m.get("kind") == "lora"]
    max_rank = lora_rank_for(max(ranks + [8]) * merge_width)
    if url:
        client = VLLMClient(url)
        try:
            served = client.served()
        except EngineUnavailable as exc:
            client.close()
            raise KnowpatchError(f"engine_url: {exc}") from None
        client.base = served[0]
        return VLLMEngine(editor, client, None, max_lora_rank=max_rank)
    process = VLLMProcess(resolve_model_path(editor.model_name), vllm_python(python),
                          (log_dir or knowpatch_home() / "logs") / "vllm.log",
                          max_lora_rank=max_rank, dtype=editor.base_info["dtype"],
                          max_model_len=editor.context_length)
    process.start()
    return VLLMEngine(editor, VLLMClient(process.url), process, max_lora_rank=max_rank)
