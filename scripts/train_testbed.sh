#!/usr/bin/env bash
# Trains the testbed DiT (ComfyUI's FLUX class at a tiny size) on the procedural world and writes
# safedig_core/testbed/assets/dit.safetensors + dit_train_log.jsonl. Resumable: rerun the same command after
# a kill and it continues from the last checkpoint in $WORK. Budget: <= 60 minutes of training on 2 cores.
# The committed DiT: one- and two-object scenes (30 % of each batch), 10000 steps of 32.
#   SEED=0 STEPS=10000 MINUTES=58 THREADS=2 scripts/train_testbed.sh [extra train_dit options]
# Then measure it: python -m safedig_core.testbed.quality
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SAFEDIG_VENV:-$PWD/.venv}
exec "$venv/bin/python" -m safedig_core.testbed.train_dit --seed "${SEED:-0}" --steps "${STEPS:-10000}" \
  --minutes "${MINUTES:-58}" --threads "${THREADS:-2}" --work "${WORK:-$PWD/.cache/safedig_testbed/train}" "$@"
