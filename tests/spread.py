"""A MobileCLIP-S2 checkpoint with random weights whose embeddings are spread out.

A randomly initialised MobileCLIP-S2 maps every image (and every text) to nearly one
direction: unrelated photos score cosine ~0.99998, so a test that ranks ("a photo is found
by itself", "the resized copy is nearest") is decided by float noise. This keeps the real
architecture and the random trunk (same cost, same code path, same file format as the real
checkpoint) and only centres the two projection heads on fixed probe inputs (their mean
feature and its few leading directions are projected out), so what every input shares is
removed and what is specific to each remains:
an image and its resized copy stay close, unrelated images do not. Text-to-image scores
still mean nothing; tests of meaning need the real weights.

The probes are generated here (seeded shapes, gradients and textures), so the checkpoint is
the same bytes whether or not the shared image corpus is present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ARCHITECTURE = "MobileCLIP-S2"
#: Probe texts: captions, bare words, prompts, odd strings (what tests and users type).
PROBE_TEXTS = tuple(
    [
        f"a photo of {what}"
        for what in (
            "a cat",
            "a dog",
            "the sea",
            "a red car",
            "mountains",
            "a birthday cake",
            "a city at night",
            "a forest",
            "two people",
            "a bicycle",
            "snow",
            "a guitar",
        )
    ]
    + [
        "red",
        "cat",
        "dog",
        "car",
        "itap of a car.",
        "a photo of a cat.",
        "2019 holiday",
        "a bowl of fruit on a table",
        "Sunset über dem Meer",
        "blurry photo",
        "IMG_0042",
        "the cathedral at night",
        "",
        "x" * 300,
    ]
)
#: Leading directions of the probe features removed besides the mean: the random trunk
#: puts most of the variance in a few (brightness, colour), which would still dominate.
IMAGE_DIRECTIONS, TEXT_DIRECTIONS = 4, 2
PROBE_IMAGES = 48


def probe_images(count: int = 24, seed: int = 0, size: int = 256) -> np.ndarray:
    """``count`` varied model inputs (N,3,size,size) in [0,1]: shapes on gradients, noise."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    images = []
    for i in range(count):
        low, high = rng.random(3), rng.random(3)
        axis = ramp[None, :] if i % 2 else ramp[:, None]
        weight = np.broadcast_to(axis, (size, size))[..., None]
        background = (low * (1 - weight) + high * weight) * 255
        image = Image.fromarray(background.astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 6))):
            x, y = rng.integers(0, size, 2)
            w, h = rng.integers(size // 8, size // 2, 2)
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((int(x), int(y), int(x + w), int(y + h)), fill=fill)
        if i % 3 == 0:
            noise = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
            texture = Image.fromarray(noise, "RGB").resize((size, size), Image.BILINEAR)
            image = Image.blend(image, texture, 0.35)
        image = image.filter(ImageFilter.GaussianBlur(float(rng.random() * 2)))
        images.append(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0)
    return np.stack(images)


def _centring(features, torch, directions: int):
    """(mu, Q): the probes' mean feature and the projector that removes it and the
    ``directions`` leading principal directions around it (Q = I - V^T V)."""
    mu = features.mean(0)
    _, _, vt = torch.linalg.svd(features - mu, full_matrices=False)
    leading = vt[:directions]
    return mu, torch.eye(features.shape[1]) - leading.T @ leading


def _centre_image_head(model, torch, probes: np.ndarray) -> None:
    """fc(x) = W x + b becomes W Q (x - mu) over the probes' fc inputs."""
    fc = model.visual.trunk.head.fc
    seen = []
    hook = fc.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model.encode_image(torch.from_numpy(probes))
    hook.remove()
    mu, keep = _centring(seen[0], torch, IMAGE_DIRECTIONS)
    fc.weight.copy_(fc.weight @ keep)
    fc.bias.copy_(-(fc.weight @ mu))


def _centre_text_head(model, torch) -> None:
    """The pooled (end-of-text) feature x becomes Q (x - mu) before the text projection:
    mu is taken off ln_final's bias and Q folded into the projection matrix."""
    import open_clip

    tower = model.text
    seen = []
    hook = tower.ln_final.register_forward_hook(lambda module, args, out: seen.append(out))
    tokens = open_clip.get_tokenizer(ARCHITECTURE)(list(PROBE_TEXTS))
    model.encode_text(tokens)
    hook.remove()
    pooled = seen[0][torch.arange(len(PROBE_TEXTS)), tokens.argmax(dim=-1)]
    mu, keep = _centring(pooled, torch, TEXT_DIRECTIONS)
    tower.ln_final.bias.sub_(mu)
    tower.text_projection.copy_(keep @ tower.text_projection)


def write_spread_checkpoint(path: Path, seed: int = 0) -> Path:
    """Save a spread MobileCLIP-S2 state_dict (loadable with ``--weights``) to ``path``."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    model = open_clip.create_model(ARCHITECTURE, pretrained=None)
    model.eval()
    with torch.no_grad():
        _centre_image_head(model, torch, probe_images(PROBE_IMAGES, seed=seed))
        _centre_text_head(model, torch)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path
