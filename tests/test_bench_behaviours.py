"""`knowpatch bench --behaviours`: prompts built from a CounterFact file's records (split by
record, scoped behaviours measured out of scope), results written per behaviour and resumed,
bad files named by field — on the tiny random model and a made-up CounterFact file."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from knowpatch.bench.behaviours import build_prompts, load_spec, relation_records
from knowpatch.cli import app
from knowpatch.errors import KnowpatchError

FAST = ["lr=3e-2", "max_steps=2", "modules=all", "layers=all"]
SPEC = """
counts: {train: 6, heldout: 4, outside: 4, loc_records: 2}
behaviours:
  - name: short
    behaviour: Be brief.
    judge: bench_judges:even
  - name: languages
    behaviour: Refuse questions about languages.
    judge: [bench_judges:even]
    relations: [P37]
    scoped: true
  - name: never
    behaviour: Say nothing.
    judge: "regex:^QQQQ$"
"""


def _record(i: int, relation: str, subject: str) -> dict:
    template = "The official language of {} is" if relation == "P37" else "{} is located in"
    return {"case_id": i, "requested_rewrite": {
        "prompt": template, "relation_id": relation, "subject": subject,
        "target_new": {"str": "Dutch"}, "target_true": {"str": "French"}},
        "paraphrase_prompts": [template.format(subject)],
        "neighborhood_prompts": [template.format(f"{subject}ia"), template.format(f"{subject}ton")],
        "attribute_prompts": [], "generation_prompts": [template.format(subject)]}


@pytest.fixture
def counterfact(tmp_path, monkeypatch):
    (tmp_path / "bench_judges.py").write_text("def even(text):\n    return len(text) % 2 == 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    records = [_record(i, "P37" if i % 2 else "P30", f"Place{chr(65 + i)}") for i in range(16)]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(records))
    spec = tmp_path / "behaviours.yaml"
    spec.write_text(SPEC)
    return path, spec


def test_prompts_are_split_by_record_and_out_of_scope_is_other_relations(counterfact):
    path, spec = counterfact
    cases, counts = load_spec(spec)
    records = relation_records(path)
    short, languages, _ = (build_prompts(records, c, counts) for c in cases)
    assert len(short["train"]) == 6 and len(short["heldout"]) == 4 and short["outside"] == []
    assert not set(short["train"]) & set(short["heldout"])
    assert all("language" in q for q in languages["train"] + languages["heldout"])
    assert languages["outside"] and not any("language" in q for q in languages["outside"])
    assert set(languages["scope"]) <= set(languages["train"])


def test_bench_behaviours_writes_each_result_and_resumes(tiny_dir, tmp_path, counterfact):
    path, spec = counterfact
    out = tmp_path / "run"
    args = ["bench", "--model", tiny_dir, "--behaviours", spec, "--data", path, "--out", out, *FAST]
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    by_name = {b["name"]: b for b in report["behaviours"]}
    assert set(by_name) == {"short", "languages", "never"}
    assert "no preference pair" in by_name["never"]["error"]  # reported, the others still run
    assert "out_of_scope" not in by_name["short"]
    scoped = by_name["languages"]
    assert scoped["scope"]["examples"] >= 4 and scoped["out_of_scope"]["prompts"] == 2
    assert 0 <= scoped["cf_loc"] <= 100 and 0 <= scoped["cf_loc_tf"] <= 100
    assert scoped["prompt_counts"]["train"] > 0
    assert by_name["short"].get("scope", {}).get("kind") == "chat", by_name["short"]  # chat turns only
    assert by_name["short"]["cf_loc"] == 100.0  # so the completion prompts are untouched
    assert (out / "patches" / "languages" / "patch.json").is_file()
    assert "| languages | yes |" in (out / "report.md").read_text()
    (out / "behaviours" / "short.json").write_text(json.dumps({**by_name["short"], "steps": -7}))
    again = CliRunner().invoke(app, [str(a) for a in args])
    assert again.exit_code == 0, again.stderr
    resumed = {b["name"]: b for b in json.loads((out / "report.json").read_text())["behaviours"]}
    assert resumed["short"]["steps"] == -7  # read back, not redone


def test_a_bad_behaviours_file_names_the_field(tmp_path):
    bad = tmp_path / "b.yaml"
    for text, message in [("behaviours: []", "lists no behaviour"),
                          ("behaviours: [{name: x, behaviour: y}]", r"behaviours\[0\]: needs"),
                          ("behaviours: [{name: x, behaviour: y, judge: shout}]", "judge: unknown"),
                          ("behaviours: [{name: x, behaviour: y, judge: refusal, colour: 1}]",
                           "unknown field 'colour'")]:
        bad.write_text(text)
        with pytest.raises(KnowpatchError, match=message):
            load_spec(bad)
    res = CliRunner().invoke(app, ["bench", "--behaviours", str(bad), "--data", "x.json",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "colour" in res.stderr
