#!/usr/bin/env bash
# The prepared GPU check: everything a CPU machine cannot show, in one run of under 9 minutes on an H100/H200
# (the steps' time limits add up to 8.75 min; a step over its limit is stopped, reported, and the check goes on;
# throughput JSON is written after every size, so a stopped step keeps what it measured).
#   1. xformers memory-efficient attention on CUDA agrees with sdpa and a naive fp32 reference (outputs and
#      gradients), and how fast each backend is                       -> attention_backends.json
#   2. the CUDA-only tests (xformers paths of attention, blocks and KV cache; the head + cross-entropy in bf16)
#   3. training throughput of the runtime's own step (runtime/step.py TrainStep) in Run.precision bf16 and fp32
#      (TF32), d256 and d512 x 4 layers, 4 x 128 tokens: ours eager and with Run.compile (whole-step compilation,
#      cold) against the research chunk loop, MFU against the bf16 matmul peak measured in the same process,
#      bf16 vs fp32 tokens/s, graph breaks of the compiled step -> train_throughput.json
#   4. the same at paper scale: d512, 16 layers, 4 x 256 tokens, vocab 8192, batch 8 (the paper's 64 sequences
#      over 8 devices)                                                 -> train_throughput_paper.json
#   5. memory-conditioned generation vs full context                 -> inference.json
# Usage, from the repository root on a CUDA machine whose python3 has torch (>= 2.10) and transformers:
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (default benchmarks/results/gpu)
# GPU_CHECK_DRY=1 runs the throughput steps' CPU-sized twins instead (same flags, tiny shapes, default OUT_DIR
# /tmp/gpu_check_dry): a check of the script and of the benchmark's compiled path on a machine without CUDA.
# Packages the machine lacks (xformers, gin-config) may lie as wheels in .whl/: they are installed to /tmp/site.
set -uo pipefail
DRY=${GPU_CHECK_DRY:-0}
OUT=${1:-$([ "$DRY" = 1 ] && echo /tmp/gpu_check_dry || echo benchmarks/results/gpu)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH="$PWD"  # the project itself, uninstalled
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
status=0
# step TITLE SECONDS COMMAND...: a failed or timed-out step is reported and the check goes on
step() {
  local title=$1 limit=$2; shift 2
  echo; echo "=== $title"
  timeout --signal=INT --kill-after=15 "$limit" "$@" || { echo "!!! failed or timed out (${limit} s): $*"; status=1; }
}

TP="python3 benchmarks/train_throughput.py --compile --models research ours ours+compile --precision bf16 fp32"
if [ "$DRY" = 1 ]; then  # the throughput steps at CPU size (the other steps need CUDA)
  DEV="--device cpu --threads 2 --warmup 1 --steps 1 --rounds 1 --batch 2 --vocab 512"
  step "training throughput (dry)" 1200 $TP $DEV --sizes 64 --layers 1 --chunk-len 16 --out "$OUT/train_throughput.json"
  step "paper scale (dry)" 1200 $TP $DEV --paper --sizes 64 --layers 2 --chunk-len 16 \
    --out "$OUT/train_throughput_paper.json"
  exit $status
fi

DEV="--device cuda --threads 8"
step "machine" 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch; print(\"torch\", torch.__version__)"; python3 -c "import xformers; print(\"xformers\", xformers.__version__)" || true'
step "attention backends" 45 python3 benchmarks/attention_backends.py --device cuda --out "$OUT/attention_backends.json"
step "CUDA tests" 60 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_blocks.py tests/test_objectives.py
step "training throughput" 180 $TP $DEV --steps 5 --rounds 3 --out "$OUT/train_throughput.json"
step "paper scale" 150 $TP $DEV --paper --batch 8 --steps 3 --rounds 3 --out "$OUT/train_throughput_paper.json"
step "inference" 60 python3 benchmarks/inference.py --device cuda --out "$OUT/inference.json"
exit $status
