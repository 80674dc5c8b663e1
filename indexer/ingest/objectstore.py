"""Photos in object storage (``s3://bucket/prefix``, ``gs://bucket/prefix``) through pyarrow.

A URI given to ``clipdex index`` is listed, stat'ed and read here, through pyarrow's file
systems (``pyarrow.fs.S3FileSystem``, ``GcsFileSystem``): the catalog stores the URI as the
photo's path, and its size and mtime (the object's LastModified) as on disk, so unchanged
objects cost nothing on the next run and deleted ones leave the library. Objects have no
device or inode, and no real path (nothing to resolve).

Where and how to connect comes from the environment, so that the decode worker processes
and Ray actors that read the bytes connect exactly as the process that listed them (the CLI
sets these from its flags):

- ``CLIPDEX_S3_ENDPOINT`` (else ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``): an
  S3-compatible server (MinIO, Ceph, moto), e.g. ``http://127.0.0.1:9000``;
- ``CLIPDEX_S3_REGION`` (else ``AWS_REGION``, ``AWS_DEFAULT_REGION``);
- ``CLIPDEX_S3_ANONYMOUS=1``: unsigned requests (a public bucket, no credentials);
- the credentials themselves as the AWS SDK finds them (``AWS_ACCESS_KEY_ID`` and
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, an instance role); for ``gs://``, Google's
  application default credentials.

The only home of pyarrow's file systems (see tests/test_layers.py), imported only when a URI
is used: :func:`is_uri` and :class:`UriRoot` need nothing. Errors that stop a run (no
credentials, no such bucket, access denied, an endpoint that does not answer) are
:class:`~indexer.errors.ObjectStoreError` naming the URI and what to set; one unreadable
object is a failure reason for that file alone.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from indexer.errors import ConfigError, ObjectStoreError

SCHEMES = ("s3", "gs", "gcs")
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
ENV_ENDPOINT = "CLIPDEX_S3_ENDPOINT"
ENV_REGION = "CLIPDEX_S3_REGION"
ENV_ANONYMOUS = "CLIPDEX_S3_ANONYMOUS"
# Every variable that decides how to connect: forwarded to Ray actors as they are here.
FORWARDED_ENV = (
    ENV_ENDPOINT,
    ENV_REGION,
    ENV_ANONYMOUS,
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_EC2_METADATA_DISABLED",
)
CONNECT_SECONDS = 5.0  # an endpoint that does not answer fails fast, not after minutes
REQUEST_SECONDS = 60.0
WHAT_TO_SET = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or use anonymous "
    "access for a public bucket (CLIPDEX_S3_ANONYMOUS=1)"
)


def scheme_of(path: object) -> str | None:
    """The scheme of a URI string (``"s3"``), or None for a local path."""
    if not isinstance(path, str):
        return None
    match = _URI.match(path)
    return match.group(1).lower() if match else None


def is_uri(path: object) -> bool:
    """Whether ``path`` is an object-storage URI clipdex reads (s3://, gs://)."""
    return scheme_of(path) in SCHEMES


@dataclass(frozen=True)
class Settings:
    """How to reach the object store, from the environment (see the module docstring)."""

    endpoint: str | None = None
    region: str | None = None
    anonymous: bool = False

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        endpoint = next(
            (
                env[k]
                for k in (ENV_ENDPOINT, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
                if env.get(k)
            ),
            None,
        )
        region = next(
            (env[k] for k in (ENV_REGION, "AWS_REGION", "AWS_DEFAULT_REGION") if env.get(k)), None
        )
        anonymous = env.get(ENV_ANONYMOUS, "").strip().lower() in ("1", "true", "yes", "on")
        return cls(endpoint, region, anonymous)

    def where(self) -> str:
        """The endpoint in words, for messages."""
        return self.endpoint or "the provider's default endpoint"


def apply_settings(endpoint: str | None, region: str | None, anonymous: bool | None) -> None:
    """Put the edge's flags into this process's environment, where every reader (this
    process, its decode workers, Ray actors) takes them from."""
    if endpoint:
        os.environ[ENV_ENDPOINT] = endpoint
    if region:
        os.environ[ENV_REGION] = region
    if anonymous:
        os.environ[ENV_ANONYMOUS] = "1"


def forwarded_env() -> dict[str, str]:
    """The connection settings of this process, to hand to processes on other machines."""
    return {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}


@dataclass(frozen=True)
class UriRoot:
    """A URI given to index: a "folder" (a prefix) or one object. Quacks like the
    :class:`pathlib.Path` roots of local runs where the pipeline uses them (``is_dir``,
    ``parent``, ``str``), and is never a local path (no ``__fspath__``)."""

    uri: str
    folder: bool

    def is_dir(self) -> bool:
        return self.folder

    def is_file(self) -> bool:
        return not self.folder

    @property
    def parent(self) -> UriRoot:
        scheme, rest = self.uri.split("://", 1)
        head = rest.rpartition("/")[0]
        return UriRoot(f"{scheme}://{head or rest}", True)

    def __str__(self) -> str:
        return self.uri


def normalize(uri: str) -> str:
    """``S3://bucket//a/b/`` -> ``s3://bucket/a/b``: one spelling per object in the catalog."""
    scheme = scheme_of(uri)
    if scheme not in SCHEMES:
        raise ConfigError(
            f"{uri}: unsupported scheme {scheme}:// (clipdex reads s3:// and gs://)",
        )
    rest = uri[len(scheme) + 3 :]
    parts = [part for part in rest.split("/") if part]
    if not parts:
        raise ConfigError(f"{uri}: name a bucket, e.g. {scheme}://my-photos/2024")
    if {".", ".."} & set(parts):
        raise ConfigError(f"{uri}: '.' and '..' are not allowed in an object URI")
    return f"{'gs' if scheme == 'gcs' else scheme}://{'/'.join(parts)}"


# -- the file system ----------------------------------------------------------------------------
_filesystems: dict[tuple[str, Settings], Any] = {}
_lock = threading.Lock()


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow file system, ``bucket/key``) for a URI; one file system per scheme and
    settings in a process (its connection pool is reused)."""
    scheme = scheme_of(uri)
    settings = Settings.from_env()
    key = (scheme, settings)
    with _lock:
        found = _filesystems.get(key)
        if found is None:
            found = _filesystems[key] = _make_filesystem(scheme, settings, uri)
    return found, normalize(uri).split("://", 1)[1]


def _make_filesystem(scheme: str, settings: Settings, uri: str) -> Any:
    try:
        from pyarrow import fs
    except ImportError as exc:
        raise ObjectStoreError(
            f"{uri}: reading object storage needs pyarrow: pip install 'clipdex[s3]'",
        ) from exc
    if scheme in ("gs", "gcs"):
        limit = dt.timedelta(seconds=REQUEST_SECONDS)
        return fs.GcsFileSystem(anonymous=settings.anonymous, retry_time_limit=limit)
    options: dict[str, Any] = {
        "anonymous": settings.anonymous,
        "connect_timeout": CONNECT_SECONDS,
        "request_timeout": REQUEST_SECONDS,
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if settings.endpoint:
        parts = urlsplit(
            settings.endpoint if "://" in settings.endpoint else f"https://{settings.endpoint}"
        )
        options["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
        options["scheme"] = parts.scheme or "https"
        # A private S3-compatible server rarely cares; without one the SDK would ask AWS.
        options["region"] = settings.region or "us-east-1"
    elif settings.region:
        options["region"] = settings.region
    return fs.S3FileSystem(**options)


# -- listing and reading ------------------------------------------------------------------------
def resolve(uri: str) -> UriRoot:
    """The root a URI names: a prefix holding objects, or one object; a clear
    :class:`ObjectStoreError` when it cannot be listed (see :func:`translate`)."""
    clean = normalize(uri)
    store, path = filesystem(clean)
    from pyarrow import fs

    try:
        info = store.get_file_info(path)
        if info.type == fs.FileType.File:
            return UriRoot(clean, False)
        if info.type == fs.FileType.Directory:
            return UriRoot(clean, True)
        bucket = path.split("/", 1)[0]
        if "/" in path and store.get_file_info(bucket).type != fs.FileType.NotFound:
            raise ObjectStoreError(
                f"{clean}: no object at or under this prefix in bucket {bucket!r}: check the URI",
            )
    except OSError as exc:
        raise translate(exc, clean) from exc
    raise _no_bucket(clean, bucket)


def list_files(root: UriRoot) -> Iterator[tuple[str, int, int]]:
    """(URI, size, mtime in ns) of every object under a prefix root, in no set order."""
    from pyarrow import fs

    store, path = filesystem(root.uri)
    scheme = root.uri.split("://", 1)[0]
    try:
        infos = store.get_file_info(fs.FileSelector(path, recursive=True))
    except OSError as exc:
        raise translate(exc, root.uri) from exc
    for info in infos:
        if info.type == fs.FileType.File:
            yield f"{scheme}://{info.path}", info.size, _mtime_ns(info)


def stat(uri: str) -> tuple[int, int] | None:
    """(size, mtime in ns) of one object; None when it is gone. OSError when the store
    cannot be asked."""
    from pyarrow import fs

    store, path = filesystem(uri)
    info = store.get_file_info(path)
    if info.type != fs.FileType.File:
        return None
    return info.size, _mtime_ns(info)


def read_bytes(uri: str) -> bytes:
    """The whole content of one object (FileNotFoundError when it is gone)."""
    store, path = filesystem(uri)
    with store.open_input_stream(path) as stream:
        return stream.read()


def iter_chunks(uri: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    """One object's bytes in chunks (a video is hashed, never held whole)."""
    store, path = filesystem(uri)
    with store.open_input_stream(path) as stream:
        while data := stream.read(chunk):
            yield data


def open_input(uri: str):
    """A seekable binary file over one object (FFmpeg seeks in a video)."""
    store, path = filesystem(uri)
    return store.open_input_file(path)


def _mtime_ns(info) -> int:
    mtime = info.mtime_ns
    return int(mtime) if mtime is not None else 0


# -- errors in words ------------------------------------------------------------------------------
def translate(exc: BaseException, uri: str) -> ObjectStoreError:
    """An error of the store as a message naming the URI and what to set."""
    text = str(exc)
    upper = text.upper()
    where = Settings.from_env().where()
    bucket = uri.split("://", 1)[-1].split("/", 1)[0]
    if "NO_SUCH_BUCKET" in upper or "BUCKET DOES NOT EXIST" in upper:
        return _no_bucket(uri, bucket)
    if any(
        word in upper
        for word in (
            "NETWORK_CONNECTION",
            "COULD NOT CONNECT",
            "COULDN'T CONNECT",
            "TIMED OUT",
            "COULD NOT RESOLVE",
        )
    ):
        return ObjectStoreError(
            f"{uri}: cannot reach the object store at {where}: check that it runs and that "
            f"the endpoint is right ({ENV_ENDPOINT} or AWS_ENDPOINT_URL)",
            setting="s3_endpoint",
        )
    if any(
        word in upper
        for word in (
            "CREDENTIAL",
            "INVALID_ACCESS_KEY",
            "SIGNATURE_DOES_NOT_MATCH",
            "MISSING_AUTHENTICATION",
        )
    ):
        return ObjectStoreError(
            f"{uri}: the object store at {where} refused the credentials (missing or wrong): "
            f"{WHAT_TO_SET}",
        )
    denied = "ACCESS_DENIED" in upper or "ACCESS DENIED" in upper or "FORBIDDEN" in upper
    if denied and not _has_credentials(uri):
        return ObjectStoreError(
            f"{uri}: access denied, and no credentials are set (keys, a profile or a "
            "credentials file) to sign the requests: "
            f"{WHAT_TO_SET}",
        )
    if denied:
        return ObjectStoreError(
            f"{uri}: access denied: the credentials in use may not list or read it: "
            f"{WHAT_TO_SET}, for an identity allowed to list and get its objects",
        )
    first = (text.strip().splitlines() or [type(exc).__name__])[0]
    return ObjectStoreError(f"{uri}: cannot list or read it ({first})")


def _has_credentials(uri: str) -> bool:
    """Whether the SDK has somewhere to find credentials (keys, a profile, a web identity,
    a container or instance role: the last one cannot be told without asking it)."""
    if scheme_of(uri) != "s3" or Settings.from_env().anonymous:
        return True  # Google's credentials cannot be told apart; anonymous is on purpose
    env = os.environ
    names = (
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    )
    if any(env.get(name) for name in names):
        return True
    files = (env.get("AWS_SHARED_CREDENTIALS_FILE"), "~/.aws/credentials", "~/.aws/config")
    # An instance role, if there is one, cannot be told without asking it: not counted.
    return any(f and os.path.isfile(os.path.expanduser(f)) for f in files)


def _no_bucket(uri: str, bucket: str) -> ObjectStoreError:
    return ObjectStoreError(  # perhaps the right bucket on the wrong server
        f"{uri}: the bucket {bucket!r} does not exist at {Settings.from_env().where()}: check "
        f"the URI, or the endpoint of an S3-compatible server ({ENV_ENDPOINT} or "
        "AWS_ENDPOINT_URL)",
    )


def read_failure(exc: OSError, uri: str) -> str:
    """Why one object could not be read, as a failure reason for that file alone."""
    if isinstance(exc, FileNotFoundError):
        return "the object disappeared before it was read"
    message = str(translate(exc, uri))
    return message.split(": ", 1)[1] if message.startswith(uri) else message
