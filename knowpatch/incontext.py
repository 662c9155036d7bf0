"""Facts stated in the prompt: how in-context patches (and hybrid ones, an adapter with its
statement) act. When a query fires such a patch, its statement goes before a completion
prompt, or into the system message of a chat question.

    statements = editor.statements(patches)     # among the patches a block uses
    statements.prompts(["The Eiffel Tower is located in the city of"])
    statements.systems(["Where is the Eiffel Tower?"])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from .requests import EditRequest, LocalityProbe, PortabilityProbe

# prompts -> for each, the ids of the patches (with a statement) it fires
Decide = Callable[[list[str]], list[list[str]]]


class Statements:
    """The statements of some patches, and the router's decision of which a query fires."""

    def __init__(self, decide: Decide, statements: dict[str, str]):
        self.decide, self.statements = decide, statements

    def __bool__(self) -> bool:
        return bool(self.statements)

    def stated(self, texts: Sequence[str]) -> list[str]:
        """For each text, the statements of the patches it fires ("" for none)."""
        if not self.statements or not texts:
            return [""] * len(texts)
        return [" ".join(self.statements[p] for p in fired) for fired in self.decide(list(texts))]

    def prompts(self, texts: Sequence[str]) -> list[str]:
        """Completion prompts with the facts they fire stated first."""
        return [f"{s} {t}" if s else t for s, t in zip(self.stated(texts), texts)]

    def systems(self, questions: Sequence[str]) -> list[str | None]:
        """For each chat question, the system message stating the facts it fires (None:
        none fired, the template's own)."""
        return [s or None for s in self.stated(questions)]

    def requests(self, requests: list[EditRequest]) -> list[EditRequest]:
        """`requests` with every completion prompt (edit, paraphrase, locality, portability)
        stated to as a query would be; their questions stay (see `systems`)."""
        if not self.statements:
            return requests
        texts = [t for r in requests for t in _prompts(r)]
        stated = iter(self.prompts(texts))
        out = []
        for r in requests:
            prompt = next(stated)
            rephrase = [next(stated) for _ in r.rephrase_prompts]
            locality = [LocalityProbe(next(stated), p.answer) for p in r.locality]
            portability = [PortabilityProbe(next(stated), p.answer, p.aliases) for p in r.portability]
            out.append(replace(r, prompt=prompt, rephrase_prompts=rephrase, locality=locality,
                               portability=portability))
        return out


    def prepare(self, requests: list[EditRequest]
                ) -> tuple[list[EditRequest], dict[str, str | None] | None]:
        """What `evaluate` takes: the requests stated to, and each question's system message."""
        if not self.statements:
            return requests, None
        questions = list(dict.fromkeys(q for r in requests
                                       for q in (*r.questions, *r.locality_questions)))
        return self.requests(requests), dict(zip(questions, self.systems(questions)))


def _prompts(r: EditRequest) -> list[str]:
    return [r.prompt, *r.rephrase_prompts, *(p.prompt for p in r.locality),
            *(p.prompt for p in r.portability)]


NONE = Statements(lambda texts: [[] for _ in texts], {})
