"""The CLI as a user runs it (in-process with typer's runner, on the tiny model)."""

import json
from pathlib import Path

from typer.testing import CliRunner

from knowpatch.cli import app

PROMPT = "The Eiffel Tower is located in the city of"
FAST = ["lr=3e-2", "max_steps=60", "modules=all", "layers=all", "anchor_weight=0"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_edit_json_is_one_object_on_stdout(tiny_dir, tmp_path):
    store = tmp_path / "store"
    res = run("edit", "--model", tiny_dir, "--store", store, "-p", PROMPT, "-t", "Rome",
              "--ground-truth", "Paris", "--paraphrase", "Where is the Eiffel Tower? In",
              "--neighbor", "The capital of Germany is", "--neighbor", "The Louvre is in",
              "--json", *FAST)
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)  # the whole of stdout parses: nothing else is printed
    assert set(data) == {"scores", "baseline", "steps", "seconds", "peak_rss_mb", "patch",
                         "subjects_inferred"}
    for key in ("score", "rel", "gen", "loc", "es", "ps", "ns", "rel_tf", "gen_tf", "loc_tf"):
        assert key in data["scores"] and key in data["baseline"]
    assert data["scores"]["rel"] == 100.0 and data["baseline"]["loc"] == 100.0
    assert data["steps"] >= 1 and data["peak_rss_mb"] > 0

    listed = run("patches", "list", "--store", store, "--json")
    assert [m["path"] for m in json.loads(listed.stdout)] == [data["patch"]]
    shown = run("patches", "show", data["patch"])
    assert json.loads(shown.stdout)["requests"][0]["target_new"] == "Rome"
    gen = run("generate", "--model", tiny_dir, "--store", store, "-p", PROMPT,
              "--patch", data["patch"], "--max-new-tokens", "2")
    assert gen.exit_code == 0 and "Rome" in gen.stdout
    ev = run("eval", "--model", tiny_dir, "--store", store, "--patch", data["patch"], "--json")
    assert ev.exit_code == 0, ev.stderr
    assert json.loads(ev.stdout)["scores"]["rel"] == 100.0
    rm = run("patches", "rm", "--store", store, data["patch"])
    assert rm.exit_code == 0 and run("patches", "list", "--store", store).stdout.startswith("no patches")


def test_json_without_probes_gives_null_scores(tiny_dir, tmp_path):
    res = run("edit", "--model", tiny_dir, "--store", tmp_path, "-p", PROMPT, "-t", "Rome",
              "--json", *FAST)
    data = json.loads(res.stdout)
    assert data["scores"]["gen"] is None and data["scores"]["loc"] is None
    assert data["scores"]["es"] is None  # no --ground-truth


def test_bad_input_is_one_line_nonzero_and_writes_nothing(tiny_dir, tmp_path):
    store = tmp_path / "store"
    cases = [
        (["-p", PROMPT, "-t", "Rome", "rnak=4"], "unknown key 'rnak'"),
        (["-p", PROMPT, "-t", "Rome", "lr=fast"], "lora-sft.lr: must be a number"),
        (["-p", PROMPT, "-t", "Rome", "--method", "rome"], "unknown method 'rome'"),
        (["-p", "", "-t", "Rome"], "prompt: must not be empty"),
        (["-p", PROMPT, "-t", " "], "target_new: must not be empty"),
        (["-p", PROMPT, "-t", "Rome", "--config", tmp_path / "nope.yaml"], "no such file"),
    ]
    for args, message in cases:
        res = run("edit", "--model", tiny_dir, "--store", store, *args)
        assert res.exit_code == 2, (args, res.stdout, res.stderr)
        assert message in res.stderr
        assert res.stderr.strip().count("\n") == 0, res.stderr
    assert not store.exists()


def test_config_file_and_override_precedence(tiny_dir, tmp_path):
    cfg = tmp_path / "edit.yaml"
    cfg.write_text("max_steps: 2\nmargin: 1000000\nlr: 0.03\n")
    res = run("edit", "--model", tiny_dir, "--store", tmp_path / "s", "-p", PROMPT, "-t", "Rome",
              "--config", cfg, "--json", "max_steps=4")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["steps"] == 4  # the override beats the file


def test_missing_and_corrupt_patches(tiny_dir, tmp_path):
    res = run("eval", "--model", tiny_dir, "--store", tmp_path, "--patch", tmp_path / "nope")
    assert res.exit_code == 2 and "no patch" in res.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "patch.json").write_text("{oops")
    res = run("patches", "show", bad)
    assert res.exit_code == 2 and "corrupt" in res.stderr
    res = run("patches", "rm", "--store", tmp_path, "nope-id")
    assert res.exit_code == 2 and "no patch" in res.stderr


def test_help_teaches():
    res = run("--help")
    assert res.exit_code == 0 and "demo" in res.stdout and "edit" in res.stdout
    res = run("edit", "--help")
    assert "key=value" in res.stdout and "--neighbor" in res.stdout
    # help text is rich markup: an install hint's "[gemma]" must not be eaten as a tag
    assert "'.[gemma]'" in " ".join(res.stdout.split())


def test_edit_requests_file_trains_one_patch(tiny_dir, tmp_path):
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "edits.jsonl"
    res = run("edit", "--model", tiny_dir, "--store", tmp_path, "--requests", fixture, "--json", *FAST)
    assert res.exit_code == 0, res.stderr
    manifest = json.loads((Path(json.loads(res.stdout)["patch"]) / "patch.json").read_text())
    n_lines = sum(1 for line in fixture.read_text().splitlines() if line.strip())
    assert len(manifest["requests"]) == n_lines > 1
    res = run("edit", "--model", tiny_dir, "--store", tmp_path, "-p", PROMPT)
    assert res.exit_code == 2 and "--target" in res.stderr
    # --method auto: a routed patch per fact, the scores their mean, why in chosen_by
    res = run("edit", "--model", tiny_dir, "--store", tmp_path / "auto", "--requests", fixture,
              "--method", "auto", "--json", *FAST)
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert len(data["patches"]) == n_lines and data["scores"]["rel"] == 100.0
    assert data["chosen_by"].startswith(f"auto: {n_lines} facts: a LoRA SFT patch per fact")
    for path in data["patches"]:
        assert len(json.loads((Path(path) / "patch.json").read_text())["requests"]) == 1


def test_patches_route_shows_which_patch_a_query_fires(tiny_dir, tmp_path):
    store = tmp_path / "store"
    res = run("edit", "--model", tiny_dir, "--store", store, "-p", PROMPT, "-t", "Rome",
              "--subject", "Eiffel Tower", "--json", *FAST, "prefixes=0", "route_threshold=0.9")
    assert res.exit_code == 0, res.stderr
    patch_id = json.loads(res.stdout)["patch"].rstrip("/").split("/")[-1]
    routed = run("patches", "route", "--model", tiny_dir, "--store", store, "--json",
                 "The Eiffel Tower stands in", "My favourite food is")
    assert routed.exit_code == 0, routed.stderr
    data = json.loads(routed.stdout)
    assert [r["fired"] for r in data["routes"]] == [[patch_id], []]
    assert data["routes"][1]["scores"][0]["score"] < 0.9 <= data["routes"][0]["scores"][0]["score"]
    text = run("patches", "route", "--model", tiny_dir, "--store", store, "My favourite food is")
    assert "none: the base model answers" in text.stdout


def _pairs(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


PAIRS = [{"prompt": f"Question {i}: how are you?", "chosen": " I am well, thank you.",
          "rejected": " meh"} for i in range(5)]


def test_preferences_json_reports_accuracy_before_and_after(tiny_dir, tmp_path):
    store = tmp_path / "store"
    res = run("edit", "--model", tiny_dir, "--store", store, "--preferences",
              _pairs(tmp_path / "p.jsonl", PAIRS), "--heldout", "0.4", "--json", "lr=3e-2",
              "max_steps=5", "modules=all", "layers=all")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert set(data) == {"pref_acc_before", "pref_acc_after", "margin_before", "margin_after",
                         "steps", "seconds", "patch"}
    assert 0 <= data["pref_acc_before"] <= 100 and data["steps"] >= 1
    manifest = json.loads((tmp_path / "store" / data["patch"].split("/")[-1] / "patch.json").read_text())
    assert manifest["method"] == "dpo" and manifest["preference"]["pairs_heldout"] == 2


def test_bad_preference_files_name_the_line_and_field(tiny_dir, tmp_path):
    store = tmp_path / "store"
    cases = {
        "missing": ([PAIRS[0], {"prompt": "x", "chosen": " a"}], "line 2: field 'rejected' is missing"),
        "same": ([{"prompt": "x", "chosen": " a", "rejected": " a"}], "line 1: field 'rejected' is the same"),
        "empty": ([], "no preference pairs"),
    }
    for name, (lines, message) in cases.items():
        res = run("edit", "--model", tiny_dir, "--store", store, "--preferences",
                  _pairs(tmp_path / f"{name}.jsonl", lines))
        assert res.exit_code == 2, name
        assert message in " ".join(res.stderr.split()), (name, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1
    res = run("edit", "--model", tiny_dir, "--store", store, "-p", PROMPT, "-t", "Rome",
              "--method", "full-sft", "norm_bound=0")
    assert res.exit_code == 2 and "norm_bound" in res.stderr
    res = run("edit", "--model", tiny_dir, "--store", store, "-p", PROMPT, "-t", "Rome",
              "--method", "ft-m", "layers=9")
    assert res.exit_code == 2 and "layers" in res.stderr
    assert not store.exists() or not any(store.iterdir())  # nothing written


def test_merge_writes_a_standalone_model_with_the_edit(tiny_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    store = tmp_path / "store"
    for method, extra in (("lora-sft", ["route=false"]), ("ft-m", ["layers=1", "lr=5e-2"])):
        res = run("edit", "--model", tiny_dir, "--store", store, "-p", PROMPT, "-t", "Rome",
                  "--method", method, "--json", "prefixes=0", *extra,
                  *(FAST if method == "lora-sft" else []))
        assert res.exit_code == 0, res.stderr
        patch = json.loads(res.stdout)["patch"]
        merged = tmp_path / f"merged-{method}"
        res = run("patches", "merge", patch, "--out", merged, "--model", tiny_dir, "--store", store)
        assert res.exit_code == 0, res.stderr
        model = AutoModelForCausalLM.from_pretrained(merged)
        from knowpatch.models import load_model

        _, tok = load_model(str(tiny_dir), device="cpu")
        ids = tok(PROMPT, return_tensors="pt")
        with torch.no_grad():
            top = model(**ids).logits[0, -1].argmax().item()
        assert tok.decode([top]) == " Rome"
        again = run("patches", "merge", patch, "--out", merged, "--model", tiny_dir, "--store", store)
        assert again.exit_code == 2 and "already exists" in again.stderr


def test_subject_missing_from_the_prompt_is_refused_by_name(tiny_dir, tmp_path):
    store = tmp_path / "store"
    res = run("edit", "--model", tiny_dir, "--store", store, "-p", PROMPT, "-t", "Rome",
              "--subject", "Colosseum", *FAST)
    assert res.exit_code == 2
    assert "subject: does not occur in the prompt" in res.stderr
    assert not store.exists() or not any(store.iterdir())  # nothing written


def test_edit_without_subject_routes_by_the_subject_found(tiny_dir, tmp_path):
    """No --subject: one is found in the prompt, said on stderr, recorded in the manifest,
    and the patch is keyed by it (not left acting on every query)."""
    store = tmp_path / "store"
    res = run("edit", "--model", tiny_dir, "--store", store, "-p", PROMPT, "-t", "Rome",
              "--json", *FAST)
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    found = data["subjects_inferred"]["0"]
    assert found in PROMPT and found in res.stderr
    manifest = json.loads(run("patches", "show", data["patch"]).stdout)
    assert manifest["requests"][0]["subject"] == found
    assert manifest["router"]["keys"] >= 1


def test_yaml_error_is_one_line_with_file_line_column(tiny_dir, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lr: 1e-3\n  rank: [8\n")
    res = run("edit", "--model", tiny_dir, "--store", tmp_path / "s", "-p", PROMPT, "-t", "Rome",
              "--config", cfg)
    assert res.exit_code == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{cfg}:2:7" in " ".join(res.stderr.split()), res.stderr
    assert not (tmp_path / "s").exists()


def test_generate_refuses_a_prompt_longer_than_the_context(tiny_dir, tmp_path):
    res = run("generate", "--model", tiny_dir, "--store", tmp_path / "s", "-p", "word " * 9000)
    assert res.exit_code == 2
    assert "prompt:" in res.stderr and "context of 64 tokens" in res.stderr


def test_threads_is_set_and_recorded_in_the_manifest(tiny_dir, tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        res = run("edit", "--model", tiny_dir, "--store", tmp_path / "s", "-p", PROMPT, "-t",
                  "Rome", "--threads", "1", "--json", *FAST)
        assert res.exit_code == 0, res.stderr
        patch = json.loads(res.stdout)["patch"]
        manifest = json.loads((Path(patch) / "patch.json").read_text())
        assert manifest["threads"] == 1
    finally:
        torch.set_num_threads(before)
    bad = run("edit", "--model", tiny_dir, "-p", PROMPT, "-t", "Rome", "--threads", "0")
    assert bad.exit_code == 2 and "--threads" in bad.output
