#!/usr/bin/env bash
# Install clipdex with its test dependencies and run the whole test suite.
# The browser test needs Debian's chromium; it is installed when apt-get can (root), and
# the test is skipped with a reason where no browser can be had.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
        || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1)) \
        || echo "note: could not install chromium; the browser test will be skipped"
fi
scripts/install.sh test
export CLIPDEX_CORPUS="${CLIPDEX_CORPUS:-$(cd .. && pwd)/shared/imgcorpus}"
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -ra "$@"
