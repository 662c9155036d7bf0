"""The one training loop every editing method runs on.

A method supplies `step(model) -> StepOutput`: the loss of one batch, and whether the edit
is already learnt judged from that same forward pass (so the early-stop check costs no
extra forward). The loop stops as soon as it is learnt: the step budget is a ceiling, not
a schedule. It is built on `accelerate.Accelerator`, so the same code runs on one CPU and
under `accelerate launch` on several processes.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    loss: torch.Tensor
    learnt: bool
    info: dict[str, float] = field(default_factory=dict)


@dataclass
class LoopResult:
    steps: int
    learnt: bool
    seconds: float
    losses: list[float]
    extra: dict = field(default_factory=dict)
    """What a method records in the patch manifest besides (e.g. DPO's rejected answers)."""
    deltas: dict[str, torch.Tensor] | None = None
    """Weight-delta methods (full SFT, FT-M, full DPO): the change of every trained tensor."""


@dataclass
class LoopSettings:
    lr: float
    max_steps: int
    weight_decay: float = 0.0
    max_seconds: float | None = None
    grad_clip: float | None = 1.0
    progress: bool = True
    description: str = "editing"
    after_step: Callable[[], None] | None = None
    """Called after each optimizer update (e.g. to project weights back into a norm bound)."""


# Where an edit's time goes: `clocked()` collects the seconds of every `phase(name)` block run
# inside it (in this thread or task), by name. Phases do not nest; outside `clocked()` a
# phase costs one context-variable read.
_CLOCK: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "knowpatch_clock", default=None)


@contextlib.contextmanager
def clocked() -> Iterator[dict[str, float]]:
    """A dict that fills with the seconds spent in each `phase` run inside this block."""
    seconds: dict[str, float] = {}
    token = _CLOCK.set(seconds)
    try:
        yield seconds
    finally:
        _CLOCK.reset(token)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the block's wall time under `name` in the enclosing `clocked()`, if any."""
    seconds = _CLOCK.get()
    if seconds is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


def run_loop(
    model: torch.nn.Module,
    params: Iterable[torch.nn.Parameter],
    step: Callable[[torch.nn.Module], StepOutput],
    settings: LoopSettings,
    accelerator: Accelerator | None = None,
) -> LoopResult:
    """Optimise `params` with AdamW until `step` reports the edit learnt or a limit is hit.

    At most `max_steps` optimizer updates; the forward after the last update is still run
    to tell whether the edit was learnt.
    """
    accelerator = accelerator or Accelerator(cpu=not _on_gpu(model), device_placement=False)
    params = [p for p in params if p.requires_grad]
    if not params:
        raise RuntimeError("nothing to train: no parameter requires grad")
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    plain = _plain(accelerator)
    prepared, optimizer = _prepare(accelerator, model, optimizer, plain)
    losses: list[float] = []
    start = time.perf_counter()
    learnt = False
    steps = 0
    # The model stays in eval mode: dropout would make the early-stop check (taken from the
    # training forward itself) disagree with what the model does at inference.
    progress = _progress(settings, accelerator)
    try:
        task = progress.add_task(settings.description, total=settings.max_steps) if progress else None
        while True:
            with phase("forward"):  # the step's forward, loss and its learnt check
                out = step(prepared)
            loss_value, learnt = _agree(accelerator, out.loss.detach(), out.learnt)
            losses.append(loss_value)
            if progress:
                progress.update(task, completed=steps, description=(
                    f"{settings.description} loss {losses[-1]:.3f}"))
            if learnt or steps >= settings.max_steps:
                break
            if settings.max_seconds and time.perf_counter() - start > settings.max_seconds:
                log.warning("stopped at the time limit of %.0f s after %d steps",
                            settings.max_seconds, steps)
                break
            _update(accelerator, optimizer, params, out.loss, settings)
            steps += 1
    finally:
        if progress:
            progress.stop()
        optimizer.zero_grad(set_to_none=True)
        # free_memory() ends in gc.collect(), a full collection whose cost grows with every
        # live object, every loaded adapter's included; one plain process needs none of it
        # (the accelerator and its references die with this call)
        if not plain:
            accelerator.free_memory()
    return LoopResult(steps=steps, learnt=learnt, seconds=time.perf_counter() - start,
                      losses=losses)


def _update(accelerator: Accelerator, optimizer, params, loss: torch.Tensor,
            settings: LoopSettings) -> None:
    """One optimizer update from `loss` (clipped), then the method's `after_step`."""
    with phase("backward"):
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
    with phase("optimizer"):
        if settings.grad_clip:
            accelerator.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step()
        if settings.after_step is not None:
            settings.after_step()


def _prepare(accelerator: Accelerator, model, optimizer, plain: bool):
    """The model and optimizer as the accelerator runs them. One plain process (no mixed
    precision, nothing distributed): preparing the model does nothing for it but
    `verify_device_map`, a walk over every module — every loaded adapter's too, so its cost
    grows with the store. Skipped there."""
    if plain:
        return model, accelerator.prepare(optimizer)
    return accelerator.prepare(model, optimizer)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed launch (accelerate / torchrun)."""
    return int(os.environ.get("RANK", "0")) == 0


def _agree(accelerator: Accelerator, loss: torch.Tensor, learnt: bool) -> tuple[float, bool]:
    """The mean loss over processes, and learnt only when every process's share is learnt
    (so that all processes stop at the same step)."""
    if accelerator.num_processes == 1:
        return float(loss), bool(learnt)
    both = torch.stack([loss.float().reshape(()), torch.tensor(float(not learnt),
                                                                device=loss.device)])
    total = accelerator.reduce(both, reduction="sum")
    return float(total[0]) / accelerator.num_processes, bool(total[1] == 0)


def _plain(accelerator: Accelerator) -> bool:
    """One process, no mixed precision, no distributed engine."""
    from accelerate.utils import DistributedType

    return (accelerator.num_processes == 1 and accelerator.mixed_precision == "no"
            and accelerator.distributed_type == DistributedType.NO)


def _on_gpu(model: torch.nn.Module) -> bool:
    try:
        return next(model.parameters()).device.type != "cpu"
    except StopIteration:
        return False


def _progress(settings: LoopSettings, accelerator: Accelerator):
    if not settings.progress or not accelerator.is_main_process:
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("steps (ceiling)"), TimeElapsedColumn(), TextColumn("≤"),
        TimeRemainingColumn(),
        console=Console(stderr=True), transient=True,
    )
    progress.start()
    return progress
