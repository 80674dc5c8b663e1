#!/usr/bin/env bash
# Create .venv (if needed) and install clipdex with the given extras, e.g. `scripts/install.sh test`.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-torch}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# torch and torchvision first, as a matching pair (PyPI's torchvision does not import beside
# every torch build); the project then installs with its extras.
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
