"""`unic bench`: distill's flags -> BenchConfig -> unic_cli.bench.run_bench (random weights, nothing downloaded)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from unic_cli.cli import NonEmptyPath, registry_option
from unic_cli.commands.distill import _config_options  # the very same flags as `unic distill`
from unic_cli.config import BenchConfig

log = logging.getLogger("unic_cli")


def _batch_sizes(ctx, param, value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 64,128,256") from None


@click.command(context_settings={"max_content_width": 110})
@click.argument("more_teachers", nargs=-1, metavar="")
@click.option("--teachers", "-t", multiple=True, metavar="SPEC [SPEC ...]",
              help="Teachers (random weights are used whatever the spec).")
@_config_options(hidden=("--out", "--epochs", "--log-every", "--checkpoint-every", "--keep-checkpoints"),
                 helps={"--steps": "Timed steps, after --warmup untimed ones  [default: 5].",
                        "--data": "Time with real images from this folder (decoding included); default: a fixed "
                                  "random batch."})
@click.option("--warmup", type=int, help="Untimed steps before the timed --steps  [default: 2].")
@click.option("--try-batch-sizes", callback=_batch_sizes, metavar="N,N,..",
              help="Per-process batch sizes to try in turn (with --compile, each compiled for its own shapes); "
                   "reports the fastest that fits.")
@click.option("--profile", "profile_dir", type=NonEmptyPath(), metavar="DIR",
              help="Then profile one step: DIR/trace.json (Perfetto), DIR/ops.txt, DIR/ops_by_shape.txt, "
                   "kernel time by kind.")
@click.option("--config", "config_file", type=NonEmptyPath(dir_okay=False),
              help="TOML setting any field (e.g. a run's config.toml); flags override it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line instead of a table.")
@click.option("--dry-run", is_flag=True, help="Validate and print the FLOPs per image; time nothing.")
# distill's run-folder flags, so that a distill command line runs as is
@click.option("--overwrite", "--resume", "--auto-resume", "ignored_run_flag", is_flag=True, hidden=True)
@registry_option
def bench(more_teachers, teachers, config_file, as_json, dry_run, ignored_run_flag, **flags) -> None:
    """Time the real training step of any distill configuration, with random-init teachers and student.

    Every `unic distill` flag is accepted, so a distill command line runs as is: --steps counts timed steps
    here (default 5), --epochs, --overwrite, --resume and --auto-resume are ignored. --config also takes a run's
    config.toml (its steps, epochs and data are not used). Without --data the step is fed a fixed random batch, so image
    decoding is not timed.

    \b
    Example (the CPU reference of benchmarks/SPEED.md):
      unic bench --teachers dino_b16 deit3_b --student vit_small_patch16_224 --batch-size 16 \\
        --ladder-hidden 768 --ladder-last-hidden 3072 --device cpu --steps 3
    """
    from unic_cli.errors import ConfigError

    specs = tuple(t for t in (*teachers, *more_teachers) if t)
    if more_teachers and not teachers:
        raise ConfigError(f"unexpected argument(s) {list(more_teachers)}; teachers go after --teachers")
    if config_file is not None and not Path(config_file).is_file():
        raise ConfigError(f"--config {str(config_file)!r} does not exist")
    if flags.get("epochs") is not None:
        log.info("--epochs %d ignored: bench times --steps steps (default 5)", flags["epochs"])
        flags["epochs"] = None
    if ignored_run_flag:
        log.info("--overwrite / --resume / --auto-resume ignored: bench writes no run and resumes none")
    flags = {**flags, "teachers": specs or None}
    config = BenchConfig.from_sources(config_file, flags)
    if dry_run:
        if config.profile_dir is not None or config.try_batch_sizes:
            log.warning("--profile / --try-batch-sizes ignored with --dry-run: nothing is timed or profiled")
        _print_dry_run(config, as_json)
        return

    from unic_cli.bench import run_bench

    from unic_cli.distributed import dist_info

    result = run_bench(config, warmup=config.warmup, batch_sizes=config.try_batch_sizes,
                       profile_dir=config.profile_dir)
    if not dist_info().is_main:  # under torchrun the numbers cover all processes; rank 0 prints them
        return
    if as_json:
        click.echo(json.dumps(result))
        return
    _print_result(result)


def _print_dry_run(config: BenchConfig, as_json: bool) -> None:
    """The validated configuration's FLOPs (meta device: no weights, nothing timed)."""
    from unic_cli.plan import flops_per_image
    from unic_cli.train_step import global_batch_size

    flops = flops_per_image(config)
    global_batch = global_batch_size(config, world_size=1)
    result = {"dry_run": True, "batch_size": config.batch_size, "global_batch": global_batch,
              "flops_per_image": flops, "flops_per_step": flops["train_step"] * global_batch}
    if as_json:
        click.echo(json.dumps(result))
        return
    from unic_cli.console import console

    console.print(f"Dry run: the configuration is valid; {flops['train_step'] / 1e9:.3f} GFLOP per image, "
                  f"{result['flops_per_step'] / 1e9:.2f} GFLOP per step of {global_batch} image(s) (one process). "
                  "Nothing was timed.", highlight=False)


def _print_result(r: dict) -> None:
    from rich.table import Table

    from unic_cli.console import console

    def gib(n: int | None) -> str:
        return "-" if n is None else f"{n / 2**30:.2f} GiB"

    table = Table(title=f"unic bench on {r['device']} (teachers {r['teacher_dtype']}, student {r['student_dtype']})",
                  show_header=True, header_style="bold")
    for col in ("part", "sec/step", "share"):
        table.add_column(col, justify="right" if col != "part" else "left")
    split_total = sum(r["split_sec_per_step"].values()) or 1.0
    for part, sec in r["split_sec_per_step"].items():
        table.add_row(part, f"{sec:.3f}", f"{100 * sec / split_total:.0f}%")
    table.add_row("[bold]step", f"[bold]{r['sec_per_step']:.3f}", "")
    console.print(table)
    f = r["flops_per_image"]
    console.print(f"batch {r['global_batch']} ({r['world_size']} process(es)): {r['images_per_sec']:.1f} images/s; "
                  f"{f['train_step'] / 1e9:.1f} GFLOP/image, {r['flops_per_step'] / 1e9:.0f} GFLOP/step, achieved "
                  f"{r['achieved_flops_per_sec'] / 1e9:.1f} GFLOP/s"
                  + (f", MFU {100 * r['mfu']:.1f}% of {r['bf16_peak_flops'] / 1e12:.0f} TFLOP/s bf16"
                     if r.get("mfu") is not None else ""))
    console.print(f"peak memory: host {gib(r['peak_host_mem_bytes'])}, device {gib(r['peak_device_mem_bytes'])}")
    if prof := r.get("profile"):
        kinds = ", ".join(f"{kind} {100 * sec / (prof['total_sec'] or 1):.0f}%"
                          for kind, sec in prof["by_kind_sec"].items())
        console.print(f"profile of one step ({prof['clock']}, {prof['total_sec']:.3f} s): {kinds}; "
                      f"trace {prof['trace']}, table {prof['table']}")
    if len(r.get("sweep", [])) > 1:
        console.print("sweep: " + ", ".join(
            f"batch {s['batch_size']}: " + ("out of memory" if s.get("oom") else f"{s['images_per_sec']:.1f} img/s")
            for s in r["sweep"]))
