"""REST routes for zero-shot classification, tags and near-duplicates.

``POST /api/classify`` (a photo id or an upload, plus labels), ``GET /api/tags`` (the labels
`clipdex tag` stored, with counts, for the page's tag filter) and ``GET /api/duplicates``.
The search routes' filters, cut-off and date order live in :mod:`.refine`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from retrieval.search.classify import make_labelset
from retrieval.search.duplicates import DEFAULT_THRESHOLD
from retrieval.search.errors import QueryError
from retrieval.server.api import State, errors, urls
from retrieval.server.errors import error_body
from retrieval.server.labels import RETRY_AFTER_S, LabelJob, preparing_message
from retrieval.server.refine import checked_folders
from retrieval.server.schemas import ErrorDetail, TagScore
from retrieval.server.workload import check_prompts

router = APIRouter(tags=["search"])


class Prediction(BaseModel):
    label: str
    probability: float = Field(description="Softmax over the given labels (sums to 1).")


class ClassifyResponse(BaseModel):
    id: int | None = Field(description="The photo's id, or null for an upload.")
    labels: int = Field(description="How many labels were compared.")
    templates: list[str]
    predictions: list[Prediction]


class LabelProgress(BaseModel):
    done: int = Field(description="Prompts encoded so far.")
    total: int = Field(description="Prompts the label set needs (labels times templates).")


class PreparingDetail(ErrorDetail):
    progress: LabelProgress | None = Field(
        None, description="With code `preparing`: how far the label set's preparation got."
    )


class PreparingResponse(BaseModel):
    error: PreparingDetail


PREPARING_503 = {
    "model": PreparingResponse,
    "description": "Code `preparing`: the default label set's vectors are being computed "
    "once for this model by a background job (shared by concurrent requests); retry after "
    "the `Retry-After` seconds. Also `not_ready` while the server starts.",
}


class TagCount(BaseModel):
    label: str
    images: int


class TagList(BaseModel):
    tags: list[TagCount]


class DuplicateMember(BaseModel):
    id: int
    path: str
    width: int
    height: int
    size: int
    score: float = Field(description="Cosine to the group's keeper.")
    tags: list[TagScore] | None = None
    thumbnail_url: str
    image_url: str


class DuplicateGroup(BaseModel):
    keeper: int = Field(description="Suggested photo to keep: the largest, then the oldest.")
    members: list[DuplicateMember] = Field(description="The keeper first.")


class DuplicatesResponse(BaseModel):
    threshold: float
    groups: list[DuplicateGroup]


@router.post(
    "/api/classify",
    response_model=ClassifyResponse,
    responses={**errors(400, 404, 409, 413, 415, 422, 429), 503: PREPARING_503},
)
def classify(
    request: Request,
    state: State,
    image_id: Annotated[
        int | None, Form(alias="id", ge=1, le=2**63 - 1, description="An indexed photo's id.")
    ] = None,
    file: Annotated[UploadFile | None, File(description="Or an image file.")] = None,
    labels: Annotated[
        str | None,
        Form(max_length=100_000, description="Comma-separated labels [default: data/labels.txt]."),
    ] = None,
    template: Annotated[
        list[str] | None, Form(description="Prompt templates with {} (repeatable).")
    ] = None,
    top: Annotated[int, Form(ge=1, le=1000, description="How many labels to return.")] = 5,
) -> dict:
    """Zero-shot classification of one photo: probabilities over labels, best first.

    The default label set is prepared once per model in the background: until it is ready
    this answers 503 `preparing` with the progress and `Retry-After`."""
    if (image_id is None) == (file is None):
        raise QueryError("send exactly one of the form fields id (a photo id) or file (an image)")
    labelset = make_labelset(labels, None, [t for t in template or () if t is not None])
    if labels is not None or template:  # the default set is the server's own, made once
        cap = state.settings.max_request_prompts
        check_prompts(len(labelset.labels), len(labelset.templates), cap)
    collection = state.require_collection()
    if image_id is not None:
        state.image_row(image_id)
    # The default label set is the server's own: prepared once by a shared background job
    # (503 `preparing` meanwhile). A request's own labels are its own cost: computed here,
    # capped above and stopped with the request like any model work.
    default = labels is None and not template
    matrix = state.label_vectors(labelset) if default else None  # before an upload's model call
    if isinstance(matrix, LabelJob):
        return _preparing(request, matrix)
    photo = image_id if image_id is not None else state.embed_upload(file.file.read())
    predictions = collection.classify(photo, labelset, top=top, label_vectors=matrix)
    return {
        "id": image_id,
        "labels": len(labelset.labels),
        "templates": list(labelset.templates),
        "predictions": [p.as_dict() for p in predictions],
    }


def _preparing(request: Request, job: LabelJob) -> JSONResponse:
    """503 `preparing`: the label set's job is running; progress in prompts."""
    body = error_body(request, 503, "preparing", preparing_message(job))
    body["error"]["progress"] = job.progress()
    return JSONResponse(body, 503, headers={"Retry-After": str(RETRY_AFTER_S)})


@router.get("/api/tags", response_model=TagList, responses=errors(503))
def tags(state: State) -> dict:
    """The labels `clipdex tag` stored, with how many photos carry each, most frequent first."""
    counts = state.require_library().catalog.tag_counts()
    return {"tags": [{"label": label, "images": n} for label, n in counts]}


@router.get("/api/duplicates", response_model=DuplicatesResponse, responses=errors(400, 422, 503))
def duplicates(
    request: Request,
    state: State,
    threshold: Annotated[
        float, Query(ge=0.5, le=1.0, description="Cosine at which photos count as copies.")
    ] = DEFAULT_THRESHOLD,
    folders: Annotated[
        list[str] | None, Query(alias="in", description="Only under these folders or globs.")
    ] = None,
) -> dict:
    """Groups of near-duplicate photos (bursts, resized or re-encoded copies), largest first."""
    collection = state.require_collection()
    groups = state.in_search_thread(collection.duplicates, threshold, checked_folders(folders))
    catalog = collection.library.catalog
    ids = [m.id for g in groups for m in g.members]
    tagged = catalog.tags_for(ids) if catalog.has_tags() else None
    return {"threshold": threshold, "groups": [_group(request, g, tagged) for g in groups]}


def _group(request: Request, group, tagged: dict | None) -> dict:
    members = []
    for member in group.members:
        document = member.as_dict()  # paths lossless: see .responses
        if tagged is not None:
            pairs = tagged.get(member.id, [])
            document["tags"] = [{"label": lab, "score": round(sc, 4)} for lab, sc in pairs]
        document.update(urls(request, member.id))
        members.append(document)
    return {"keeper": group.keeper.id, "members": members}
