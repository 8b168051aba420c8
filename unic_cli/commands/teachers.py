"""`unic teachers`: the registry as a table or JSON, and `unic teachers show ALIAS` for one card."""

from __future__ import annotations

import json

import click

from unic_cli.cli import registry_option


def _model_name(card) -> str:
    if card.pretrained_tag and card.source == "timm":
        return f"{card.model_id}.{card.pretrained_tag}"
    if card.pretrained_tag:
        return f"{card.model_id}{'@' if card.source == 'hf' else '/'}{card.pretrained_tag}"
    return card.model_id


def _shown(value: object):
    """Card text as rich shows it verbatim: a Text (never parsed as markup), with control characters (terminal
    escape sequences) written as escapes. Cards may come from someone else's --registry folder."""
    from rich.text import Text

    return Text("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value)))


def _widths(card) -> str:
    if not card.has_summary:
        return f"-/{card.patch_dim}"
    return f"{card.summary_dim}/{card.patch_dim}"


def _table(cards) -> None:
    from rich import box
    from rich.table import Table

    from rich.console import Console

    from unic_cli.console import console

    if not console.is_terminal:  # a pipe or a CI log has no width: unwrapped rows, so `| grep dinov2` works
        console = Console(width=160, highlight=False, file=console.file)
    table = Table(title=f"{len(cards)} teacher cards", box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False,
                  caption="patch: patch size, or a ConvNet's feature stride (s); dims: summary/patch widths; reg: "
                          "register tokens (dropped);\nsum: class token or the model's pooling.  `unic teachers show "
                          "ALIAS` shows one card and its grid; `--json` for scripts.",
                  caption_justify="left")
    table.add_column("alias", style="bold cyan", no_wrap=True)
    table.add_column("source", no_wrap=True)
    table.add_column("model", overflow="fold")
    table.add_column("px", justify="right", no_wrap=True)
    table.add_column("patch", justify="right", no_wrap=True)
    table.add_column("dims s/p", justify="right", no_wrap=True)
    table.add_column("reg", justify="right", no_wrap=True)
    table.add_column("sum", no_wrap=True)
    table.add_column("licence", overflow="fold")
    for card in cards:
        patch = f"{card.patch_size}" + ("s" if card.family == "convnet" else "")
        table.add_row(_shown(card.alias), card.source, _shown(_model_name(card)), str(card.image_size), patch,
                      _widths(card), str(card.num_register_tokens), card.summary_from if card.has_summary else "-",
                      _shown(card.license))
    console.print(table)


class _TeachersGroup(click.Group):
    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError:
            import difflib

            close = difflib.get_close_matches(args[0], self.list_commands(ctx), n=1) if args else []
            if args and not close:  # `unic teachers dinov2_g`: a card was meant
                raise click.UsageError(f"No such command {args[0]!r}; to show one card: unic teachers show "
                                       f"{args[0]}", ctx) from None
            raise


@click.group(cls=_TeachersGroup, invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print all cards as JSON, for scripts.")
@registry_option
@click.pass_context
def teachers(ctx: click.Context, as_json: bool) -> None:
    """List every teacher card in the registry.

    \b
    Example:
      unic teachers
      unic teachers --json | jq '.[].alias'
      unic teachers show dinov2_g --image-size 224 --patch-size 16
    """
    if ctx.invoked_subcommand is not None:
        return
    from unic_cli.registry import all_cards

    cards = list(all_cards().values())
    if as_json:
        click.echo(json.dumps([c.to_dict() for c in cards], indent=2))
    else:
        _table(cards)


def _student_grid_options(command):
    """--image-size and --patch-size: the student whose grid a teacher is lined up with."""
    command = click.option("--patch-size", type=click.IntRange(min=1), default=16, show_default=True,
                           help="The student's patch size.")(command)
    return click.option("--image-size", type=click.IntRange(min=1), default=224, show_default=True,
                        help="The student's input size, which sets this teacher's input size and grid.")(command)


def _student_grid(image_size: int, patch_size: int) -> tuple[int, int]:
    from unic_cli.errors import ConfigError

    if image_size % patch_size:
        raise ConfigError(f"--image-size {image_size} is not a multiple of --patch-size {patch_size}")
    return image_size // patch_size, image_size // patch_size


@teachers.command()
@click.argument("spec")
@_student_grid_options
@click.option("--json", "as_json", is_flag=True, help="Print the card and resolved sizes as JSON.")
@registry_option
def show(spec: str, image_size: int, patch_size: int, as_json: bool) -> None:
    """Show one teacher card (or explicit spec) and how it lines up with a student.

    SPEC is an alias from `unic teachers` or an explicit spec such as timm:vit_base_patch16_224.
    """
    from unic_cli.registry import parse_teacher_spec

    grid = _student_grid(image_size, patch_size)
    parsed = parse_teacher_spec(spec)
    if parsed.source == "alias":
        from unic_cli.registry import apply_overrides, get_card

        card = apply_overrides(get_card(parsed.target), parsed.overrides, origin=f"teacher spec {spec!r}")
    else:  # explicit specs read the library's config: this imports torch
        from unic_cli.teachers import resolve_card

        card = resolve_card(parsed)
    input_size = card.input_size_for(grid)
    resolved = {
        "student": {"image_size": image_size, "patch_size": patch_size, "grid": list(grid)},
        "teacher_input_size": list(input_size),
        "teacher_native_grid": list(card.native_grid),
        "teacher_feature_grid": list(card.grid_for(input_size)),
        "patch_tokens_resampled": tuple(card.grid_for(input_size)) != grid,
    }
    if as_json:
        click.echo(json.dumps({"card": card.to_dict(), "resolved": resolved}, indent=2))
        return
    from rich.table import Table

    from unic_cli.console import console

    table = Table(title=_shown(f"teacher {card.alias}"), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in card.to_dict().items():
        if value not in (None, ""):
            table.add_row(key, _shown(value))
    ih, iw = input_size
    fh, fw = card.grid_for(input_size)
    how = f"{fh}x{fw} feature map resized to the student grid" if (fh, fw) != grid else "grids match exactly"
    if card.family == "convnet" and (ih % card.patch_size or iw % card.patch_size):  # the stem's padding decides
        how = f"about {how} (a stem without padding gives {ih // card.patch_size}x{iw // card.patch_size})"
    table.add_row("for the student", f"{image_size} px / patch {patch_size} -> grid {grid[0]}x{grid[1]}")
    table.add_row("teacher input", f"{ih}x{iw} px ({how})")
    console.print(table)


@teachers.command()
@click.argument("spec")
@_student_grid_options
@click.option("--random-init", is_flag=True, help="Build the architecture without loading weights.")
@click.option("--device", default="cpu", show_default=True,
              help="Where to run the check: cpu, cuda, cuda:N, or auto (cuda when available).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@registry_option
def check(spec: str, image_size: int, patch_size: int, random_init: bool, device: str, as_json: bool) -> None:
    """Load one teacher (weights included) and run a blank batch through it.

    Use it before a long run: it downloads or reads the weights, checks them against the architecture, and
    prints the token shapes on the student's grid.

    \b
    Example:
      unic teachers check dinov2_s
      unic teachers check 'dinov2_g=/weights/dinov2_vitg14.safetensors' --image-size 224 --patch-size 14
    """
    grid = _student_grid(image_size, patch_size)
    from unic_cli.config import teacher_spec_problems
    from unic_cli.devices import device_problem
    from unic_cli.errors import ConfigError

    # what can be told without torch comes back at once, not after a 3 s import
    if problems := [*teacher_spec_problems(spec), *filter(None, [device_problem(device)])]:
        raise ConfigError(problems)
    from unic_cli.devices import resolve_device  # an absent CUDA device is one ConfigError
    from unic_cli.teachers import check_teacher  # imports torch

    report = check_teacher(spec, grid=grid, pretrained=not random_init, device=str(resolve_device(device)))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    from unic_cli.console import console

    shapes = report["tokens"]
    console.print(
        f"[bold]{report['card']['alias']}[/] ok: input {report['input_size'][0]}x{report['input_size'][1]} px, "
        f"grid {grid[0]}x{grid[1]}, summary {shapes['summary']}, patch {shapes['patch']} ({report['dtype']}), "
        f"{report['num_parameters'] / 1e6:.1f}M parameters; loaded in {report['load_seconds']:.1f} s, "
        f"one batch in {report['forward_seconds']:.2f} s"
    )
