#!/usr/bin/env bash
# The prepared GPU check: everything a CPU machine cannot show, in one short run (about 5 minutes on an H100).
#   1. xformers memory-efficient attention on CUDA agrees with sdpa and a naive fp32 reference (outputs and
#      gradients), and how fast each backend is       -> benchmarks/attention_backends.py
#   2. the CUDA-only tests (xformers paths of the attention, block, KV-cache and model tests)
#   3. training throughput of ours vs the research chunk loop, full context and no memory (bf16 autocast)
#   4. memory-conditioned generation vs full context at 4, 8 and 16 chunks
# Usage, from the repository root on a CUDA machine whose python3 has torch (>= 2.10) and transformers:
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (default benchmarks/results/gpu)
# Packages the machine lacks (xformers, gin-config) may lie as wheels in .whl/: they are installed to /tmp/site.
set -uo pipefail
OUT=${1:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH="$PWD"  # the project itself, uninstalled
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
status=0
step() { echo; echo "=== $1"; shift; "$@" || { echo "!!! failed: $*"; status=1; }; }

step "machine" bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, xformers; print(\"torch\", torch.__version__, \"xformers\", xformers.__version__)"'
step "attention backends" python3 benchmarks/attention_backends.py --device cuda --out "$OUT/attention_backends.json"
step "CUDA tests" python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_blocks.py
step "training throughput" python3 benchmarks/train_throughput.py --device cuda --threads 8 --steps 5 --rounds 3 --out "$OUT/train_throughput.json"
step "inference" python3 benchmarks/inference.py --device cuda --out "$OUT/inference.json"
exit $status
