"""The code's shape, as the adapter-bank redesign set it: one owner per concern, public
names across modules, short functions, hooks that live for one call."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from helpers import bank_with, lora_layers

from knowpatch import EditRequest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "knowpatch"
FAST = {"max_steps": 30, "prefixes": 0, "anchor_weight": 0.0, "lr": 2e-2}
EIFFEL = EditRequest("The Eiffel Tower is located in the city of", "Rome", subject="Eiffel Tower")
KREMLIN = EditRequest("The Kremlin is located in the city of", "Oslo", subject="Kremlin")


def _sources() -> list[Path]:
    return sorted([*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py")])


def test_no_private_name_is_used_across_modules():
    """`from x import _name`, or `obj._name` on anything but self/cls, is a private name
    used from outside its owner. Third-party state is listed by name: PEFT's LoRA-layer
    flags that the adapter bank sets by hand, torch's hook tables a test below counts, and
    transformers' config attention name, set by bf16 training without the module walk of
    `set_attn_implementation` (a walk that grew with the adapters loaded), and torch's
    count of in-place writes to a tensor, which tells bf16 training a kept weight copy is
    stale."""
    allowed = {"_active_adapter", "_disable_adapters", "_move_adapter_to_device_of_base_layer",
               "_forward_hooks", "_forward_pre_hooks", "_attn_implementation", "_version"}
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                found += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
            elif (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                  and not node.attr.startswith("__") and node.attr not in allowed
                  and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"{path.name}:{node.lineno} uses {ast.unparse(node)}")
    assert found == []


def test_functions_are_short_and_the_editor_thin():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.end_lineno - node.lineno + 1 > 60:
                    long.append(f"{path.name}:{node.name}")
    assert long == []
    adapters = ast.parse((PACKAGE / "adapters.py").read_text())
    imported = {n.module for n in ast.walk(adapters) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(adapters) if isinstance(n, ast.Import) for a in n.names}
    assert not any("editor" in (m or "") for m in imported)


def test_every_method_follows_the_protocol():
    from knowpatch.methods import METHODS, AdapterMethod, Method

    for name, method in METHODS.items():
        assert isinstance(method, Method) and method.NAME == name
        config = method.Config()
        assert method.kind(config) in ("lora", "delta", "context")
        if method.kind(config) == "lora":
            assert isinstance(method, AdapterMethod)


def test_adding_a_patch_takes_the_per_layer_path(tiny_dir):
    """The first adapter is PEFT's injection; every later one with the same targets is
    added layer by layer (a PEFT signature change would fall back to PEFT's model-wide,
    store-sized path: this test then fails instead of the fallback going unnoticed)."""
    from knowpatch.methods import lora_sft

    bank, model = bank_with(tiny_dir)
    cfg = lora_sft.adapter_config(model, lora_sft.Config())
    assert bank.add("first", cfg) == "peft"
    assert bank.add("second", cfg) == "per-layer"
    assert "second" in bank
    assert not any(p.requires_grad for p in bank.params("second"))
    bank.remove("second")
    assert "second" not in bank


def test_the_editor_owns_its_parts():
    """No module but the editor's own touches its parts: outside code asks with verbs
    (`route`, `save`, `check`, `options`, ...), never through a field of the editor's."""
    parts = {"router", "pager", "store", "adapters", "placement", "deltas", "routing", "progress"}
    found = []
    for path in _sources():
        if path.name in ("editor.py", "loaded.py", "editing.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in parts
                    and isinstance(node.value, ast.Name)
                    and ("editor" in node.value.id or node.value.id in ("ed", "paged", "fresh"))):
                found.append(f"{path.name}:{node.lineno} uses {ast.unparse(node)}")
    assert found == []
    from knowpatch import Editor

    assert not parts & {name for name in vars(Editor) if not name.startswith("_")}


def test_the_core_imports_without_the_server_or_the_figures():
    """The core (and the bench's runner) import neither FastAPI nor matplotlib: those load
    with `knowpatch serve` and a report's figure only."""
    import subprocess
    import sys

    code = ("import sys, knowpatch, knowpatch.editor, knowpatch.bench, knowpatch.cli; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_module_is_long_and_imports_have_no_cycle():
    """No module over 500 lines; the package's imports (inside functions too) form no cycle."""
    long = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
            if len(p.read_text().splitlines()) > 500]
    assert long == []
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):  # imports inside functions too
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                deps.add(target)
                deps.update(f"{target}.{a.name}" for a in node.names)
    graph = {k: {d for d in v if d in graph} for k, v in graph.items()}
    cycles = []

    def visit(node, stack):
        for dep in graph[node]:
            if dep in stack:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, stack + [dep])
        done.add(node)

    done: set[str] = set()
    for start in graph:
        if start not in done:
            visit(start, [start])
    # a package's __init__ importing its own submodules is not a cycle of concern
    cycles = [c for c in cycles if not all(x.startswith(c[0] + ".") or x == c[0] for x in c)]
    assert cycles == []


def _hooks(editor) -> int:
    modules = [editor.model, *lora_layers(editor.model).values()]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)


def test_routing_hooks_live_for_one_block_only(tiny_editor):
    """Per-row routing installs its hooks for the `using` block (the model's) and for each
    forward (the LoRA layers'), and removes them: none remain between calls, even after a
    forward that failed."""
    a = tiny_editor.edit(EIFFEL, evaluate=False, **FAST)
    tiny_editor.edit(KREMLIN, evaluate=False, **FAST)
    idle = _hooks(tiny_editor)
    assert idle == 0
    out = tiny_editor.generate([EIFFEL.prompt, KREMLIN.prompt, "The capital of Japan is"],
                               max_new_tokens=3)
    assert out[0].startswith(" Rome") and out[1].startswith(" Oslo")
    assert _hooks(tiny_editor) == idle
    def boom(*_args):
        raise RuntimeError("boom")

    failing = tiny_editor.model.model.norm.register_forward_hook(boom)  # after the LoRA layers
    ids = torch.tensor([tiny_editor.tokenizer(EIFFEL.prompt)["input_ids"]])
    try:
        with pytest.raises(RuntimeError, match="boom"), tiny_editor.using([a]) as model:
            assert _hooks(tiny_editor) > idle  # the model's routing hooks
            model(input_ids=ids)
    finally:
        failing.remove()
    assert _hooks(tiny_editor) == idle
