"""`knowpatch bench` on the tiny model: each mode, resume, reports, compare."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from knowpatch import KnowpatchError
from knowpatch.bench import Bench, BenchSettings
from knowpatch.cli import app

FIX = Path(__file__).parent / "fixtures"
FAST = {"lr": 3e-2, "max_steps": 30, "modules": ["all"], "layers": "all", "anchor_weight": 0.0}


def _bench(editor, out, **kw):
    settings = BenchSettings(data=str(kw.pop("data", FIX / "counterfact.json")),
                             method_config=dict(FAST), fluency_every=kw.pop("fluency_every", 0),
                             **kw)
    return Bench(editor, settings, out, progress=False)


def _rows(out):
    return [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]


def test_single_mode_report(tiny_editor, tmp_path):
    report = _bench(tiny_editor, tmp_path, n=2, fluency_every=2).run()
    rows = _rows(tmp_path)
    assert [r["case_id"] for r in rows] == [r["case_id"] for r in rows[:2]] and len(rows) == 2
    assert report["summary"]["n"] == 2 and report["baseline"]["loc"] == 100.0
    for key in ("score", "rel", "gen", "loc", "port", "S", "es", "ps", "ns", "rel_tf", "gen_tf",
                "loc_tf", "fluency", "multihop", "s_per_edit_median", "s_per_edit_p90",
                "steps_median", "eval_s_per_record", "peak_rss_mb", "n"):
        assert key in report["summary"]
    assert report["summary"]["port"] is None and report["summary"]["multihop"] is None
    assert report["summary"]["fluency"] is not None  # record 0 is measured (every 2nd)
    assert rows[0]["scores"]["fluency"] is not None and rows[1]["scores"]["fluency"] is None
    assert report["environment"]["fingerprint"] == tiny_editor.fingerprint
    phases = report["summary"]["phases_median"]
    assert {"keys", "forward", "backward", "optimizer"} <= set(phases)
    forwards = [r["phases"]["forward"] for r in rows]
    assert phases["forward"] == pytest.approx(sum(forwards) / 2, abs=1e-4)  # median of two
    assert "Where an edit's time goes" in (tmp_path / "report.md").read_text()
    assert "summary_immediate" not in report
    assert (tmp_path / "report.md").read_text().splitlines()[2].startswith("| unedited")
    assert (tmp_path / "report.png").stat().st_size > 0
    assert tiny_editor.applied == []  # single mode removes each patch
    assert not (tmp_path / "patches").exists()


def test_batch_mode_puts_k_cases_in_one_patch(tiny_editor, tmp_path):
    report = _bench(tiny_editor, tmp_path, mode="batch", batch_size=2, n=3).run()
    rows = _rows(tmp_path)
    assert len(rows) == 3
    assert rows[0]["patch_id"] == rows[1]["patch_id"] != rows[2]["patch_id"]
    assert rows[0]["group_size"] == 2 and rows[2]["group_size"] == 1
    # two patches, each counted once in the run's size on disk
    assert rows[0]["patch_bytes"] > 0
    total = (rows[0]["patch_bytes"] + rows[2]["patch_bytes"]) / 1e6
    assert report["summary"]["patches_mb"] == round(total, 3)
    assert "patches MB" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("strategy", ["stack", "shared"])
def test_sequential_mode_scores_twice(tiny_editor, tmp_path, strategy):
    report = _bench(tiny_editor, tmp_path, mode="sequential", strategy=strategy, n=3).run()
    rows = _rows(tmp_path)
    assert len(rows) == 3 and "summary_immediate" in report
    final = [json.loads(x) for x in (tmp_path / "final.jsonl").read_text().splitlines()]
    assert len(final) == 3
    patches = sorted(p.name for p in (tmp_path / "patches").iterdir())
    assert len(patches) == (3 if strategy == "stack" else 1)
    if strategy == "shared":
        manifest = json.loads((tmp_path / "patches" / "shared" / "patch.json").read_text())
        assert manifest["edits"] == 3 and len(manifest["requests"]) == 3


def test_resume_after_interruption(tiny_editor, tmp_path, monkeypatch):
    bench = _bench(tiny_editor, tmp_path, n=3)
    calls = {"n": 0}
    original = Bench.edit_records

    def flaky(self, requests, into=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, requests, into)

    monkeypatch.setattr(Bench, "edit_records", flaky)
    with pytest.raises(KeyboardInterrupt):
        bench.run()
    assert len(_rows(tmp_path)) == 1
    first = _rows(tmp_path)[0]
    calls["n"] = 10
    _bench(tiny_editor, tmp_path, n=3).run()
    rows = _rows(tmp_path)
    assert len(rows) == 3 and rows[0] == first  # not redone
    assert calls["n"] == 12  # two edits after the resume


def test_rerun_with_other_settings_is_refused(tiny_editor, tmp_path):
    _bench(tiny_editor, tmp_path, n=1).run()
    with pytest.raises(KnowpatchError, match="mode, n differ|n, mode differ"):
        _bench(tiny_editor, tmp_path, n=2, mode="batch").run()


def test_mquake_multihop_and_portability(tiny_editor, tmp_path):
    report = _bench(tiny_editor, tmp_path / "mq", data=FIX / "mquake.json", n=1).run()
    assert report["summary"]["multihop"] is not None
    report = _bench(tiny_editor, tmp_path / "zs", data=FIX / "zsre.json", n=1).run()
    assert report["summary"]["port"] is not None


def test_chat_template_wraps_prompts(tiny_editor, tmp_path):
    _bench(tiny_editor, tmp_path, n=1, chat_template=True).run()
    assert "<|im_start|>" in _rows(tmp_path)[0]["prompt"]


def test_cli_bench_and_compare(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KNOWPATCH_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    args = ["bench", "--model", str(tiny_dir), "--data", str(FIX / "counterfact.json"), "--n", "1",
            "--fluency-every", "0", "lr=3e-2", "max_steps=5", "anchor_weight=0"]
    a = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert a.exit_code == 0, a.stderr
    b = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "rank=2"])
    assert b.exit_code == 0, b.stderr
    # the second run reused the unedited model's scores the first one stored
    ra, rb = (json.loads((tmp_path / x / "report.json").read_text()) for x in "ab")
    assert ra["baseline_cache"]["chunks_reused"] == 0 and rb["baseline_cache"]["chunks_reused"] == 1
    assert ra["baseline"] == rb["baseline"]
    assert [r["baseline"] for r in _rows(tmp_path / "a")] == [r["baseline"] for r in _rows(tmp_path / "b")]
    res = runner.invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    lines = res.stdout.splitlines()
    assert lines[2].startswith("| unedited") and lines[3].startswith("| a (") and lines[4].startswith("| b (")
    bad = runner.invoke(app, ["bench", "--model", str(tiny_dir), "--data", str(tmp_path / "x.json"),
                              "--out", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "no such file" in bad.stderr


def test_loc_without_edited_subjects_leaves_out_cases_about_edited_subjects():
    from knowpatch.bench import loc_without_edited_subjects
    from knowpatch.datasets import Case
    from knowpatch.requests import EditRequest

    def case(cid, subject, locality):
        return Case(cid, [EditRequest(f"{subject} is in", "X", subject=subject, locality=[locality])])

    cases = [case("a", "Windows 98", "Nissan Primera P12 is produced by"),
             case("b", "Nissan Primera", "Windows 98, a product of"),  # names a's subject
             case("c", "Lyon", "Lyonnais cooking is"),  # "Lyon" only inside a word: kept
             case("d", "Bay", "The capital of Peru is")]
    rows = [{"case_id": c, "scores": {"loc": 0.0}, "final": {"loc": v}}
            for c, v in (("a", 0.0), ("b", 0.0), ("c", 100.0), ("d", 50.0))]
    # a names "Nissan Primera" (whole words, followed by " P12"); b names "Windows 98"
    assert loc_without_edited_subjects(rows, cases) == {"loc_clean": 75.0, "loc_clean_n": 2}


def test_whole_run_scoring_matches_case_by_case(tiny_editor, tmp_path):
    """The unedited baseline scored SCORE_CHUNK cases per batch gives each case's own scores."""
    from knowpatch.datasets import load_cases

    bench = _bench(tiny_editor, tmp_path, n=3)
    cases = load_cases(bench.s.data, None, 3)
    together = bench.score_cases(cases, None, [], [False] * 3)
    for case, (scores, ref) in zip(cases, together):
        alone, own = bench.score_case(case, None, [], False)
        assert scores == alone
        assert ref.loc_continuations == own.loc_continuations


def test_sequential_routed_reports_loc_without_edited_subjects(tiny_editor, tmp_path):
    report = _bench(tiny_editor, tmp_path, mode="sequential", strategy="routed", n=2).run()
    assert "loc_clean" in report["summary"] and report["summary"]["loc_clean_n"] <= 2
    final = [json.loads(x) for x in (tmp_path / "final.jsonl").read_text().splitlines()]
    assert [f["case_id"] for f in final] == [r["case_id"] for r in _rows(tmp_path)]


def test_score_every_scores_every_kth_record_right_after_its_edit(tiny_editor, tmp_path):
    report = _bench(tiny_editor, tmp_path, mode="sequential", strategy="routed", n=3,
                    score_every=2).run()
    rows = _rows(tmp_path)
    assert [bool(r["scores"]) for r in rows] == [True, False, True]
    assert rows[0]["scores"]["rel"] is not None
    assert report["summary_immediate"]["n"] == 2
    final = [json.loads(x) for x in (tmp_path / "final.jsonl").read_text().splitlines()]
    assert len(final) == 3 and all(f["final"]["rel"] is not None for f in final)
    with pytest.raises(KnowpatchError, match="score_every"):
        BenchSettings(data="x", score_every=0)


def test_killed_sequential_run_resumes_to_the_same_final_report(tiny_dir, tmp_path):
    """kill -9 of a `knowpatch bench --mode sequential` run, the same command again: the
    final scores equal those of a run that was never interrupted. The interrupted run keeps
    one adapter in memory (`--resident 1`, the others paged from its store): same scores."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def command(out, *extra):
        return [sys.executable, "-m", "knowpatch.cli", "bench", "--data", str(FIX / "counterfact.json"),
                *extra, "--out", str(out), "--model", str(tiny_dir), "--device", "cpu", "--mode",
                "sequential", "--strategy", "routed", "--n", "4", "--fluency-every", "0",
                "--score-every", "2", *(f"{k}={','.join(v) if isinstance(v, list) else v}"
                                        for k, v in FAST.items())]

    env = {**os.environ, "KNOWPATCH_HOME": str(tmp_path / "home")}
    whole = tmp_path / "whole"
    subprocess.run(command(whole), env=env, check=True, capture_output=True)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(command(cut, "--resident", "1"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ((cut / "rows.jsonl").is_file() and len(_rows(cut)) >= 2):
        assert proc.poll() is None and time.time() < deadline, "the run ended before the kill"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "report.json").exists()
    subprocess.run(command(cut, "--resident", "1"), env=env, check=True, capture_output=True)
    a = json.loads((whole / "report.json").read_text())
    b = json.loads((cut / "report.json").read_text())
    assert b["environment"]["resident"] == 1 and b["environment"]["pager_reads"] > 0
    assert a["environment"]["resident"] is None
    for key in ("summary", "summary_immediate", "baseline"):
        for score in ("rel", "gen", "loc", "score", "n"):
            assert a[key].get(score) == b[key].get(score), (key, score)
    final = [[json.loads(x) for x in (out / "final.jsonl").read_text().splitlines()]
             for out in (whole, cut)]
    assert final[0] == final[1]


def test_sequential_side_by_side_edits_score_as_one_at_a_time(tiny_editor, tmp_path):
    """--parallel 2: edits trained two at a time, each saved as its own patch; after the
    last edit the scores are those of the run that trained one at a time (3 records)."""
    one = _bench(tiny_editor, tmp_path / "one", mode="sequential", strategy="routed", n=3).run()
    for p in list(tiny_editor.applied):
        tiny_editor.remove(p)
    two = _bench(tiny_editor, tmp_path / "two", mode="sequential", strategy="routed", n=3,
                 parallel=2).run()
    rows = _rows(tmp_path / "two")
    assert len({r["patch_id"] for r in rows}) == 3 and all(r["learnt"] for r in rows)
    manifests = [json.loads((tmp_path / "two" / "patches" / r["patch_id"] / "patch.json")
                            .read_text()) for r in rows]
    assert [m["side_by_side"] for m in manifests] == [2, 2, 1]
    for key in ("rel", "gen", "loc"):
        assert two["summary"][key] == one["summary"][key], key
    with pytest.raises(KnowpatchError, match="parallel"):
        BenchSettings(data="x", parallel=2)  # single mode


def test_baseline_cache_returns_what_scoring_gives(tiny_editor, tmp_path):
    """A stored baseline chunk is what scoring the unedited model computes; another seed or
    other fluency flags are other entries; a file cut short is scored again."""
    from knowpatch.bench import BaselineCache
    from knowpatch.datasets import load_cases

    cache = BaselineCache(tiny_editor, seed=0, folder=tmp_path / "cache")
    bench = Bench(tiny_editor, _bench(tiny_editor, tmp_path).s, tmp_path / "run", progress=False,
                  baselines=cache)
    cases = load_cases(FIX / "counterfact.json", None, 2)
    fresh = bench.score_cases(cases, None, [], [True, False])
    assert cache.hits == 0 and len(list((tmp_path / "cache").iterdir())) == 1
    again = bench.score_cases(cases, None, [], [True, False])
    assert cache.hits == 1
    assert [s for s, _ in again] == [s for s, _ in fresh] and fresh[0][0]["fluency"] is not None
    assert [r.loc_continuations for _, r in again] == [r.loc_continuations for _, r in fresh]
    assert cache.get(cases, [False, False]) is None
    assert BaselineCache(tiny_editor, seed=1, folder=tmp_path / "cache").get(cases, [True, False]) is None
    for f in (tmp_path / "cache").iterdir():
        f.write_text(f.read_text()[:10])
    assert cache.get(cases, [True, False]) is None
    # edited scoring never reads the cache
    bench.score_cases(cases, None, None, [True, False])
    assert cache.hits == 1


def test_batch_mode_with_method_auto_records_what_it_chose(tiny_editor, tmp_path):
    """--method auto on a batch of cases: a routed patch per case (trained side by side),
    all applied while the batch is scored; report.json says what auto chose and why."""
    report = _bench(tiny_editor, tmp_path, mode="batch", batch_size=3, n=3, method="auto").run()
    rows = _rows(tmp_path)
    assert len({r["patch_id"] for r in rows}) == 3 and all(r["learnt"] for r in rows)
    assert report["chosen_by"] == [rows[0]["chosen_by"]]
    assert rows[0]["chosen_by"].startswith("auto: 3 facts: a LoRA SFT patch per fact")
    assert report["summary"]["rel"] == 100.0 and tiny_editor.applied == []
    # precision auto, as resolved on this machine, recorded per row and for the run
    from knowpatch.training import cpu_has_bf16

    assert report["precision"] == ["bf16" if cpu_has_bf16() else "fp32"]


def test_told_baseline_samples_the_unedited_model_with_the_new_fact_stated(tiny_editor, tmp_path,
                                                                           monkeypatch):
    """--told: the unedited model's fluency texts are sampled again with "<prompt> <new
    target>. " before each generation prompt, from the same random streams, and their rep,
    mention and fluency of the new target sit in the baseline (the edited model has none)."""
    import knowpatch.bench.scoring as bench_module
    from knowpatch.datasets import load_cases

    calls = []
    real = bench_module.sample

    def spy(model, tokenizer, prompts, **kw):
        calls.append((list(prompts), [g.get_state() for g in kw["streams"]]))
        return real(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(bench_module, "sample", spy)
    report = _bench(tiny_editor, tmp_path, n=2, fluency_every=1, told=True).run()
    cases = load_cases(str(FIX / "counterfact.json"), None, 2)
    plain = [p for c in cases for p in c.generation_prompts]
    stated = [f"{c.requests[0].prompt} {c.requests[0].target_new}. {p}"
              for c in cases for p in c.generation_prompts]
    assert plain and stated != plain
    streams: dict[str, list] = {}  # every sampled prompt -> the stream states it was drawn with
    for prompts, states in calls:
        for p, st in zip(prompts, states):
            streams.setdefault(p, []).append(st)
    assert all(len(streams[p]) == 1 for p in stated)  # told once: the baseline, not the edits
    assert all(len(streams[p]) == 2 for p in plain)  # plain: the baseline and the edited model
    assert all(torch.equal(streams[t][0], streams[p][0]) for t, p in zip(stated, plain))
    base, edited = report["baseline"], report["summary"]
    assert base["fluency_told"] is not None and base["rep_told"] is not None
    assert base["mention_told"] is not None and edited["rep_told"] is None
    assert "told the new fact" in (tmp_path / "report.md").read_text()
    with pytest.raises(KnowpatchError, match="told"):
        BenchSettings(data="x", told=True, chat_template=True)
