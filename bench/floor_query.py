"""The floor of a cold text query: the least a fresh process must do to embed one text.

Imports numpy and onnxruntime, builds an ``InferenceSession`` from the cached text tower
with ONNX Runtime's default options, tokenises with clipdex's tokenizer and runs it once.
No catalog, no vector search, no CLI: what is left when everything clipdex adds costs
nothing. ``bench/bench_cold.py`` times it in fresh processes beside ``clipdex search``.

Usage: ``python bench/floor_query.py TEXT_ONNX [QUERY]``; prints the first few features.
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort

from indexer.model.tokenizer import Tokenizer


def main(argv: list[str]) -> None:
    """Embed ``argv[1]`` (default "a dog") with the text tower at ``argv[0]``."""
    model, query = argv[0], (argv[1] if len(argv) > 1 else "a dog")
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    tokens = Tokenizer.load().encode([query])
    features = session.run(None, {"tokens": tokens})[0]
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    print(" ".join(f"{x:.4f}" for x in unit[0, :4]))


if __name__ == "__main__":
    main(sys.argv[1:])
