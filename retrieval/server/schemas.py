"""Request and response models: they validate input and document the API in /openapi.json."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field

from retrieval.search.text import text_problem


def _usable(problem_of):
    """A pydantic check: a 422 naming the field when ``problem_of(value)`` has a reason."""

    def check(value: str) -> str:
        problem = problem_of(value)
        if problem:
            raise ValueError(problem)
        return value

    return AfterValidator(check)


# Request strings: usable text (no lone surrogates, no control characters). Paths to index
# are checked where they meet the file system (.paths.confine: 400, as ever).
Text = Annotated[str, _usable(text_problem)]


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. not_found, too_large.")
    message: str = Field(description="What went wrong and what to do, for a person.")
    setting: str | None = Field(
        None,
        description="The server setting that would fix it (e.g. max_megapixels), when one does.",
    )


class ErrorResponse(BaseModel):
    error: ErrorDetail


class TagScore(BaseModel):
    label: str
    score: float = Field(description="Zero-shot probability stored by `clipdex tag`.")


class CutoffInfo(BaseModel):
    rule: str = Field(description="auto, min-score or auto+min-score.")
    threshold: float | None = Field(description="Results score above this cosine.")
    median: float | None = None
    sigma: float | None = None
    z: float | None = None
    population: int | None = None


class RawCompanion(BaseModel):
    id: int
    path: str
    image_url: str


class Snippet(BaseModel):
    source: str = Field(description="name, folder, ocr, description or keywords.")
    text: str = Field(description="Part of that text, each matched word between [[ and ]].")


class Matched(BaseModel):
    semantic: float | None = Field(
        description="Cosine of the photo to the query's meaning (null: a words-only query)."
    )
    text: list[str] = Field(description="The query's words and quoted phrases found.")
    sources: list[str] = Field(description="Where they were found: name, folder, ocr, ...")
    snippets: list[Snippet] | None = Field(
        default=None, description="Where the words stand in that text (first results)."
    )


class SearchHit(BaseModel):
    id: int
    path: str
    score: float = Field(
        description="Cosine similarity to the query, -1..1; with fusion the cosine moved up "
        "by the words found (see README: Words and meaning)."
    )
    width: int
    height: int
    taken_at: str | None
    tags: list[TagScore] | None = Field(
        default=None, description="Stored zero-shot tags, best first (once `clipdex tag` ran)."
    )
    raw: RawCompanion | None = Field(
        default=None,
        description="The camera RAW of the same shot (same folder and name stem), listed "
        "with this photo instead of on its own (absent with raw_pairs=true).",
    )
    matched: Matched | None = Field(
        default=None, description="Why it matched: present when the library stores words."
    )
    kind: Literal["photo", "video"] = Field(
        default="photo", description="A video is one hit, at its best-scoring frame."
    )
    frame_time: float | None = Field(
        default=None,
        description="Videos: seconds into the video of the frame that scored (the moment).",
    )
    duration: float | None = Field(default=None, description="Videos: length in seconds.")
    thumbnail_url: str = Field(description="A JPEG; of a video, its scoring frame.")
    image_url: str = Field(
        description="The original file (range requests work: a video plays from frame_time "
        "with a `#t=` fragment)."
    )


class SearchResponse(BaseModel):
    query: str
    kind: Literal["text", "image", "similar"]
    k: int
    offset: int
    sort: str = "score"
    total: int | None = Field(
        default=None, description="How many photos passed the cut-off (null without one)."
    )
    cutoff: CutoffInfo | None = None
    fusion: Literal["calibrated", "rrf"] | None = Field(
        default=None, description="How meaning and words were fused (absent: meaning only)."
    )
    results: list[SearchHit]


class ImageMeta(BaseModel):
    id: int
    path: str
    name: str
    size: int
    width: int
    height: int
    format: str | None
    taken_at: str | None
    camera_make: str | None
    camera_model: str | None
    gps_lat: float | None
    gps_lon: float | None
    indexed_at: str | None
    sha256: str
    kind: Literal["photo", "video"] = "photo"
    duration: float | None = Field(default=None, description="Videos: seconds.")
    codec: str | None = Field(default=None, description="Videos: e.g. H264, HEVC, VP9, AV1.")
    frame_time: float | None = Field(
        default=None, description="Videos: the time of the frame the thumbnail shows."
    )
    thumbnail_url: str
    image_url: str
    similar_url: str


class IndexRequest(BaseModel):
    paths: list[str] = Field(
        min_length=1,
        max_length=100,
        description="Folders or files on the server, inside one of its --index-root folders "
        "(relative paths are taken from the first root).",
    )
    index: Literal["auto", "exact", "ivf"] | None = Field(
        default=None,
        description="Vector index kind afterwards: auto (exact below 100k photos, else ivf), "
        "exact or ivf (8-bit codes, exact re-rank, recall@10 >= 0.98); switching rebuilds "
        "from the catalog without re-encoding. Default: keep the library's choice.",
    )
    ocr: Literal["auto", "always", "never"] | None = Field(
        default=None,
        description="Read text in the photos indexed (OCR): auto (only photos the model finds "
        "likely to hold text), always or never. Default: the server's --ocr (auto).",
    )


class JobStatus(BaseModel):
    id: str
    paths: list[str]
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    total: int | None = Field(description="Files to process; null until discovery finished.")
    done: int
    failed: int
    img_per_s: float
    seconds: float
    error: str | None
    report: dict | None
    status_url: str


class JobList(BaseModel):
    jobs: list[JobStatus]


class SessionRequest(BaseModel):
    token: Text = Field(max_length=4096)


# -- OpenAI-compatible embeddings ---------------------------------------------------------
class EmbeddingRequest(BaseModel):
    model: Text = Field(max_length=256, examples=["mobileclip-s2"])
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, a list of texts, or (clipdex's extension) data:image/...;base64, "
        "URLs of images. Token arrays are not supported."
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: Text | None = Field(default=None, max_length=256)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
