"""Routed forwards: each batch a model runs is routed row by row, and the adapter bank runs
each fired adapter on its own rows. The glue between the router (the decision) and the
adapter bank (the execution), for the duration of one block."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from .adapters import AdapterBank, RowPlan
from .router import Route


class RoutedForwards:
    """For one block of forwards: before each forward of `model`, a new batch (token ids,
    attention mask) is routed by `decide(rows, columns, width)` and runs with the adapter
    bank's plan for it; a cached generation step runs that batch's plan for its step (see
    `RowPlan.at_step`). The bank's hooks go when the forward ends, the model's when the
    block does."""

    def __init__(self, model, bank: AdapterBank, decide: Callable[..., RowPlan]):
        self.model, self.bank, self.decide = model, bank, decide
        self.decided = RowPlan()  # the plan of the last routed batch
        self.step = 0  # cached generation steps since that batch
        self.routing = False  # the router's own forward of the base model is running
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
            plan = self.decided.at_step(self.step)
        else:
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
            self.decided, self.step = plan, 0
        self.running.enter_context(self.bank.running(plan))

    def after(self, *_args: Any) -> None:
        if not self.routing:
            self.running.close()


def row_plan(routes: list[Route], keyed: list[str], gated: dict[str, str], step_limits: dict[str, int],
             columns: list[torch.Tensor] | None, width: int, device) -> RowPlan:
    """The rows each fired patch runs on; for gated patches (with `columns`), a mask that is
    1 at the tokens where the router found the subject (gate subject) or at the query's
    last token (gate last); the cached generation steps that patches with a limit act in."""
    rows = {}
    for p in keyed:
        fired = [i for i, r in enumerate(routes) if p in r.fired]
        if fired:
            rows[p] = torch.tensor(fired, dtype=torch.long, device=device)
    gates = {}
    for p in rows if columns is not None else ():
        if p in gated:
            gate = torch.zeros((len(rows[p]), width), device=device)
            for k, r in enumerate(rows[p].tolist()):
                at = (routes[r].positions.get(p, []) if gated[p] == "subject"
                      else [len(columns[r]) - 1])
                if at:
                    gate[k, columns[r][at].to(device)] = 1.0
            gates[p] = gate
    return RowPlan(rows, gates, {p: step_limits[p] for p in rows if p in step_limits})
