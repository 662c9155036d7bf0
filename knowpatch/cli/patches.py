"""`knowpatch patches …`: list, show, route, merge and remove saved patches."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ..models import load_model
from ..patches import merge_into_base
from .common import (
    DeviceOpt,
    DtypeOpt,
    ModelArgs,
    ModelOpt,
    StoreOpt,
    err,
    fail,
    open_editor,
    open_store,
    out,
    patches_app,
    run_body,
    setup_logging,
)


@patches_app.command("list")
def patches_list(store: Path | None = StoreOpt,
                 as_json: bool = typer.Option(False, "--json")) -> None:
    """List the patches in the store, oldest first."""
    items = open_store(store).list()
    if as_json:
        print(json.dumps(items))
        return
    if not items:
        out.print(f"no patches in {open_store(store).root}")
        return
    table = Table()
    for col in ("id", "method", "edit", "score", "rel", "gen", "loc", "steps", "s"):
        table.add_column(col)
    for m in items:
        reqs = m.get("requests") or [{}]
        first = f"{reqs[0].get('prompt', '?')} → {reqs[0].get('target_new', '?')}"
        if len(reqs) > 1:
            first += f" (+{len(reqs) - 1})"
        s = m.get("scores") or {}
        table.add_row(m["id"], m.get("method", "?"), first,
                      *("–" if s.get(k) is None else f"{s[k]:.0f}" for k in ("score", "rel", "gen", "loc")),
                      str(m.get("steps", "–")), str(m.get("seconds", "–")))
    out.print(table)


@patches_app.command("show")
def patches_show(ref: str = typer.Argument(..., help="Patch id or folder."),
                 store: Path | None = StoreOpt) -> None:
    """Print a patch's manifest (patch.json)."""
    def body():
        p = open_store(store).load(ref)
        print(json.dumps(p.manifest, indent=2, ensure_ascii=False))
    run_body(body)


@patches_app.command("route")
def patches_route(
    prompts: list[str] = typer.Argument(..., help="Queries to route."),
    store: Path | None = StoreOpt, model: str = ModelOpt, device: str = DeviceOpt,
    dtype: str | None = DtypeOpt, top: int = typer.Option(3, help="Best-scoring patches shown "
                                                          "per query, fired or not."),
    as_json: bool = typer.Option(False, "--json"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Show which patches of the store each query would activate, and why: every patch's
    router score (min over its subject tokens of the best cosine match in the query) against
    its threshold. Patches without keys act on every query; superseded ones never fire."""
    setup_logging(verbose)

    def body():
        editor = open_editor(ModelArgs(model, device, dtype, store))
        report = editor.explain(prompts, top)
        result, superseded, unkeyed = report["routes"], report["superseded"], report["always_active"]
        if as_json:
            print(json.dumps(report))
            return
        out.print(f"{report['patches']} patches for this model in {editor.store_root} "
                  f"({len(unkeyed)} without keys, active for every query; "
                  f"{len(superseded)} superseded)")
        for r in result:
            fired = ", ".join(r["fired"]) or "none: the base model answers"
            out.print(f"\n[bold]{escape(r['prompt'])}[/] → {escape(fired)}")
            for sc in r["scores"]:
                mark = "fires" if sc["score"] >= sc["threshold"] else "no"
                out.print(f"  {sc['score']:.3f} (≥ {sc['threshold']:.2f}? {mark})  {sc['patch']}  "
                          f"{escape(sc['edit'])}", highlight=False)
    run_body(body)


@patches_app.command("merge")
def patches_merge(
    ref: str = typer.Argument(..., help="Patch id or folder."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the merged HF model."),
    store: Path | None = StoreOpt, model: str = ModelOpt, device: str = DeviceOpt,
    dtype: str | None = DtypeOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
) -> None:
    """Write a standalone HF model folder with the patch baked into the base weights
    (loadable with AutoModelForCausalLM.from_pretrained). Routing does not survive a merge:
    the merged model applies the edit to every query."""
    def body():
        patch = open_store(store).load(ref)
        if out_dir.exists() and not overwrite:
            fail(f"out: {out_dir} already exists (--overwrite to replace it)")
        with err.status(f"loading {model}…"):
            base, tokenizer = load_model(model, device=device, dtype=dtype)
        folder = merge_into_base(patch, base, tokenizer, out_dir, overwrite=overwrite)
        out.print(f"merged {patch.id} ({patch.kind}) into {folder}")
    run_body(body)


@patches_app.command("rm")
def patches_rm(ref: list[str] = typer.Argument(..., help="Patch ids or folders."),
               store: Path | None = StoreOpt) -> None:
    """Delete patches from disk."""
    def body():
        st = open_store(store)
        folders = [st.resolve(r) for r in ref]  # resolve all first: nothing removed on error
        for f in folders:
            st.remove(f)
            out.print(f"removed {f}")
    run_body(body)

