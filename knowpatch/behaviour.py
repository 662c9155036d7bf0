"""Behaviour edits from words: a behaviour described in an instruction ("Answer in one short
sentence.") becomes a DPO patch that makes the model act so *without* the instruction —
context distillation, judged by a program (`judges`) on what the model writes.

For each training prompt (a user question): chosen answers are the base model's own,
sampled with the instruction in the system message and kept where the judge passes them;
rejected answers are its answers without the instruction (greedy first, then sampled) that
the judge fails. A prompt with no passing chosen answer, or whose answers already pass
without the instruction, gives no pair and is reported, never dropped in silence. Answers
are written to their end (EOS) under a cap; one the cap cut is marked truncated (a length
judge fails it), and an answer that ended is trained with its EOS, so that the patch also
learns where to stop.

    pairs, report = behaviour_pairs(editor, "Answer in one short sentence.", prompts,
                                    parse_judges("max-words:20"))
    patch, _ = editor.edit_preferences(pairs, heldout=0, prefixes=0)
    measured = judge_answers(editor, held_out_prompts, judge, patches=[patch])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .decoding import continuations, prompt_ids
from .errors import KnowpatchError
from .fluency import mean_fluency
from .judges import Judges
from .questions import chat_prompt
from .requests import EditRequest, encode_completion

ANSWER_TOKENS = 96
"""The cap on an answer's new tokens (an answer cut there is truncated)."""


@dataclass
class Answer:
    text: str
    truncated: bool  # the cap ended it, not EOS


def answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int = ANSWER_TOKENS,
            samples: int = 1, temperature: float = 0.0, seed: int = 0,
            batch: int = 16, done: Callable[[int], None] | None = None) -> list[list[Answer]]:
    """`samples` answers to each of `prompts` (greedy at temperature 0), each to its EOS
    or the cap (a prompt near the end of the model's context: a shorter cap); `done(n)`
    after each batch of n prompts."""
    eos = tokenizer.eos_token_id
    made = continuations(model, tokenizer, prompts, max_new_tokens, samples=samples,
                         temperature=temperature, seed=seed, batch_size=batch, shorten=True,
                         done=done)
    return [[Answer(tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True).strip(),
                    eos not in ids) for ids in rows] for rows in made]


@contextlib.contextmanager
def progress_bar(description: str, total: int, show: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr while a block runs (`show`); yields `advance(n)`."""
    if not show:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def check_prompts(prompts: list[str], field: str = "prompts") -> list[str]:
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise KnowpatchError(f"{field}: no prompts (one per line)")
    return prompts


def behaviour_pairs(editor, behaviour: str, prompts: list[str], judge: Judges, *,
                    samples: int = 4, temperature: float = 0.8, seed: int = 0,
                    max_new_tokens: int = ANSWER_TOKENS) -> tuple[list[EditRequest], dict]:
    """Preference pairs that teach `behaviour` without the instruction (see the module), and
    a report: pairs made, prompts without a pair and why, and pass rates of the answers."""
    if not behaviour or not behaviour.strip():
        raise KnowpatchError("behaviour: empty (describe the behaviour, e.g. \"Answer in one "
                             "short sentence.\")")
    prompts = check_prompts(prompts)
    tok = editor.tokenizer
    plain = [chat_prompt(tok, q) for q in prompts]
    told = [chat_prompt(tok, q, behaviour.strip()) for q in prompts]
    context = editor.context_length or 1 << 30  # a pair (prompt, answer, EOS) must fit it
    longest = max(len(prompt_ids(tok, p)) for p in plain + told)
    max_new_tokens = min(max_new_tokens, context - longest - 1)
    if max_new_tokens < 1:
        raise KnowpatchError(f"prompts: a prompt of {longest} tokens fills the model's context "
                             f"of {context}")
    with editor.using([]) as base, progress_bar("answers with and without the instruction",
                                                3 * len(prompts), editor.shows_progress) as done:
        with_it = answers(base, tok, told, samples=samples, temperature=temperature, seed=seed,
                          max_new_tokens=max_new_tokens, done=done)
        greedy_plain = answers(base, tok, plain, max_new_tokens=max_new_tokens, done=done)
        sampled_plain = answers(base, tok, plain, samples=2, temperature=temperature,
                                seed=seed + 1, max_new_tokens=max_new_tokens, done=done)
    eos = tok.eos_token or ""
    pairs, skipped = [], {}
    for q, prompt, good, bad in zip(prompts, plain, with_it,
                                    [g + s for g, s in zip(greedy_plain, sampled_plain)]):
        passing = [a for a in good if judge(a.text, a.truncated)]
        failing = [a for a in bad if not judge(a.text, a.truncated)]
        fits = [a for a in passing + failing if _fits(tok, prompt, _ended(a, eos), context)]
        chosen = next((a for a in passing if a in fits), None)
        rejected = next((a for a in failing if a in fits), None)
        if not passing:
            skipped[q] = "no answer given the instruction passed the judge"
        elif not failing:
            skipped[q] = "every answer without the instruction already passes"
        elif chosen is None or rejected is None:
            skipped[q] = "its answers do not fit the model's context"
        else:
            pairs.append(EditRequest(prompt=prompt, target_new=_ended(chosen, eos),
                                     rejected=_ended(rejected, eos)))
    report = {"behaviour": behaviour.strip(), "judge": judge.spec, "prompts": len(prompts),
              "pairs": len(pairs), "skipped": skipped,
              "pass_with_instruction": _rate([a for row in with_it for a in row], judge),
              "pass_without": _rate([row[0] for row in greedy_plain], judge)}
    if not pairs:
        raise KnowpatchError(f"prompts: no preference pair could be made ({len(skipped)} "
                             f"prompts: {next(iter(skipped.values()))})")
    return pairs, report


def _fits(tokenizer, prompt: str, answer: str, context: int) -> bool:
    """Prompt and answer, tokenized as training reads them, fit the context (an answer's
    text can take more tokens than were generated: decoding does not round-trip)."""
    head, body = encode_completion(tokenizer, prompt, answer)
    return len(head) + len(body) <= context


def _ended(answer: Answer, eos: str) -> str:
    """The answer as a training target: with its EOS where it ended (after the chat
    template's "assistant\n" no space goes before it: `requests.split_completion`)."""
    return answer.text + eos if not answer.truncated else answer.text


def _rate(found: list[Answer], judge: Judges) -> float:
    return round(100.0 * sum(judge(a.text, a.truncated) for a in found) / max(1, len(found)), 2)


def judge_answers(editor, prompts: list[str], judge: Judges, *, patches=None,
                  max_new_tokens: int = ANSWER_TOKENS) -> dict:
    """Greedy chat answers to `prompts` with `patches` active (None: those applied; []: the
    base model): the judge's pass rate (%), their fluency, the answers."""
    tok = editor.tokenizer
    with editor.using(patches) as model, progress_bar(
            "judged answers", len(prompts), editor.shows_progress) as done:
        found = [row[0] for row in answers(model, tok, [chat_prompt(tok, q) for q in prompts],
                                          max_new_tokens=max_new_tokens, done=done)]
    fluency = mean_fluency([a.text for a in found])
    return {"pass_rate": _rate(found, judge),
            "fluency": None if fluency is None else round(fluency, 4),
            "truncated": sum(a.truncated for a in found), "answers": [a.text for a in found]}


def unchanged(before: list[str], after: list[str], tokenizer, tokens: int = 12) -> float:
    """The share (%) of answers whose first `tokens` tokens are the same before and after."""
    def head(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    same = [head(a) == head(b) for a, b in zip(before, after)]
    return round(100.0 * sum(same) / max(1, len(same)), 2)
