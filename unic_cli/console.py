"""The one rich Console, print_error, the RichHandler that shows the library's log records, stage_progress."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from unic_cli.errors import UnicError

if TYPE_CHECKING:
    from rich.progress import Progress

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def print_error(err: UnicError) -> None:
    """One clear message on stderr, no traceback; under torchrun it names the process (each one prints its own)."""
    world_size, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    where = rf"\[rank {rank}/{world_size}] " if world_size.isdigit() and int(world_size) > 1 else ""
    # the message is plain text: escaped, so a "[...]" in it (a shape, a list of names) is printed, not markup
    err_console.print(f"{where}[bold red]Error:[/] {escape(str(err))}", markup=True, soft_wrap=True,
                      highlight=False)


def setup_logging(verbose: bool = False) -> None:
    """Route `logging.getLogger("unic_cli")` through rich; the library itself never prints."""
    logger = logging.getLogger("unic_cli")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        handler = RichHandler(console=err_console, show_path=False, show_time=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def stage_progress(bar: Progress, *, prefix: str = "", **fields) -> Callable[[str, int, int], None]:
    """A probe's `progress(label, done, total)` callback drawn on `bar`: one bar per stage label.

    Each label (a split and its models, or a split's targets) gets its bar on its first report, described as
    `prefix + label`; `fields` fill the bar's custom columns (e.g. `status=""`).
    """
    ids: dict[str, int] = {}

    def progress(label: str, done: int, total: int) -> None:
        if label not in ids:
            ids[label] = bar.add_task(prefix + label, total=total, **fields)
        bar.update(ids[label], completed=done)

    return progress
