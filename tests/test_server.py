"""`knowpatch serve` over real HTTP on 127.0.0.1: the official `openai` client, plain HTTP,
bad input, the API key, patches added and removed while requests run, and a kill -9 during
an edit. The tiny random model keeps it fast; its edits learn in a few steps."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
from knowpatch.serve import InThread, ServeSettings, create_app  # noqa: E402

http = httpx.Client(timeout=300)  # generous: a busy 2-core machine answers slowly

PROMPT = "The Eiffel Tower is located in the city of"
EDIT = {"prompt": PROMPT, "target_new": "Rome", "subject": "Eiffel Tower",
        "settings": {"max_steps": 40}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running(InThread):
    """A server on a thread of this process (uvicorn), stopped at the end."""

    def __init__(self, editor, **settings):
        self.editor = editor
        super().__init__(create_app(editor, ServeSettings(**{"served_name": "custom", **settings})))

    def client(self, key: str = "unused"):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0)


@pytest.fixture
def served(tiny_editor):
    running = Running(tiny_editor)
    yield running
    running.stop()


def edit(base: str, body: dict, headers: dict | None = None) -> dict:
    job = http.post(base + "/v1/patches", json=body, headers=headers)
    assert job.status_code == 202, job.text
    job = job.json()
    deadline = time.time() + 300
    while job["status"] in ("queued", "running"):
        assert time.time() < deadline
        time.sleep(0.1)
        job = http.get(f"{base}/v1/jobs/{job['id']}", headers=headers).json()
    assert job["status"] == "succeeded", job
    return job


def complete(client, prompt: str, patches="auto", **kw):
    return client.completions.create(model=kw.pop("model", "custom"), prompt=prompt,
                                      max_tokens=kw.pop("max_tokens", 6), temperature=0,
                                      extra_body={"patches": patches}, **kw)


def test_openai_client_completions_chat_stream_and_patches(served):
    client = served.client()
    base_text = complete(client, PROMPT).choices[0].text
    assert complete(client, PROMPT).choices[0].text == base_text  # greedy is deterministic
    stream = client.completions.create(model="custom", prompt=PROMPT, max_tokens=6,
                                       temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == base_text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    chat = client.chat.completions.create(model="custom", max_tokens=5, temperature=0,
                                          messages=[{"role": "user", "content": "Hi"}])
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    chat_stream = client.chat.completions.create(
        model="custom", max_tokens=5, temperature=0, stream=True,
        messages=[{"role": "user", "content": "Hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in chat_stream) == \
        chat.choices[0].message.content

    job = edit(served.base, EDIT)
    pid = job["patch"]
    assert job["scores"]["rel"] == 100.0
    models = [m.id for m in client.models.list().data]
    assert models == ["custom", pid]
    raw = client.completions.with_raw_response.create(
        model="custom", prompt=PROMPT, max_tokens=6, temperature=0)
    edited = raw.parse()
    assert edited.choices[0].text.startswith(" Rome")
    assert edited.choices[0].model_extra["knowpatch"]["patches"] == [pid]
    assert raw.headers["x-knowpatch-patches"] == pid
    assert complete(client, PROMPT, patches=[]).choices[0].text == base_text  # the base model
    assert complete(client, PROMPT, patches=[pid]).choices[0].text.startswith(" Rome")
    assert complete(client, PROMPT, model=pid).choices[0].text.startswith(" Rome")  # by name
    shown = http.get(f"{served.base}/v1/patches/{pid}").json()
    assert shown["manifest"]["id"] == pid and shown["target_new"] == "Rome"
    assert http.delete(f"{served.base}/v1/patches/{pid}").status_code == 200
    assert complete(client, PROMPT).choices[0].text == base_text  # removed without a restart
    assert not (served.editor.store_root / pid).exists()


def test_sampling_n_seed_stop(served):
    client = served.client()
    kw = dict(model="custom", prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    a = client.completions.create(n=3, **kw)
    b = client.completions.create(n=3, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same text
    others = [client.completions.create(**{**kw, "seed": s}).choices[0].text for s in (1, 2, 3)]
    assert len(set(others + [a.choices[0].text])) > 1  # seeds are honoured: not greedy text
    greedy = complete(client, PROMPT, max_tokens=8).choices[0].text
    assert any(t != greedy for t in others + [c.text for c in a.choices])
    assert 3 <= a.usage.completion_tokens <= 24  # counted by the engine, 1..8 per choice
    full = complete(client, PROMPT, max_tokens=8).choices[0].text
    words = full.split()
    assert len(words) >= 2, full
    cut = complete(client, PROMPT, max_tokens=8, stop=[words[1]]).choices[0]
    assert cut.finish_reason == "stop" and words[1] not in cut.text
    assert full.startswith(cut.text)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "max_tokens": 100000}, "max_tokens"),
    ({"prompt": "word " * 200}, "prompt"),  # the tiny model's context is 64 tokens
    ({"prompt": "x", "patches": ["../x"]}, "patches.0"),
    ({"prompt": "x", "patches": ["/etc/passwd"]}, "patches.0"),
    ({"prompt": "x", "patches": ["no-such-patch"]}, "patches.0"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "n": 100}, "n"),
    ({"prompt": ""}, "prompt"),
    ({}, "prompt"),
])
def test_bad_completion_requests_are_4xx_naming_the_field(served, body, param):
    r = http.post(served.base + "/v1/completions", json={"model": "custom", **body})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert param.split(".")[0] in r.json()["error"]["message"]


def test_other_bad_input_is_4xx_and_the_server_keeps_serving(served, tmp_path):
    base = served.base
    r = http.post(base + "/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = http.post(base + "/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = http.post(base + "/v1/patches", json={"prompt": "The Louvre is in", "target_new": "  "})
    assert r.status_code == 400 and r.json()["error"]["param"] == "target_new"
    r = http.post(base + "/v1/patches", json={**EDIT, "settings": {"nonsense": 1}})
    assert r.status_code == 400 and "nonsense" in r.json()["error"]["message"]
    for bad in ("../x", "/etc", "..", "a/b"):
        r = http.post(base + "/v1/patches/load", json={"id": bad})
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == "id", bad
    r = http.get(base + "/v1/patches/..%2F..%2Fetc")
    assert 400 <= r.status_code < 500
    r = http.delete(base + "/v1/patches/not-there")
    assert r.status_code == 404 and r.json()["error"]["param"] == "id"
    # a patch made for another base model: its manifest says another fingerprint
    job = edit(base, EDIT)
    folder = served.editor.store_root / job["patch"]
    foreign = served.editor.store_root / "foreign-patch"
    http.delete(f"{base}/v1/patches/{job['patch']}", params={"unload_only": True})
    os.rename(folder, foreign)
    manifest = json.loads((foreign / "patch.json").read_text())
    manifest["base"]["fingerprint"] = "0" * 16
    manifest["id"] = "foreign-patch"
    (foreign / "patch.json").write_text(json.dumps(manifest))
    r = http.post(base + "/v1/patches/load", json={"id": "foreign-patch"})
    assert r.status_code == 400 and "base model" in r.json()["error"]["message"]
    assert complete(served.client(), PROMPT).choices[0].text  # still serving


def test_api_key(tiny_editor):
    running = Running(tiny_editor, api_key="s3cret")
    try:
        base = running.base
        assert http.get(base + "/").status_code == 200  # the playground page is public
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for method, path in (("GET", "/v1/models"), ("GET", "/v1/patches"),
                                 ("POST", "/v1/patches"), ("DELETE", "/v1/patches/x"),
                                 ("POST", "/v1/completions"), ("GET", "/v1/jobs/x")):
                r = http.request(method, base + path, headers=headers, json=EDIT)
                assert r.status_code == 401, (method, path, headers)
        assert http.get(base + "/v1/patches", headers={"Authorization": "Bearer s3cret"}
                         ).json()["data"] == []  # nothing was created by the refused POSTs
        with pytest.raises(openai.AuthenticationError):
            running.client("wrong").models.list()
        assert complete(running.client("s3cret"), PROMPT).choices[0].text
    finally:
        running.stop()


def test_concurrent_requests_while_patches_come_and_go(served):
    """200 concurrent requests while a patch is loaded and unloaded again and again: none
    fails, and each is answered with the patches the router picks for its prompt alone
    (under one of the two patch sets) and the same text as the prompt served alone."""
    base, client = served.base, served.client()
    a = edit(base, EDIT)["patch"]
    b = edit(base, {"prompt": "The Colosseum is located in the city of", "target_new": "Oslo",
                    "subject": "Colosseum", "settings": {"max_steps": 40}})["patch"]
    c = edit(base, {"prompt": "Angela Merkel speaks the language", "target_new": "Danish",
                    "subject": "Angela Merkel", "settings": {"max_steps": 40}})["patch"]
    prompts = [PROMPT, "Where is the Eiffel Tower? In", "The Colosseum stands in",
               "Angela Merkel was born in", "The Louvre is in the city of", "Berlin is a",
               "The capital of France is", "Colosseum tickets cost", "Hello, my name is",
               "Eiffel Tower visitors"]
    expected = {}
    for state in ("with", "without"):
        for p in prompts:
            r = complete(client, p, max_tokens=5)
            expected[(p, r.choices[0].text, tuple(r.choices[0].model_extra["knowpatch"]["patches"]))] = state
        if state == "with":
            assert http.delete(f"{base}/v1/patches/{c}", params={"unload_only": True}).status_code == 200
    stop = threading.Event()

    def toggle() -> int:
        n = 0
        while not stop.is_set():
            assert http.post(base + "/v1/patches/load", json={"id": c}).status_code == 200
            assert http.delete(f"{base}/v1/patches/{c}", params={"unload_only": True}).status_code == 200
            n += 1
        return n

    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        toggler = pool.submit(toggle)
        futures = [pool.submit(complete, served.client(), prompts[i % len(prompts)], max_tokens=5)
                   for i in range(200)]
        results = [f.result(timeout=300) for f in futures]
        stop.set()
        toggles = toggler.result(timeout=300)
    assert toggles >= 1
    for i, r in enumerate(results):
        key = (prompts[i % len(prompts)], r.choices[0].text,
               tuple(r.choices[0].model_extra["knowpatch"]["patches"]))
        assert key in expected, key
    fired = {p for r in results for p in r.choices[0].model_extra["knowpatch"]["patches"]}
    assert {a, b} <= fired  # the routed patches did serve their subjects
    assert max(served.app.state.engine.batches) > 1  # concurrent requests shared batches


def test_kill_9_during_an_edit_leaves_a_whole_patch_or_none(tiny_dir, tmp_path):
    """The server is killed (SIGKILL) while it saves a patch (a fault-injected pause holds
    the save between writing its temp folder and renaming it): the half-written folder is
    seen, the restarted server removes it, lists only whole patches, and edits again."""
    kill_during_save(["--model", str(tiny_dir)], EDIT, tmp_path)


def kill_during_save(serve_args: list[str], body: dict, tmp_path: Path) -> None:
    """`test_kill_9_during_an_edit_leaves_a_whole_patch_or_none` for a server started with
    `serve_args` (also run on the vLLM engine, tests/test_vllm.py)."""
    store = tmp_path / "store"
    env = {**os.environ, "KNOWPATCH_HOME": os.environ.get("KNOWPATCH_HOME", str(tmp_path / "home"))}

    def start(pause: float = 0) -> tuple[subprocess.Popen, str]:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "knowpatch.cli", "serve", *serve_args,
                                 "--device", "cpu", "--store", str(store), "--port", str(port)],
                                env={**env, "KNOWPATCH_FAULT_SAVE_PAUSE": str(pause)},
                                stderr=subprocess.PIPE)
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                http.get(base + "/v1/models", timeout=1)
                return proc, base
            except httpx.HTTPError:
                assert time.time() < deadline
                time.sleep(0.1)

    def partial() -> list[Path]:
        return [p for p in store.iterdir() if p.name.startswith(".")] if store.is_dir() else []

    proc, base = start(pause=60)
    assert http.post(base + "/v1/patches", json=body).status_code == 202
    deadline = time.time() + 300
    while not any((p / "patch.json").is_file() for p in partial()):  # the save is under way
        assert time.time() < deadline and proc.poll() is None, "no save seen"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # inside the save: its temp folder is written, not renamed
    proc.wait()
    assert partial() and not [p for p in store.iterdir() if not p.name.startswith(".")]
    proc, base = start()
    try:
        assert not partial()  # what the killed save left is gone
        assert http.get(base + "/v1/patches").json()["data"] == []
        job = edit(base, body)  # and the server edits again, whole
        folders = sorted(p.name for p in store.iterdir())
        assert folders == [job["patch"]]
        assert [p["id"] for p in http.get(base + "/v1/patches").json()["data"]] == folders
        assert {"patch.json", "adapter_model.safetensors"} <= {
            f.name for f in (store / folders[0]).iterdir()}
    finally:
        proc.terminate()
        proc.wait()


def test_cli_serve_help_documents_the_options():
    r = subprocess.run([sys.executable, "-m", "knowpatch.cli", "serve", "--help"],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0
    for option in ("--host", "--port", "--store", "--model", "--device", "--dtype", "--api-key",
                   "--max-batch", "--batch-window-ms", "--max-tokens", "--cors", "127.0.0.1"):
        assert option in r.stdout, option


def test_playground_page_is_served(served):
    page = http.get(served.base + "/").text
    assert "<title>knowpatch playground</title>" in page and "/v1/completions" in page


def test_no_half_written_folder_is_listed(tmp_path):
    from knowpatch.patches import PatchStore

    (tmp_path / ".abc.tmp123").mkdir()
    (tmp_path / "whole").mkdir()
    assert PatchStore(tmp_path).clean() == [".abc.tmp123"]
    assert [p.name for p in Path(tmp_path).iterdir()] == ["whole"]


def test_statements_without_in_context_patches_do_not_wait_for_the_engine(tiny_editor):
    """Each completion asks the engine for in-context statements; with none loaded that is
    answered here, not by a task on the engine thread (a task arriving there closed the
    batch being collected: 64 concurrent requests ran as batches of 1 to 6 rows)."""
    from knowpatch.serve.engines.local import LocalEngine

    engine = LocalEngine(tiny_editor)  # not started: a task would never be run
    assert engine.statements(["The Eiffel Tower is in"], None) == [""]
    assert engine.queue.qsize() == 0


def test_a_reading_task_runs_inside_batch_collection_a_changing_one_ends_it(tiny_editor):
    """Routing and statements (reads) arriving while a batch is collected run at once and the
    batch goes on collecting; patch work (a change) ends the batch and waits for it."""
    from knowpatch.serve.engine import Generation
    from knowpatch.serve.engines.local import LocalEngine, Task

    engine = LocalEngine(tiny_editor, batch_window=0.5)  # not started: collect by hand
    gens = [Generation([[1, 2]], 4, lambda *a: None) for _ in range(3)]
    read, change = Task(lambda: "routed", reads=True), Task(lambda: "changed")
    for item in (read, gens[1], change, gens[2]):
        engine.queue.put(item)
    batch, pending = engine.collect(gens[0])
    assert read.future.result(timeout=0) == "routed"
    assert batch == gens[:2] and pending is change and not change.future.done()


def test_a_behaviour_edit_over_http_is_checked_then_trained_and_scoped(served, tmp_path, monkeypatch):
    """POST /v1/patches with `behaviour`: bad fields are a 400 naming them (nothing made);
    a good one is a job whose patch is served, fires on its scope and reports its numbers."""
    (tmp_path / "server_judges.py").write_text("def even(text):\n    return len(text) % 2 == 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base = served.base
    languages = [f"Which language is spoken in town {i}?" for i in range(8)]
    good = {"behaviour": "Be brief.", "prompts": languages, "judge": "server_judges:even",
            "heldout": 0.25, "scope": languages,
            "out_of_scope": [f"Who owns company number {i}?" for i in range(6)],
            "settings": {"max_steps": 2, "lr": 3e-2, "modules": ["all"]}}
    for change, param in [({"judge": "shout"}, "judge"), ({"judge": []}, "judge"),
                          ({"prompts": []}, "prompts"), ({"prompts": "one"}, "prompts"),
                          ({"behaviour": " "}, "behaviour"), ({"scope": languages[:2]}, "scope"),
                          ({"heldout": 1.5}, "heldout"), ({"colour": 1}, "colour"),
                          ({"settings": {"beta": -1}}, "dpo: beta")]:
        r = http.post(base + "/v1/patches", json={**good, **change})
        assert r.status_code == 400, (change, r.text)
        assert r.json()["error"]["message"].startswith(param), (change, r.text)
    assert http.get(base + "/v1/patches").json()["data"] == []
    job = edit(base, good)
    assert job["report"]["scope"]["examples"] == 6 and "pass_rate" in job["report"]
    listed = [p["id"] for p in http.get(base + "/v1/patches").json()["data"]]
    assert job["patch"] in listed
    from knowpatch.questions import chat_prompt

    for form in (lambda q: chat_prompt(served.editor.tokenizer, q), lambda q: q):  # chat, plain
        asked = [form(q) for q in ("Which language is spoken in town 9?", "Who owns company number 9?")]
        inside, outside = (http.post(base + "/v1/route", json={"prompt": p}) for p in asked)
        assert job["patch"] in inside.json()["fired"], inside.text
        assert job["patch"] not in outside.json()["fired"], outside.text
