#!/usr/bin/env bash
# Install clipdex, index the sample photos in data/samples and search them.
# Weights: the hub's MobileCLIP-S2 'datacompdr' (downloaded once and cached), or a local
# checkpoint given by CLIPDEX_WEIGHTS=/path/to/open_clip_pytorch_model.bin.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh torch
export CLIPDEX_LIBRARY="${CLIPDEX_LIBRARY:-$PWD/.demo-library}"
.venv/bin/clipdex index data/samples
.venv/bin/clipdex search "a cat" -k 3
.venv/bin/clipdex similar data/samples/puppy.jpg -k 3
