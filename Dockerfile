# clipdex server image: `clipdex serve` on port 8000 with the model kept warm.
#
#   docker compose up -d          (see docker-compose.yml and the README's Docker section)
#
# CPU-only torch comes from PyTorch's own index first, so pip does not pull the
# multi-gigabyte CUDA wheels; the project is then installed (not editable) with its
# `torch` extra, which also brings open_clip, timm and the ONNX exporter, and its `s3`
# extra (pyarrow's file systems: `clipdex index s3://...` / `gs://...` in the container).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.2,<=2.14.1" torchvision
# OpenCV (RapidOCR's dependency, for --ocr) needs these system libraries.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY indexer ./indexer
COPY retrieval ./retrieval
RUN pip install ".[torch,s3]" \
    && clipdex serve --help > /dev/null \
    && python -c "import cv2, rapidocr_onnxruntime, pyarrow.fs" \
    && python -c "import retrieval.server, importlib.resources as r; \
assert (r.files('retrieval.server') / 'web' / 'index.html').is_file()"

# An unprivileged user owns the library and the model cache (both volumes).
RUN useradd --create-home --uid 1000 clipdex \
    && mkdir -p /data/library /cache /photos \
    && chown -R clipdex:clipdex /data /cache
USER clipdex
WORKDIR /home/clipdex

ENV CLIPDEX_LIBRARY=/data/library \
    CLIPDEX_INDEX_ROOTS=/photos \
    HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/cache
VOLUME ["/data/library", "/cache"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["clipdex", "serve", "--host", "0.0.0.0", "--port", "8000"]
