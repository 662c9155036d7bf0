"""Benchmark loaders: every format from a small invented fixture, detection, `n`, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knowpatch.datasets import FORMATS, Case, detect_format, load_cases
from knowpatch.errors import KnowpatchError
from knowpatch.requests import LocalityProbe, PortabilityProbe

FIXTURES = Path(__file__).parent / "fixtures"
REAL_DATA = Path(__file__).parents[1].parent / "shared" / "data"

FIXTURE_FORMATS = {
    "counterfact.json": "counterfact",
    "counterfact_portability.json": "counterfact-portability",
    "easyedit.json": "easyedit",
    "zsre.json": "zsre",
    "mquake.json": "mquake",
    "edits.jsonl": "jsonl",
}


def _records(name: str) -> list[dict]:
    return json.loads((FIXTURES / name).read_text())


def _write(tmp_path: Path, name: str, records: list[dict]) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


# ---- each format ------------------------------------------------------------------------------

def test_counterfact() -> None:
    cases = load_cases(FIXTURES / "counterfact.json")
    assert [c.case_id for c in cases] == ["90001", "90002", "90003"]
    case = cases[0]
    assert isinstance(case, Case) and len(case.requests) == 1 and case.multihop == []
    r = case.requests[0]
    assert r.prompt == "Veltrana is located in"
    assert (r.subject, r.target_new, r.ground_truth) == ("Veltrana", "Borealis", "Austravia")
    assert r.rephrase_prompts == ["The kettle whistled twice. Veltrana belongs to the continent of",
                                  "Notes from the archive. Veltrana is a part of the continent of"]
    assert r.locality == [LocalityProbe("Oskaria is located in", "Austravia"),
                          LocalityProbe("Mirrendale is a part of the continent of", "Austravia"),
                          LocalityProbe("Pellucia is in", "Austravia")]
    assert r.portability == []
    # deduplicated, first-seen order kept
    assert case.generation_prompts == ["People around Veltrana speak the language of",
                                       "One can get to Veltrana by navigating",
                                       "Veltrana's surroundings include"]
    assert cases[1].requests[0].prompt == "The mother tongue of Orrin Maddox is"


def test_counterfact_portability() -> None:
    cases = load_cases(FIXTURES / "counterfact_portability.json")
    assert [c.case_id for c in cases] == ["91001", "91002"]
    r = cases[0].requests[0]
    assert r.prompt == "Juno Hartwell originates from"
    assert (r.target_new, r.ground_truth) == ("Port Calloway", "Elmsbridge")
    assert len(r.rephrase_prompts) == 2 and len(r.locality) == 2
    assert r.portability == [PortabilityProbe(
        "What kind of festival is the city where Juno Hartwell originates from known for?",
        "Lantern festivals")]
    assert cases[0].generation_prompts == ["Juno Hartwell currently lives in",
                                           "Juno Hartwell's parents are from"]


def test_counterfact_portability_read_as_counterfact_ignores_portability() -> None:
    cases = load_cases(FIXTURES / "counterfact_portability.json", fmt="counterfact")
    assert all(c.requests[0].portability == [] for c in cases)


def test_easyedit() -> None:
    cases = load_cases(FIXTURES / "easyedit.json")
    assert [c.case_id for c in cases] == ["0", "1", "2"]
    r = cases[0].requests[0]
    assert r.prompt == "The mother tongue of Perrin Ashdown is"
    assert (r.subject, r.target_new, r.ground_truth) == ("Perrin Ashdown", "Quenlish", "Dravic")
    assert r.rephrase_prompts == ["Where Perrin Ashdown is from, people speak the language of"]
    assert r.locality == [LocalityProbe("Nell Kestrel is a native speaker of", "Dravic")]
    assert cases[0].generation_prompts == [] and cases[0].multihop == []


def test_zsre() -> None:
    cases = load_cases(FIXTURES / "zsre.json")
    assert [c.case_id for c in cases] == ["0", "1"]  # no case_id in zsRE: the record index
    r = cases[0].requests[0]
    assert r.prompt == "When was the inception of Glasswing Regatta?"
    assert (r.subject, r.target_new, r.ground_truth) == ("Glasswing Regatta", "1984", "1962")
    assert r.rephrase_prompts == ["When was the Glasswing Regatta first held?"]
    # the "nq question: " prefix is kept: prompts are given as they are
    assert r.locality == [LocalityProbe("nq question: who painted the mural in the old harbour station",
                                        "Ada Pemberton")]
    assert r.portability == [PortabilityProbe(
        "Which sport is the Glasswing Regatta, first held in 1984, part of?", "Sailing")]
    second = cases[1].requests[0]
    assert second.target_new == "Ember Ridge"  # " Ember Ridge" in the file
    assert second.ground_truth == "Coldspine Range"  # answers[0]


def test_mquake() -> None:
    cases = load_cases(FIXTURES / "mquake.json")
    assert [c.case_id for c in cases] == ["95001", "95002"]
    case = cases[0]
    assert [(r.prompt, r.subject, r.target_new, r.ground_truth) for r in case.requests] == [
        ("Lanterns Over Tallow was performed by", "Lanterns Over Tallow", "The Copper Owls", "Mira Solberg"),
        ("The Copper Owls was formed in", "The Copper Owls", "Grellingham", "Ostwick"),
    ]
    assert all(r.rephrase_prompts == [] and r.locality == [] for r in case.requests)
    assert len(case.multihop) == 3
    assert case.multihop[0] == PortabilityProbe(
        'Where was the performer of "Lanterns Over Tallow" formed?', "Grellingham",
        ("Grellingham City", "Grell"))
    assert len(cases[1].requests) == 3
    assert {p.aliases for p in cases[1].multihop} == {()}  # empty new_answer_alias


def test_jsonl() -> None:
    cases = load_cases(FIXTURES / "edits.jsonl")
    assert [c.case_id for c in cases] == ["veltrana-continent", "1", "7"]  # blank line skipped
    r = cases[0].requests[0]
    assert (r.prompt, r.subject, r.target_new, r.ground_truth) == (
        "Veltrana is located in", "Veltrana", "Borealis", "Austravia")
    assert r.rephrase_prompts == ["Veltrana belongs to the continent of",
                                  "Veltrana is a part of the continent of"]
    assert r.locality == [LocalityProbe("Oskaria is located in"),
                          LocalityProbe("Pellucia is in", "Austravia")]
    assert r.portability == [PortabilityProbe("Veltrana's continent is called", "Borealis",
                                              ("the Borealis continent",))]
    second = cases[1].requests[0]
    assert (second.rejected, second.subject, second.ground_truth) == ("Dravic", None, None)
    assert cases[2].requests[0].locality == [LocalityProbe("Pebblecast, developed by")]


def test_jsonl_records_in_a_json_list(tmp_path: Path) -> None:
    path = _write(tmp_path, "own.json", [{"prompt": "Ada's pet is a", "target_new": "lynx"}])
    assert detect_format(json.loads(path.read_text()), path) == "jsonl"
    assert load_cases(path)[0].requests[0].target_new == "lynx"


# ---- detection and n --------------------------------------------------------------------------

@pytest.mark.parametrize("name, fmt", FIXTURE_FORMATS.items())
def test_detect_format(name: str, fmt: str) -> None:
    path = FIXTURES / name
    if name.endswith(".jsonl"):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        records = _records(name)
    assert detect_format(records, path) == fmt
    assert fmt in FORMATS


def test_detect_format_unknown_keys() -> None:
    with pytest.raises(KnowpatchError, match=r"x\.json: cannot tell the format .*question.* counterfact"):
        detect_format([{"question": "?"}], "x.json")
    with pytest.raises(KnowpatchError, match="no records"):
        detect_format([], "x.json")


def test_explicit_format_equals_detected() -> None:
    for name, fmt in FIXTURE_FORMATS.items():
        assert load_cases(FIXTURES / name, fmt=fmt) == load_cases(FIXTURES / name)


@pytest.mark.parametrize("name", FIXTURE_FORMATS)
def test_n_takes_the_first_records(name: str) -> None:
    every = load_cases(FIXTURES / name)
    assert len(every) >= 2
    assert load_cases(FIXTURES / name, n=1) == every[:1]
    assert load_cases(FIXTURES / name, n=2) == every[:2]
    assert load_cases(FIXTURES / name, n=100) == every


def test_n_must_be_positive() -> None:
    with pytest.raises(KnowpatchError, match="n: must be ≥ 1"):
        load_cases(FIXTURES / "counterfact.json", n=0)


# ---- errors -----------------------------------------------------------------------------------

def test_missing_field_names_file_record_and_field(tmp_path: Path) -> None:
    records = _records("counterfact.json")
    del records[1]["requested_rewrite"]["target_new"]["str"]
    path = _write(tmp_path, "counterfact_500.json", records)
    with pytest.raises(KnowpatchError) as e:
        load_cases(path)
    assert str(e.value) == "counterfact_500.json: record 1: requested_rewrite.target_new.str: is missing"
    assert len(load_cases(path, n=1)) == 1  # only the first n records are converted


def test_wrong_type_names_the_list_item(tmp_path: Path) -> None:
    records = _records("counterfact.json")
    records[2]["neighborhood_prompts"][0] = 5
    path = _write(tmp_path, "cf.json", records)
    with pytest.raises(KnowpatchError,
                       match=r"^cf\.json: record 2: neighborhood_prompts\[0\]: must be a string"):
        load_cases(path)


def test_mquake_error_names_the_rewrite(tmp_path: Path) -> None:
    records = _records("mquake.json")
    del records[1]["requested_rewrite"][2]["subject"]
    path = _write(tmp_path, "mq.json", records)
    with pytest.raises(KnowpatchError,
                       match=r"^mq\.json: record 1: requested_rewrite\[2\]\.subject: is missing"):
        load_cases(path)


def test_zsre_empty_answers(tmp_path: Path) -> None:
    records = _records("zsre.json")
    records[0]["answers"] = []
    path = _write(tmp_path, "z.json", records)
    with pytest.raises(KnowpatchError, match=r"^z\.json: record 0: answers: must not be empty"):
        load_cases(path)


def test_editrequest_error_is_prefixed(tmp_path: Path) -> None:
    records = _records("easyedit.json")
    records[2]["prompt"] = "{} is owned by"
    del records[2]["subject"]
    path = _write(tmp_path, "ee.json", records)
    with pytest.raises(KnowpatchError, match=r"^ee\.json: record 2: subject: is required when prompt holds"):
        load_cases(path)


def test_jsonl_bad_json_line(tmp_path: Path) -> None:
    path = tmp_path / "edits.jsonl"
    path.write_text('{"prompt": "A is", "target_new": "B"}\n\n{"prompt": "C is", "target_new": \n')
    with pytest.raises(KnowpatchError, match=r"^edits\.jsonl: line 3: invalid JSON"):
        load_cases(path)
    assert len(load_cases(path, n=1)) == 1  # lines after the first n are not read


def test_jsonl_unknown_field(tmp_path: Path) -> None:
    path = tmp_path / "edits.jsonl"
    path.write_text('{"prompt": "A is", "target_new": "B"}\n{"prompt": "C is", "tagret_new": "D"}\n')
    with pytest.raises(KnowpatchError,
                       match=r"^edits\.jsonl: line 2: tagret_new: unknown field \(known: case_id"):
        load_cases(path)


def test_jsonl_unknown_probe_field(tmp_path: Path) -> None:
    path = tmp_path / "edits.jsonl"
    path.write_text('{"prompt": "A is", "target_new": "B", "locality": [{"prompt": "C is", "anser": "D"}]}\n')
    with pytest.raises(KnowpatchError, match=r"^edits\.jsonl: line 1: locality\[0\]\.anser: unknown field"):
        load_cases(path)


@pytest.mark.parametrize("line, message", [
    ('{"target_new": "B"}', "line 1: prompt: is missing"),
    ('{"prompt": "A is", "target_new": "  "}', "line 1: target_new: must not be empty"),
    ('{"prompt": "A is", "target_new": "B", "rephrase_prompts": 3}',
     "line 1: rephrase_prompts: must be a list"),
    ('{"prompt": "A is", "target_new": "B", "portability": [{"prompt": "Q?"}]}',
     "line 1: portability[0].answer: must be a string"),
    ('"A is B"', "line 1: must be a JSON object"),
    ('{"prompt": "A is", "target_new": "B", "case_id": [1]}',
     "line 1: case_id: must be a string or an integer"),
])
def test_jsonl_invalid_records(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "edits.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(KnowpatchError) as e:
        load_cases(path)
    assert str(e.value).startswith(f"edits.jsonl: {message}")


def test_duplicate_case_id(tmp_path: Path) -> None:
    path = tmp_path / "edits.jsonl"
    path.write_text('{"case_id": "a", "prompt": "A is", "target_new": "B"}\n'
                    '{"case_id": "a", "prompt": "C is", "target_new": "D"}\n')
    with pytest.raises(KnowpatchError, match=r"line 2: case_id: 'a' is already used by line 1"):
        load_cases(path)


def test_unknown_format() -> None:
    with pytest.raises(KnowpatchError, match=r"format: unknown value 'rome'.*counterfact, "
                                             r"counterfact-portability, easyedit, zsre, mquake, jsonl"):
        load_cases(FIXTURES / "counterfact.json", fmt="rome")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.json"
    with pytest.raises(KnowpatchError, match=f"{path}: no such file"):
        load_cases(path)


@pytest.mark.parametrize("text, message", [
    ("[]", "holds no records"),
    ("\n\n", "holds no records"),
    ('{"data": []}', "must hold a JSON list of records"),
    ("[1, 2", "invalid JSON at line 1"),
])
def test_bad_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(KnowpatchError, match=message):
        load_cases(path, fmt="counterfact")


def test_record_not_an_object(tmp_path: Path) -> None:
    path = _write(tmp_path, "cf.json", [*_records("counterfact.json"), "oops"])
    with pytest.raises(KnowpatchError, match=r"^cf\.json: record 3: must be a JSON object \(got str\)"):
        load_cases(path)


# ---- the real files (read by path, never copied) ----------------------------------------------

REAL_FILES = [
    ("counterfact/counterfact_500.json", "counterfact", 1),
    ("counterfact/counterfact_portability_gpt4.json", "counterfact-portability", 1),
    ("counterfact_easyedit/counterfact-edit.json", "easyedit", 1),
    ("zsre/zsre_mend_eval_portability_gpt4.json", "zsre", 1),
    ("mquake/MQuAKE-hard.json", "mquake", 4),
]


@pytest.mark.parametrize("relative, fmt, requests_per_case", REAL_FILES)
def test_real_files(relative: str, fmt: str, requests_per_case: int) -> None:
    path = REAL_DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    cases = load_cases(path, n=5)
    assert len(cases) == 5
    assert load_cases(path, fmt=fmt, n=5) == cases
    assert len({c.case_id for c in cases}) == 5
    for case in cases:
        assert len(case.requests) == requests_per_case
        r = case.requests[0]
        assert r.prompt and r.target_new and r.ground_truth and r.subject
        assert "{}" not in r.prompt
        if fmt.startswith("counterfact"):
            assert len(r.rephrase_prompts) == 2 and len(r.locality) == 10
            assert 1 <= len(case.generation_prompts) <= 10
            assert len(set(case.generation_prompts)) == len(case.generation_prompts)
        if fmt in ("easyedit", "zsre"):
            assert len(r.rephrase_prompts) == 1 and len(r.locality) == 1
        if fmt == "zsre":
            assert r.locality[0].prompt.startswith("nq question: ")
        expected_portability = 1 if fmt in ("counterfact-portability", "zsre") else 0
        assert len(r.portability) == expected_portability
        assert len(case.multihop) == (3 if fmt == "mquake" else 0)


def test_jsonl_details(tmp_path: Path) -> None:
    """U+2028 inside a string is not a line break; a .jsonl file may also hold a JSON list."""
    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps({"prompt": "A\u2028 is", "target_new": "B"}, ensure_ascii=False) + "\r\n")
    assert load_cases(path)[0].requests[0].prompt == "A\u2028 is"
    path.write_text(json.dumps([{"prompt": "A is", "target_new": "B"}], indent=2))
    assert load_cases(path, fmt="jsonl")[0].requests[0].target_new == "B"
