#!/usr/bin/env bash
# The GPU path of training on a CUDA machine: the training and data-parallel tests with torch on the GPU (two
# ranks with NCCL when the machine has two GPUs), then training speed (bench/train_speed.py) on the CPU and the
# GPU for SmolLM2's block shapes, and on the GPU for the synthetic 1B Llama's shapes (Llama 3.2 1B's blocks,
# random weights, test vocabulary). Results go to $OUT (default bench/results).
# Needs python3 with CUDA torch and the project's dependencies; PYTHONPATH may add carried packages.
# On a copy of the tree whose .git is missing or stale, COALORA_BENCH_COMMIT names the (clean) commit copied,
# for the results' provenance.
set -uo pipefail
OUT=${OUT:-bench/results}
export COALORA_HOME=${COALORA_HOME:-/tmp/coalora-home} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# llama.cpp's converter as `make setup` puts it, when it travelled with the tree (carry .venv/llama.cpp)
[ -d .venv/llama.cpp ] && export COALORA_LLAMA_CPP_CONVERTER=${COALORA_LLAMA_CPP_CONVERTER:-$PWD/.venv/llama.cpp}
mkdir -p "$OUT" "$COALORA_HOME"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'GPUs', torch.cuda.device_count())"
python3 -m pytest -q -p no:cacheprovider tests/test_training.py ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/gpu_pytest.log" | tail -25
# torchrun tests skip themselves unless there are two GPUs
COALORA_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider -rs tests/test_distributed.py 2>&1 \
    | tee "$OUT/gpu_distributed_pytest.log" | tail -15
python3 bench/train_speed.py --devices cpu,cuda --steps "${STEPS:-30}" --batch "${BATCH:-8}" --seq-len "${SEQ:-512}" \
    --results-dir "$OUT" 2>&1 | tail -12
python3 bench/train_speed.py --model synthetic-1b --devices cuda --steps "${STEPS:-30}" --batch "${BATCH:-8}" \
    --seq-len "${SEQ:-512}" --results-dir "$OUT" --name train_speed_1b 2>&1 | tail -8
