"""Rich progress bars on stderr: indexing (count, img/s, ETA) and label preparation."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
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


class PromptProgress:
    """A ``(done, total)`` callback for computing label vectors: on its first call it prints
    ``note`` and starts a bar (prompts done, elapsed, ETA), which rich redraws several times
    a second, so the screen never looks hung; silent when ``enabled`` is False. Use it as a
    context manager so the bar is closed even when the work stops early."""

    def __init__(self, console: Console, note: str, enabled: bool = True) -> None:
        self.console, self.note, self.enabled = console, note, enabled
        self.calls = 0
        self._bar: Progress | None = None
        self._task = None

    def __call__(self, done: int, total: int) -> None:
        self.calls += 1
        if not self.enabled:
            return
        if self._bar is None:
            self.console.print(self.note.format(total=total), highlight=False, soft_wrap=True)
            self._bar = Progress(
                TextColumn("labels"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("prompts"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._bar.start()
            self._task = self._bar.add_task("labels", total=total)
        self._bar.update(self._task, completed=done, total=total)

    def __enter__(self) -> PromptProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
