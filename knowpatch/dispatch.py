"""Routed forwards: each batch a model runs is routed row by row, and the adapter bank runs
each fired adapter on its own rows. The glue between the router (the decision) and the
adapter bank (the execution), for the duration of one block."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from .adapters import AdapterBank, RowPlan
from .chat import names
from .router import Route


class RoutedForwards:
    """For one block of forwards: before each forward of `model`, a new batch (token ids,
    attention mask) is routed by `decide(rows, columns, width)` and runs with the adapter
    bank's plan for it; a cached generation step runs that batch's plan for its step (see
    `RowPlan.at_step`), and first, for the rows a handoff adapter has just left, replaces
    their cache with the base weights' states of the text so far (`RowPlan.handed_off`).
    The bank's hooks go when the forward ends, the model's when the block does."""

    def __init__(self, model, bank: AdapterBank, decide: Callable[..., RowPlan]):
        self.model, self.bank, self.decide = model, bank, decide
        self.decided = RowPlan()  # the plan of the last routed batch
        self.step = 0  # cached generation steps since that batch
        self.routing = False  # the router's own forward of the base model is running
        self.inputs: list[tuple[torch.Tensor, Any]] = []  # (ids, position ids) fed since routing
        self.released: dict[str, set[int]] = {}  # per `until` adapter: the rows it is done with
        self.running = contextlib.ExitStack()

    def __enter__(self) -> RoutedForwards:
        model = self.model
        self.hooks = [model.register_forward_pre_hook(self.before, with_kwargs=True),
                      model.register_forward_hook(self.after)]
        return self

    def __exit__(self, *_exc: Any) -> None:
        for hook in self.hooks:
            hook.remove()
        self.running.close()

    def before(self, _module, args, kwargs) -> None:
        if self.routing:
            return
        self.running.close()
        ids = kwargs.get("input_ids", args[0] if args else None)
        past = kwargs.get("past_key_values", kwargs.get("cache"))  # the name varies by version
        if ids is None or (past is not None and past.get_seq_length() > 0):
            self.step += 1
            self.inputs.append((ids, kwargs.get("position_ids")))
            fresh = {}
            if self.decided.until and ids is not None:  # adapters whose answer has come
                generated = torch.cat([i for i, _ in self.inputs[1:]], dim=1)
                fresh = self.decided.released(generated, self.released)
            plan = self.decided.at_step(self.step, self.released)
            handed = self.decided.handed_off(self.step, fresh, self.released)
            if handed and ids is not None:
                self.reread(handed, kwargs.get("attention_mask"), past)
        else:
            self.inputs = [(ids, kwargs.get("position_ids"))]
            mask = kwargs.get("attention_mask")
            if mask is not None:
                mask = mask[:, -ids.shape[1]:]
            columns = [(mask[r].nonzero().squeeze(-1) if mask is not None else
                        torch.arange(ids.shape[1], device=ids.device)) for r in range(ids.shape[0])]
            rows = [ids[r][c].tolist() for r, c in enumerate(columns)]
            self.routing = True
            try:
                plan = self.decide(rows, columns, ids.shape[1])
            finally:
                self.routing = False
            self.decided, self.step, self.released = plan, 0, {}
        self.running.enter_context(self.bank.running(plan))

    def reread(self, rows: list[int], mask: torch.Tensor | None, past) -> None:
        """Replace `rows`' cached states with those the base weights (routed adapters off)
        give the tokens fed so far: from here on these rows are written by the base model
        reading the query and its edited answer, not the edited states of the query (which
        would keep pulling the text back to the answer)."""
        ids = torch.cat([i for i, _ in self.inputs[:-1]], dim=1)
        index = torch.tensor(rows, device=ids.device)
        options: dict[str, Any] = {"use_cache": True, "logits_to_keep": 1}
        if mask is not None:
            options["attention_mask"] = mask[index, :ids.shape[1]]
        positions = [p for _, p in self.inputs[:-1]]
        if all(p is not None for p in positions):
            at = torch.cat(positions, dim=-1)[..., :ids.shape[1]]
            options["position_ids"] = at[index] if at.shape[0] == ids.shape[0] else at
        self.routing = True  # no routing, no routed adapter: the base weights
        try:
            out = self.model(input_ids=ids[index], **options)
            # transformers ≥ 5.2x names it `cache` (reading `past_key_values` warns there)
            fresh = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        finally:
            self.routing = False
        for old, new in zip(past.layers, fresh.layers):
            length = old.keys.shape[-2]
            old.keys[index] = new.keys[..., -length:, :].to(old.keys.dtype)
            old.values[index] = new.values[..., -length:, :].to(old.values.dtype)

    def after(self, *_args: Any) -> None:
        if not self.routing:
            self.running.close()


class Placement:
    """Where each keyed patch's adapter acts in a routed query, by its gate: all (every
    position), subject (the tokens where the router found the subject, no generated token),
    answer (the query and the first generated tokens, as many as its answer has), handoff
    (as answer, then the base weights re-read the text so far and write on), reply (as
    handoff, but on a row until the text it generated names the patch's answer — a chat
    reply reaches the answer after some words — `reply_tokens` at most) or last (as answer,
    but of the query only its last token)."""

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer  # reads generated tokens for gate=reply
        self.gated: dict[str, str] = {}  # patch -> subject or last: prompt positions only
        self.step_limits: dict[str, int] = {}  # patch -> cached generation steps it acts in
        self.handoff: set[str] = set()
        self.until: dict[str, Callable[[list[int]], bool]] = {}  # patch -> its answer given?

    def set(self, patch_id: str, gate: str, answer_tokens: int | None,
            answers: Sequence[str] = (), reply_tokens: int | None = None) -> None:
        self.forget(patch_id)
        if gate in ("subject", "last"):
            self.gated[patch_id] = gate
        if gate == "subject":
            self.step_limits[patch_id] = 0
        elif gate == "reply" and answers and reply_tokens and self.tokenizer is not None:
            self.step_limits[patch_id] = reply_tokens - 1
            self.handoff.add(patch_id)
            self.until[patch_id] = partial(_names_any, self.tokenizer, tuple(answers))
        elif gate in ("answer", "handoff", "last", "reply") and answer_tokens:
            self.step_limits[patch_id] = answer_tokens - 1
            if gate in ("handoff", "reply"):
                self.handoff.add(patch_id)

    def forget(self, patch_id: str) -> None:
        self.gated.pop(patch_id, None)
        self.step_limits.pop(patch_id, None)
        self.handoff.discard(patch_id)
        self.until.pop(patch_id, None)

    def plan(self, routes: list[Route], keyed: list[str], columns: list[torch.Tensor] | None,
             width: int, device) -> RowPlan:
        """The rows each fired patch runs on; for gated patches (with `columns`), a mask
        that is 1 at the tokens where the router found the subject (gate subject) or at the
        query's last token (gate last); the cached generation steps that patches with a
        limit act in; the patches the base model takes over from."""
        fired: dict[str, list[int]] = {}  # from the routes: a pass over every keyed patch per
        for i, r in enumerate(routes):   # row grew with the store
            for p in r.fired:
                fired.setdefault(p, []).append(i)
        rows = {p: torch.tensor(fired[p], dtype=torch.long, device=device)
                for p in keyed if p in fired}
        gates = {}
        for p in rows if columns is not None else ():
            if p in self.gated:
                gate = torch.zeros((len(rows[p]), width), device=device)
                for k, r in enumerate(rows[p].tolist()):
                    at = (routes[r].positions.get(p, []) if self.gated[p] == "subject"
                          else [len(columns[r]) - 1])
                    if at:
                        gate[k, columns[r][at].to(device)] = 1.0
                gates[p] = gate
        return RowPlan(rows, gates, {p: self.step_limits[p] for p in rows if p in self.step_limits},
                       frozenset(p for p in rows if p in self.handoff),
                       until={p: self.until[p] for p in rows if p in self.until})


def _names_any(tokenizer, answers: tuple[str, ...], generated: list[int]) -> bool:
    """The text of `generated` names one of `answers` (whole words, case-insensitive)."""
    text = tokenizer.decode(generated, skip_special_tokens=True)
    return any(names(text, a) for a in answers)
