#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install fedvision into it, editable, with the
# test tools and Opacus (the `dp` extra: differential privacy). The environment lives in .venv
# unless FEDVISION_VENV names another folder (CI keeps one outside the clone, keyed by the
# dependency spec, and links .venv to it).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FEDVISION_VENV:-.venv}"
python="${PYTHON:-python3.11}"
# A reused environment whose console scripts (flwr, flower-superlink, ...) name an interpreter
# that is gone is rebuilt.
if [ -x "$venv/bin/python" ] && bash scripts/venv_is_stale.sh "$venv"; then
  echo "setup: rebuilding $venv" >&2
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv with $python" >&2
  "$python" -m venv "$venv"
fi
if [ "$venv" != ".venv" ]; then ln -sfn "$venv" .venv; fi
# pip runs by the environment's own path, not through the .venv link: the scripts it writes
# must not name this clone, which a cached environment outlives.
# pip prints one warning per missing local index folder on these machines; keep errors only.
install() {
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev,dp]" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
}
imports() { .venv/bin/python -c "import fedvision, torch, flwr, opacus"; }
install
if ! imports; then
  # A cached environment left half-installed (an install that was killed) is rebuilt once.
  echo "setup: the install into $venv is broken; rebuilding it" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  install
  imports || { echo "setup: install failed" >&2; exit 1; }
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch, flwr; print("torch", torch.__version__, "flwr", flwr.__version__)'))" >&2
