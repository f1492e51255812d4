#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv from requirements.txt, then
# requirements-nodeps.txt without dependencies (packages whose declared requirements contradict
# requirements.txt's pins but that run with them; that file says which and why), then this checkout
# itself, editable and without dependencies (`pip install --no-deps -e .`: the packages ctfm_common,
# ctfm_bundles and its tools, and the console commands of pyproject.toml).
# Re-installs only when one of those three files, or the checkout's folder, changed since the last
# install. Sourced by tools/run_demo.sh and tools/run_tests.sh; PYTHON selects the interpreter (default python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CTFM_VENV:-$root/.venv}"
stamp="$venv/.requirements.sha256"
want="$( (cat "$root/requirements.txt" "$root/requirements-nodeps.txt" "$root/pyproject.toml"; echo "$root") | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements.txt into $venv (first time: a few minutes)"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r "$root/requirements.txt"
  "$venv/bin/python" -m pip install -q --no-deps -r "$root/requirements-nodeps.txt"
  "$venv/bin/python" -m pip install -q --no-deps -e "$root"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
