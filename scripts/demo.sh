#!/usr/bin/env bash
# The main job from nothing: set up, then run `safedig demo` (the whole pipeline on the built-in testbed DiT).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m safedig_core demo "$@"
