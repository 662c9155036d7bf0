"""What a bench report records of the machine and the software it ran on."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from ..editor import Editor
from ..version import __version__


def environment(editor: Editor) -> dict[str, Any]:
    import peft
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "knowpatch": __version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "resident": editor.paging()["resident"], "pager_reads": editor.paging()["reads"],
        "device": str(editor.device), "model": editor.model_name,
        "fingerprint": editor.fingerprint, "git_commit": commit,
    }

