"""click group `unic`, lazy subcommands, UnicError -> exit code.

Subcommands are imported by string only when invoked, so `unic --help` never imports torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import click

from unic_cli import __version__
from unic_cli.errors import UnicError

_COMMANDS = {
    "teachers": "unic_cli.commands.teachers:teachers",
    "distill": "unic_cli.commands.distill:distill",
    "export": "unic_cli.commands.export:export",
    "probe": "unic_cli.commands.probe:probe",
    "bench": "unic_cli.commands.bench:bench",
    "demo": "unic_cli.commands.demo:demo",
}

_SHORT_HELP = {
    "teachers": "List the teacher registry, or show one card.",
    "distill": "Distill teachers into one student encoder.",
    "export": "Write a projector-free student that timm loads.",
    "probe": "Measure students and teachers side by side.",
    "bench": "Time the training step for any configuration.",
    "demo": "Distill, export and probe real teachers offline.",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in _COMMANDS if self._available(name)]

    @staticmethod
    def _available(name: str) -> bool:
        module = _COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(module) is not None

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _COMMANDS or not self._available(name):
            return None
        module, attr = _COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, _SHORT_HELP[name]) for name in self.list_commands(ctx)]  # no import for --help
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError:
            if args and args[0] not in _COMMANDS:
                import difflib

                close = difflib.get_close_matches(args[0], list(_COMMANDS), n=1)
                if close:
                    raise click.UsageError(f"No such command {args[0]!r}. Did you mean {close[0]!r}?", ctx) from None
            raise

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UnicError as err:  # a user error: one message, no traceback
            from unic_cli.console import print_error

            print_error(err)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:  # Ctrl-C where no command handles it itself (distill checkpoints and exits)
            from unic_cli.console import err_console

            err_console.print("Interrupted.", highlight=False)
            ctx.exit(130)  # the shell's code for SIGINT (click's own "Aborted!" exits 1)


class NonEmptyPath(click.Path):
    """click.Path (as a pathlib.Path) that refuses "": click would turn it into Path("."), the current folder,
    so `--out ""` wrote a run into the cwd and `--config ""` said "'.' does not exist"."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**{"path_type": Path, **kwargs})

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail(f"{value!r} is empty; give a path", param, ctx)
        return super().convert(value, param, ctx)


def _add_registry(ctx: click.Context, param: click.Parameter, value: tuple[Path, ...]) -> tuple[Path, ...]:
    from unic_cli.registry import add_registry_dir

    try:
        for path in value:
            add_registry_dir(path)
    except UnicError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None
    return value


registry_option = click.option(
    "--registry",
    type=NonEmptyPath(file_okay=False),
    multiple=True,
    expose_value=False,
    is_eager=True,
    callback=_add_registry,
    help="A folder of extra teacher cards (*.toml); repeatable. Also read from UNIC_REGISTRY_PATH.",
)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="unic")
@click.option("-v", "--verbose", is_flag=True, help="Show debug messages.")
@registry_option
def unic(verbose: bool) -> None:
    """unic: distill any set of pretrained vision backbones into one universal student encoder.

    \b
    Typical session:
      unic teachers                                  # what can be distilled
      unic distill --teachers dinov2_g metaclip_h --data /imagenet/train --out runs/a
      unic export runs/a --out students/a            # a plain timm model
      unic probe students/a dinov2_g --task knn --data /my/dataset
    """
    from unic_cli.console import setup_logging
    from unic_cli.registry import add_registry_dirs_from_env

    setup_logging(verbose)
    try:
        add_registry_dirs_from_env()
    except UnicError as err:
        raise click.UsageError(f"UNIC_REGISTRY_PATH: {err}") from None
