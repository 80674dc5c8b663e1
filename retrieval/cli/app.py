"""The ``clipdex`` command line: thin typer commands over :class:`retrieval.collection.Collection`.

Each command parses its flags, calls one method of the front door and renders the answer.
Flags and ``CLIPDEX_*`` environment variables are resolved here, at the edge, and passed
inward as plain values. Every command takes ``--library`` (env CLIPDEX_LIBRARY) and
``--json``; those that load the model take ``--weights``, ``--device``, ``--backend`` and
``--cache-dir`` (env CLIPDEX_CACHE); those that report progress or notes on stderr take
``-q/--quiet``. Domain errors become one line on stderr and exit 1; usage errors exit 2
(click's convention); nothing ever prints a traceback.

Help is rendered by rich, which reads ``[...]`` as markup and drops it silently: write
"(default: ...)" in help texts, never "[default: ...]". tests/test_help.py renders every
command's ``--help`` and checks that each help text survives whole.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from indexer.errors import ClipdexError, ConfigError
from indexer.paths import DISPLAY_ERRORS, display

if TYPE_CHECKING:
    from retrieval.cli.progress import PromptProgress
    from retrieval.collection import Collection
    from retrieval.search.classify import LabelSet
    from retrieval.search.engine import SearchPage

app = typer.Typer(
    name="clipdex",
    help="Search your photos by what is in them (MobileCLIP-S2 + FAISS + SQLite).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
stdout = Console(emoji=False)  # ":smile:" in a file name stays as it is
stderr = Console(stderr=True, emoji=False)


def _opt(*names: str, help: str, **kwargs: Any) -> Any:
    return typer.Option(*names, help=help, show_default=False, **kwargs)


LibraryOpt = Annotated[
    Path | None,
    _opt(
        "--library",
        envvar="CLIPDEX_LIBRARY",
        help="Library directory (default: 'library' in the user data folder).",
    ),
]
WeightsOpt = Annotated[
    Path | None,
    _opt(
        "--weights",
        envvar="CLIPDEX_WEIGHTS",
        help="Local MobileCLIP-S2 checkpoint (offline use) instead of the hub's datacompdr.",
    ),
]
CacheOpt = Annotated[
    Path | None,
    _opt(
        "--cache-dir",
        envvar="CLIPDEX_CACHE",
        help="Folder for the exported ONNX model (default: the user cache folder).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
QuietOpt = Annotated[
    bool, typer.Option("-q", "--quiet", help="No progress bar or notes on stderr; errors only.")
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto | cpu | cuda | mps", envvar="CLIPDEX_DEVICE")
]
BackendOpt = Annotated[
    str,
    typer.Option(
        "--backend",
        envvar="CLIPDEX_BACKEND",
        help="auto | torch | onnx (auto: ONNX Runtime on a CPU, torch on a GPU).",
    ),
]
KOpt = Annotated[int, typer.Option("-k", "--k", min=1, max=10_000, help="How many results.")]


# -- search refinements (filters, cut-off, order, paging): see retrieval/search/options.py --
class SortOrder(str, Enum):
    score = "score"
    date = "date"
    date_asc = "date-asc"


class CutoffRule(str, Enum):
    auto = "auto"
    none = "none"


LabelsFileOpt = Annotated[
    Path | None, _opt("--labels-file", help="One label per line (default: data/labels.txt).")
]
TemplateOpt = Annotated[
    list[str] | None, _opt("--template", help="Prompt with {} for the label (repeatable).")
]
PhotoList = list[str] | None
LikeOpt = Annotated[PhotoList, _opt("--like", help="Add a photo (id, path or file) to the query.")]
UnlikeOpt = Annotated[PhotoList, _opt("--unlike", help="Subtract a photo from the query.")]
AfterOpt = Annotated[
    str | None, _opt("--after", help="Taken on/after DATE (YYYY[-MM[-DD]], ISO); else mtime.")
]
BeforeOpt = Annotated[str | None, _opt("--before", help="Taken before DATE.")]
InOpt = Annotated[PhotoList, _opt("--in", help="Only under this folder or folder glob.")]
CameraOpt = Annotated[str | None, _opt("--camera", help="Camera make/model contains TEXT.")]
MinSizeOpt = Annotated[str | None, _opt("--min-size", help="At least WxH, either orientation.")]
FormatOpt = Annotated[PhotoList, _opt("--format", help="jpeg, png, heic, ... (repeatable).")]
TagOpt = Annotated[PhotoList, _opt("--tag", help="Has this `clipdex tag` label (repeatable).")]
KindOpt = Annotated[str | None, _opt("--kind", help="photo or video: only that kind.")]
CutoffOpt = Annotated[
    CutoffRule | None, _opt("--cutoff", help="auto: only results that stand out for the query.")
]
MinScoreOpt = Annotated[float | None, _opt("--min-score", help="Only results scoring >= X.")]
SortOpt = Annotated[
    SortOrder, typer.Option("--sort", help="score, or date (newest first) / date-asc.")
]
OffsetOpt = Annotated[int, typer.Option("--offset", min=0, help="Skip this many (paging).")]
RawPairsOpt = Annotated[
    bool,
    typer.Option(
        "--raw-pairs",
        help="List both files of a RAW+JPEG pair (default: once, as the JPEG, RAW noted).",
    ),
]


def cli_command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Register a command whose domain errors print one line and exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ClipdexError as exc:
            fail(cli_message(exc))
        except KeyboardInterrupt:
            stderr.print("interrupted: the library keeps its last checkpoint")
            raise typer.Exit(130) from None

    return app.command()(wrapper)


def fail(message: str) -> None:
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def cli_message(exc: ClipdexError) -> str:
    """A domain error's message, plus the flag of the setting that fixes it (``--weights``).

    The indexer words its errors without flags (an HTTP client has none) and names the
    setting in ``exc.setting``; every setting is the flag of the same name here.
    """
    if not exc.setting:
        return str(exc)
    return f"{exc} (--{exc.setting.replace('_', '-')})"


def emit_json(document: Any) -> None:
    """One JSON document on stdout. A path's undecodable bytes (lone surrogates) are
    written as ``\\udcNN`` escapes: valid JSON that ``json.loads`` turns back into the
    very path, which ``os.fsencode`` turns back into the very bytes."""
    text = json.dumps(document, ensure_ascii=False)
    sys.stdout.write(text.encode("utf-8", "backslashreplace").decode("utf-8") + "\n")


def note(message: str | Text, quiet: bool) -> None:
    """A note on stderr, unless ``--quiet``."""
    if not quiet:
        stderr.print(message, highlight=False, soft_wrap=True)


def label_progress(labelset: LabelSet, default: bool, quiet: bool) -> PromptProgress:
    """The note and bar shown while a label set's vectors are computed (not when cached)."""
    from retrieval.cli.progress import PromptProgress

    what = "the default labels" if default else f"{len(labelset.labels)} labels"
    message = f"preparing {what} once for this model: {{total}} prompts"
    return PromptProgress(stderr, message, enabled=not quiet)


def path_cell(path: str) -> Text:
    """A path for a table cell: printable, and never read as rich markup ("[/]")."""
    return Text(display(path))


def open_collection(
    library: Path | None,
    weights: Path | None = None,
    device: str = "auto",
    backend: str = "auto",
    cache_dir: Path | None = None,
    *,
    quiet: bool = False,
    read_only: bool = False,
    single_query: bool = False,
) -> Collection:
    """The front door over ``--library`` with the model the flags name (loaded lazily).

    ``single_query``: this process embeds one text, then exits (``search``): the model
    is set up to start fast rather than to run many times.
    """
    from retrieval.collection import Collection, EncoderLoader

    if quiet:  # e.g. the one-time ONNX export notice
        logging.getLogger("clipdex").setLevel(logging.ERROR)
    loader = EncoderLoader(weights, device, backend, cache_dir, single_query=single_query)
    return Collection.open(library, read_only=read_only, encoder=loader)


def _value(choice: Enum | None) -> str | None:
    return choice.value if choice is not None else None


S3EndpointOpt = Annotated[
    str | None,
    _opt(
        "--s3-endpoint",
        envvar="CLIPDEX_S3_ENDPOINT",
        help="For s3:// paths: the URL of an S3-compatible server (MinIO, Ceph), e.g. "
        "http://127.0.0.1:9000 (default: AWS_ENDPOINT_URL, else AWS itself). Credentials: "
        "AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY or AWS_PROFILE.",
    ),
]
S3RegionOpt = Annotated[
    str | None,
    _opt(
        "--s3-region",
        envvar="CLIPDEX_S3_REGION",
        help="For s3:// paths: the bucket's region (default: AWS_REGION).",
    ),
]
S3AnonymousOpt = Annotated[
    bool,
    _opt(
        "--s3-anonymous",
        envvar="CLIPDEX_S3_ANONYMOUS",
        help="For s3:// and gs:// paths: unsigned requests (a public bucket, no credentials).",
    ),
]


def object_store_settings(endpoint: str | None, region: str | None, anonymous: bool) -> None:
    """Hand the object-storage flags to every reader (decode workers, Ray actors) through
    this process's environment; nothing of pyarrow is imported."""
    from indexer.ingest.objectstore import apply_settings

    apply_settings(endpoint, region, anonymous)


OcrOpt = Annotated[
    str,
    typer.Option(
        "--ocr",
        envvar="CLIPDEX_OCR",
        help="Read text in photos (OCR, offline, on the CPU): auto (only photos the model "
        "finds likely to hold text: documents, screenshots, signs, receipts), always, or "
        "never. Applies to photos indexed in this run; renamed photos keep their text.",
    ),
]


# -- commands ------------------------------------------------------------------------------
@cli_command
def index(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="Folders or image files to index, or object-storage URIs: s3://bucket/prefix, "
            "gs://bucket/prefix (the catalog stores the URI; see --s3-endpoint).",
        ),
    ],
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", help="Glob of paths to skip (repeatable), e.g. '*/raw/*'."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=1024, help="Images per model call.")] = 16,
    workers: Annotated[
        int | None,
        _opt("--workers", min=1, max=64, help="Decode worker processes (default: cores, max 4)."),
    ] = None,
    max_megapixels: Annotated[
        float,
        typer.Option(min=0.01, help="Refuse images larger than this (decompression bombs)."),
    ] = 89.0,
    checkpoint_every: Annotated[
        int, typer.Option(min=1, help="Commit catalog + index at least every N images.")
    ] = 256,
    index_kind: Annotated[
        str | None,
        typer.Option(
            "--index",
            help="Vector index kind: auto (exact below 100k photos, else ivf), exact (scan "
            "every vector) or ivf (8-bit codes, exact re-rank, recall@10 >= 0.98). Recorded "
            "in the library; switching rebuilds from the catalog, no re-encoding. "
            "Default: keep the library's choice (auto).",
        ),
    ] = None,
    cluster: Annotated[
        str | None,
        _opt(
            "--cluster",
            envvar="CLIPDEX_CLUSTER",
            help="Decode and encode on a Ray cluster: auto (the running one, RAY_ADDRESS), "
            "local (start one here) or its address, e.g. 10.0.0.5:6379 (needs the ray extra "
            "of clipdex).",
        ),
    ] = None,
    shard_size: Annotated[
        int,
        typer.Option(min=1, max=100_000, help="With --cluster: files per shard (and commit)."),
    ] = 64,
    s3_endpoint: S3EndpointOpt = None,
    s3_region: S3RegionOpt = None,
    s3_anonymous: S3AnonymousOpt = False,
    ocr: OcrOpt = "auto",
    ocr_threshold: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            envvar="CLIPDEX_OCR_THRESHOLD",
            help="With --ocr auto: read a photo when its text likelihood (0-1) is at least this.",
        ),
    ] = 0.2,
    device: DeviceOpt = "auto",
    backend: BackendOpt = "auto",
    library: LibraryOpt = None,
    weights: WeightsOpt = None,
    cache_dir: CacheOpt = None,
    prepare_labels: Annotated[
        bool,
        typer.Option(
            "--prepare-labels/--no-prepare-labels",
            envvar="CLIPDEX_PREPARE_LABELS",
            help="Afterwards, compute the default labels' vectors for classify/tag if missing "
            "(once per model; after the report, Ctrl-C skips).",
        ),
    ] = True,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Index photos (recursively, incrementally) into the library."""
    from indexer.ingest.ocr import check_mode
    from indexer.ingest.pipeline import IndexOptions
    from indexer.store.kindchoice import check_choice
    from retrieval.cli.progress import BarProgress

    options = IndexOptions(
        excludes=exclude or (),
        batch_size=batch_size,
        max_megapixels=max_megapixels,
        checkpoint_every=checkpoint_every,
        index_kind=check_choice(index_kind),
        ocr=check_mode(ocr),
        ocr_threshold=ocr_threshold,
    )
    if workers:
        options.workers = workers
    object_store_settings(s3_endpoint, s3_region, s3_anonymous)
    bar = BarProgress(stderr, enabled=not (json_out or quiet))
    photos = open_collection(library, weights, device, backend, cache_dir, quiet=quiet)
    on_cluster = None
    if cluster is not None:
        from indexer.ingest.cluster import ClusterOptions  # Ray itself loads when it connects

        on_cluster = ClusterOptions(cluster, shard_size=shard_size)
    with photos:
        with bar:
            report = photos.index(paths, options, bar, on_cluster)
        print_index_report(report, json_out, quiet)
        if prepare_labels and report.indexed:  # the writer lock is already released
            prepare_default_labels(photos, quiet or json_out)


@cli_command
def watch(
    paths: Annotated[list[str], typer.Argument(help="Folders to keep the library in step with.")],
    poll: Annotated[
        float | None,
        _opt(
            "--poll",
            min=0.1,
            help="Rescan every SECONDS instead of following file-system events (network "
            "mounts; chosen by itself where events are unavailable).",
        ),
    ] = None,
    debounce: Annotated[
        float,
        typer.Option(min=0.0, help="A batch starts once no change arrived for this many seconds."),
    ] = 2.0,
    max_wait: Annotated[
        float,
        typer.Option(min=0.0, help="...or once the oldest waiting change waited this long."),
    ] = 60.0,
    settle: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="A file is read once its size and mtime held still this many seconds "
            "(files still being copied wait).",
        ),
    ] = 2.0,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", help="Glob of paths to skip (repeatable), e.g. '*/raw/*'."),
    ] = None,
    workers: Annotated[
        int | None,
        _opt("--workers", min=1, max=64, help="Decode worker processes (default: cores, max 4)."),
    ] = None,
    max_megapixels: Annotated[
        float,
        typer.Option(min=0.01, help="Refuse images larger than this (decompression bombs)."),
    ] = 89.0,
    ocr: OcrOpt = "auto",
    device: DeviceOpt = "auto",
    backend: BackendOpt = "auto",
    library: LibraryOpt = None,
    weights: WeightsOpt = None,
    cache_dir: CacheOpt = None,
    quiet: QuietOpt = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON line per batch on stdout.")
    ] = False,
) -> None:
    """Keep the library in sync with folders: index new, changed, moved and deleted photos
    as they happen, until Ctrl-C."""
    from indexer.ingest.ocr import check_mode
    from indexer.ingest.pipeline import IndexOptions
    from indexer.ingest.sync import SyncOptions

    options = IndexOptions(
        excludes=exclude or (), max_megapixels=max_megapixels, ocr=check_mode(ocr)
    )
    if workers:
        options.workers = workers
    sync_options = SyncOptions(
        quiet_seconds=debounce, max_wait_seconds=max_wait, settle_seconds=settle, poll_seconds=poll
    )
    photos = open_collection(library, weights, device, backend, cache_dir, quiet=quiet)
    with photos:
        syncer = photos.syncer(
            paths,
            options,
            sync_options,
            on_batch=lambda record, report: print_batch(record, report, json_out, quiet),
            on_note=lambda message: note(Text(message), quiet),
        )
        what = ", ".join(display(str(root)) for root in syncer.roots)
        note(Text(f"watching {what} (library {photos.root}); Ctrl-C stops"), quiet)
        # Ctrl-C is how a watch ends: the first stops it after the current step (a flag, so
        # no finaliser or library code can swallow it), a second one at once; `kill` is
        # the first. The library keeps its last checkpoint either way.
        with contextlib.suppress(KeyboardInterrupt), stop_on_signals(quiet) as stop:
            syncer.run(stop)
    status = syncer.status()
    note(
        Text(
            f"stopped after {status['batches']} batches: indexed {status['indexed']}, "
            f"reused {status['reused']}, removed {status['removed']}, failed {status['failed']}"
        ),
        quiet,
    )


@contextlib.contextmanager
def stop_on_signals(quiet: bool = False) -> Iterator[threading.Event]:
    """An event SIGTERM or a first Ctrl-C sets for the block; a second Ctrl-C raises
    KeyboardInterrupt as usual. Only in the main thread (elsewhere the event stays unset)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def interrupt(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        note(Text("stopping after the current step (Ctrl-C again to stop now)"), quiet)

    previous_term = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    previous_int = signal.signal(signal.SIGINT, interrupt)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def print_batch(record, report, json_out: bool, quiet: bool) -> None:
    """One finished sync batch: a JSON line, or failures on stderr and one summary line."""
    import datetime as dt

    if json_out:
        emit_json(record.as_dict())
        sys.stdout.flush()
        return
    for path, reason in report.failures[:20]:
        note(f"[yellow]failed:[/] {escape(display(path))}: {escape(reason)}", quiet)
    if len(report.failures) > 20:
        note(f"... and {len(report.failures) - 20} more: see `clipdex failures`", quiet)
    at = dt.datetime.fromtimestamp(record.finished_at).strftime("%H:%M:%S")
    stdout.print(
        f"{at} batch {record.number}: indexed {record.indexed}, reused {record.reused}, "
        f"removed {record.removed}, failed {record.failed} in {record.seconds:.1f}s",
        highlight=False,
    )


def prepare_default_labels(photos: Collection, quiet: bool) -> None:
    """Compute the default label vectors now, if missing, so a first classify is instant.
    Ctrl-C stops it without harm: the index is committed and classify computes them."""
    if photos.labels_prepared():
        return
    from retrieval.search.classify import make_labelset

    bar = label_progress(make_labelset(), True, quiet)
    try:
        with bar:
            photos.label_vectors(progress=bar)
    except KeyboardInterrupt:
        note("skipped preparing the labels: the first classify or tag will", quiet)


def print_index_report(report, json_out: bool, quiet: bool) -> None:
    """The index report: JSON, or failures on stderr and one summary line."""
    if json_out:
        emit_json(report.as_dict())
        return
    for path, reason in report.failures[:20]:
        note(f"[yellow]failed:[/] {escape(display(path))}: {escape(reason)}", quiet)
    if len(report.failures) > 20:
        note(f"... and {len(report.failures) - 20} more: see `clipdex failures`", quiet)
    s = report.as_dict()
    rate = s["indexed"] / s["seconds"] if s["seconds"] else 0.0
    stdout.print(
        f"indexed {s['indexed']}, unchanged {s['unchanged']}, reused {s['reused']}, "
        f"removed {s['removed']}, failed {s['failed']} in {s['seconds']:.1f}s ({rate:.1f} img/s)"
    )
    if report.index_rebuilt:
        stdout.print(f"vector index rebuilt from the catalog as {report.index_rebuilt}")
    if report.ocr.unavailable:
        note(f"[yellow]no text read:[/] {escape(report.ocr.unavailable)}", quiet)
    if report.ocr.read:
        stdout.print(
            f"text read (OCR) in {report.ocr.read} photos, found in {report.ocr.with_text} "
            f"({report.ocr.seconds:.1f}s)"
        )


@cli_command
def search(
    query: Annotated[
        str | None,
        typer.Argument(
            help='What the photos show, e.g. "beach + sunset - people". Where words are '
            "stored (names, keywords, text in photos) they are searched too: '\"out of "
            "order\"' must appear; text:WORD looks in text in photos, captions and keywords "
            "only, name:WORD in file and folder names only."
        ),
    ] = None,
    k: KOpt = 20,
    like: LikeOpt = None,
    unlike: UnlikeOpt = None,
    after: AfterOpt = None,
    before: BeforeOpt = None,
    folder: InOpt = None,
    camera: CameraOpt = None,
    min_size: MinSizeOpt = None,
    formats: FormatOpt = None,
    tag: TagOpt = None,
    kind: KindOpt = None,
    cutoff: CutoffOpt = None,
    min_score: MinScoreOpt = None,
    sort: SortOpt = SortOrder.score,
    offset: OffsetOpt = 0,
    raw_pairs: RawPairsOpt = False,
    device: DeviceOpt = "auto",
    backend: BackendOpt = "auto",
    library: LibraryOpt = None,
    weights: WeightsOpt = None,
    cache_dir: CacheOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Find photos by describing them: weighted terms, photos, filters, cut-off, date order."""
    from retrieval.search.options import SearchOptions
    from retrieval.search.query import describe

    if query is None and not like:
        raise typer.BadParameter("give a QUERY, or --like PHOTO")
    options = SearchOptions(
        k=k,
        offset=offset,
        after=after,
        before=before,
        folders=folder,
        camera=camera,
        min_size=min_size,
        formats=formats,
        tags=tag,
        kind=kind,
        cutoff=_value(cutoff),
        min_score=min_score,
        sort=sort.value,
        raw_pairs=raw_pairs,
    )
    photos = open_collection(
        library, weights, device, backend, cache_dir, quiet=quiet, read_only=True, single_query=True
    )
    with photos:
        page = photos.search(query, like=like or (), unlike=unlike or (), options=options)
    print_page(query if query is not None else describe(page.terms or []), page, json_out, quiet)


@cli_command
def similar(
    photo: Annotated[str, typer.Argument(help="An indexed photo's id or path, or any image file.")],
    k: KOpt = 20,
    after: AfterOpt = None,
    before: BeforeOpt = None,
    folder: InOpt = None,
    camera: CameraOpt = None,
    min_size: MinSizeOpt = None,
    formats: FormatOpt = None,
    tag: TagOpt = None,
    kind: KindOpt = None,
    cutoff: CutoffOpt = None,
    min_score: MinScoreOpt = None,
    sort: SortOpt = SortOrder.score,
    offset: OffsetOpt = 0,
    raw_pairs: RawPairsOpt = False,
    device: DeviceOpt = "auto",
    backend: BackendOpt = "auto",
    library: LibraryOpt = None,
    weights: WeightsOpt = None,
    cache_dir: CacheOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Find photos that look like a photo (filters, cut-off and order as for search)."""
    from retrieval.search.options import SearchOptions

    options = SearchOptions(
        k=k,
        offset=offset,
        after=after,
        before=before,
        folders=folder,
        camera=camera,
        min_size=min_size,
        formats=formats,
        tags=tag,
        kind=kind,
        cutoff=_value(cutoff),
        min_score=min_score,
        sort=sort.value,
        raw_pairs=raw_pairs,
    )
    photos = open_collection(
        library, weights, device, backend, cache_dir, quiet=quiet, read_only=True
    )
    with photos:
        page = photos.similar(photo, options)
    print_page(photo, page, json_out, quiet)


@cli_command
def embed(
    text: Annotated[str | None, typer.Option("--text", help="Text to embed.")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Image file to embed.")] = None,
    device: DeviceOpt = "auto",
    backend: BackendOpt = "auto",
    library: LibraryOpt = None,
    weights: WeightsOpt = None,
    cache_dir: CacheOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Print the L2-normalised embedding of a text or an image."""
    if (text is None) == (image is None):
        raise typer.BadParameter("give exactly one of --text or --image")
    photos = open_collection(library, weights, device, backend, cache_dir, quiet=quiet)
    vector = photos.embed_text(text) if text is not None else photos.embed_image(image)
    document = {
        "model": photos.encoder.identity.name,
        "dim": int(vector.shape[0]),
        "vector": vector.tolist(),
    }
    if json_out:
        emit_json(document)
    else:
        stdout.print(f"{document['model']} ({document['dim']}-d):")
        sys.stdout.write(" ".join(f"{x:.6f}" for x in vector) + "\n")


@cli_command
def info(library: LibraryOpt = None, json_out: JsonOpt = False) -> None:
    """Show what the library holds and which model made it."""
    from rich.table import Table

    with open_collection(library, read_only=True) as photos:
        facts = photos.info()
    if json_out:
        emit_json(facts.as_dict())
        return
    table = Table(show_header=False, box=None)
    table.add_row("library", facts.library)
    table.add_row("model", facts.model_name or "(none yet)")
    images = str(facts.images)
    if facts.videos:  # a video is one result, searched at each of its kept frames
        images += (
            f" ({facts.photos} photos, {facts.videos} videos with "
            f"{facts.video_frames} searchable frames)"
        )
    table.add_row("images", images)
    table.add_row("failed", str(facts.failed))
    if facts.reindex_queued:  # the server refused their files: `clipdex index` reads them
        note = "run `clipdex index` on their folders"
        table.add_row("to re-index", f"{facts.reindex_queued} ({note})")
    table.add_row("on disk", f"{facts.bytes_on_disk / 1e6:.1f} MB")
    table.add_row("index", describe_index(facts.index))
    stdout.print(table)


def describe_index(index: dict) -> str:
    """One line for the vector index: its kind, the choice behind it, and for ivf the
    lists, probes and recall measured when it was built."""
    text = f"{index.get('kind')} (chosen: {index.get('choice', 'auto')})"
    if index.get("kind") == "ivf" and index.get("nlist"):
        text += f", {index['nlist']} lists, nprobe {index['nprobe']}"
        if index.get("recall_at_10") is not None:
            text += (
                f", recall@10 {index['recall_at_10']:.3f} measured on "
                f"{index.get('recall_queries', 0)} held-out queries"
            )
    return text


@cli_command
def failures(library: LibraryOpt = None, json_out: JsonOpt = False) -> None:
    """List the files that could not be indexed, with the reason."""
    from rich.table import Table

    with open_collection(library, read_only=True) as photos:
        rows = photos.failures()
    if json_out:
        emit_json(rows)
        return
    if not rows:
        stdout.print("no failures")
        return
    table = Table("path", "error")
    for row in rows:
        table.add_row(path_cell(row["path"]), Text(row["error"]))
    stdout.print(table)


@cli_command
def optimize(library: LibraryOpt = None, json_out: JsonOpt = False) -> None:
    """Rebuild the index into one base file now (an ivf index trains again on what the
    library holds; searches go on meanwhile); a catalog from before 32 KiB pages is rebuilt
    with them (~40 % smaller), once."""
    with open_collection(library) as photos:
        report = photos.optimize()
    if json_out:
        emit_json(report.as_dict())
        return
    stdout.print(
        f"index: {report.photos} photos in one {report.kind} base file (folded in "
        f"{report.folded_vectors} added and {report.folded_removals} removed) in "
        f"{report.seconds:.1f}s"
    )
    catalog = report.catalog
    if catalog is not None and catalog.done:
        stdout.print(
            f"catalog: rebuilt with {catalog.page_size // 1024} KiB pages, "
            f"{catalog.bytes_before / 1e6:,.1f} MB -> {catalog.bytes_after / 1e6:,.1f} MB "
            f"in {catalog.seconds:.1f}s"
        )
    elif catalog is not None and catalog.reason:
        stdout.print(
            f"catalog: keeps its {catalog.page_size // 1024} KiB pages ({catalog.reason})"
        )


@cli_command
def repair(
    paths: Annotated[
        list[str] | None,
        typer.Argument(
            help="Photo folders (or s3:// / gs:// URIs) to index again afterwards (re-encodes "
            "lost rows)."
        ),
    ] = None,
    s3_endpoint: S3EndpointOpt = None,
    s3_region: S3RegionOpt = None,
    s3_anonymous: S3AnonymousOpt = False,
    device: DeviceOpt = "auto",
    backend: BackendOpt = "auto",
    library: LibraryOpt = None,
    weights: WeightsOpt = None,
    cache_dir: CacheOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Check the library; salvage a damaged catalog, rebuild the index, re-encode the rest."""
    from retrieval.cli.progress import BarProgress

    object_store_settings(s3_endpoint, s3_region, s3_anonymous)
    bar = BarProgress(stderr, enabled=bool(paths) and not (json_out or quiet))  # PATHS take long
    photos = open_collection(library, weights, device, backend, cache_dir, quiet=quiet)
    with bar:
        report = photos.repair(paths or (), progress=bar)
    if json_out:
        emit_json(report.as_dict())
        return
    for line in repair_lines(report):
        stdout.print(line, highlight=False, soft_wrap=True)


def repair_lines(report) -> list[Text]:
    """`clipdex repair`'s summary, one line per step."""
    if report.catalog == "ok":
        lines = ["catalog: ok"]
    else:
        lines = [
            f"catalog: damaged ({report.catalog_problem}); salvaged, {report.rows_lost} rows "
            f"could not be read; the damaged file is kept as {report.damaged_copy}"
        ]
    lines.append(f"vectors: {report.vectors_damaged} damaged, {report.reencoded} encoded again")
    lines += [f"  not recovered: {display(path)}: {why}" for path, why in report.not_recovered]
    found = f"damaged ({report.index_problem}); " if report.index_problem else ""
    lines.append(f"index: {found}rebuilt from the catalog with {report.index_images} photos")
    if report.indexed is not None:
        s = report.indexed.as_dict()
        lines.append(f"indexed {s['indexed']}, unchanged {s['unchanged']}, failed {s['failed']}")
    elif report.rows_lost:
        lines.append("run `clipdex repair FOLDER...` or `clipdex index FOLDER` to re-encode them")
    return [Text(line) for line in lines]


@cli_command
def serve(
    host: Annotated[
        str, typer.Option(envvar="CLIPDEX_HOST", help="Address to listen on.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=1, max=65535, envvar="CLIPDEX_PORT", help="Port to listen on.")
    ] = 8000,
    token: Annotated[
        str | None,
        _opt(
            "--token",
            envvar="CLIPDEX_TOKEN",
            help="Bearer token every route but /healthz then requires.",
        ),
    ] = None,
    max_upload_mb: Annotated[
        float,
        typer.Option(min=0.01, envvar="CLIPDEX_MAX_UPLOAD_MB", help="Largest request body."),
    ] = 20.0,
    max_megapixels: Annotated[
        float, typer.Option(min=0.01, help="Refuse uploads and thumbnails larger than this.")
    ] = 89.0,
    index_root: Annotated[
        list[Path] | None,
        _opt(
            "--index-root",
            envvar="CLIPDEX_INDEX_ROOTS",
            help="Folder POST /api/index may index inside (repeatable; default: none).",
        ),
    ] = None,
    request_timeout: Annotated[
        float,
        typer.Option(
            min=0.1,
            envvar="CLIPDEX_REQUEST_TIMEOUT",
            help="Seconds a request body may take to arrive, a response may stall, and a query "
            "may wait for the model (request headers: 10 s at most).",
        ),
    ] = 60.0,
    max_connections: Annotated[
        int,
        typer.Option(
            min=1,
            envvar="CLIPDEX_MAX_CONNECTIONS",
            help="Open connections served at once; beyond it: 503.",
        ),
    ] = 256,
    max_request_prompts: Annotated[
        int,
        typer.Option(
            min=1,
            envvar="CLIPDEX_MAX_REQUEST_PROMPTS",
            help="Prompts (labels x templates) one /api/classify request may have encoded.",
        ),
    ] = 2048,
    max_request_inputs: Annotated[
        int,
        typer.Option(
            min=1,
            envvar="CLIPDEX_MAX_REQUEST_INPUTS",
            help="Texts and images one /v1/embeddings request may send.",
        ),
    ] = 256,
    max_request_megapixels: Annotated[
        float,
        typer.Option(
            min=0.01,
            envvar="CLIPDEX_MAX_REQUEST_MEGAPIXELS",
            help="Megapixels decoded across all images of one request.",
        ),
    ] = 400.0,
    allowed_host: Annotated[
        list[str] | None,
        _opt(
            "--allowed-host",
            envvar="CLIPDEX_ALLOWED_HOSTS",
            help="Host name the server answers besides IP addresses and localhost, e.g. a "
            "reverse proxy's (repeatable or comma-separated; .example.com: its subdomains "
            "too; * any: unsafe, no DNS-rebinding guard). Its pages may also POST here.",
        ),
    ] = None,
    session_hours: Annotated[
        float,
        typer.Option(
            min=0.001,
            envvar="CLIPDEX_SESSION_HOURS",
            help="A web-page login (with --token) ends this many hours after it began.",
        ),
    ] = 12.0,
    prepare_labels: Annotated[
        bool,
        typer.Option(
            "--prepare-labels/--no-prepare-labels",
            envvar="CLIPDEX_PREPARE_LABELS",
            help="After each index job, compute the default labels' vectors in the background "
            "if missing, so a first classify answers at once.",
        ),
    ] = True,
    ocr: Annotated[
        str | None,
        _opt(
            "--ocr",
            envvar="CLIPDEX_OCR",
            help="Index jobs and --watch read text in photos: auto (photos likely to hold "
            "text), always or never (a job may ask otherwise). Default: auto.",
        ),
    ] = None,
    watch_folder: Annotated[
        list[Path] | None,
        _opt(
            "--watch",
            envvar="CLIPDEX_WATCH",
            help="Folder to keep the library in sync with while serving, as `clipdex watch` "
            "does (repeatable; its state is in /api/info and on the page).",
        ),
    ] = None,
    poll: Annotated[
        float | None,
        _opt(
            "--poll",
            min=0.1,
            envvar="CLIPDEX_POLL",
            help="With --watch: rescan every SECONDS instead of following file-system events.",
        ),
    ] = None,
    cluster: Annotated[
        str | None,
        _opt(
            "--cluster",
            envvar="CLIPDEX_CLUSTER",
            help="POST /api/index decodes and encodes on this Ray cluster: auto (the running "
            "one), local, or its address (needs the ray extra of clipdex).",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    s3_endpoint: S3EndpointOpt = None,
    s3_region: S3RegionOpt = None,
    s3_anonymous: S3AnonymousOpt = False,
    device: DeviceOpt = "auto",
    backend: BackendOpt = "auto",
    library: LibraryOpt = None,
    weights: WeightsOpt = None,
    cache_dir: CacheOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Serve the REST API, the OpenAI-compatible embeddings and the web page."""
    from indexer.ingest.ocr import check_mode
    from retrieval.collection import default_library_dir
    from retrieval.server import Settings, create_app
    from retrieval.server.serving import run_server
    from retrieval.server.settings import exposure_warning

    if poll is not None and not watch_folder:
        fail("--poll applies to the --watch folders: add --watch FOLDER, or drop --poll")
    object_store_settings(s3_endpoint, s3_region, s3_anonymous)  # photos indexed from URIs
    settings = Settings(
        library=library if library is not None else default_library_dir(),
        weights=weights,
        device=device,
        backend=backend,
        cache_dir=cache_dir,
        token=token,
        max_upload_mb=max_upload_mb,
        max_megapixels=max_megapixels,
        index_roots=tuple(index_root or ()),
        header_timeout=min(10.0, request_timeout),
        request_timeout=request_timeout,
        max_connections=max_connections,
        max_request_prompts=max_request_prompts,
        max_request_inputs=max_request_inputs,
        max_request_megapixels=max_request_megapixels,
        prepare_labels=prepare_labels,
        ocr=check_mode(ocr) if ocr is not None else None,
        allowed_hosts=(*(allowed_host or ()), host),  # a listen address that is a name
        session_hours=session_hours,
        watch_paths=tuple(watch_folder or ()),
        watch_poll=poll,
        cluster=cluster,
    )
    warning = exposure_warning(host, settings.token)
    if warning:  # a security warning is never silenced
        line = f"[bold yellow]warning:[/] {escape(warning)}"
        stderr.print(line, highlight=False, soft_wrap=True)
    note(Text(f"clipdex: library {settings.library}, http://{host}:{port}/"), quiet)
    if quiet:
        logging.getLogger("clipdex").setLevel(logging.ERROR)
        log_level = "warning" if log_level == "info" else log_level
    run_server(create_app(settings), settings, host, port, log_level=log_level)


@cli_command
def classify(
    photo: Annotated[str, typer.Argument(help="An indexed photo's id or path, or any image file.")],
    labels: Annotated[
        str | None, _opt("--labels", help='Comma-separated labels, e.g. "cat,dog,car".')
    ] = None,
    labels_file: LabelsFileOpt = None,
    template: TemplateOpt = None,
    top: Annotated[int, typer.Option("--top", min=1, max=1000, help="How many labels.")] = 5,
    device: DeviceOpt = "auto",
    backend: BackendOpt = "auto",
    library: LibraryOpt = None,
    weights: WeightsOpt = None,
    cache_dir: CacheOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Zero-shot classify a photo: probabilities over labels (prompt ensembles, softmax)."""
    from rich.table import Table

    from retrieval.search.classify import make_labelset

    labelset = make_labelset(labels, labels_file, template or ())
    bar = label_progress(labelset, labels is None and labels_file is None, quiet or json_out)
    photos = open_collection(library, weights, device, backend, cache_dir, quiet=quiet)
    with photos, bar:
        predictions = photos.classify(photo, labelset, top=top, progress=bar)
    if json_out:
        emit_json(
            {
                "photo": photo,
                "labels": len(labelset.labels),
                "templates": list(labelset.templates),
                "predictions": [p.as_dict() for p in predictions],
            }
        )
        return
    table = Table("label", "probability")
    for prediction in predictions:
        table.add_row(Text(prediction.label), f"{prediction.probability:.3f}")
    stdout.print(table)


@cli_command
def tag(
    labels_file: LabelsFileOpt = None,
    labels: Annotated[str | None, _opt("--labels", help="Comma-separated labels instead.")] = None,
    template: TemplateOpt = None,
    top: Annotated[
        int, typer.Option("--top", min=1, max=50, help="Labels stored per photo, at most.")
    ] = 3,
    min_probability: Annotated[
        float, typer.Option("--min-probability", min=0.0, max=1.0, help="Store labels >= this.")
    ] = 0.1,
    force: Annotated[bool, typer.Option("--force", help="Tag every photo again.")] = False,
    device: DeviceOpt = "auto",
    backend: BackendOpt = "auto",
    library: LibraryOpt = None,
    weights: WeightsOpt = None,
    cache_dir: CacheOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Tag every photo with its top labels, for `search --tag` (incremental: re-run freely)."""
    from retrieval.search.classify import make_labelset

    labelset = make_labelset(labels, labels_file, template or ())
    bar = label_progress(labelset, labels is None and labels_file is None, quiet or json_out)
    photos = open_collection(library, weights, device, backend, cache_dir, quiet=quiet)
    with photos, bar:
        report = photos.tag(
            labelset, top=top, min_probability=min_probability, force=force, progress=bar
        )
    if json_out:
        emit_json(report.as_dict())
        return
    common = ", ".join(f"{label} ({n})" for label, n in report.top_labels[:8])
    stdout.print(
        Text(
            f"tagged {report.tagged} photos ({report.already} already tagged) with "
            f"{report.labels} labels in {report.seconds:.1f}s"
            + (f"; most common: {common}" if common else "")
        )
    )


@cli_command
def duplicates(
    threshold: Annotated[
        float,
        typer.Option("--threshold", min=0.5, max=1.0, help="Cosine at which photos are copies."),
    ] = 0.95,
    folder: InOpt = None,
    library: LibraryOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Group near-duplicate photos (bursts, resized or re-encoded copies); suggest a keeper."""
    from rich.table import Table

    with open_collection(library, read_only=True) as photos:
        groups = photos.duplicates(threshold, folder or ())
    if json_out:
        emit_json({"threshold": threshold, "groups": [g.as_dict() for g in groups]})
        return
    if not groups:
        stdout.print(f"no near-duplicates at --threshold {threshold}")
        return
    for number, group in enumerate(groups, 1):
        table = Table("", "score", "id", "path", "size", title=f"group {number}")
        for member in group.members:
            table.add_row(
                "keep" if member is group.keeper else "",
                f"{member.score:.3f}",
                str(member.id),
                path_cell(member.path),
                f"{member.width}x{member.height}",
            )
        stdout.print(table)


def print_page(query: str, page: SearchPage, json_out: bool, quiet: bool = False) -> None:
    """A search page as JSON (query, results, total, cutoff, terms...) or a table."""
    from rich.table import Table

    if json_out:
        emit_json({"query": query, **page.as_dict()})
        return
    if page.cutoff is not None:
        note(
            f"{page.total} photos score above {page.cutoff.threshold:.3f} ({page.cutoff.rule} "
            "cut-off)" + ("" if page.total else "; nothing stands out: try without --cutoff"),
            quiet,
        )
    if not page.results:
        if page.cutoff is None:
            stdout.print("no results (is the library empty, or are the filters too strict?)")
        return
    words = page.fusion is not None  # the library stores words: say which ones matched
    table = Table(
        "#", "score", "id", "path", "size", "taken", "tags", *(["words"] if words else [])
    )
    for rank, r in enumerate(page.results, page.options.offset + 1):
        labels = ", ".join(t["label"] for t in r.tags or [])
        size, taken, path = f"{r.width}x{r.height}", r.taken_at or "", path_cell(r.path)
        if r.raw is not None:  # a RAW+JPEG pair shown once
            path.append(f" (+ RAW {display(Path(r.raw['path']).name)})")
        if r.frame_time is not None:  # a video: the moment that scored
            path.append(f" @ {_moment(r.frame_time)}", style="cyan")
        cells = [str(rank), f"{r.score:.3f}", str(r.id), path, size, taken, Text(labels)]
        table.add_row(*cells, *([Text(matched_cell(r.matched))] if words else []))
    stdout.print(table)


def _moment(seconds: float) -> str:
    """Seconds into a video as m:ss.s (h:mm:ss.s past an hour)."""
    minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{rest:04.1f}" if hours else f"{minutes}:{rest:04.1f}"


def matched_cell(matched: dict | None) -> str:
    """The words a result matched and where: 'receipt, total (ocr)'."""
    if not matched or not matched["text"]:
        return ""
    return f"{', '.join(matched['text'])} ({', '.join(matched['sources'])})"


def main() -> None:
    """Console-script entry point."""
    for stream in (sys.stdout, sys.stderr):  # undecodable bytes in a path print as \xNN
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors=DISPLAY_ERRORS)
    try:
        app()
    except ConfigError as exc:  # raised before a command runs, e.g. while resolving config
        stderr.print(f"error: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
