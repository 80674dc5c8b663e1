"""MobileCLIP-S2 through open_clip and torch: the only module that imports them.

Loading follows shared/DESIGN.md: the ``datacompdr`` weights from the Hugging Face hub
(open_clip caches them) or a local checkpoint file; the image tower re-parameterised for
inference; eval + inference mode; L2-normalised outputs. Preprocessing is not done here:
callers pass tensors made by :func:`indexer.ingest.decode.to_model_input`, which implements
MobileCLIP's own transform whatever the weights source.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from indexer.errors import ConfigError, WeightsUnavailable
from indexer.model.identity import (
    ARCHITECTURE,
    CONTEXT_LENGTH,
    DEFAULT_PRETRAINED,
    HF_FILE,
    HF_REPO,
    ModelIdentity,
    checkpoint_identity,
    l2_normalise,
)

DEVICES = ("auto", "cpu", "cuda", "mps")


def cuda_available() -> bool:
    """Whether torch would run on a CUDA GPU; asks torch only when an NVIDIA driver is present."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    driver = Path("/proc/driver/nvidia/gpus")
    if not (driver.is_dir() and any(driver.iterdir())) and not Path("/dev/nvidia0").exists():
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_device(device: str = "auto") -> str:
    """The torch device to run on: ``auto`` picks cuda, then mps, then cpu."""
    import torch

    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "the cuda device was asked for, but torch sees no CUDA GPU: choose the cpu device",
            setting="device",
        )
    return device


def weights_help() -> str:
    """How to get the weights without a network, for error messages."""
    return (
        f"download {HF_FILE} from https://huggingface.co/{HF_REPO} "
        "and give that file as the weights"
    )


def build_model(weights: Path | None):
    """Create the open_clip MobileCLIP-S2 model with real weights, re-parameterised, eval."""
    import open_clip
    from timm.utils import reparameterize_model

    if weights is not None and not Path(weights).is_file():
        raise WeightsUnavailable(
            f"weights file {weights} does not exist: {weights_help()}", setting="weights"
        )
    pretrained = str(weights) if weights is not None else DEFAULT_PRETRAINED
    try:
        model = open_clip.create_model(ARCHITECTURE, pretrained=pretrained)
    except Exception as exc:  # hub errors, unpickling errors, shape mismatches...
        source = f"weights file {weights}" if weights else f"weights '{DEFAULT_PRETRAINED}'"
        raise WeightsUnavailable(
            f"could not load {ARCHITECTURE} {source} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}): {weights_help()}",
            setting="weights",
        ) from exc
    model.eval()
    reparameterize_model(model, inplace=True)
    return model


class TorchEncoder:
    """The eager open_clip model; fp16 autocast on CUDA."""

    backend = "torch"

    def __init__(self, weights: Path | None = None, device: str = "auto") -> None:
        self.weights = Path(weights) if weights else None
        self.requested_device = device
        if self.weights is not None and not self.weights.is_file():
            raise WeightsUnavailable(
                f"weights file {weights} does not exist: {weights_help()}", setting="weights"
            )
        # The identity is known without loading the model, so an up-to-date library is
        # checked (and an unchanged folder re-indexed) without paying for torch.
        self.identity = (
            checkpoint_identity(self.weights)
            if self.weights
            else ModelIdentity(weights=DEFAULT_PRETRAINED)
        )
        self._model = None
        self._tokenizer = None

    @property
    def model(self):
        """The open_clip model, loaded on first use."""
        if self._model is None:
            import torch

            self._torch = torch
            self.device = resolve_device(self.requested_device)
            self._model = build_model(self.weights).to(self.device)
        return self._model

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    def _autocast(self):
        if self.device == "cuda":
            return self._torch.autocast("cuda", dtype=self._torch.float16)
        return contextlib.nullcontext()

    def encode_images(self, batch: np.ndarray) -> np.ndarray:
        """(N,3,256,256) float32 in [0,1] -> (N,512) unit vectors."""
        model = self.model  # loads torch and the weights on first use
        torch = self._torch
        tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        with torch.inference_mode(), self._autocast():
            features = model.encode_image(tensor)
        return l2_normalise(features.float().cpu().numpy())

    def tokenize(self, texts: list[str]):
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(ARCHITECTURE)
        return self._tokenizer(texts, context_length=CONTEXT_LENGTH)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """N strings -> (N,512) unit vectors."""
        model = self.model
        torch = self._torch
        tokens = self.tokenize(list(texts)).to(self.device)
        with torch.inference_mode(), self._autocast():
            features = model.encode_text(tokens)
        return l2_normalise(features.float().cpu().numpy())
