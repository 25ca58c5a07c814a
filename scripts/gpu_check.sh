#!/usr/bin/env bash
# The one prepared CUDA check (issue 12): about 10 minutes on one GPU. Nothing else in the project needs a GPU.
#   1. benchmarks/steering_overhead.py on CUDA in bf16 at FLUX width (3072, 49 152 latents): steering and gate
#      cost beside one DoubleStreamBlock, fast vs exact gate;
#   2. benchmarks/sae_training.py on CUDA: SafeDIG's TopK trainer against sparsify's SparseCoder, side by side;
#   3. benchmarks/scaling.py --device cuda: SAE training tokens/s at FLUX width, which replaces the estimate in
#      docs/SCALING.md's cost table;
#   4. with two or more GPUs, the 2-rank build test on nccl (NCCL runs no two ranks on one device).
# Each step writes text and JSON into $OUT (default out/gpu_check); the figures go into docs/SCALING.md.
#
#   bash scripts/gpu_check.sh                 # python: .venv/bin/python if there is one, else python3
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${SAFEDIG_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device here')" || exit 2
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/device.txt"
status=0
step() {  # name, timeout in seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name" | tee -a "$OUT/summary.txt"
  if timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1; then echo "ok" >> "$OUT/summary.txt"
  else echo "FAILED (exit $?), see $name.txt" | tee -a "$OUT/summary.txt"; status=1; fi
  tail -n 25 "$OUT/$name.txt"
}
step steering_overhead 240 "$PY" benchmarks/steering_overhead.py --device cuda --dtype bfloat16 --testbed-prompts 0 \
  --json "$OUT/steering_overhead.json"
step sae_training 180 "$PY" benchmarks/sae_training.py --device cuda --dtype bfloat16 --json "$OUT/sae_training.json"
step scaling 120 "$PY" benchmarks/scaling.py --device cuda --json "$OUT/scaling.json"
if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  step nccl_build 240 env SAFEDIG_TEST_DEVICE=cuda "$PY" -m pytest -q tests/test_distributed.py -k build
else
  echo "== nccl_build: skipped, one GPU (NCCL runs no two ranks on one device)" | tee -a "$OUT/summary.txt"
fi
exit $status
