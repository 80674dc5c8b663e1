"""The REST API under /api, plus /healthz and /readyz: thin routes over ServerState.

Photos are addressed by catalog id only; their paths come from the catalog, never from the
request. Every route that can fail documents its error statuses.
"""

from __future__ import annotations

import datetime as dt
import mimetypes
import os
from enum import IntEnum
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Query, Request, Response, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from PIL import Image

from indexer.paths import display
from retrieval.search.engine import SearchPage, SearchResult
from retrieval.server.errors import NotReady
from retrieval.server.jobs import IndexJob
from retrieval.server.originals import (
    CataloguedFileResponse,
    RangeCheckedFileResponse,
    is_object,
    object_video_response,
    open_catalogued,
    read_object,
)
from retrieval.server.refine import Options, page_fields
from retrieval.server.schemas import (
    ErrorResponse,
    ImageMeta,
    IndexRequest,
    JobList,
    JobStatus,
    SearchResponse,
    SessionRequest,
)
from retrieval.server.security import Auth
from retrieval.server.state import ServerState
from retrieval.server.thumbnails import CACHE_CONTROL, THUMBNAIL_SIZES

router = APIRouter()


def get_state(request: Request) -> ServerState:
    return request.app.state.clipdex


State = Annotated[ServerState, Depends(get_state)]
ImageId = Annotated[int, PathParam(ge=1, le=2**63 - 1, description="A photo's catalog id.")]
ThumbnailSize = IntEnum("ThumbnailSize", {f"px{size}": size for size in THUMBNAIL_SIZES})


def errors(*statuses: int) -> dict:
    """OpenAPI documentation of the error statuses a route can answer."""
    return {status: {"model": ErrorResponse} for status in statuses}


# -- health -----------------------------------------------------------------------------
@router.get("/healthz", tags=["health"])
async def healthz() -> dict:
    """Liveness: the process answers. Never needs a token. Async, so it never queues behind
    busy worker threads."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], responses=errors(503))
def readyz(state: State) -> dict:
    """Readiness: 200 once the library is open and the model is loaded, else 503 and why."""
    if not state.ready:
        state.require_library()
        state.require_encoder()
        raise NotReady("still starting")
    return {"status": "ready", "model": state.encoder.identity.name}


@router.get("/api/info", tags=["library"])
def info(state: State) -> dict:
    """The library, the model, readiness, limits and running index jobs."""
    return state.info()


# -- search -----------------------------------------------------------------------------
@router.get(
    "/api/search",
    response_model=SearchResponse,
    tags=["search"],
    responses=errors(400, 409, 422, 503),
)
def search(
    request: Request,
    state: State,
    q: Annotated[str, Query(min_length=1, max_length=1000, description="What the photos show.")],
    options: Options,
) -> dict:
    """Photos that match a text, best first. The text may weigh terms ("beach + sunset -
    people", "2:dog + cat"); filters, cut-off and date order are optional (see README)."""
    page = state.search_text(q, options)
    return search_response(request, q, "text", page)


@router.post(
    "/api/search/image",
    response_model=SearchResponse,
    tags=["search"],
    responses=errors(400, 409, 413, 415, 422, 503),
)
def search_image(
    request: Request,
    state: State,
    file: Annotated[UploadFile, File(description="An image file (its bytes decide its type).")],
    options: Options,
) -> dict:
    """Photos that look like an uploaded image (multipart field ``file``)."""
    data = file.file.read()
    page = state.search_image(data, options)
    name = os.path.basename(file.filename or "") or "uploaded image"
    return search_response(request, name, "image", page)


@router.get(
    "/api/images/{image_id}/similar",
    response_model=SearchResponse,
    tags=["search"],
    responses=errors(400, 404, 422, 503),
)
def similar(
    request: Request,
    state: State,
    image_id: ImageId,
    options: Options,
) -> dict:
    """Photos that look like an indexed photo ("more like this"); needs no model call."""
    page = state.similar(image_id, options)
    return search_response(request, str(image_id), "similar", page)


def search_response(request: Request, query: str, kind: str, page: SearchPage) -> dict:
    """The JSON answer of a search route: the query, its paging and refinements, the hits."""
    return {
        "query": query,
        "kind": kind,
        "k": page.options.k,
        "offset": page.options.offset,
        **page_fields(page),
        "results": [hit(request, result) for result in page.results],
    }


def hit(request: Request, result: SearchResult) -> dict:
    document = result.as_dict()  # the path as the catalog holds it: see .responses
    document.update(urls(request, result.id, result.frame_time))
    if result.raw is not None:  # the RAW of a RAW+JPEG pair: its original bytes' URL
        raw_id = result.raw["id"]
        document["raw"] = {**result.raw, "image_url": urls(request, raw_id)["image_url"]}
    return document


def urls(request: Request, image_id: int, frame_time: float | None = None) -> dict:
    """The thumbnail and file URLs of a photo; of a video, the thumbnail of one frame."""
    base = f"{request.scope.get('root_path', '')}/api/images/{image_id}"
    at = f"&t={frame_time:g}" if frame_time is not None else ""
    return {"thumbnail_url": f"{base}/thumbnail?size=256{at}", "image_url": f"{base}/file"}


# -- photos -----------------------------------------------------------------------------
@router.get(
    "/api/images/{image_id}",
    response_model=ImageMeta,
    tags=["photos"],
    responses=errors(404, 422, 503),
)
def image_meta(request: Request, state: State, image_id: ImageId) -> dict:
    """Everything the catalog knows about one photo."""
    row = state.image_row(image_id)
    document = {key: _jsonable(value) for key, value in row.items()}
    document["name"] = os.path.basename(row["path"])
    document.update(urls(request, image_id, row.get("frame_time")))
    document["similar_url"] = f"{request.scope.get('root_path', '')}/api/images/{image_id}/similar"
    return document


def _jsonable(value):
    return value.isoformat() if isinstance(value, dt.datetime) else value


@router.get(
    "/api/images/{image_id}/file",
    tags=["photos"],
    response_class=FileResponse,
    responses={200: {"content": {"image/*": {}}}, **errors(404, 422, 503)},
)
def image_file(request: Request, state: State, image_id: ImageId) -> Response:
    """The original file, with the content type of what was decoded when it was indexed.
    Range requests are answered (206), so a browser plays a video from any moment.

    Only the very file that was indexed is served (no symlink on any component of its
    path; the device, inode, size and mtime recorded): a file replaced or changed, or a
    link swapped in on its path since, is answered 404 ``file_changed`` ("run clipdex
    index"), never with its bytes, and the photo is queued for re-indexing.
    """
    row = state.image_row(image_id)
    name = display(os.path.basename(row["path"]))  # a header: printable text
    if is_object(row):  # indexed from s3:// or gs://: sent from the object store
        headers = {
            "Cache-Control": "private, max-age=3600",
            "Content-Disposition": f"inline; filename*=utf-8''{quote(name)}",
        }
        if row.get("kind") == "video":  # streamed, never held whole; Range from a seek
            return object_video_response(
                request, row, media_type(row), headers, state.queue_reindex
            )
        data = read_object(row, state.queue_reindex)  # checked against the catalogued hash
        return Response(data, media_type=media_type(row), headers=headers)
    fd, stat = open_catalogued(row, state.queue_reindex)
    return CataloguedFileResponse(
        fd,
        stat,
        media_type=media_type(row),
        filename=name,
        content_disposition_type="inline",
        headers={"Cache-Control": "private, max-age=3600"},
    )


def media_type(row: dict) -> str:
    by_format = Image.MIME.get((row.get("format") or "").upper())
    if by_format:
        return by_format
    guessed, _ = mimetypes.guess_type(row["path"])
    if row.get("kind") == "video":
        return guessed if guessed and guessed.startswith("video/") else "video/mp4"
    return guessed if guessed and guessed.startswith("image/") else "application/octet-stream"


@router.get(
    "/api/images/{image_id}/thumbnail",
    tags=["photos"],
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, 304: {}, **errors(404, 422, 503)},
)
def thumbnail(
    request: Request,
    state: State,
    image_id: ImageId,
    size: Annotated[ThumbnailSize, Query(description="Longest side in pixels.")] = 256,
    t: Annotated[
        float | None,
        Query(
            ge=0,
            le=10**7,
            description="Videos: the frame at this second [default: the "
            "frame the video's row holds]. Ignored for photos.",
        ),
    ] = None,
) -> Response:
    """A JPEG thumbnail (EXIF orientation applied; of a video, one frame, rotation applied),
    cached in the library, with an ETag.

    Made only from the very file that was indexed (as ``/file``: else 404 ``file_changed``)
    and cached by what was read, so it is never stale or another file's."""
    row = state.image_row(image_id)
    etag = request.headers.get("if-none-match", "")
    rendered = state.thumbnails.get(row, int(size), etag, at=t)
    headers = {"ETag": rendered.etag, "Cache-Control": CACHE_CONTROL}
    if rendered.not_modified:
        return Response(status_code=304, headers=headers)
    if rendered.path is not None:
        return RangeCheckedFileResponse(rendered.path, media_type="image/jpeg", headers=headers)
    return Response(rendered.data, media_type="image/jpeg", headers=headers)


# -- indexing ---------------------------------------------------------------------------
@router.post(
    "/api/index",
    status_code=202,
    response_model=JobStatus,
    tags=["library"],
    responses=errors(400, 403, 422, 503),
)
def start_index(request: Request, state: State, body: IndexRequest) -> dict:
    """Index folders (inside the server's --index-root) in the background; returns the job."""
    return job_document(request, state.submit_index(body.paths, body.index, body.ocr))


@router.get("/api/index", response_model=JobList, tags=["library"])
def list_jobs(request: Request, state: State) -> dict:
    """Recent index jobs, newest first."""
    return {"jobs": [job_document(request, job) for job in state.jobs.recent()]}


@router.get(
    "/api/index/{job_id}", response_model=JobStatus, tags=["library"], responses=errors(404, 422)
)
def job_status(
    request: Request,
    state: State,
    job_id: Annotated[str, PathParam(pattern="^[0-9a-f]{1,64}$")],
) -> dict:
    """Progress of one job: done / total / failed / img per s / state."""
    return job_document(request, state.jobs.get(job_id))


def job_document(request: Request, job: IndexJob) -> dict:
    document = job.as_dict()
    document["status_url"] = f"{request.scope.get('root_path', '')}/api/index/{job.id}"
    return document


# -- web page session -------------------------------------------------------------------
@router.post("/api/session", status_code=204, tags=["auth"], responses=errors(401, 422, 429))
def login(request: Request, state: State, body: SessionRequest) -> Response:
    """Trade the token for a session cookie (HttpOnly, SameSite=Strict), so the page's <img>
    requests carry it. The session ends on logout, after the server's --session-hours, or
    when the server stops. Wrong tokens are throttled per address: 429 with Retry-After."""
    response = Response(status_code=204)
    auth: Auth = request.app.state.auth
    if auth.token is None:
        return response
    refusal = auth.check(request.scope, body.token)
    if refusal is not None:
        return refusal
    auth.session_cookie(response, request.scope)
    return response


@router.delete("/api/session", status_code=204, tags=["auth"])
def logout(request: Request) -> Response:
    """End the page's session: its id is revoked, not only its cookie deleted."""
    response = Response(status_code=204)
    request.app.state.auth.end_session(response, request.scope)
    return response
