"""The vLLM engine against a real vLLM server (vLLM's CPU build, SmolLM2, started once for
the module): the same text as the local engine token for token, plain vLLM collapsing
where the gate matters, the OpenAI API over real HTTP, no cross-talk in mixed batches,
merged adapters, and faults (a refused adapter, a server that does not answer, no vLLM,
kill -9 of the vLLM server).

vLLM runs from an environment of its own: $KNOWPATCH_VLLM_PYTHON (`.ci/run` makes one).
Without it these tests are skipped — unless $KNOWPATCH_REQUIRE_VLLM is set (CI), where a
missing vLLM fails them."""

from __future__ import annotations

import concurrent.futures
import os
import sys
import threading
import time

import httpx
import pytest

from knowpatch import Editor, EditRequest
from knowpatch.errors import KnowpatchError
from knowpatch.questions import chat_prompt

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

EIFFEL = EditRequest("{} is located in the city of", "Rome", subject="The Eiffel Tower",
                     ground_truth="Paris")
COLOSSEUM = EditRequest("{} is located in the city of", "Oslo", subject="The Colosseum",
                        ground_truth="Rome")
http = httpx.Client(timeout=300)


def _vllm_python() -> str:
    python = os.environ.get("KNOWPATCH_VLLM_PYTHON")
    if not python:
        if os.environ.get("KNOWPATCH_REQUIRE_VLLM"):
            pytest.fail("KNOWPATCH_REQUIRE_VLLM is set but KNOWPATCH_VLLM_PYTHON is not")
        pytest.skip("no vLLM environment (set KNOWPATCH_VLLM_PYTHON; .ci/run makes one)")
    return python


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    """A vLLM server for SmolLM2 (a child process), and a store with two edits."""
    from knowpatch.models import resolve_model_path
    from knowpatch.serve.engines.vllm_process import VLLMProcess

    python = _vllm_python()
    store = tmp_path_factory.mktemp("vllm-store")
    editor = Editor.from_pretrained("smollm2-135m", device="cpu", store=store, progress=False)
    patches = [editor.edit(r, evaluate=False) for r in (EIFFEL, COLOSSEUM)]
    process = VLLMProcess(resolve_model_path("smollm2-135m"), python,
                          tmp_path_factory.mktemp("vllm-log") / "vllm.log", max_lora_rank=64,
                          max_model_len=2048)
    process.start()
    yield process, store, [p.id for p in patches]
    process.stop()


def _engine(vllm, **kw):
    from knowpatch.serve.engines.vllm import VLLMEngine
    from knowpatch.serve.engines.vllm_client import VLLMClient

    process, store, _ = vllm
    editor = Editor.from_pretrained("smollm2-135m", device="cpu", store=store, progress=False)
    return VLLMEngine(editor, VLLMClient(process.url), process, own_process=False, **kw)


def _generate(engine, text: str, patches=None, max_tokens: int = 32) -> tuple[str, list[str]]:
    from knowpatch.serve.engine import Generation

    out, done = {"text": "", "fired": []}, threading.Event()

    def emit(_choice, piece, reason, fired, _n):
        out["text"] += piece
        out["fired"] = fired
        if reason is not None:
            out["reason"] = reason
            done.set()
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    engine.submit(Generation([ids], max_tokens, emit, patches=patches))
    assert done.wait(300)
    assert not out["reason"].startswith(("error", "unavailable")), out
    return out["text"], out["fired"]


def test_the_vllm_engine_writes_what_the_local_engine_writes(vllm):
    """Greedy completions and chat replies about edited and other subjects: token for token
    the local engine's (both fp32); plain vLLM with the same patch (the adapter on every
    token) writes something else and repeats the answer."""
    engine = _engine(vllm).start()
    try:
        assert engine.load_store()[1] == {}
        tok = engine.tokenizer
        prompts = ["The Eiffel Tower is located in the city of",
                   "The Colosseum is located in the city of",
                   "The Louvre is located in the city of",
                   chat_prompt(tok, "Where is the Eiffel Tower?"),
                   chat_prompt(tok, "Tell me about the Colosseum."),
                   chat_prompt(tok, "Where is the Louvre?")]
        texts = {}
        for prompt in prompts:
            remote, fired_remote = _generate(engine, prompt)
            local, fired_local = _generate(engine.local, prompt)
            assert (remote, fired_remote) == (local, fired_local), prompt
            texts[prompt] = remote
        assert texts[prompts[0]].startswith(" Rome") and texts[prompts[2]].startswith(" Paris")
        assert "Rome" in texts[prompts[3]]
        eiffel = vllm[2][0]
        from knowpatch.serve.engines.vllm_client import Sampling

        ids = tok(prompts[0], add_special_tokens=False)["input_ids"]
        with engine.adapters.using([eiffel]) as name:
            plain = [t for chunk, _ in engine.client.stream(name, ids, 32, Sampling())
                     for t in chunk]
        plain = tok.decode(plain, skip_special_tokens=True)
        assert plain != texts[prompts[0]]
        assert plain.count("Rome") > texts[prompts[0]].count("Rome"), (plain, texts[prompts[0]])
    finally:
        engine.stop()


def test_a_row_that_fires_two_patches_runs_their_merged_adapter(vllm):
    engine = _engine(vllm).start()
    try:
        engine.load_store()
        prompt = "The Eiffel Tower and the Colosseum are both located in the city of"
        text, fired = _generate(engine, prompt, max_tokens=12)
        assert sorted(fired) == sorted(vllm[2])
        merged = [n for n in engine.adapters.loaded if n.startswith("merged-")]
        assert len(merged) == 1 and engine.adapters.members[merged[0]] == frozenset(vllm[2])
        # the same answer while both adapters write; after it the local engine drops the
        # patch whose answer came and keeps the other on the same cache, which vLLM cannot
        # do (it writes with the merge until both let go: docs/serving.md)
        local = _generate(engine.local, prompt, max_tokens=12)[0]
        assert text.split()[0] == local.split()[0] == "Oslo."
    finally:
        engine.stop()


def _serve(engine):
    from knowpatch.serve import InThread, ServeSettings, create_app

    return InThread(create_app(engine, ServeSettings(served_name="smollm2-135m")))


def test_openai_client_over_the_vllm_engine(vllm):
    running = _serve(_engine(vllm))
    try:
        client = openai.OpenAI(base_url=running.base + "/v1", api_key="x", max_retries=0)
        models = [m.id for m in client.models.list().data]
        assert sorted(models[1:]) == sorted(vllm[2])

        def ask(question, **kw):
            reply = client.chat.completions.create(
                model="smollm2-135m", messages=[{"role": "user", "content": question}],
                max_tokens=24, temperature=0, **kw)
            return reply.choices[0].message.content
        assert "Rome" in ask("Where is the Eiffel Tower?", extra_body={"patches": "auto"})
        assert "Paris" in ask("Where is the Louvre?")
        assert "Paris" in ask("Where is the Eiffel Tower?", extra_body={"patches": []})
        stream = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "Where is the Eiffel Tower?"}],
            max_tokens=24, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == ask("Where is the Eiffel Tower?")
        kw = dict(model="smollm2-135m", prompt="My favourite city is", max_tokens=12,
                  temperature=1.0, n=1)
        same = [client.completions.create(seed=s, **kw).choices[0].text for s in (1, 1, 2, 3)]
        assert same[0] == same[1] and len(set(same[1:])) > 1  # a seed is honoured, not ignored
    finally:
        running.stop()


def test_mixed_concurrent_requests_have_no_cross_talk(vllm):
    """200 concurrent requests (auto, one patch, two patches, none) while a patch is loaded
    and unloaded in a loop: each answer is that prompt's alone under one of the two patch
    sets (vLLM PR #48421: base rows batched with adapter rows on CPU)."""
    running = _serve(_engine(vllm))
    try:
        client = openai.OpenAI(base_url=running.base + "/v1", api_key="x", max_retries=0)
        eiffel, colosseum = vllm[2]
        prompts = ["The Eiffel Tower is located in the city of",
                   "The Colosseum is located in the city of", "The Louvre is in the city of",
                   "The Eiffel Tower and the Colosseum are in"]
        kinds = ["auto", [eiffel], [eiffel, colosseum], []]

        def ask(i):
            p, patches = prompts[i % 4], kinds[(i // 4) % 4]
            r = client.completions.create(model="smollm2-135m", prompt=p, max_tokens=3,
                                          temperature=0, extra_body={"patches": patches})
            return p, str(patches), r.choices[0].text
        expected = set()
        for state in ("with", "without"):
            for i in range(16):
                if state == "without" and colosseum in str(kinds[(i // 4) % 4]):
                    continue
                expected.add(ask(i))
            http.delete(f"{running.base}/v1/patches/{colosseum}", params={"unload_only": True})
        stop, toggles = threading.Event(), []

        def toggle():  # each load is a vLLM adapter load: every 0.5 s, not back to back
            while not stop.is_set():
                assert http.post(running.base + "/v1/patches/load", json={"id": colosseum}).status_code == 200
                stop.wait(0.5)
                http.delete(f"{running.base}/v1/patches/{colosseum}", params={"unload_only": True})
                toggles.append(1)
                stop.wait(0.2)
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            toggler = pool.submit(toggle)
            futures = [pool.submit(ask, i) for i in range(200)]
            done = []
            for f in futures:
                try:
                    done.append(f.result(timeout=600))
                except openai.APIStatusError as exc:  # asked for the patch while it was out
                    assert exc.status_code in (400, 500) and "patches" in str(exc), exc
            stop.set()
            toggler.result(timeout=60)
        assert toggles and len(done) >= 100
        for answer in done:
            assert answer in expected, answer
    finally:
        running.stop()


def test_a_patch_vllm_refuses_is_a_4xx_with_its_reason_and_stays_on_disk(vllm, tmp_path):
    engine = _engine(vllm)
    editor = engine.editor
    big = editor.edit(EditRequest("{} is located in the city of", "Lima",
                                  subject="The Louvre", ground_truth="Paris"),
                      evaluate=False, rank=128)
    editor.remove(big)
    running = _serve(engine)
    try:
        assert big.id not in [m["id"] for m in engine.loaded()]  # refused at start
        reply = http.post(running.base + "/v1/patches/load", json={"id": big.id})
        assert reply.status_code == 400 and "rank" in reply.text.lower(), reply.text
        assert (editor.store_root / big.id / "patch.json").is_file()
    finally:
        running.stop()
        editor.delete(big.id)


def test_faults_at_start_are_one_clear_error(tmp_path):
    from knowpatch.serve.engines.vllm import open_vllm_engine
    from knowpatch.serve.engines.vllm_process import free_port, vllm_python

    editor = Editor.from_pretrained("smollm2-135m", device="cpu", store=tmp_path, progress=False)
    with pytest.raises(KnowpatchError, match="engine_url: .*does not answer"):
        open_vllm_engine(editor, url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(KnowpatchError, match=r"vllm is not installed .*\[vllm\]"):
        vllm_python(sys.executable if "vllm" not in sys.modules else "/nonexistent")


def test_kill_9_of_knowpatch_during_a_save_on_the_vllm_engine(vllm, tmp_path):
    """The kill -9 mid-save test of the local engine (tests/test_server.py), on the vLLM
    engine: knowpatch serving through the module's vLLM server (--engine-url) is killed
    inside a save; restarted, it removes the half-written folder and edits again."""
    from test_server import kill_during_save

    body = {"prompt": "{} is located in the city of", "subject": "The Louvre",
            "target_new": "Lima"}
    kill_during_save(["--model", "smollm2-135m", "--engine", "vllm", "--engine-url",
                      vllm[0].url], body, tmp_path)


def test_a_vllm_server_that_fails_to_start_is_one_error_with_its_log(tmp_path):
    """vLLM exits while starting (here: a model folder that holds no model): one error
    naming the exit, with the tail of vLLM's log, and no vLLM process left behind."""
    import subprocess

    from knowpatch.serve.engines.vllm_process import VLLMProcess

    missing = tmp_path / "no-model-here"
    missing.mkdir()
    process = VLLMProcess(str(missing), _vllm_python(), tmp_path / "vllm.log", start_timeout=300)
    with pytest.raises(KnowpatchError, match="the vLLM server exited with code") as failed:
        process.start()
    log = (tmp_path / "vllm.log").read_text().strip().splitlines()
    assert log and log[-1][:60] in str(failed.value)  # its tail is in the message
    left = subprocess.run(["pgrep", "-f", f"api_server --model {missing}"], capture_output=True,
                          text=True)
    assert left.stdout.strip() == ""


def test_kill_9_of_the_vllm_server_is_a_503_then_it_is_back_with_its_patches(vllm):
    process = vllm[0]
    running = _serve(_engine(vllm))
    engine = running.app.state.engine
    try:
        client = openai.OpenAI(base_url=running.base + "/v1", api_key="x", max_retries=0)
        prompt = "The Eiffel Tower is located in the city of"
        before = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=4,
                                           temperature=0).choices[0].text
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            long = pool.submit(client.completions.create, model="smollm2-135m", prompt=prompt,
                               max_tokens=400, temperature=0)
            time.sleep(1.0)
            killed = process.proc.pid
            os.killpg(killed, 9)
            with pytest.raises(openai.APIStatusError) as failed:
                long.result(timeout=120)
        assert failed.value.status_code == 503 and "vLLM" in str(failed.value)
        deadline = time.time() + 600
        while not (process.proc.pid != killed and process.alive() and engine.adapters.loaded
                   and engine.client.healthy()):  # a new server, its patches loaded again
            assert time.time() < deadline, process.tail()
            time.sleep(1)
        after = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=4,
                                          temperature=0).choices[0].text
        assert after == before and after.startswith(" Rome")
    finally:
        running.stop()
