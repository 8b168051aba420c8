"""`unic probe`: flags -> ProbeConfig -> `unic_cli.probe.run_probe`, with a rich progress bar and table."""

from __future__ import annotations

import click

from unic_cli.cli import NonEmptyPath, registry_option
from unic_cli.config import PROBE_TASKS, ProbeConfig

_DEFAULT = ProbeConfig.field_defaults()


def _show(name: str) -> str:
    return f"  [default: {_DEFAULT[name]}]"


@click.command()
@click.argument("models", nargs=-1, metavar="MODEL...")
@click.option("--task", "-t", "tasks", multiple=True, metavar="TASK",
              help=f"{' | '.join(PROBE_TASKS)}; repeat (or comma-separate) for several tasks on the same data.")
@click.option("--data", "--data-dir", "data_dir", type=NonEmptyPath(), metavar="DIR",
              help="Dataset folder with train/ and val/ or test/ (class folders, or images/ + masks/|depth/).")
@click.option("--out", "--out-dir", "out_dir", type=NonEmptyPath(), metavar="DIR",
              help="Where probe.json, probe.md and probe.png go.  [default: RUN/probe with --run, else ./probe]")
@click.option("--run", "run_dir", type=NonEmptyPath(), metavar="RUN_DIR",
              help="A `unic distill` run: results are merged into RUN_DIR/probe.json for the export's model card.")
@click.option("--cache-dir", type=NonEmptyPath(), metavar="DIR",
              help="Feature cache (reused when only probe settings change).  [default: OUT/cache]")
@click.option("--eval-split", type=click.Choice(["val", "test"]), help="[default: test when present, else val]")
@click.option("--dense-image-size", type=int, metavar="PX",
              help="Input side for seg/depth, rounded to each ViT's patch size." + _show("dense_image_size"))
@click.option("--dense-layers", type=int, metavar="N",
              help="seg/depth on the last N feature levels concatenated (ViT blocks; ConvNet stages at stride 16; "
                   "timm models)." + _show("dense_layers"))
@click.option("--concat-patch-mean", is_flag=True, default=None,
              help="Linear probe on [summary, mean patch token] instead of the summary alone.")
@click.option("--ignore-index", type=int, help="Mask value that is void (CamVid: 11)." + _show("ignore_index"))
@click.option("--num-classes", type=int, help="Seg classes.  [default: largest mask label + 1]")
@click.option("--depth-bins", type=int, help="Depth bins; 0 regresses depth." + _show("depth_bins"))
@click.option("--depth-scale", type=float, help="16-bit PNG depth units per metre." + _show("depth_scale"))
@click.option("--random-init", is_flag=True, default=None, help="Random weights instead of pretrained (a baseline).")
@click.option("--batch-size", type=int, help="Images per extraction batch." + _show("batch_size"))
@click.option("--num-workers", type=int, help="Image decoding workers." + _show("num_workers"))
@click.option("--device", help="auto, cpu, cuda or cuda:N." + _show("device"))
@click.option("--seed", type=int, help=_show("seed").strip())
@click.option("--config", "config_file", type=NonEmptyPath(exists=True, dir_okay=False),
              help="TOML setting any ProbeConfig field (knn_ks, linear_lrs, dense_steps, ...); flags override it.")
@registry_option
def probe(models, tasks, config_file, **flags) -> None:
    """Measure students and teachers side by side.

    MODEL is an exported student folder, a teacher alias or spec (ALIAS=PATH for local weights), or a timm model
    name. All models share one pass over the data; features are cached, so re-running with other probe settings
    does not re-run the encoders.

    \b
    Example:
      unic probe students/a dinov2_g metaclip_h --task knn --task linear --data data/pets
      unic probe students/a --task seg --data data/camvid --ignore-index 11 --run runs/a
    """
    task_list = tuple(t.strip() for text in tasks for t in text.split(",") if t.strip())
    config = ProbeConfig.from_sources(config_file, {**flags, "models": models or None, "tasks": task_list or None})

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from unic_cli.console import console, err_console, stage_progress
    from unic_cli.probe import run_probe  # torch is imported here, never by `unic --help`

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err_console, transient=False) as bar:
        outcome = run_probe(config, progress=stage_progress(bar))
    console.print(_table(outcome.merged, outcome.report))
    for path in outcome.files:
        console.print(f"wrote {path}")


def _table(merged: dict, new: dict):
    """One row per model, one column per task of this call: the primary metric and the gain over the best teacher.

    Rows and gains come from the merged probe.json, so a student probed alone is compared with the teachers
    probed on the same task key in earlier calls (marked `*`), exactly as probe.md does.
    """
    from rich.table import Table

    from unic_cli.probe.report import best_reference, relative_scores, score

    relative, best = relative_scores(merged), best_reference(merged)
    task_keys = [k for k in new["tasks"] if k in merged["tasks"]]
    models = [m for m in merged["results"] if any(score(merged, m, k) is not None for k in task_keys)]
    earlier = [m for m in models if m not in new["results"]]
    table = Table(title="unic probe (gain: vs the best teacher on each task)", header_style="bold")
    table.add_column("model", overflow="fold")
    table.add_column("kind")
    for task_key in task_keys:
        table.add_column(f"{task_key}\n{merged['tasks'][task_key]['primary']}", justify="right")
    for model in models:
        cells = []
        for task_key in task_keys:
            value, gain = score(merged, model, task_key), relative.get(task_key, {}).get(model)
            if value is None:
                cells.append("")
                continue
            style = "green" if gain is not None and gain >= 0 else "red"
            cells.append(f"{value:.4f}" + ("" if gain is None else f" [{style}]{gain:+.1f}%[/]"))
        table.add_row(model + (" *" if model in earlier else ""), merged["models"][model]["kind"], *cells)
    notes = [f"best {what} on {task_key}: {model} ({value:.4f})"
             for task_key in task_keys if task_key in best for model, value, what in [best[task_key]]]
    if earlier:
        notes.append("* measured in an earlier call (OUT/probe.json)")
    table.caption = "\n".join(notes)
    return table
