"""The ``clipdex`` command line: thin typer commands over the library and the engine.

Every command takes ``--library`` (env CLIPDEX_LIBRARY), ``--weights`` (env
CLIPDEX_WEIGHTS) and ``--json``. Domain errors become one line on stderr and exit 1; usage
errors exit 2 (click's convention); nothing ever prints a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from indexer.errors import ClipdexError, ConfigError
from indexer.library import Library

app = typer.Typer(
    name="clipdex",
    help="Search your photos by what is in them (MobileCLIP-S2 + FAISS + SQLite).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stdout = Console()
stderr = Console(stderr=True)

LibraryOpt = Annotated[
    Path | None,
    typer.Option(
        "--library",
        envvar="CLIPDEX_LIBRARY",
        help="Library directory [default: the user data dir].",
        show_default=False,
    ),
]
WeightsOpt = Annotated[
    Path | None,
    typer.Option(
        "--weights",
        envvar="CLIPDEX_WEIGHTS",
        help="Local MobileCLIP-S2 checkpoint (offline use) instead of the hub's datacompdr.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
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


def cli_command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Register a command whose domain errors print one line and exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ClipdexError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            stderr.print("interrupted: the library keeps its last checkpoint")
            raise typer.Exit(130) from None

    return app.command()(wrapper)


def fail(message: str) -> None:
    stderr.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def emit_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, ensure_ascii=False) + "\n")


def library_dir(library: Path | None) -> Path:
    from .engine import default_library_dir

    return library if library is not None else default_library_dir()


def open_library(library: Path | None, *, create: bool = False) -> Library:
    return Library.open(library_dir(library), create=create)


def make_engine(
    library: Path | None, weights: Path | None, device: str = "auto", backend: str = "auto"
):
    from indexer.encoders import load_encoder

    from .engine import SearchEngine

    # A query only reads the index: memory-map it instead of copying it in.
    lib = Library.open(library_dir(library), mmap=True)
    return SearchEngine(lib, lambda: load_encoder(weights, device, backend))


# -- commands ------------------------------------------------------------------------------
@cli_command
def index(
    paths: Annotated[list[Path], typer.Argument(help="Folders or image files to index.")],
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", help="Glob of paths to skip (repeatable), e.g. '*/raw/*'."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=1024, help="Images per model call.")] = 16,
    workers: Annotated[
        int | None,
        typer.Option(min=1, max=64, help="Decode worker processes [default: cores, max 4]."),
    ] = None,
    max_megapixels: Annotated[
        float,
        typer.Option(min=0.01, help="Refuse images larger than this (decompression bombs)."),
    ] = 89.0,
    checkpoint_every: Annotated[
        int, typer.Option(min=1, help="Commit catalog + index at least every N images.")
    ] = 256,
    device: DeviceOpt = "auto",
    backend: BackendOpt = "auto",
    library: LibraryOpt = None,
    weights: WeightsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Index photos (recursively, incrementally) into the library."""
    from indexer.encoders import load_encoder
    from indexer.pipeline import IndexOptions, index_paths

    from .progress import BarProgress

    options = IndexOptions(
        excludes=exclude or (),
        batch_size=batch_size,
        max_megapixels=max_megapixels,
        checkpoint_every=checkpoint_every,
    )
    if workers:
        options.workers = workers
    encoder = load_encoder(weights, device, backend)
    bar = BarProgress(stderr, enabled=not json_out)
    with open_library(library, create=True) as lib, bar:
        report = index_paths(lib, encoder, paths, options, bar)
    if json_out:
        emit_json(report.as_dict())
        return
    for path, reason in report.failures[:20]:
        stderr.print(f"[yellow]failed:[/] {path}: {reason}", highlight=False, soft_wrap=True)
    if len(report.failures) > 20:
        stderr.print(f"... and {len(report.failures) - 20} more: see `clipdex failures`")
    s = report.as_dict()
    rate = s["indexed"] / s["seconds"] if s["seconds"] else 0.0
    stdout.print(
        f"indexed {s['indexed']}, unchanged {s['unchanged']}, reused {s['reused']}, "
        f"removed {s['removed']}, failed {s['failed']} in {s['seconds']:.1f}s ({rate:.1f} img/s)"
    )


@cli_command
def search(
    query: Annotated[str, typer.Argument(help='What the photos show, e.g. "a dog on the beach".')],
    k: KOpt = 20,
    device: DeviceOpt = "auto",
    backend: BackendOpt = "auto",
    library: LibraryOpt = None,
    weights: WeightsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Find photos by describing them."""
    engine = make_engine(library, weights, device, backend)
    print_results(query, engine.search_text(query, k), json_out)


@cli_command
def similar(
    photo: Annotated[str, typer.Argument(help="An indexed photo's id or path, or any image file.")],
    k: KOpt = 20,
    device: DeviceOpt = "auto",
    backend: BackendOpt = "auto",
    library: LibraryOpt = None,
    weights: WeightsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Find photos that look like a photo."""
    engine = make_engine(library, weights, device, backend)
    print_results(photo, engine.similar(photo, k), json_out)


@cli_command
def embed(
    text: Annotated[str | None, typer.Option("--text", help="Text to embed.")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Image file to embed.")] = None,
    device: DeviceOpt = "auto",
    backend: BackendOpt = "auto",
    library: LibraryOpt = None,
    weights: WeightsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Print the L2-normalised embedding of a text or an image."""
    from indexer.encoders import load_encoder

    from .engine import embed_image, embed_text

    if (text is None) == (image is None):
        raise typer.BadParameter("give exactly one of --text or --image")
    encoder = load_encoder(weights, device, backend)
    vector = embed_text(encoder, text) if text is not None else embed_image(encoder, image)
    document = {
        "model": encoder.identity.name,
        "dim": int(vector.shape[0]),
        "vector": vector.tolist(),
    }
    if json_out:
        emit_json(document)
    else:
        stdout.print(f"{document['model']} ({document['dim']}-d):")
        sys.stdout.write(" ".join(f"{x:.6f}" for x in vector) + "\n")


@cli_command
def info(library: LibraryOpt = None, weights: WeightsOpt = None, json_out: JsonOpt = False) -> None:
    """Show what the library holds and which model made it."""
    with open_library(library) as lib:
        identity = lib.identity
        document = {
            "library": str(lib.root),
            "model": json.loads(identity.to_json()) if identity else None,
            "images": lib.catalog.count(),
            "failed": lib.catalog.failure_count(),
            "bytes_on_disk": lib.bytes_on_disk(),
        }
    if json_out:
        emit_json(document)
        return
    table = Table(show_header=False, box=None)
    table.add_row("library", document["library"])
    table.add_row("model", identity.name if identity else "(none yet)")
    table.add_row("images", str(document["images"]))
    table.add_row("failed", str(document["failed"]))
    table.add_row("on disk", f"{document['bytes_on_disk'] / 1e6:.1f} MB")
    stdout.print(table)


@cli_command
def failures(
    library: LibraryOpt = None, weights: WeightsOpt = None, json_out: JsonOpt = False
) -> None:
    """List the files that could not be indexed, with the reason."""
    with open_library(library) as lib:
        rows = lib.catalog.list_failures()
    if json_out:
        emit_json(rows)
        return
    if not rows:
        stdout.print("no failures")
        return
    table = Table("path", "error")
    for row in rows:
        table.add_row(row["path"], row["error"])
    stdout.print(table)


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
        typer.Option(
            envvar="CLIPDEX_TOKEN",
            help="Bearer token every route but /healthz then requires.",
            show_default=False,
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
        typer.Option(
            "--index-root",
            envvar="CLIPDEX_INDEX_ROOTS",
            help="Folder POST /api/index may index inside (repeatable) [default: none].",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    device: DeviceOpt = "auto",
    library: LibraryOpt = None,
    weights: WeightsOpt = None,
) -> None:
    """Serve the REST API, the OpenAI-compatible embeddings and the web page."""
    import uvicorn

    from .server import Settings, create_app
    from .server.settings import exposure_warning

    settings = Settings(
        library=library_dir(library),
        weights=weights,
        device=device,
        token=token,
        max_upload_mb=max_upload_mb,
        max_megapixels=max_megapixels,
        index_roots=tuple(index_root or ()),
    )
    warning = exposure_warning(host, settings.token)
    if warning:
        stderr.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    stderr.print(f"clipdex: library {settings.library}, http://{host}:{port}/", highlight=False)
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level=log_level,
        timeout_keep_alive=5,
        server_header=False,
    )


def print_results(query: str, results: list, json_out: bool) -> None:
    if json_out:
        emit_json({"query": query, "results": [r.as_dict() for r in results]})
        return
    if not results:
        stdout.print("no results (is the library empty? run `clipdex index PATH`)")
        return
    table = Table("#", "score", "id", "path", "size", "taken")
    for rank, r in enumerate(results, 1):
        table.add_row(
            str(rank),
            f"{r.score:.3f}",
            str(r.id),
            r.path,
            f"{r.width}x{r.height}",
            r.taken_at or "",
        )
    stdout.print(table)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except ConfigError as exc:  # raised before a command runs, e.g. while resolving config
        stderr.print(f"error: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
