"""Choose and build an encoder backend; the one entry point the edges call.

``auto`` runs ONNX Runtime on a CPU (faster there, and a query never imports torch) and
torch with fp16 autocast on a CUDA GPU (or on Apple's MPS when asked for). Both backends
report the same :class:`~indexer.model.identity.ModelIdentity` for the same weights, so a library
indexed with one is searched and extended with the other.
"""

from __future__ import annotations

from pathlib import Path

from indexer.errors import ConfigError
from indexer.model.identity import Encoder
from indexer.model.torch_encoder import cuda_available  # cheap: torch loads inside it

BACKENDS = ("auto", "torch", "onnx")


def load_encoder(
    weights: Path | None = None,
    device: str = "auto",
    backend: str = "auto",
    *,
    cache_dir: Path | None = None,
    single_query: bool = False,
) -> Encoder:
    """An encoder for MobileCLIP-S2 with the given weights (None: the hub's datacompdr).

    ``single_query``: the process embeds one text and exits (a CLI search), so the ONNX
    text session is built for a fast start rather than for many runs.
    """
    chosen = resolve_backend(backend, device)
    if chosen == "onnx":
        from indexer.model.onnx_encoder import OnnxEncoder

        return OnnxEncoder(weights, cache_dir=cache_dir, single_query=single_query)
    from indexer.model.torch_encoder import TorchEncoder

    return TorchEncoder(weights, device)


def resolve_backend(backend: str = "auto", device: str = "auto") -> str:
    """``torch`` or ``onnx`` for a requested backend and device; never imports torch on a CPU."""
    if backend not in BACKENDS:
        raise ConfigError(
            f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}", setting="backend"
        )
    if backend == "onnx":
        if device not in ("auto", "cpu"):
            raise ConfigError(
                f"the onnx backend runs on the CPU, not on {device}: choose the torch backend "
                f"for {device}, or the cpu device",
                setting="backend",
            )
        return "onnx"
    if backend == "torch":
        return "torch"
    if device == "auto":
        return "torch" if cuda_available() else "onnx"
    return "onnx" if device == "cpu" else "torch"
