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
import functools
import logging
import os
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.weak import WeakIdKeyDictionary

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    loss: torch.Tensor
    learnt: bool
    info: dict[str, float] = field(default_factory=dict)
    accumulated: bool = False
    """The step ran its own backward passes (micro-batches, gradients summed): the loop
    only clips and steps."""


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
    autocast: torch.dtype | None = None
    """Run each step's forward under `torch.autocast` to this dtype (None: as the model is)."""


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
    cast = contextlib.ExitStack()  # the frozen weights' bf16 copies, put back at the end
    with phase("cast"):
        cast.enter_context(frozen_cast(model, settings.autocast))
    try:
        task = progress.add_task(settings.description, total=settings.max_steps) if progress else None
        while True:
            optimizer.zero_grad(set_to_none=True)
            with phase("forward"), autocast(model, settings.autocast):
                out = step(prepared)  # the step's forward, loss and its learnt check
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
            _update(accelerator, optimizer, params, out, settings)
            steps += 1
    finally:
        cast.close()
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


def _update(accelerator: Accelerator, optimizer, params, out: StepOutput,
            settings: LoopSettings) -> None:
    """One optimizer update from the step's loss (clipped), then the method's `after_step`."""
    if not out.accumulated:
        with phase("backward"):
            accelerator.backward(out.loss)
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


PRECISIONS = ("auto", "bf16", "fp32")


def training_dtype(model: torch.nn.Module, precision: str) -> torch.dtype | None:
    """The dtype a training forward autocasts to (None: none, the model's own dtype).

    `precision`: fp32 (none), bf16, or auto: bf16 where the hardware multiplies bf16
    natively (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX) and the model is in
    fp32, else none. Autocast runs the matrix products in bf16 and keeps the weights, the
    adapter's gradients and its optimizer state in the model's dtype: on such a CPU a step
    costs about two thirds of fp32's (docs/edit-latency.md). Inference is not affected.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    try:
        param = next(model.parameters())
    except StopIteration:
        return None
    if param.dtype != torch.float32:
        return None
    if param.device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if param.device.type == "cpu" and cpu_has_bf16() else None


def precision_name(dtype: torch.dtype | None) -> str:
    """What a manifest records for a `training_dtype` result: bf16 or fp32."""
    return "bf16" if dtype is not None else "fp32"


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16); read from
    /proc/cpuinfo (elsewhere: False, and auto precision stays fp32). torch itself reports
    only its vector ISA level, which AVX512 CPUs without bf16 instructions share."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def autocast(model: torch.nn.Module, dtype: torch.dtype | None):
    """`torch.autocast` on the model's device type to `dtype`; a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=dtype)


@contextlib.contextmanager
def frozen_cast(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """For a whole training run, the frozen linear weights of `model` as `dtype` copies.

    Autocast casts a weight that requires no grad again at every forward (its cast cache
    keeps only trainable leaves): on SmolLM2 that copy cost a fifth of a bf16 step. Cast
    once here instead, and put the originals back on exit. Left as they are: trainable
    weights and LoRA's own layers. An output layer tied to the input embeddings gets its
    own copy (the embeddings keep theirs, in the model's dtype) and is tied again on exit.
    Written by hand: autocast has no option to cache casts of frozen weights.

    The copies are kept between runs (`_cast_of`): casting them again at every edit was a
    sixth of a Gemma edit (its tied 262k-token output layer) and grew SmolLM2's edits too.
    They cost 2 bytes per frozen linear weight for as long as the model lives.
    """
    if dtype is None or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        yield  # distributed (FSDP shards its weights): autocast casts as it goes
        return
    swapped: list[tuple[torch.nn.Module, torch.nn.Parameter]] = []
    switched: list[Any] = []  # configs whose attention was switched from sdpa
    try:
        modules = list(_base_modules(model))
        for module in modules:
            weight = getattr(module, "weight", None)
            if (not isinstance(module, torch.nn.Linear) or weight is None
                    or weight.requires_grad or weight.dtype == dtype):
                continue
            swapped.append((module, weight))
            module.weight = _cast_of(weight, dtype)
        switched = _fp32_attention(model, modules)
        yield
    finally:
        for module, weight in swapped:
            module.weight = weight
        for config in switched:
            config._attn_implementation = "sdpa"


# a frozen weight -> (its version when cast, its cast copy); an entry goes with its weight
_CASTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _cast_of(weight: torch.nn.Parameter, dtype: torch.dtype) -> torch.nn.Parameter:
    """`weight` as a frozen `dtype` copy, made again only when the weight has changed since
    (torch counts in-place writes in `_version`: a weight delta applied or removed, a
    full-SFT restore) or a copy of another dtype is asked for."""
    kept = _CASTS.get(weight)
    if kept is not None and kept[0] == weight._version and kept[1].dtype == dtype:
        return kept[1]
    copy = torch.nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    _CASTS[weight] = (weight._version, copy)
    return copy


def _base_modules(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`module` and its submodules, not descending into LoRA's own (`lora_*`): with N
    adapters loaded each adapted layer holds N of them, and a full walk grew an edit's time
    with the store (0.98 s per edit over the first 100 of 1,000 sequential edits, 1.59 s over
    the last 100)."""
    yield module
    for name, child in module.named_children():
        if not name.startswith("lora_"):
            yield from _base_modules(child)


_FP32_SDPA = "knowpatch_sdpa_fp32"


def _fp32_attention(model: torch.nn.Module, modules: list[torch.nn.Module]) -> list[Any]:
    """Switch a CPU model's SDPA attention to one that runs in fp32 under bf16 autocast:
    torch's CPU flash kernel is ~3× slower in bf16 than in fp32 at an edit's sizes (its
    backward above all), and attention is a small share of the products. Returns the
    switched configs, to be set back to sdpa (none: nothing switched). Uses
    transformers' `AttentionInterface` (a registered implementation, chosen by name).

    The name is set on the configs of the model's own submodels, found in `modules` (the
    model's modules outside LoRA's layers, the walk the weight cast made):
    `set_attn_implementation` walks every module, and with N adapters loaded that walk grew
    each edit's time with the store (at 250 adapters, half of the 0.11 s the cast took,
    profiled on a 1,000-edit run)."""
    from transformers import PreTrainedModel

    hf = model.module if hasattr(model, "module") else model
    hf = hf.get_base_model() if hasattr(hf, "get_base_model") else hf
    if (attention_implementation(hf) != "sdpa" or not isinstance(hf, PreTrainedModel)
            or next(hf.parameters()).device.type != "cpu"):
        return []
    configs = {id(m.config): m.config for m in modules if isinstance(m, PreTrainedModel)}
    if any(getattr(c, k, None) is not None for c in configs.values() for k in c.sub_configs):
        return []  # a composite model (sub-configs): left as it is, attention runs in bf16
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_FP32_SDPA, _sdpa_in_fp32)
    AttentionMaskInterface.register(_FP32_SDPA, sdpa_mask)  # the masks SDPA takes
    switched = [c for c in configs.values() if c._attn_implementation == "sdpa"]
    for config in switched:
        config._attn_implementation = _FP32_SDPA
    return switched


def attention_implementation(model: torch.nn.Module) -> str | None:
    """The attention implementation a transformers model runs now (e.g. sdpa, eager)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def _sdpa_in_fp32(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention; under autocast, taken in fp32 (rotary embeddings leave
    the query and key in fp32 already, autocast would cast all three down again)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    device = query.device.type
    if not torch.is_autocast_enabled(device):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast(device_type=device, enabled=False):
        return sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                      attention_mask, **kwargs)


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
