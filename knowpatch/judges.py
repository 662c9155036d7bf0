"""Judges: programs that say whether a text shows a behaviour (a behaviour edit is measured by
them, on what the edited model writes).

A judge is given by a spec, `NAME` or `NAME:ARGUMENT`:

    max-words:N        at most N words (an answer cut by the token cap fails: it was longer)
    starts-with:TEXT   opens with TEXT (case and surrounding spaces aside)
    ends-with:TEXT     closes with TEXT (a final full stop aside)
    contains:WORDS     names WORDS (whole words, case aside)
    not-contains:WORDS does not
    regex:PATTERN      Python's re.search finds PATTERN
    no-contractions    no "don't", "it's", "we'll", … (possessives are not contractions)
    language:CODE      written in language CODE (ISO 639-1, e.g. fr), by py3langid
    refusal            declines to answer ("I can't help with that", "I'm sorry, but …")
    module:function    your own: `function(text) -> bool`, imported from `module`

Several specs given together (`parse_judges`) must all pass. Bad specs raise
`KnowpatchError` naming the field (`judge`) before anything runs; a user function that
raises on a text raises `KnowpatchError` too, naming it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import KnowpatchError

LANGUAGES = ("en", "fr", "de", "es", "it", "pt", "nl", "sv", "da", "no", "fi", "pl", "ru", "tr",
             "zh", "ja", "ko", "ar", "hi", "id", "vi", "cs", "ro", "hu", "el", "uk", "he")
"""The languages `language:CODE` tells apart (the code asked for is added): py3langid over
its full 97-language set calls short English sentences Afrikaans."""

CONTRACTION = re.compile(
    r"\b\w+n['’]t\b|\b\w+['’](?:re|ve|ll|d|m)\b|"
    r"\b(?:it|he|she|that|there|what|who|here|where|how|let|this)['’]s\b", re.I)

REFUSAL = re.compile(
    r"\b(?:i|we)\s+(?:can(?:no|['’])t|cannot|won['’]t|am\s+not\s+able|['’]m\s+not\s+able|"
    r"am\s+unable|['’]m\s+unable|(?:do\s+not|don['’]t)\s+(?:provide|give|offer|discuss))\b|"
    r"\bi['’]m\s+sorry,?\s+but\b|\bi\s+am\s+sorry,?\s+but\b|\bnot\s+able\s+to\s+(?:help|assist|"
    r"provide|answer)\b|\bunable\s+to\s+(?:help|assist|provide|answer)\b|\bplease\s+(?:consult|"
    r"ask|see|contact)\b", re.I)


@dataclass(frozen=True)
class Judge:
    """One judge: `spec` as given, `test(text, truncated)` the verdict."""

    spec: str
    test: Callable[[str, bool], bool]

    def __call__(self, text: str, truncated: bool = False) -> bool:
        try:
            return bool(self.test(text, truncated))
        except KnowpatchError:
            raise
        except Exception as exc:  # a user's judge that fails on a text: say which
            raise KnowpatchError(f"judge: {self.spec} raised {type(exc).__name__}: {exc}") from None


@dataclass(frozen=True)
class Judges:
    """Several judges; a text passes when every one passes it."""

    judges: tuple[Judge, ...]

    @property
    def spec(self) -> str:
        return " & ".join(j.spec for j in self.judges)

    def __call__(self, text: str, truncated: bool = False) -> bool:
        return all(j(text, truncated) for j in self.judges)


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+(?:['’][^\W_]+)*", text)


def _phrase(words: str) -> re.Pattern:
    body = r"\s+".join(re.escape(w) for w in words.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.I)


def _normal(text: str) -> str:
    return " ".join(text.split()).lower()


def _max_words(arg: str) -> Callable[[str, bool], bool]:
    if not arg.isdigit() or int(arg) < 1:
        raise KnowpatchError(f"judge: max-words takes a whole number ≥ 1 (got {arg!r})")
    n = int(arg)
    return lambda text, truncated: not truncated and len(_words(text)) <= n


def _language(arg: str) -> Callable[[str, bool], bool]:
    code = arg.strip().lower()
    if not re.fullmatch(r"[a-z]{2,3}", code):
        raise KnowpatchError(f"judge: language takes an ISO 639-1 code such as fr (got {arg!r})")
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identify = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    if code not in identify.nb_classes:
        raise KnowpatchError(f"judge: language {code!r} is not one py3langid knows")
    identify.set_languages(sorted(set(LANGUAGES) | {code}))
    return lambda text, _t: bool(text.strip()) and identify.classify(text)[0] == code


def _user(spec: str) -> Callable[[str, bool], bool]:
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as exc:  # ImportError, AttributeError, or the module failing to import
        raise KnowpatchError(f"judge: {spec} cannot be imported ({type(exc).__name__}: {exc})") from None
    if not callable(fn):
        raise KnowpatchError(f"judge: {spec} is not a function")
    return lambda text, _t: fn(text)


def _needs(name: str, arg: str) -> str:
    if not arg.strip():
        raise KnowpatchError(f"judge: {name} needs an argument ({name}:…)")
    return arg


BUILT_IN: dict[str, Callable[[str], Callable[[str, bool], bool]]] = {
    "max-words": _max_words,
    "starts-with": lambda a: (lambda t, _: _normal(t).startswith(_normal(_needs("starts-with", a)))),
    "ends-with": lambda a: (lambda t, _: _normal(t).rstrip(". ").endswith(
        _normal(_needs("ends-with", a)).rstrip(". "))),
    "contains": lambda a: (lambda t, _, p=_phrase(_needs("contains", a)): bool(p.search(t))),
    "not-contains": lambda a: (lambda t, _, p=_phrase(_needs("not-contains", a)): not p.search(t)),
    "regex": lambda a: _regex(a),
    "no-contractions": lambda a: (lambda t, _: not CONTRACTION.search(t)),
    "language": _language,
    "refusal": lambda a: (lambda t, _: bool(REFUSAL.search(t))),
}


def _regex(arg: str) -> Callable[[str, bool], bool]:
    try:
        pattern = re.compile(_needs("regex", arg))
    except re.error as exc:
        raise KnowpatchError(f"judge: regex {arg!r} does not compile ({exc})") from None
    return lambda text, _t: bool(pattern.search(text))


def parse_judge(spec: str) -> Judge:
    """The judge `spec` names (see the module's list); `KnowpatchError` naming `judge` if
    it names none."""
    spec = (spec or "").strip()
    if not spec:
        raise KnowpatchError("judge: empty (e.g. max-words:20, contains:Paris, language:fr)")
    name, _, arg = spec.partition(":")
    if name in BUILT_IN:
        if name in ("no-contractions", "refusal") and arg:
            raise KnowpatchError(f"judge: {name} takes no argument (got {arg!r})")
        return Judge(spec, BUILT_IN[name](arg))
    if arg and re.fullmatch(r"[A-Za-z_][\w.]*", name) and re.fullmatch(r"[A-Za-z_]\w*", arg):
        return Judge(spec, _user(spec))
    raise KnowpatchError(f"judge: unknown judge {spec!r} (built-in: {', '.join(BUILT_IN)}; "
                         "or module:function)")


def parse_judges(specs: str | Sequence[str]) -> Judges:
    """All of `specs` as one judge."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise KnowpatchError("judge: at least one is needed")
    return Judges(tuple(parse_judge(s) for s in specs))
