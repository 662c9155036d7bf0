"""What an edit asks for (`EditRequest`), validated, and how it meets the tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import KnowpatchError, field_error

# A target starting with one of these follows the prompt without a space ("Paris," / "...").
_NO_SPACE_BEFORE = set(",.;:!?)]}'\"")


@dataclass(frozen=True)
class LocalityProbe:
    """A prompt whose answer must not change; `answer` is optional (used by loc_tf)."""

    prompt: str
    answer: str | None = None


@dataclass(frozen=True)
class PortabilityProbe:
    """A question the edit should carry over to: the expected new answer and its aliases."""

    prompt: str
    answer: str
    aliases: tuple[str, ...] = ()


@dataclass
class EditRequest:
    """One fact to edit.

    `prompt` may hold `{}`, filled with `subject`. `target_new` is written as a user writes
    it (`"Rome"`); the separator the model would generate before it is added when the
    request is tokenized, so `"Rome"` and `" Rome"` are the same edit.
    """

    prompt: str
    target_new: str
    ground_truth: str | None = None
    subject: str | None = None
    rephrase_prompts: list[str] = field(default_factory=list)
    locality: list[LocalityProbe] = field(default_factory=list)
    portability: list[PortabilityProbe] = field(default_factory=list)
    rejected: str | None = None
    questions: list[str] = field(default_factory=list)
    """The fact asked as questions, as a user asks an instruct model in chat: the first is
    the one chat training writes the new answer for, and scores chat_rel; the others score
    chat_gen (`questions`)."""
    locality_questions: list[str] = field(default_factory=list)
    """The same kind of question about other subjects: their chat replies must not change
    (chat_loc)."""

    def __post_init__(self) -> None:
        self.prompt = check_text("prompt", self.prompt)
        self.target_new = check_text("target_new", self.target_new).strip()
        if not self.target_new:
            raise field_error("target_new", "must not be empty or only white space")
        if self.ground_truth is not None:
            self.ground_truth = check_text("ground_truth", self.ground_truth).strip()
        if self.rejected is not None:
            self.rejected = check_text("rejected", self.rejected).strip()
        if self.subject is not None:
            self.subject = check_text("subject", self.subject).strip()
        if "{}" in self.prompt:
            if not self.subject:
                raise field_error("subject", "is required when prompt holds '{}'", self.prompt)
            self.prompt = self.prompt.replace("{}", self.subject)
        if self.subject and self.subject not in self.prompt:
            raise field_error("subject", "does not occur in the prompt "
                              f"{self.prompt!r} (the router keys the edit by it)", self.subject)
        self.rephrase_prompts = [
            check_text(f"rephrase_prompts[{i}]", p) for i, p in enumerate(_as_list(self.rephrase_prompts))
        ]
        self.locality = [
            _locality(f"locality[{i}]", p) for i, p in enumerate(_as_list(self.locality))
        ]
        self.portability = [
            _portability(f"portability[{i}]", p)
            for i, p in enumerate(_as_list(self.portability))
        ]
        for name in ("questions", "locality_questions"):
            setattr(self, name, [check_text(f"{name}[{i}]", q)
                                 for i, q in enumerate(_as_list(getattr(self, name)))])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "request") -> EditRequest:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise field_error(f"{where}.{unknown[0]}", f"unknown field (known: {sorted(known)})")
        for required in ("prompt", "target_new"):
            if required not in data:
                raise field_error(f"{where}.{required}", "is missing")
        return cls(**data)


def check_text(name: str, value: Any) -> str:
    """A non-empty string, else an error naming `name`."""
    if not isinstance(value, str):
        raise field_error(name, "must be a string", value)
    if not value.strip():
        raise field_error(name, "must not be empty")
    return value


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        return [value]
    return list(value)


def _locality(name: str, value: Any) -> LocalityProbe:
    if isinstance(value, LocalityProbe):
        return value
    if isinstance(value, str):
        return LocalityProbe(check_text(name, value))
    if isinstance(value, dict):
        answer = value.get("answer")
        return LocalityProbe(check_text(f"{name}.prompt", value.get("prompt")),
                             None if answer is None else check_text(f"{name}.answer", answer).strip())
    if isinstance(value, (tuple, list)) and len(value) in (1, 2):
        answer = value[1] if len(value) == 2 else None
        return LocalityProbe(check_text(f"{name}.prompt", value[0]),
                             None if answer is None else check_text(f"{name}.answer", answer).strip())
    raise field_error(name, "must be a prompt, (prompt, answer) or {prompt, answer}", value)


def _portability(name: str, value: Any) -> PortabilityProbe:
    if isinstance(value, PortabilityProbe):
        return value
    if isinstance(value, dict):
        prompt, answer, aliases = value.get("prompt"), value.get("answer"), value.get("aliases", ())
    elif isinstance(value, (tuple, list)) and len(value) in (2, 3):
        prompt, answer = value[0], value[1]
        aliases = value[2] if len(value) == 3 else ()
    else:
        raise field_error(name, "must be (prompt, answer[, aliases]) or {prompt, answer}", value)
    aliases = tuple(check_text(f"{name}.aliases", a).strip() for a in _as_list(aliases))
    return PortabilityProbe(check_text(f"{name}.prompt", prompt),
                            check_text(f"{name}.answer", answer).strip(), aliases)


def split_completion(prompt: str, completion: str) -> tuple[str, str]:
    """Put the boundary between prompt and completion where the model would generate it.

    Trailing spaces of the prompt move into the completion (a model generates " Rome", not
    "Rome" after "of "), and a space is added before a completion that does not start with
    punctuation, unless the prompt ends in a newline.
    """
    head = prompt.rstrip(" \t")
    body = completion.strip()
    if not body:
        return head, body
    if head.endswith(("\n", "(", "[", "\"", "'")) or body[0] in _NO_SPACE_BEFORE:
        return head, body
    return head, " " + body


def encode_completion(
    tokenizer, prompt: str, completion: str, *, append_eos: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids of `prompt` (as it is fed at inference) and of `completion` after it.

    The pair is tokenized jointly, and the prompt's own ids are checked to be a prefix, so
    that the completion ids are the ones the model would produce after exactly those prompt
    ids; where a tokenizer merges across the boundary, the completion is tokenized alone.
    """
    head, body = split_completion(prompt, completion)
    prompt_ids = tokenizer(head, add_special_tokens=True)["input_ids"]
    joint = tokenizer(head + body, add_special_tokens=True)["input_ids"]
    if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        target_ids = joint[len(prompt_ids):]
    else:
        target_ids = tokenizer(body, add_special_tokens=False)["input_ids"]
    if append_eos and tokenizer.eos_token_id is not None:
        target_ids = target_ids + [tokenizer.eos_token_id]
    return list(prompt_ids), list(target_ids)


def check_fits(request: EditRequest, tokenizer, max_positions: int | None) -> None:
    """Raise, naming the field, if the prompt + target is longer than the model's context."""
    if not max_positions:
        return
    p_ids, t_ids = encode_completion(tokenizer, request.prompt, request.target_new)
    if len(p_ids) + len(t_ids) > max_positions:
        raise field_error(
            "prompt",
            f"prompt + target_new is {len(p_ids) + len(t_ids)} tokens, longer than the "
            f"model's context of {max_positions}",
        )


def as_requests(requests: EditRequest | Sequence[EditRequest]) -> list[EditRequest]:
    """One request or a sequence of them, checked, as a list."""
    if isinstance(requests, EditRequest):
        return [requests]
    requests = list(requests)
    if not requests:
        raise KnowpatchError("requests: at least one EditRequest is needed")
    for i, r in enumerate(requests):
        if not isinstance(r, EditRequest):
            raise KnowpatchError(f"requests[{i}]: expected an EditRequest, got {type(r).__name__}")
    return requests


def check_all_fit(requests: list[EditRequest], tokenizer, max_positions: int | None) -> None:
    """`check_fits` for each request; with several, the error says which."""
    for i, req in enumerate(requests):
        try:
            check_fits(req, tokenizer, max_positions)
        except KnowpatchError as exc:
            if len(requests) == 1:
                raise
            raise KnowpatchError(f"request {i}: {exc}") from None
