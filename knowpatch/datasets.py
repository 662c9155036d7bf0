"""Benchmark files read into `Case`s: CounterFact, EasyEdit, zsRE, MQuAKE and the project's JSONL.

Every format is described in docs/data-formats.md. A malformed record raises `KnowpatchError`
naming the file, the record (``record 3``, 0-based; ``line 4``, 1-based, in JSONL) and the field,
e.g. ``counterfact_500.json: record 3: requested_rewrite.target_new.str: is missing``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from .errors import KnowpatchError, field_error
from .questions import relation_questions
from .requests import EditRequest, LocalityProbe, PortabilityProbe, check_text


@dataclass
class Case:
    """One benchmark unit: the requests edited together and what is scored only per case."""

    case_id: str
    requests: list[EditRequest]
    multihop: list[PortabilityProbe] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)


FORMATS = ("counterfact", "counterfact-portability", "easyedit", "zsre", "mquake", "jsonl")

# Keys of the project's own records (one EditRequest each, plus an optional case_id).
_JSONL_KEYS = frozenset(EditRequest.__dataclass_fields__) | {"case_id"}
_LOCALITY_KEYS = frozenset({"prompt", "answer"})
_PORTABILITY_KEYS = frozenset({"prompt", "answer", "aliases"})
# Keys that only EasyEdit's flat records have (the project's records spell them differently).
_EASYEDIT_KEYS = frozenset({"rephrase_prompt", "locality_prompt", "locality_ground_truth"})


def detect_format(records: list[dict], path: str | Path) -> str:
    """The format of `records`, told from the keys of the first one; `path` is for messages."""
    if not records:
        raise KnowpatchError(f"{path}: holds no records")
    first = records[0]
    if not isinstance(first, dict):
        raise KnowpatchError(f"{path}: the first record must be a JSON object (got {type(first).__name__})")
    keys = set(first)
    rewrite = first.get("requested_rewrite")
    if isinstance(rewrite, list):
        return "mquake"
    if isinstance(rewrite, dict):
        return "counterfact-portability" if "portability" in keys else "counterfact"
    if {"src", "alt"} <= keys:
        return "zsre"
    if {"prompt", "target_new"} <= keys:
        return "easyedit" if keys & _EASYEDIT_KEYS else "jsonl"
    if Path(path).suffix.lower() == ".jsonl":
        return "jsonl"  # the project's own format: its validation names what is wrong
    raise KnowpatchError(
        f"{path}: cannot tell the format from the keys of the first record ({', '.join(sorted(keys))}); "
        f"name it (one of {', '.join(FORMATS)})"
    )


def load_cases(path: str | Path, fmt: str | None = None, n: int | None = None) -> list[Case]:
    """Read the first `n` records of `path` (all when None), in file order, as `Case`s.

    The format is detected from the first record when `fmt` is None. A `.jsonl` file, or any
    file read with `fmt="jsonl"`, holds one JSON object per line; other files hold a JSON list.
    """
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise KnowpatchError(f"format: unknown value {fmt!r} (expected {', '.join(FORMATS)})")
    if n is not None and n < 1:
        raise KnowpatchError(f"n: must be ≥ 1 (got {n})")
    if not path.exists():
        raise KnowpatchError(f"{path}: no such file")
    if not path.is_file():
        raise KnowpatchError(f"{path}: is not a file")
    located, everything = _read(path, fmt, n)
    where, first = located[0]
    if not isinstance(first, dict):
        raise KnowpatchError(f"{path.name}: {where}: must be a JSON object (got {type(first).__name__})")
    if fmt is None:
        fmt = detect_format([first], path)
    convert = _CONVERTERS[fmt]
    if fmt in ("counterfact", "counterfact-portability"):  # questions need the whole file
        convert = partial(convert, templates=relation_templates(everything))
    cases: list[Case] = []
    seen: dict[str, str] = {}
    for index, (where, record) in enumerate(located):
        try:
            if not isinstance(record, dict):
                raise KnowpatchError(f"must be a JSON object (got {type(record).__name__})")
            case = convert(record, _case_id(record, index))
        except KnowpatchError as e:
            raise KnowpatchError(f"{path.name}: {where}: {e}") from e
        if case.case_id in seen:
            raise KnowpatchError(f"{path.name}: {where}: case_id: {case.case_id!r} is already used by "
                                 f"{seen[case.case_id]}")
        seen[case.case_id] = where
        cases.append(case)
    return cases


# ---- reading ------------------------------------------------------------------------------------

def _read(path: Path, fmt: str | None, n: int | None) -> tuple[list[tuple[str, Any]], list[Any]]:
    """The first `n` records of the file, each with where it is ("record 3" / "line 4"), and
    every record of a JSON list (a JSON-lines file: the records read)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise KnowpatchError(f"{path}: is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise KnowpatchError(f"{path}: cannot be read ({e.strerror})") from e
    if not text.strip():
        raise KnowpatchError(f"{path}: holds no records")
    if (fmt == "jsonl" or path.suffix.lower() == ".jsonl") and not text.lstrip().startswith("["):
        located = _read_lines(path, text, n)
        data = [record for _, record in located]
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise KnowpatchError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg} "
                                 "(one record per line needs a .jsonl name or the jsonl format)") from e
        if not isinstance(data, list):
            raise KnowpatchError(f"{path}: must hold a JSON list of records (got a {type(data).__name__})")
        located = [(f"record {i}", record) for i, record in enumerate(data[:n])]
    if not located:
        raise KnowpatchError(f"{path}: holds no records")
    return located, data


def _read_lines(path: Path, text: str, n: int | None) -> list[tuple[str, Any]]:
    located: list[tuple[str, Any]] = []
    # split on "\n" only: str.splitlines() would also split at U+2028 inside JSON strings.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if n is not None and len(located) >= n:
            break
        try:
            located.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise KnowpatchError(
                f"{path.name}: line {number}: invalid JSON ({e.msg} at column {e.colno})") from e
    return located


def _case_id(record: dict, index: int) -> str:
    value = record.get("case_id")
    if value is None:
        return str(index)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise field_error("case_id", "must be a string or an integer", value)
    text = str(value).strip()
    if not text:
        raise field_error("case_id", "must not be empty")
    return text


# ---- field access -------------------------------------------------------------------------------

def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _at(obj: Any, path: str, prefix: str = "", required: bool = True) -> Any:
    """The value at a dotted `path` in `obj` (None when absent and not required)."""
    name = prefix
    for key in path.split("."):
        if not isinstance(obj, dict):
            raise field_error(name or "record", "must be a JSON object", obj)
        name = _join(name, key)
        if key not in obj:
            if required:
                raise field_error(name, "is missing")
            return None
        obj = obj[key]
        if obj is None:
            if required:
                raise field_error(name, "must not be null")
            return None
    return obj


def _text(obj: Any, path: str, prefix: str = "", required: bool = True) -> str | None:
    """A non-empty string at `path` (None when absent and not required)."""
    value = _at(obj, path, prefix, required)
    if value is None:
        return None
    return check_text(_join(prefix, path), value)


def _texts(obj: Any, path: str, prefix: str = "", required: bool = False, single: bool = False) -> list[str]:
    """A list of non-empty strings at `path` ([] when absent); `single` also takes one string."""
    name = _join(prefix, path)
    value = _at(obj, path, prefix, required)
    if value is None:
        return []
    if single and isinstance(value, str):
        return [check_text(name, value)]
    if not isinstance(value, list):
        raise field_error(name, "must be a list of strings", value)
    return [check_text(f"{name}[{i}]", v) for i, v in enumerate(value)]


def _new_questions(obj: dict, key: str, required: bool) -> list[PortabilityProbe]:
    """`{"New Question", "New Answer"}` (or a list of them) as portability probes."""
    value = _at(obj, key, required=required)
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    probes = []
    for i, item in enumerate(items):
        name = f"{key}[{i}]" if isinstance(value, list) else key
        probes.append(PortabilityProbe(_text(item, "New Question", name),
                                       _text(item, "New Answer", name).strip()))
    return probes


# ---- questions -----------------------------------------------------------------------------------

CHAT_NEIGHBOURS = 3
"""Neighbourhood subjects asked about per CounterFact record (chat_loc)."""


def relation_templates(records: list[Any]) -> dict[str, set[str]]:
    """Per CounterFact relation, the prompt templates its records use ("{} is located in"):
    each rewrite prompt, and each paraphrase from its subject on."""
    out: dict[str, set[str]] = {}
    for record in records:
        rewrite = record.get("requested_rewrite") if isinstance(record, dict) else None
        if not isinstance(rewrite, dict) or not isinstance(rewrite.get("prompt"), str):
            continue
        subject, found = rewrite.get("subject") or "", out.setdefault(str(rewrite.get("relation_id")), set())
        if "{}" in rewrite["prompt"]:
            found.add(rewrite["prompt"])
        for p in record.get("paraphrase_prompts") or []:
            if subject and isinstance(p, str) and subject in p:
                found.add(p[p.rfind(subject):].replace(subject, "{}", 1))
    return out


def neighbour_subjects(prompts: list[str], templates: set[str]) -> list[str]:
    """The subjects of neighbourhood prompts, read off the relation's templates (the longest
    template that fits first); distinct, in order; prompts no template fits are left out."""
    found: list[str] = []
    ordered = sorted(templates, key=lambda t: (-len(t), t))
    for prompt in prompts:
        for template in ordered:
            head, tail = template.split("{}", 1)
            if prompt.startswith(head) and prompt.endswith(tail) and len(prompt) > len(head) + len(tail):
                subject = prompt[len(head):len(prompt) - len(tail)].strip()
                if subject and subject not in found:
                    found.append(subject)
                break
    return found


def _as_question(text: str) -> str:
    """zsRE's locality prompt ("nq question: who wrote …") as the question it is."""
    text = text.removeprefix("nq question:").strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith("?") else "?")


# ---- converters ---------------------------------------------------------------------------------

def _counterfact(record: dict, case_id: str, portability: bool = False,
                 templates: dict[str, set[str]] | None = None) -> Case:
    """ROME/MEMIT CounterFact; with `portability`, EasyEdit's one-hop portability question too.
    Its relation's questions (`questions.RELATION_QUESTIONS`) about the subject, and about
    the neighbourhood prompts' subjects (found with the relation's prompt `templates`)."""
    ground_truth = _text(record, "requested_rewrite.target_true.str").strip()
    relation = _at(record, "requested_rewrite.relation_id", required=False)
    subject = _text(record, "requested_rewrite.subject")
    neighbours = neighbour_subjects(_texts(record, "neighborhood_prompts"),
                                    (templates or {}).get(relation, set()))
    request = EditRequest(
        prompt=_text(record, "requested_rewrite.prompt"),
        subject=_text(record, "requested_rewrite.subject"),
        target_new=_text(record, "requested_rewrite.target_new.str"),
        ground_truth=ground_truth,
        rephrase_prompts=_texts(record, "paraphrase_prompts"),
        locality=[LocalityProbe(p, ground_truth) for p in _texts(record, "neighborhood_prompts")],
        portability=_new_questions(record, "portability", required=True) if portability else [],
        questions=relation_questions(str(relation), subject),
        locality_questions=[q for s in neighbours[:CHAT_NEIGHBOURS]
                            for q in relation_questions(str(relation), s)[:1]],
    )
    generation = list(dict.fromkeys(_texts(record, "generation_prompts")))
    return Case(case_id, [request], generation_prompts=generation)


def _counterfact_portability(record: dict, case_id: str,
                             templates: dict[str, set[str]] | None = None) -> Case:
    return _counterfact(record, case_id, portability=True, templates=templates)


def _easyedit(record: dict, case_id: str) -> Case:
    """EasyEdit's flat records (prompt, target_new, ground_truth, rephrase_prompt, locality_*)."""
    prompts = _texts(record, "locality_prompt", single=True)
    answers: list[str | None] = [a.strip() for a in _texts(record, "locality_ground_truth", single=True)]
    if not answers:
        answers = [None] * len(prompts)
    elif len(answers) != len(prompts):
        raise field_error("locality_ground_truth", f"has {len(answers)} answers for {len(prompts)} "
                          "locality_prompt entries")
    request = EditRequest(
        prompt=_text(record, "prompt"),
        target_new=_text(record, "target_new"),
        ground_truth=_text(record, "ground_truth", required=False),
        subject=_text(record, "subject", required=False),
        rephrase_prompts=_texts(record, "rephrase_prompt", single=True),
        locality=[LocalityProbe(p, a) for p, a in zip(prompts, answers)],
    )
    return Case(case_id, [request])


def _zsre(record: dict, case_id: str) -> Case:
    """MEND's zsRE eval records: src, alt, answers, rephrase, loc/loc_ans, optional portability."""
    answers = _texts(record, "answers", required=True, single=True)
    if not answers:
        raise field_error("answers", "must not be empty")
    loc = _text(record, "loc", required=False)
    loc_ans = _text(record, "loc_ans", required=False)
    request = EditRequest(
        prompt=_text(record, "src"),
        target_new=_text(record, "alt"),
        ground_truth=answers[0],
        subject=_text(record, "subject", required=False),
        rephrase_prompts=_texts(record, "rephrase", single=True),
        locality=[LocalityProbe(loc, loc_ans and loc_ans.strip())] if loc else [],
        portability=_new_questions(record, "portability", required=False),
        questions=[_text(record, "src"), *_texts(record, "rephrase", single=True)],
        locality_questions=[_as_question(loc)] if loc else [],
    )
    return Case(case_id, [request])


def _mquake(record: dict, case_id: str) -> Case:
    """MQuAKE: all rewrites of a case edited together, scored on its multi-hop questions."""
    rewrites = _at(record, "requested_rewrite")
    if not isinstance(rewrites, list) or not rewrites:
        raise field_error("requested_rewrite", "must be a non-empty list", rewrites)
    requests = []
    for i, rewrite in enumerate(rewrites):
        where = f"requested_rewrite[{i}]"
        prompt = _text(rewrite, "prompt", where)
        subject = _text(rewrite, "subject", where)
        target_new = _text(rewrite, "target_new.str", where)
        ground_truth = _text(rewrite, "target_true.str", where)
        question = _text(rewrite, "question", where, required=False)
        try:
            requests.append(EditRequest(prompt=prompt, target_new=target_new,
                                        ground_truth=ground_truth, subject=subject,
                                        questions=[question] if question else []))
        except KnowpatchError as e:
            raise KnowpatchError(f"{where}.{e}") from e
    questions = _texts(record, "questions", required=True)
    if not questions:
        raise field_error("questions", "must not be empty")
    answer = _text(record, "new_answer").strip()
    aliases = tuple(a.strip() for a in _texts(record, "new_answer_alias"))
    return Case(case_id, requests, multihop=[PortabilityProbe(q, answer, aliases) for q in questions])


def _jsonl(record: dict, case_id: str) -> Case:
    """The project's own records: EditRequest's fields (validated by it) plus an optional case_id."""
    unknown = sorted(set(record) - _JSONL_KEYS)
    if unknown:
        raise field_error(unknown[0], f"unknown field (known: {', '.join(sorted(_JSONL_KEYS))})")
    for required in ("prompt", "target_new"):
        if required not in record:
            raise field_error(required, "is missing")
    for key in ("rephrase_prompts", "locality", "portability"):
        value = record.get(key)
        if value is not None and not isinstance(value, (list, str, dict)):
            raise field_error(key, "must be a list", value)
    _check_probe_keys(record.get("locality"), "locality", _LOCALITY_KEYS)
    _check_probe_keys(record.get("portability"), "portability", _PORTABILITY_KEYS)
    fields = {k: v for k, v in record.items() if k != "case_id"}
    return Case(case_id, [EditRequest.from_dict(fields)])


def _check_probe_keys(value: Any, key: str, known: frozenset[str]) -> None:
    """Reject misspelt keys of locality / portability objects (EditRequest would ignore them)."""
    items = [value] if isinstance(value, dict) else value if isinstance(value, list) else []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        unknown = sorted(set(item) - known)
        if unknown:
            raise field_error(f"{key}[{i}].{unknown[0]}",
                              f"unknown field (known: {', '.join(sorted(known))})")
        aliases = item.get("aliases")
        if aliases is not None and not isinstance(aliases, (list, str)):
            raise field_error(f"{key}[{i}].aliases", "must be a list of strings", aliases)


_CONVERTERS: dict[str, Callable[[dict, str], Case]] = {
    "counterfact": _counterfact,
    "counterfact-portability": _counterfact_portability,
    "easyedit": _easyedit,
    "zsre": _zsre,
    "mquake": _mquake,
    "jsonl": _jsonl,
}


PREFERENCE_KEYS = ("prompt", "chosen", "rejected")


def load_preferences(path: str | Path) -> list[EditRequest]:
    """Preference pairs from a JSONL file of `{"prompt", "chosen", "rejected"}` lines, as
    requests (target_new = chosen). Errors name the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise KnowpatchError(f"preferences: no file {str(path)!r}")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise KnowpatchError(f"{path}: not UTF-8 text") from None
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KnowpatchError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise KnowpatchError(f"{where}: expected an object with {', '.join(PREFERENCE_KEYS)}")
        for key in PREFERENCE_KEYS:
            if key not in record:
                raise KnowpatchError(f"{where}: field {key!r} is missing")
            if not isinstance(record[key], str) or not record[key].strip():
                raise KnowpatchError(f"{where}: field {key!r} must be a non-empty string")
        unknown = sorted(set(record) - set(PREFERENCE_KEYS))
        if unknown:
            raise KnowpatchError(f"{where}: field {unknown[0]!r} is unknown "
                                 f"(known: {', '.join(PREFERENCE_KEYS)})")
        if record["chosen"].strip() == record["rejected"].strip():
            raise KnowpatchError(f"{where}: field 'rejected' is the same as 'chosen'")
        try:
            out.append(EditRequest(record["prompt"], record["chosen"],
                                   rejected=record["rejected"]))
        except KnowpatchError as exc:
            raise KnowpatchError(f"{where}: {exc}") from None
    if not out:
        raise KnowpatchError(f"{path}: no preference pairs (the file is empty)")
    return out
