"""What every command shares: consoles, one-line errors, rich progress, tables."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from nmt.errors import NmtError
from nmt.progress import Advance

# Progress and messages go to stderr so stdout carries only results (translations, JSON).
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


class Terminated(KeyboardInterrupt):
    """SIGTERM (schedulers, `timeout`, `docker stop`): unwinds like Ctrl-C, so temporary files are removed."""


def on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def debug_enabled() -> bool:
    return os.environ.get("NMT_DEBUG", "") not in ("", "0")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` on one line to stderr and return the exit to raise."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def handle_errors(command: F) -> F:
    """Turn user errors into one line and a non-zero exit; NMT_DEBUG=1 or --debug keeps tracebacks."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except BrokenPipeError:
            # The reader went away (`nmt translate ... | head`): stop quietly, as Unix filters do.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except (NmtError, OSError, KeyboardInterrupt) as exc:
            if debug_enabled():
                raise
            if isinstance(exc, Terminated):
                raise fail("terminated", 143) from None
            if isinstance(exc, KeyboardInterrupt):
                raise fail("interrupted", 130) from None
            if isinstance(exc, OSError):
                where = f"{exc.filename}: " if exc.filename else ""
                raise fail(f"{where}{exc.strerror or exc}") from None
            raise fail(str(exc)) from None

    return wrapper  # type: ignore[return-value]


class RateColumn(ProgressColumn):
    """Throughput in the task's own unit (lines/s, tokens/s, sentences/s)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        if speed is None:
            return Text(f"- {unit}/s", style="progress.data.speed")
        return Text(f"{human(speed)} {unit}/s", style="progress.data.speed")


def human(value: float) -> str:
    """1234567 -> '1.23M': short numbers for progress lines."""
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.2f}{suffix}"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


class RichReporter:
    """The library's progress `Reporter`, drawn as rich progress bars on stderr."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self._last: int | None = None

    def task(self, description: str, total: float | None = None, unit: str = "lines") -> Advance:
        if self._last is not None:
            # A new phase begins: the previous one is complete whatever its estimate said.
            done = self.progress.tasks[self._last].completed
            self.progress.update(self._last, total=done, completed=done)
        task_id = self.progress.add_task(description, total=total, unit=unit)
        self._last = task_id
        return lambda amount: self.progress.advance(task_id, amount)


@contextmanager
def reporting() -> Iterator[RichReporter]:
    """A live progress display for the duration of a command, with rate and ETA."""
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
        disable=not err_console.is_terminal and not os.environ.get("NMT_PROGRESS"),
    )
    reporter = RichReporter(progress)
    with progress:
        yield reporter
        if reporter._last is not None:
            done = progress.tasks[reporter._last].completed
            progress.update(reporter._last, total=done, completed=done)


def summary_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    """A two-column table: the closing summary of every long command."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for name, value in rows:
        table.add_row(name, value if isinstance(value, str) else f"{value:,}" if isinstance(value, int) else f"{value}")
    return table

