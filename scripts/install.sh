#!/usr/bin/env bash
# Create .venv (if needed) and install clipdex with the given extras, e.g. `scripts/install.sh test`.
# `test` (the suite runs against this checkout) installs editable; anything else (the demo)
# installs the project as a user gets it, from a wheel built here. CLIPDEX_EDITABLE=1/0 forces
# either. pip stays quiet: only errors are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-torch}"
editable="${CLIPDEX_EDITABLE:-$([ "$extras" = test ] && echo 1 || echo 0)}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# torch and torchvision first, as a matching pair (PyPI's torchvision does not import beside
# every torch build); the project then installs with its extras.
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
if [ "$editable" = 1 ]; then
    .venv/bin/python -m pip install --quiet -e ".[${extras}]"
else
    rm -rf build  # setuptools builds in the checkout: modules left from an older tree would ship
    .venv/bin/python -m pip install --quiet ".[${extras}]"
fi
