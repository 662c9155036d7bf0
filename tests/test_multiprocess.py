"""The training loop under data parallelism: 2 CPU processes (gloo) match 1 process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

JOB = Path(__file__).parent / "jobs" / "mp_train.py"
# Losses of the two runs agree to float32 reduction-order noise; a real divergence (a
# process training on the wrong share, gradients not averaged) is orders of magnitude larger.
RTOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("method", ["full-sft", "dpo"])
def test_two_processes_match_one_with_the_same_global_batch(tiny_dir, tmp_path, method):
    one = _run([sys.executable, str(JOB), str(tiny_dir), str(tmp_path / "1.json"), method],
               tmp_path / "1.json")
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(JOB),
                str(tiny_dir), str(tmp_path / "2.json"), method], tmp_path / "2.json")
    assert one["processes"] == 1 and two["processes"] == 2
    assert one["steps"] == two["steps"] == 5
    assert two["losses"] == pytest.approx(one["losses"], rel=RTOL)
    assert one["losses"][-1] < one["losses"][0]  # it trained
