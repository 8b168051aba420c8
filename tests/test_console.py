"""The CLI's error line prints a message exactly, brackets included (rich markup is for our own styling only)."""

from __future__ import annotations

from unic_cli import console
from unic_cli.errors import ConfigError


def test_print_error__square_brackets_in_a_message_are_printed(monkeypatch):
    from rich.console import Console

    out = Console(record=True, width=200)
    monkeypatch.setattr(console, "err_console", out)
    message = "tokens must be drawn from [summary, patch], got [bold] and [/]"
    console.print_error(ConfigError(message))
    assert out.export_text().strip() == f"Error: {message}"


def test_print_error__names_the_process_under_torchrun(monkeypatch):
    from rich.console import Console

    out = Console(record=True, width=200)
    monkeypatch.setattr(console, "err_console", out)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    console.print_error(ConfigError("--batch-size 64 is larger than this process's share"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    console.print_error(ConfigError("one process"))
    assert out.export_text().splitlines() == ["[rank 3/4] Error: --batch-size 64 is larger than this process's share",
                                              "Error: one process"]
