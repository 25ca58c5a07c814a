#!/usr/bin/env bash
# The whole test suite from nothing: set up, lint (ruff, config in pyproject.toml; a finding fails the run), then
# pytest (extra arguments go to pytest; naming test files or folders, e.g. `bash scripts/test.sh tests/test_convert.py
# -q`, runs only those).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv=${SAFEDIG_VENV:-$PWD/.venv}
"$venv/bin/python" -m ruff check --quiet . || { echo "ruff found problems (above): fix them, or run '$venv/bin/python -m ruff check --fix .'" >&2; exit 1; }
prev=
for a in "$@"; do  # a test path among the arguments (not the value of an option like --deselect): run only those
  case $prev in --deselect|--ignore|-k|-m|-p|--junitxml|--basetemp) ;; *) [[ $a == tests* ]] && exec "$venv/bin/python" -m pytest "$@" ;; esac
  prev=$a
done
exec "$venv/bin/python" -m pytest tests "$@"
