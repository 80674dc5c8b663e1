"""Typed domain errors.

Every error clipdex raises on purpose derives from :class:`ClipdexError`. Its message is
written for the user (it names the thing and says what to do); the CLI prints it on one
line and exits 1, the REST app turns it into a JSON error with the status in
``http_status``. Nothing in ``indexer/`` knows about either edge: the status is a hint the
edge may read, and so is ``setting``, the name of the setting that would fix the problem
(``"max_megapixels"``, ``"library"``, ``"weights"``, ``"backend"``, ``"device"``). Messages
never spell a flag (an HTTP client has none); the CLI adds ``--max-megapixels`` itself, the
server adds ``"setting"`` to its JSON error.
"""

from __future__ import annotations


class ClipdexError(Exception):
    """Base class of every expected failure; ``str(err)`` is the user-facing message."""

    code = "error"
    http_status = 400

    def __init__(self, *args: object, setting: str | None = None) -> None:
        super().__init__(*args)
        self.setting = setting  # the setting (snake_case name) that would fix it, if one


class ConfigError(ClipdexError):
    """A flag, environment variable or argument has a value clipdex cannot use."""

    code = "bad_config"


class WeightsUnavailable(ClipdexError):
    """The model weights cannot be loaded (offline, missing or unreadable file)."""

    code = "weights_unavailable"
    http_status = 503


class ModelMismatch(ClipdexError):
    """The library was built with another model than the one asked for."""

    code = "model_mismatch"
    http_status = 409


class LibraryError(ClipdexError):
    """The library directory is missing, unreadable or damaged."""

    code = "library_error"
    http_status = 503


class LibraryLocked(LibraryError):
    """Another process is writing to the library."""

    code = "library_locked"
    http_status = 409


class LibraryDamaged(LibraryError):
    """The catalog or the index file failed a check; the message says how to repair it."""

    code = "library_damaged"
    http_status = 503

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail or message  # what is wrong, without the advice


class DiskFull(LibraryError):
    """A write to the library ran out of space; the previous checkpoint is kept."""

    code = "disk_full"
    http_status = 507

    @classmethod
    def at(cls, root: object) -> DiskFull:
        """The error for the library at ``root``, saying what was kept and what to do."""
        return cls(
            f"no space left on the disk of the library {root}: the library keeps its previous "
            "checkpoint; free some space and run the command again"
        )


class NotFound(ClipdexError):
    """An image id or path that is not in the library."""

    code = "not_found"
    http_status = 404


class DecodeError(ClipdexError):
    """One file could not be turned into an image; the message is the human reason."""

    code = "not_an_image"
    http_status = 415


class ImageTooLarge(DecodeError):
    """An image over the pixel limit (decompression-bomb guard)."""

    code = "image_too_large"
    http_status = 413


class WatchUnavailable(ClipdexError):
    """File-system events cannot be followed (a sync falls back to rescanning: ``poll``)."""

    code = "watch_unavailable"
    http_status = 503


class ClusterUnavailable(ClipdexError):
    """The Ray cluster asked for (``--cluster``) cannot be used: not installed or not reachable."""

    code = "cluster_unavailable"
    http_status = 503


class ObjectStoreError(ClipdexError):
    """An object-storage URI (s3://, gs://) cannot be listed or read: no credentials, no
    such bucket, access denied, an endpoint that does not answer. The message names the URI
    and what to set."""

    code = "object_store_unavailable"
    http_status = 502
