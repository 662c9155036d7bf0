"""A vLLM OpenAI server run by knowpatch as a child process on 127.0.0.1: started with the
base model's folder and runtime LoRA loading, watched, restarted, stopped with knowpatch.

vLLM may live in an environment of its own (`--vllm-python`): its CPU build pins a
transformers older than knowpatch's, so one virtual environment need not hold both. The
child runs `PYTHON -m vllm.entrypoints.openai.api_server`; its log goes to a file whose tail
is what an error shows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import KnowpatchError
from ..thread import free_port
from .vllm_client import VLLMClient

INSTALL_HINT = ("install the extra (pip install -e '.[vllm]') or pass --vllm-python with an "
                "environment that has it (docs/serving.md#the-vllm-engine)")


def vllm_python(given: str | None) -> str:
    """The interpreter to run vLLM with: `given`, else $KNOWPATCH_VLLM_PYTHON, else this one;
    it must import vllm (checked without importing it: vLLM takes seconds to import)."""
    python = given or os.environ.get("KNOWPATCH_VLLM_PYTHON") or sys.executable
    if not Path(python).exists():
        raise KnowpatchError(f"vllm_python: {python} does not exist")
    probe = subprocess.run([python, "-c", "import importlib.util as u, sys; "
                            "sys.exit(0 if u.find_spec('vllm') else 3)"],
                           capture_output=True, timeout=60)
    if probe.returncode != 0:
        raise KnowpatchError(f"engine: vllm is not installed in {python}; {INSTALL_HINT}")
    return python


@dataclass
class VLLMProcess:
    """The child vLLM server: `start()` waits until it answers or raises with its log."""

    model_dir: str
    python: str
    log_file: Path
    max_lora_rank: int = 64
    max_loras: int = 8
    max_cpu_loras: int = 64
    dtype: str = "float32"
    max_model_len: int | None = None
    kv_cache_gib: int = 2
    start_timeout: float = 600.0
    extra: list[str] = field(default_factory=list)
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
               "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(self.port),
               "--enable-lora", "--max-lora-rank", str(self.max_lora_rank),
               "--max-loras", str(self.max_loras), "--max-cpu-loras", str(self.max_cpu_loras),
               "--dtype", self.dtype, "--gpu-memory-utilization", "0.2",
               "--disable-log-stats"]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        return cmd + list(self.extra)

    def start(self) -> VLLMProcess:
        self.port = self.port or free_port()
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
               "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE",
                                                        str(self.kv_cache_gib))}
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        client = VLLMClient(self.url)
        deadline = time.monotonic() + self.start_timeout
        try:
            while not client.healthy():
                if self.proc.poll() is not None:
                    self.stop()  # what it spawned goes too
                    raise KnowpatchError(f"engine: the vLLM server exited with code "
                                         f"{self.proc.returncode} while starting:\n{self.tail()}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise KnowpatchError(f"engine: the vLLM server did not answer within "
                                         f"{self.start_timeout:.0f} s:\n{self.tail()}")
                time.sleep(0.5)
        finally:
            client.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the server and the processes it spawned (also those left when it died)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        """A new server on the same port, after the old one (and what it spawned) is gone."""
        self.stop()
        self.start()
