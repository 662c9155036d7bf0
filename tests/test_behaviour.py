"""Behaviour edits from words (`knowpatch.behaviour`, `knowpatch edit --behaviour`,
`knowpatch eval --prompts`): how pairs are chosen, the JSON contract, and bad input named
by field with nothing written. The tiny random model checks the plumbing; what a behaviour
edit does to SmolLM2 is measured in docs/behaviour.md."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from knowpatch import behaviour
from knowpatch.behaviour import Answer, behaviour_pairs
from knowpatch.cli import app
from knowpatch.errors import KnowpatchError
from knowpatch.judges import parse_judges

FAST = ["lr=3e-2", "max_steps=5", "modules=all", "layers=all"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_pairs_take_a_passing_answer_given_the_instruction_and_a_failing_one_without(
        tiny_editor, monkeypatch):
    """Chosen: the first sampled answer, given the instruction, that the judge passes;
    rejected: the first answer without it that the judge fails; prompts without either are
    reported with the reason."""
    told = {"q1": ["one two three four", "one two"], "q2": ["a b c d e", "a b c d"],
            "q3": ["x"]}
    plain = {"q1": ["w w w w w", "w"], "q2": ["v v v v v v"], "q3": ["y"]}

    def fake(model, tokenizer, prompts, samples=1, temperature=0.0, **kw):
        out = []
        for p in prompts:
            q = next(k for k in told if k in p)
            texts = told[q] if "Be brief." in p else plain[q]
            texts = texts[:samples] if temperature > 0 else texts[:1]
            out.append([Answer(t, t == "w w w w w") for t in texts])
        return out
    monkeypatch.setattr(behaviour, "answers", fake)
    pairs, report = behaviour_pairs(tiny_editor, "Be brief.", ["q1", "q2", "q3"],
                                    parse_judges("max-words:2"))
    eos = tiny_editor.tokenizer.eos_token
    assert [(p.target_new, p.rejected) for p in pairs] == [("one two" + eos, "w w w w w")]
    assert report["skipped"] == {"q2": "no answer given the instruction passed the judge",
                                 "q3": "every answer without the instruction already passes"}
    assert "Be brief." not in pairs[0].prompt  # trained without the instruction
    with pytest.raises(KnowpatchError, match="behaviour: empty"):
        behaviour_pairs(tiny_editor, "  ", ["q1"], parse_judges("max-words:2"))


@pytest.fixture
def judge_module(tmp_path, monkeypatch):
    (tmp_path / "tiny_judges.py").write_text(
        "def even(text):\n    return len(text) % 2 == 0\n"
        "def broken(text):\n    raise ValueError('no')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "tiny_judges"


def test_edit_and_eval_json_contract(tiny_dir, tmp_path, judge_module):
    store = tmp_path / "store"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Tell me about thing {i}." for i in range(8)) + "\n\n")
    res = run("edit", "--model", tiny_dir, "--store", store, "--behaviour", "Be brief.",
              "--prompts", prompts, "--judge", f"{judge_module}:even", "--heldout", "0.25",
              "--json", *FAST)
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert (store / data["patch_id"] / "patch.json").is_file()
    assert "be-brief" in data["patch_id"]  # named after the behaviour, not the chat template
    made = data["behaviour"]
    assert made["prompts"] == 6 and made["pairs"] + len(made["skipped"]) == 6
    assert set(made["pass_rate"]) == {"unedited", "edited"}
    manifest = json.loads((store / data["patch_id"] / "patch.json").read_text())
    assert manifest["method"] == "dpo" and manifest["behaviour"]["judge"] == f"{judge_module}:even"
    ev = run("eval", "--model", tiny_dir, "--store", store, "--patch", data["patch_id"],
             "--prompts", prompts, "--judge", f"{judge_module}:even", "--json")
    assert ev.exit_code == 0, ev.stderr
    judged = json.loads(ev.stdout)["behaviour"]
    assert 0 <= judged["pass_rate"]["unedited"] <= 100 and 0 <= judged["pass_rate"]["edited"] <= 100
    assert judged["prompts"] == 8 and "fluency" in judged and 0 <= judged["unchanged"] <= 100


def test_bad_behaviour_input_is_one_line_exit_2_and_nothing_written(tiny_dir, tmp_path, judge_module):
    store = tmp_path / "store"
    good = tmp_path / "prompts.txt"
    good.write_text("Tell me about cats.\nTell me about dogs.\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    four = tmp_path / "four.txt"
    four.write_text("One?\nTwo?\nThree?\nFour?\n")
    cases = [
        (["--behaviour", "Be brief.", "--prompts", good, "--judge", "shout"], "judge: unknown judge"),
        (["--behaviour", "Be brief.", "--prompts", good], "judge: at least one"),
        (["--behaviour", "Be brief.", "--prompts", empty, "--judge", "max-words:3"], "prompts: no prompts"),
        (["--behaviour", "Be brief.", "--prompts", tmp_path / "none.txt", "--judge", "max-words:3"],
         "prompts: cannot read"),
        (["--behaviour", "Be brief.", "--prompts", binary, "--judge", "max-words:3"], "prompts: cannot read"),
        (["--behaviour", " ", "--prompts", good, "--judge", "max-words:3"], "behaviour: empty"),
        (["--behaviour", "Be brief.", "--prompts", good, "--judge", "no_such_mod:fn"],
         "judge: no_such_mod:fn cannot be imported"),
        (["--behaviour", "Be brief.", "--prompts", good, "--judge", f"{judge_module}:broken"],
         "judge: tiny_judges:broken raised ValueError"),
        (["--prompts", good, "-p", "x", "-t", "y"], "--judge, --scope and --out-of-scope go with"),
        (["-p", "x", "-t", "y", "--scope", good], "--scope and --out-of-scope go with --behaviour"),
        (["--behaviour", "Be brief.", "--prompts", good, "--judge", "max-words:3", "--scope",
          empty], "scope: no prompts"),
        (["--behaviour", "Be brief.", "--prompts", good, "--judge", "max-words:3", "--scope",
          good], "scope: at least 4 in-scope prompts"),
        (["--behaviour", "Be brief.", "--prompts", good, "--judge", "max-words:3", "--scope",
          four, "--out-of-scope", tmp_path / "none.txt"], "out_of_scope: cannot read"),
    ]
    for args, message in cases:
        res = run("edit", "--model", tiny_dir, "--store", store, *args)
        assert res.exit_code == 2, (args, res.stdout, res.stderr)
        assert message in res.stderr, (message, res.stderr)
        assert not store.exists() or not any(store.iterdir()), args


def test_a_scoped_behaviour_edit_reports_where_it_fires(tiny_dir, tmp_path, judge_module):
    store = tmp_path / "store"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Which language is spoken in town {i}?" for i in range(8)))
    outside = tmp_path / "outside.txt"
    outside.write_text("\n".join(f"Who owns company number {i}?" for i in range(6)))
    res = run("edit", "--model", tiny_dir, "--store", store, "--behaviour", "Be brief.",
              "--prompts", prompts, "--judge", f"{judge_module}:even", "--heldout", "0.25",
              "--scope", prompts, "--out-of-scope", outside, "--json", *FAST)
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)["behaviour"]
    scope = report["scope"]
    assert scope["examples"] == 6  # the 2 held-out prompts are never keys
    assert scope["out_of_scope_examples"] == 3 and report["out_of_scope"]["prompts"] == 3
    assert scope["heldout_fires"] == 100.0 and report["out_of_scope"]["fires"] == 0.0
    assert report["out_of_scope"]["unchanged"] == 100.0  # it never fired there
    manifest = json.loads((store / json.loads(res.stdout)["patch_id"] / "patch.json").read_text())
    assert manifest["router"]["scope"]["threshold"] == scope["threshold"]
