"""`unic teachers`: the registry as a table or JSON, and `unic teachers show ALIAS` for one card."""

from __future__ import annotations

import json

import click

from unic_cli.cli import registry_option


def _table(cards) -> None:
    from rich.table import Table

    from unic_cli.console import console

    table = Table(title=f"unic teachers ({len(cards)} cards)", header_style="bold", show_lines=False)
    for col in ("alias", "source", "model id", "input", "patch", "widths (sum/patch)", "reg", "summary", "licence"):
        table.add_column(col, overflow="fold")
    for card in cards:
        model = card.model_id + (f".{card.pretrained_tag}" if card.source == "timm" and card.pretrained_tag else "")
        if card.source == "open_clip" and card.pretrained_tag:
            model += f" / {card.pretrained_tag}"
        widths = f"{card.summary_dim if card.has_summary else '-'}/{card.patch_dim}"
        summary = card.summary_from if card.has_summary else "-"
        patch = f"{card.patch_size}" + (" (stride)" if card.family == "convnet" else "")
        table.add_row(card.alias, card.source, model, str(card.image_size), patch, widths,
                      str(card.num_register_tokens), summary, card.license)
    console.print(table)


@click.group(invoke_without_command=True)
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


@teachers.command()
@click.argument("spec")
@click.option("--image-size", type=click.IntRange(min=1), default=224, show_default=True,
              help="The student's input size, to resolve this teacher's input size and grid.")
@click.option("--patch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="The student's patch size.")
@click.option("--json", "as_json", is_flag=True, help="Print the card and resolved sizes as JSON.")
@registry_option
def show(spec: str, image_size: int, patch_size: int, as_json: bool) -> None:
    """Show one teacher card (or explicit spec) and how it lines up with a student.

    SPEC is an alias from `unic teachers` or an explicit spec such as timm:vit_base_patch16_224.
    """
    from unic_cli.errors import ConfigError
    from unic_cli.registry import parse_teacher_spec

    if image_size % patch_size:
        raise ConfigError(f"--image-size {image_size} is not a multiple of --patch-size {patch_size}")
    parsed = parse_teacher_spec(spec)
    if parsed.source == "alias":
        from unic_cli.registry import apply_overrides, get_card

        card = apply_overrides(get_card(parsed.target), parsed.overrides, origin=f"teacher spec {spec!r}")
    else:  # explicit specs read the library's config: this imports torch
        from unic_cli.teachers import resolve_card

        card = resolve_card(parsed)
    grid = (image_size // patch_size, image_size // patch_size)
    input_size = card.input_size_for(grid)
    resolved = {
        "student": {"image_size": image_size, "patch_size": patch_size, "grid": list(grid)},
        "teacher_input_size": list(input_size),
        "teacher_native_grid": list(card.native_grid),
        "patch_tokens_resampled": card.family == "convnet" or tuple(input_size) != tuple(
            s * card.patch_size for s in grid),
    }
    if as_json:
        click.echo(json.dumps({"card": card.to_dict(), "resolved": resolved}, indent=2))
        return
    from rich.table import Table

    from unic_cli.console import console

    table = Table(title=f"teacher {card.alias}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in card.to_dict().items():
        if value not in (None, ""):
            table.add_row(key, str(value))
    ih, iw = input_size
    how = "feature map resized to the student grid" if card.family == "convnet" else "grids match exactly"
    table.add_row("for the student", f"{image_size} px / patch {patch_size} -> grid {grid[0]}x{grid[1]}")
    table.add_row("teacher input", f"{ih}x{iw} px ({how})")
    console.print(table)
