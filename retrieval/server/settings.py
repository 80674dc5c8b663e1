"""Server settings: resolved once at the edge (flags, then ``CLIPDEX_*``), passed inward."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from indexer.errors import ConfigError
from indexer.ingest.decode import DEFAULT_MAX_MEGAPIXELS
from retrieval.server.origin import normalise_name, valid_allowed_host

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass(frozen=True)
class Settings:
    """What ``create_app`` needs to know; every field has a safe default but ``library``."""

    library: Path
    weights: Path | None = None
    device: str = "auto"
    backend: str = "auto"  # auto | torch | onnx, as for the other commands
    cache_dir: Path | None = None  # exported ONNX models (--cache-dir, CLIPDEX_CACHE)
    token: str | None = None  # when set, every route but /healthz and the page shell needs it
    max_upload_mb: float = 20.0  # request bodies over this are refused with 413
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS  # uploads and thumbnails over this: 413
    index_roots: tuple[Path, ...] = field(default_factory=tuple)  # POST /api/index stays inside
    text_cache_size: int = 512  # text query -> vector, so paging does not re-run the model
    search_threads: int = 1  # FAISS threads per query; requests run in parallel instead
    # Slow clients (see .serving): headers must arrive within header_timeout; a body, a
    # stalled response and a query's wait for the model are each bounded by request_timeout.
    header_timeout: float = 10.0
    request_timeout: float = 60.0
    max_connections: int = 256  # open connections (or running requests); beyond: 503
    # What one request may cost (see .workload); beyond: 413 naming the setting.
    max_request_prompts: int = 2048  # classify: the request's labels x templates
    max_request_inputs: int = 256  # /v1/embeddings: texts and images in one request
    max_request_megapixels: float = 400.0  # decoded across all images of one request
    # Host names answered beyond IP literals and localhost (see .origin): names, ".domain"
    # for a domain and its subdomains, "*" for any (unsafe: no DNS-rebinding guard).
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)
    session_hours: float = 12.0  # a web-page session ends this long after the login
    auth_free_failures: int = 5  # wrong tokens per client address before the back-off
    auth_backoff: float = 1.0  # first wait after those, in seconds; doubles with each
    prepare_labels: bool = True  # after each index job, prepare the default label vectors
    # `serve --cluster`: POST /api/index decodes and encodes on this Ray cluster ("auto",
    # "local" or an address; indexer.ingest.cluster). None: in this process's workers.
    cluster: str | None = None
    ocr: str | None = None  # index jobs' and the sync's --ocr (None: the library's default)
    # Folders the server keeps the library in sync with (`serve --watch`, indexer.ingest.sync):
    # events, or a rescan every watch_poll seconds; the timers are SyncOptions'.
    watch_paths: tuple[Path, ...] = field(default_factory=tuple)
    watch_poll: float | None = None
    watch_debounce: float = 2.0
    watch_settle: float = 2.0

    def __post_init__(self) -> None:
        if self.max_upload_mb <= 0:
            raise ConfigError(f"--max-upload-mb must be positive, got {self.max_upload_mb}")
        for name in ("header_timeout", "request_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_connections < 1:
            raise ConfigError(f"--max-connections must be at least 1, got {self.max_connections}")
        for name in ("max_request_prompts", "max_request_inputs", "max_request_megapixels"):
            if not getattr(self, name) > 0:  # NaN too
                flag = name.replace("_", "-")
                raise ConfigError(f"--{flag} must be positive, got {getattr(self, name)}")
        if self.token is not None and not self.token.strip():
            object.__setattr__(self, "token", None)
        if self.session_hours <= 0:
            raise ConfigError(f"--session-hours must be positive, got {self.session_hours}")
        if self.auth_free_failures < 0 or self.auth_backoff <= 0:
            raise ConfigError("auth_free_failures must be >= 0 and auth_backoff positive")
        object.__setattr__(self, "allowed_hosts", allowed_hosts(self.allowed_hosts))
        roots = tuple(Path(os.path.abspath(os.path.expanduser(r))) for r in self.index_roots)
        object.__setattr__(self, "index_roots", roots)
        object.__setattr__(self, "watch_paths", watch_folders(self.watch_paths))
        if self.watch_poll is not None and not self.watch_poll > 0:
            raise ConfigError(f"--poll must be a positive number of seconds, got {self.watch_poll}")

    @property
    def session_seconds(self) -> float:
        return self.session_hours * 3600.0

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def watch_folders(paths: tuple[Path, ...] | list[Path]) -> tuple[Path, ...]:
    """``--watch`` folders, absolute; a path that is not an existing folder is an error."""
    folders = []
    for path in paths:
        folder = Path(os.path.abspath(os.path.expanduser(path)))
        if not folder.is_dir():
            what = "is a file" if folder.exists() else "does not exist"
            raise ConfigError(f"--watch {path} {what}: give existing folders")
        folders.append(folder)
    return tuple(dict.fromkeys(folders))


def allowed_hosts(entries: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``--allowed-host`` values, each possibly a comma-separated list (as the environment
    variable gives them), normalised; a malformed entry is a ConfigError naming it."""
    hosts: list[str] = []
    for entry in entries:
        for part in str(entry).split(","):
            name = normalise_name(part) if part.strip() != "*" else "*"
            if not part.strip():
                continue
            if not valid_allowed_host(name):
                raise ConfigError(
                    f"--allowed-host takes a host name (photos.example.com, .example.com for "
                    f"a domain and its subdomains, an IP address, or * for any), got {part!r}: "
                    "no scheme, port or path"
                )
            hosts.append(name)
    return tuple(dict.fromkeys(hosts))


def exposure_warning(host: str, token: str | None) -> str | None:
    """A warning when the server listens beyond this machine without a token."""
    if token or host in LOOPBACK_HOSTS or host.startswith("127."):
        return None
    return (
        f"clipdex is listening on {host} without a token: anyone who can reach this address "
        "can search and view your photos; set --token or CLIPDEX_TOKEN"
    )
