"""`knowpatch demo`: one edit on the embedded model, shown as a user would see it."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..requests import EditRequest
from .common import (
    DeviceOpt,
    DtypeOpt,
    ModelArgs,
    ModelOpt,
    StoreOpt,
    app,
    err,
    open_editor,
    out,
    run_body,
    scores_table,
    setup_logging,
)

DEMO_PROMPT = "The Eiffel Tower is located in the city of"
DEMO_PARAPHRASE = "Where is the Eiffel Tower? It stands in the city of"
DEMO_NEIGHBORS = ["The Louvre is located in the city of", "The capital of Germany is"]
# the edit prompt (the answer, then what the model writes after it) and open prompts about
# the subject (the answer need not come first: the text may keep the old facts)
DEMO_FREE_TEXT = [DEMO_PROMPT, "The Eiffel Tower is", "Visitors to the Eiffel Tower can"]
DEMO_FREE_TOKENS = 40
# the fact asked in chat, as people use an instruct model: the first question is trained on
# (in the model's own words), the others are not; the Louvre must keep its answer
DEMO_QUESTIONS = ["In which city is the Eiffel Tower located?", "Where is the Eiffel Tower?"]
DEMO_CHAT = ["Where is the Eiffel Tower?", "Tell me about the Eiffel Tower.", "Where is the Louvre?"]


@app.command()
def demo(
    model: str = ModelOpt, device: str = DeviceOpt, dtype: str | None = DtypeOpt,
    store: Path | None = StoreOpt,
    target: str = typer.Option("Rome", help="The new answer to teach."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Edit "The Eiffel Tower is located in the city of" → Rome on the embedded model and
    show what changed: the fact, a paraphrase, two neighbours that must not change, free
    text about the subject, and the fact asked in chat."""
    setup_logging(verbose)
    run_body(_demo, ModelArgs(model, device, dtype, store), target)


def _demo(args: ModelArgs, target: str) -> None:
    editor = open_editor(args)
    req = EditRequest(DEMO_PROMPT, target, ground_truth="Paris", subject="Eiffel Tower",
                      rephrase_prompts=[DEMO_PARAPHRASE], locality=DEMO_NEIGHBORS,
                      questions=DEMO_QUESTIONS, locality_questions=[DEMO_CHAT[-1]])
    err.print(f"editing [bold]{DEMO_PROMPT}[/] → [bold]{target}[/] with LoRA SFT…")
    patch = editor.edit(req)

    # The continuations shown are the ones the scores were computed from (the same
    # batches, the same token budgets: len(target)+2 for the edit and its paraphrase,
    # 5 tokens for neighbours, compared token for token).
    before, after = (patch.manifest["samples"][k][0] for k in ("before", "after"))
    rows = [(DEMO_PROMPT, "the edit", before["rel"], after["rel"]),
            (DEMO_PARAPHRASE, "paraphrase", before["gen"][0], after["gen"][0])]
    rows += [(p, "neighbour", b, a) for p, b, a in zip(DEMO_NEIGHBORS, before["loc"], after["loc"])]
    table = Table(title=f"{editor.model_name}: greedy answers before and after the edit",
                  title_justify="left")
    for col in ("prompt", "kind", "before", "after", ""):
        table.add_column(col)
    for prompt, kind, b, a in rows:
        if kind == "neighbour":
            mark = "[red]spilled[/]" if a != b else "[green]unchanged[/]"
        else:
            mark = "[green]edited[/]" if a.lstrip().startswith(target) else "[red]not edited[/]"
        table.add_row(prompt, kind, repr(b), repr(a), mark)
    out.print(table)
    out.print(scores_table([("unedited", patch.baseline), ("LoRA SFT", patch.scores)]))
    # free text about the subject: an edit must not make the model repeat its new answer
    free = Table(title=f"free text about the subject ({DEMO_FREE_TOKENS} greedy tokens)",
                 title_justify="left")
    for col in ("prompt", "model", "text"):
        free.add_column(col)
    for prompt in DEMO_FREE_TEXT:
        for label, patches in (("unedited", []), ("edited", [patch])):
            text = editor.generate(prompt, patches=patches, max_new_tokens=DEMO_FREE_TOKENS)[0]
            free.add_row(prompt, label, repr(text))
    out.print(free)
    chat = Table(title="asked in chat (the model's chat template, greedy replies)",
                 title_justify="left")
    for col in ("question", "model", "reply"):
        chat.add_column(col)
    for label, patches in (("unedited", []), ("edited", [patch])):
        for question, reply in zip(DEMO_CHAT, editor.chat(DEMO_CHAT, patches=patches)):
            chat.add_row(question, label, repr(reply))
    out.print(chat)
    out.print(f"edit: {patch.seconds:.2f} s, {patch.steps} optimizer steps, "
              f"{patch.manifest['trainable_params']:,} trainable parameters "
              f"({100 * patch.manifest['trainable_fraction']:.2f} % of the model), "
              f"peak memory {patch.manifest['peak_rss_mb']:.0f} MB")
    out.print(f"patch saved to {patch.path}")
    out.print(f"use it: knowpatch generate -p \"{DEMO_PROMPT}\" --patch {patch.id}")
    out.print(f"delete it: knowpatch patches rm {patch.id}")

