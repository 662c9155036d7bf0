"""One choice's text as its tokens come, for any engine: sent out in pieces that never end
inside a stop string or a UTF-8 character, cut at a stop string, ended at EOS or at the
choice's own token budget."""

from __future__ import annotations

from collections.abc import Callable

from .engine import Generation


class RowText:
    """The text of choice `choice` of `gen`: `push` each new token, `finish` at the end."""

    def __init__(self, tokenizer, gen: Generation, choice: int):
        self.tokenizer, self.gen, self.choice = tokenizer, gen, choice
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already sent
        self.done = False

    def push(self, token: int, fired: Callable[[], list[str]]) -> bool:
        """Take the next generated token (EOS ends the choice); whether the choice is done."""
        if self.done:
            return True
        if token == self.tokenizer.eos_token_id:
            self.finish("stop", fired())
            return True
        self.ids.append(token)
        text = self.text()
        stops = self.gen.stop
        cut = min((i for i in (text.find(s, max(0, self.sent - len(s))) for s in stops)
                   if i >= 0), default=-1)
        if cut >= 0:
            self.finish("stop", fired(), text[:cut])
        elif len(self.ids) >= self.gen.max_tokens:
            self.finish("length", fired(), text)
        else:
            safe = len(text) - held_back(text, stops)
            if safe > self.sent:
                self.gen.emit(self.choice, text[self.sent:safe], None, fired(), len(self.ids))
                self.sent = safe
        return self.done

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def finish(self, reason: str, fired: list[str], text: str | None = None) -> None:
        """End the choice with `reason` (its text so far, or `text`), unless it has ended."""
        if self.done:
            return
        text = self.text() if text is None else text
        self.gen.emit(self.choice, text[self.sent:], reason, fired, len(self.ids))
        self.sent = len(text)
        self.done = True


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` not to send yet: the start of a stop string, or an
    incomplete UTF-8 character."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold
