#!/usr/bin/env bash
# Device smoke run: install the carried wheels, one capped 1024 px bench, the GPU tests.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers, peft, transformers; print(torch.__version__, diffusers.__version__, peft.__version__, transformers.__version__)"
python3 -m runner bench --resolution 1024 --vram-gib 15 --steps 6 --json 2>&1 | tee $OUT/smoke1024.json | tail -n 45
python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tail -n 15
