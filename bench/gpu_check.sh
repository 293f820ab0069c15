#!/usr/bin/env bash
# The GPU path of training on a CUDA machine: the training tests with torch on the GPU (device auto),
# then bench/train_speed.py on the CPU and the GPU. Results go to $OUT (default bench/results).
# Needs python3 with CUDA torch and the project's dependencies; PYTHONPATH may add carried packages.
set -uo pipefail
OUT=${OUT:-bench/results}
export COALORA_HOME=${COALORA_HOME:-/tmp/coalora-home} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$COALORA_HOME"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 -m pytest -q -p no:cacheprovider tests/test_training.py ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/gpu_pytest.log" | tail -25
python3 bench/train_speed.py --devices cpu,cuda --steps "${STEPS:-30}" --batch "${BATCH:-8}" --seq-len "${SEQ:-512}" --results-dir "$OUT" 2>&1 | tail -12
