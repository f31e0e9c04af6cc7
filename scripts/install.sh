#!/usr/bin/env bash
# Creates .venv and installs moss-agent with every extra and the dev tools.
# Without an NVIDIA GPU it installs the CPU build of torch first (a few hundred MB instead of several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -d .venv ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1 || [ "${MOSS_CPU_ONLY:-0}" = 1 ]; then
  .venv/bin/python -m pip install -q "torch==2.13.0" \
    || .venv/bin/python -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
.venv/bin/python -m pip install -q -e ".[all,dev]"
echo "installed: activate with 'source .venv/bin/activate'"
