"""A rich progress bar for indexing (count, img/s, ETA) on stderr."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)

from indexer.ingest.pipeline import Progress as PipelineProgress


class _RateColumn(TextColumn):
    def __init__(self) -> None:
        super().__init__("")

    def render(self, task):  # type: ignore[override]
        speed = task.finished_speed or task.speed
        return f"{speed:5.1f} img/s" if speed else "  --- img/s"


class BarProgress(PipelineProgress):
    """Draws the bar while used as a context manager; silent when ``enabled`` is False."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar = Progress(
            TextColumn("indexing"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            _RateColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            disable=not enabled,
        )
        self._task = None

    def __enter__(self) -> BarProgress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def start(self, total: int) -> None:
        self._task = self._bar.add_task("indexing", total=total)

    def advance(self, count: int = 1) -> None:
        if self._task is not None:
            self._bar.advance(self._task, count)
