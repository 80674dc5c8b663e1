"""An OpenAI-compatible embeddings endpoint, so existing clients embed with MobileCLIP-S2.

``POST /v1/embeddings`` takes OpenAI's request (``model``, ``input``,
``encoding_format``, ``dimensions``) and answers its response shape; the official
``openai`` client works unchanged (it asks for base64 by default). clipdex's extension:
an input item of the form ``data:image/<type>;base64,<bytes>`` is an image and gets an
image embedding in the same space as the texts. Other URLs are plain text: nothing is
fetched.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated

import numpy as np
from fastapi import APIRouter
from fastapi import Path as PathParam

from indexer.errors import NotFound
from indexer.model.identity import CONTEXT_LENGTH, EMBED_DIM
from retrieval.search.errors import QueryError
from retrieval.search.text import check_text
from retrieval.server.api import State, errors
from retrieval.server.schemas import EmbeddingRequest, EmbeddingResponse, ModelCard, ModelList
from retrieval.server.state import ServerState
from retrieval.server.workload import over_cap

router = APIRouter(prefix="/v1", tags=["openai"])

MODEL_ID = "mobileclip-s2"
MAX_INPUTS = 2048
MAX_TEXT_CHARS = 20_000
TEXT_BATCH, IMAGE_BATCH = 64, 16
DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


@router.get("/models", response_model=ModelList)
def list_models() -> dict:
    """The one model this server embeds with."""
    return {"object": "list", "data": [model_card()]}


@router.get("/models/{model_id}", response_model=ModelCard, responses=errors(404))
def get_model(model_id: Annotated[str, PathParam(max_length=256)]) -> dict:
    check_model(model_id)
    return model_card()


def model_card() -> dict:
    return {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "clipdex"}


def check_model(name: str) -> None:
    if name.strip().lower() not in (MODEL_ID, "mobileclip-s2/datacompdr"):
        raise NotFound(f"the model {name!r} does not exist here: use {MODEL_ID!r}")


@router.post(
    "/embeddings", response_model=EmbeddingResponse, responses=errors(400, 404, 413, 415, 503)
)
def create_embeddings(state: State, body: EmbeddingRequest) -> dict:
    """Embed texts (and data: URL images) with MobileCLIP-S2: 512-d, unit length."""
    check_model(body.model)
    if body.dimensions is not None and body.dimensions != EMBED_DIM:
        raise QueryError(f"dimensions must be {EMBED_DIM} (MobileCLIP-S2 does not truncate)")
    items = parse_inputs(body.input, state.settings.max_request_inputs)
    vectors = embed_items(state, items)
    data = [
        {"object": "embedding", "index": i, "embedding": encode_vector(v, body.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    tokens = sum(count_tokens(item) for item in items if isinstance(item, str))
    return {
        "object": "list",
        "data": data,
        "model": MODEL_ID,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def parse_inputs(raw: str | list, limit: int = MAX_INPUTS) -> list[str | bytes]:
    """Texts stay str; data: URL images become their decoded bytes; at most ``limit``
    (the server's --max-request-inputs; OpenAI's own limit is 2048)."""
    items = [raw] if isinstance(raw, str) else list(raw)
    if not items:
        raise QueryError("input is empty: send a text or a list of texts")
    if len(items) > MAX_INPUTS:
        raise QueryError(f"at most {MAX_INPUTS} inputs per request, got {len(items)}")
    if len(items) > limit:
        raise over_cap("inputs", len(items), limit, "max_request_inputs", "max-request-inputs")
    if not all(isinstance(item, str) for item in items):
        raise QueryError("token arrays are not supported: send the texts themselves")
    return [parse_item(index, item) for index, item in enumerate(items)]


def parse_item(index: int, item: str) -> str | bytes:
    match = DATA_URL.match(item)
    if match is None:
        if not item.strip():
            raise QueryError(f"input[{index}] is empty")
        if len(item) > MAX_TEXT_CHARS:
            raise QueryError(f"input[{index}] is over {MAX_TEXT_CHARS} characters")
        return check_text(item, f"input[{index}]")
    try:
        return base64.b64decode(item[match.end() :], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise QueryError(f"input[{index}] is a data: URL whose base64 is invalid") from exc


def embed_items(state: ServerState, items: list[str | bytes]) -> np.ndarray:
    """Vectors in input order; texts and images each go to the model in batches."""
    out = np.zeros((len(items), EMBED_DIM), np.float32)
    texts = [i for i, item in enumerate(items) if isinstance(item, str)]
    images = [i for i, item in enumerate(items) if isinstance(item, bytes)]
    for start in range(0, len(texts), TEXT_BATCH):
        chunk = texts[start : start + TEXT_BATCH]
        out[chunk] = state.embed_texts([items[i] for i in chunk])
    for start in range(0, len(images), IMAGE_BATCH):
        chunk = images[start : start + IMAGE_BATCH]
        out[chunk] = state.embed_images([items[i] for i in chunk])
    return out


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A float list, or base64 of little-endian float32 (what OpenAI sends)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


def count_tokens(text: str) -> int:
    """CLIP BPE tokens the model saw: the text's, plus start and end, at most 77."""
    from indexer.model.tokenizer import Tokenizer

    tokenizer = Tokenizer.load()
    count = 2
    for _ in tokenizer.token_ids(text):
        count += 1
        if count >= CONTEXT_LENGTH:
            break
    return count
