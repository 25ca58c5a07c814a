#!/usr/bin/env bash
# The whole test suite from nothing: set up, then pytest (extra arguments go to pytest; naming test files or
# folders, e.g. `bash scripts/test.sh tests/test_convert.py -q`, runs only those).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for a in "$@"; do
  [[ $a == tests* ]] && exec .venv/bin/python -m pytest "$@"
done
exec .venv/bin/python -m pytest tests "$@"
