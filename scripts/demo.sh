#!/usr/bin/env bash
# The main job from nothing: set up, then run the demo (today: steering a tiny FLUX in the real ComfyUI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m safedig_core tiny-demo "$@"
