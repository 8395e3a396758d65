"""The rich progress bar shown while decoding or downloading CIFAR-10."""

from __future__ import annotations

from ..cli import escape


def progress_bar(description: str, total: int | None, enabled: bool):
    """A (not yet started) rich ``Progress`` on stderr with one task of ``total`` steps, or None
    when ``enabled`` is false. ``total=None`` shows an indeterminate bar."""
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    progress.add_task(escape(description), total=total)
    return progress
