"""`unic export`: flags -> ExportConfig -> unic_cli.export.export_student."""

from __future__ import annotations

from pathlib import Path

import click

from unic_cli.cli import NonEmptyPath, registry_option


@click.command()
@click.argument("checkpoint", metavar="RUN_OR_CHECKPOINT", type=NonEmptyPath())
@click.argument("more_heads", nargs=-1, metavar="")
@click.option("--out", "-o", type=NonEmptyPath(), required=True,
              help="Folder to write (model.safetensors, config.json, unic.json, README.md).")
@click.option("--keep-heads", multiple=True, metavar="ALIAS",
              help="Also keep these teachers' projector heads and statistics (heads.safetensors), e.g. a CLIP "
                   "teacher for zero-shot. Repeat it or list several: --keep-heads a b.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an earlier export at --out.")
@registry_option
def export(checkpoint: Path, more_heads: tuple[str, ...], out: Path, keep_heads: tuple[str, ...],
           overwrite: bool | None) -> None:
    """Write a projector-free student that timm and transformers load as is.

    RUN_OR_CHECKPOINT is a `unic distill` run folder (its latest checkpoint) or any checkpoint file in it.
    After writing, the folder is reloaded and checked against the checkpoint.

    \b
    Example:
      unic export runs/a --out students/a
      unic export runs/a/checkpoints/step_0005000.pt --out students/a-5k --keep-heads metaclip_h
      python -c "import timm; timm.create_model('local-dir:students/a', pretrained=True)"
    """
    from unic_cli.config import ExportConfig

    # click has no variadic options: "--keep-heads a b" parses as --keep-heads a, plus extra argument b
    if keep_heads and more_heads and not checkpoint.exists():
        # "--keep-heads a b RUN": click took b for RUN and RUN for a head; the one existing path is the run
        existing = [h for h in more_heads if Path(h).exists()]
        if len(existing) == 1:
            more_heads = (str(checkpoint), *(h for h in more_heads if h != existing[0]))
            checkpoint = Path(existing[0])
    if more_heads and not keep_heads:
        raise click.UsageError(f"unexpected extra argument(s) {' '.join(more_heads)}; export takes one "
                               "RUN_OR_CHECKPOINT")
    aliases = tuple(a for h in (*keep_heads, *more_heads) for a in h.split(",") if a)
    config = ExportConfig.from_sources(None, {"checkpoint": checkpoint, "out": out, "keep_heads": aliases,
                                              "overwrite": overwrite})
    from unic_cli.export import export_student  # torch is imported here, never by `unic --help`

    folder = export_student(config.checkpoint, config.out, keep_heads=config.keep_heads,
                            overwrite=config.overwrite)
    from unic_cli.console import console

    console.print(f"Wrote [bold]{folder}[/]. Load it with:\n"
                  f"  timm.create_model(\"local-dir:{folder}\", pretrained=True)\n"
                  f"  transformers.AutoModel.from_pretrained(\"{folder}\")\n"
                  f"  unic_cli.load_student(\"{folder}\")", highlight=False)
