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
