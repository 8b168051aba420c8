"""`unic distill`: flags -> DistillConfig -> unic_cli.distill.run (or plan_distillation for --dry-run)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from unic_cli.cli import NonEmptyPath, registry_option
from unic_cli.config import DistillConfig

_D = DistillConfig.field_defaults()


def _help(text: str, field: str | None = None) -> str:
    if field is None or _D[field] is None:
        return text
    value = _D[field]
    if isinstance(value, bool):
        value = "on" if value else "off"
    return f"{text}  [default: {value}]"


_FLAGS = [
    # (param decls, click kwargs)
    (("--data", "--data-dir", "data_dir"), dict(metavar="PATH", help="Training images: a folder (class subfolders "
                                                          "allowed), WebDataset .tar shards or a brace pattern, or "
                                                          "a saved HF dataset / parquet (docs/data.md).")),
    (("--out", "--out-dir", "out_dir"), dict(metavar="RUN_DIR", help=_help("Run folder.", "out_dir"))),
    (("--student",), dict(metavar="NAME", help=_help("timm ViT to train (vit_*, deit3_*, eva02_*, ...).", "student"))),
    (("--image-size",), dict(type=int, help=_help("Student input size in pixels.", "image_size"))),
    (("--batch-size",), dict(type=int, help=_help("Images per micro-batch PER PROCESS (global batch = this x "
                                                 "processes x --grad-accum-steps).", "batch_size"))),
    (("--epochs",), dict(type=int, help=f"Training length in epochs  [default: {DistillConfig.DEFAULT_EPOCHS}].")),
    (("--steps",), dict(type=int, help="Training length in optimiser steps (instead of --epochs).")),
    (("--device",), dict(metavar="auto|cpu|cuda|cuda:N", help=_help("Where to train.", "device"))),
    (("--teacher-drop-prob",), dict(type=float, help=_help("Teacher dropping p (Eq. 4); 0 turns it off.",
                                                           "teacher_drop_prob"))),
    (("--standardize/--no-standardize",), dict(default=None, help=_help("EMA feature standardisation of teacher "
                                                                        "outputs.", "standardize"))),
    (("--shared-heads/--dedicated-heads",), dict(default=None, help=_help("One projector for summary and patch "
                                                                          "tokens, or one each.", "shared_heads"))),
    (("--ladder-blocks",), dict(metavar="all|last|I,J,..", help=_help("Student blocks feeding the projectors "
                                                                      "(the last is always included).",
                                                                      "ladder_blocks"))),
    (("--ladder-hidden",), dict(type=int, metavar="N", help="Hidden width of intermediate-block projectors  "
                                                            "[default: student width].")),
    (("--ladder-last-hidden",), dict(type=int, metavar="N", help="Hidden width of last-block projectors  "
                                                                 "[default: 4x student width].")),
    (("--base-lr",), dict(type=float, help=_help("Peak learning rate per 256 images.", "base_lr"))),
    (("--min-lr",), dict(type=float, help=_help("Final learning rate.", "min_lr"))),
    (("--warmup-steps",), dict(type=int, help="Linear warm-up steps  [default: 5% of training].")),
    (("--weight-decay",), dict(type=float, help=_help("AdamW weight decay.", "weight_decay"))),
    (("--grad-clip",), dict(type=float, help=_help("Max gradient norm; 0 is off.", "grad_clip"))),
    (("--grad-accum-steps",), dict(type=int, help=_help(
        "Micro-batches per optimiser step: trains like a batch this many times larger (docs/distill.md).",
        "grad_accum_steps"))),
    (("--drop-path-rate",), dict(type=float, help=_help("Student stochastic depth.", "drop_path_rate"))),
    (("--ema-momentum-start",), dict(type=float, help=_help("Standardisation EMA momentum at step 0.",
                                                            "ema_momentum_start"))),
    (("--ema-momentum-end",), dict(type=float, help=_help("Standardisation EMA momentum at the end.",
                                                          "ema_momentum_end"))),
    (("--augment",), dict(metavar="unic|none", help=_help("Data augmentation.", "augment"))),
    (("--crop-scale",), dict(type=float, nargs=2, metavar="MIN MAX", default=None,
                             help="Random crop area range, fractions of the image  [default: 0.08 1 (the "
                                  "paper's)].")),
    (("--num-workers",), dict(type=int, help=_help("Image decoding processes.", "num_workers"))),
    (("--seed",), dict(type=int, help=_help("Random seed.", "seed"))),
    (("--log-every",), dict(type=int, help=_help("Steps between metrics.jsonl lines.", "log_every"))),
    (("--checkpoint-every",), dict(type=int, help=_help("Steps between checkpoints.", "checkpoint_every"))),
    (("--keep-checkpoints",), dict(type=int, help=_help("Newest step checkpoints kept (0: all).",
                                                        "keep_checkpoints"))),
    (("--skip-nonfinite",), dict(is_flag=True, default=None, help="Skip steps with a NaN/inf loss instead of "
                                                                   "stopping.")),
    (("--random-init-teachers",), dict(is_flag=True, default=None, help="Random teacher weights (tests, "
                                                                         "benchmarks).")),
    (("--teacher-dtype",), dict(type=click.Choice(["auto", "bf16", "fp32"]),
                                help=_help("Teacher precision (auto: bf16 where the device is fast in it).",
                                           "teacher_dtype"))),
    (("--student-dtype",), dict(type=click.Choice(["auto", "bf16", "fp32"]),
                                help=_help("Student+ladder compute (auto: bf16 autocast on CUDA, fp32 on CPU).",
                                           "student_dtype"))),
    (("--compile",), dict(is_flag=True, default=None, help="torch.compile each block of the student and teachers, "
                                                           "the student's taps and the ladder (faster on GPU).")),
    (("--compile-mode",), dict(metavar="MODE", help=_help("torch.compile mode with --compile: default, "
                                                          "max-autotune-no-cudagraphs, max-autotune, "
                                                          "reduce-overhead.", "compile_mode"))),
    (("--fsdp",), dict(is_flag=True, default=None, help="Shard with FSDP2 instead of DDP (under torchrun).")),
]


def _config_options(fn=None, *, hidden: tuple[str, ...] = (), helps: dict[str, str] | None = None):
    """Every DistillConfig flag; `hidden` flags are accepted but not listed, `helps` replaces help texts
    (for `unic bench`, which takes a distill command line as is but writes no run)."""
    def apply(fn):
        for decls, kwargs in reversed(_FLAGS):
            extra = {"hidden": True} if decls[0] in hidden else {}
            if helps and decls[0] in helps:
                extra["help"] = helps[decls[0]]
            fn = click.option(*decls, **{**kwargs, **extra})(fn)
        return fn

    return apply(fn) if fn is not None else apply


@click.command(context_settings={"max_content_width": 110})
@click.argument("more_teachers", nargs=-1, metavar="")
@click.option("--teachers", "-t", multiple=True, metavar="SPEC [SPEC ...]",
              help="Teachers: registry aliases (`unic teachers`) or explicit specs, several after one flag; "
                   "SPEC?resolution=native feeds a ViT teacher its own image size.")
@_config_options
@click.option("--config", "config_file", type=NonEmptyPath(dir_okay=False),
              help="TOML setting any field (e.g. a run's config.toml); flags override it.")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@click.option("--auto-resume", is_flag=True,
              help="Continue the run in --out if it has a checkpoint, else start it: one command for the first "
                   "start and every restart (torchrun --max-restarts, requeued jobs).")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier run in --out (only a unic run folder; deleted once the new run is built).")
@click.option("--dry-run", is_flag=True, help="Validate and print shapes, sizes, FLOPs and memory; load no weights.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the plan as JSON.")
@registry_option
@click.pass_context
def distill(ctx, more_teachers, teachers, config_file, resume, auto_resume, overwrite, dry_run, as_json,
            **flags) -> None:
    """Distill teachers into one student encoder (UNIC: standardisation, ladder of projectors, teacher dropping).

    \b
    Table 1 rows of the paper, by flags:
      basic      --no-standardize --shared-heads --ladder-blocks last --teacher-drop-prob 0
      +std       --shared-heads --ladder-blocks last --teacher-drop-prob 0
      +DP        --ladder-blocks last --teacher-drop-prob 0
      +LP        --teacher-drop-prob 0
      +tdrop     (the defaults)

    \b
    Example:
      unic distill --teachers dinov2_g metaclip_h --data /imagenet/train --out runs/a --epochs 100
      unic distill --out runs/a --resume
      unic distill --config a.toml --out runs/a --auto-resume   # starts it, or continues it after a crash
    """
    from unic_cli.errors import ConfigError

    # click has no variadic options: "--teachers a b" parses as --teachers a plus the argument b
    specs = tuple(t for t in (*teachers, *more_teachers) if t)
    if more_teachers and not teachers:
        raise ConfigError(f"unexpected argument(s) {list(more_teachers)}; teachers go after --teachers")
    out_dir = flags.get("out_dir")
    for flag, given in (("--resume", resume), ("--overwrite", overwrite)):
        if auto_resume and given:
            raise ConfigError(f"--auto-resume with {flag}: --auto-resume resumes when --out holds a checkpoint and "
                              f"starts the run otherwise; drop {flag}")
    if resume and overwrite:
        raise ConfigError("--resume with --overwrite: --resume continues the run in --out, --overwrite replaces it; "
                          "drop one")
    if as_json and not dry_run:
        raise ConfigError("--json prints the --dry-run plan; add --dry-run, or drop --json")
    if auto_resume and config_file is None:  # resuming: as --resume, the run's settings first, then the flags
        from unic_cli.checkpoint import find_checkpoint

        run_dir = Path(out_dir or _D["out_dir"])
        if (run_dir / "config.toml").is_file() and find_checkpoint(run_dir) is not None:
            config_file = run_dir / "config.toml"
    if resume and config_file is None:
        saved = Path(out_dir or _D["out_dir"]) / "config.toml"
        if not saved.is_file():
            raise ConfigError(f"--resume: {str(saved)!r} not found; give the run folder with --out")
        config_file = saved
    if config_file is not None and not Path(config_file).is_file():
        raise ConfigError(f"--config {str(config_file)!r} does not exist")
    config = DistillConfig.from_sources(config_file, {**flags, "teachers": specs or None})

    if dry_run:
        from unic_cli.plan import plan_distillation

        plan = plan_distillation(config)
        if as_json:
            click.echo(json.dumps(plan, indent=2))
        else:
            _print_plan(config, plan)
        return

    from unic_cli.distill import run
    from unic_cli.distributed import dist_info

    if not dist_info().is_main:  # under torchrun, rank 0 alone shows progress, info logs and the summary
        import logging

        logging.getLogger("unic_cli").setLevel(logging.WARNING)
        run(config, resume="auto" if auto_resume else resume, overwrite=overwrite)
        return
    with _ProgressHooks() as hooks:
        result = run(config, resume="auto" if auto_resume else resume, overwrite=overwrite, hooks=hooks)
    from unic_cli.console import console

    if result.status == "interrupted":
        console.print(f"Stopped by {result.signal_name} at step {result.step}/{result.total_steps}; checkpoint "
                      f"{result.checkpoint}.\nContinue with: unic distill --out {config.out_dir} --resume")
        ctx.exit(130 if result.signal_name == "SIGINT" else 143)
    console.print(f"Done: {result.step} steps, final loss {_fmt(result.last_metrics.get('loss'))}. "
                  f"Run folder: {result.run_dir}\n"
                  f"Next: unic export {result.run_dir} --out students/{result.run_dir.name}")


def _fmt(value: float | None) -> str:
    return "nan" if value is None else f"{value:.4f}"


class _ProgressHooks:
    """A rich progress bar with ETA, images/s and per-teacher losses, fed by the library's DistillHooks."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        from unic_cli.console import err_console

        self.progress = Progress(TextColumn("[bold]distill"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                                 console=err_console)
        self.task = None
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def on_start(self, *, start_step: int, total_steps: int, info: dict) -> None:
        self.task = self.progress.add_task("distill", total=total_steps, completed=start_step, status="")

    def on_step(self, step: int) -> None:
        self.progress.update(self.task, completed=step)

    def on_log(self, metrics: dict) -> None:
        losses = " ".join(f"{k}={_fmt(v['loss'])}" for k, v in metrics["teachers"].items())
        status = f"loss {_fmt(metrics['loss'])} | {losses} | {metrics['images_per_sec']:.1f} img/s"
        self.progress.update(self.task, status=status)

    def on_checkpoint(self, path: Path) -> None:
        pass


def _print_plan(config: DistillConfig, plan: dict) -> None:
    from rich.table import Table

    from unic_cli.console import console

    def mega(n: int) -> str:
        return f"{n / 1e6:,.2f} M"

    s, lad = plan["student"], plan["ladder"]
    table = Table(title="unic distill --dry-run (no weights loaded)", show_header=True, header_style="bold")
    for col in ("model", "input", "grid", "widths (summary/patch)", "params", "GFLOPs/img (fwd)"):
        table.add_column(col)
    flops = plan["flops_per_image"]
    table.add_row(f"student {s['name']}", f"{s['image_size']} px, patch {s['patch_size']}",
                  "x".join(map(str, s["grid"])), f"{s['embed_dim']}, {s['num_blocks']} blocks", mega(s["num_params"]),
                  f"{flops['student_and_ladder_forward'] / 1e9:.2f} (+ladder)")
    for i, t in enumerate(plan["teachers"]):
        table.add_row(f"t{i} {t['spec']} ({t['source']})", "x".join(map(str, t["input_size"])) + " px",
                      "x".join(map(str, t["grid"])) + f" (native {'x'.join(map(str, t['native_grid']))})",
                      f"{t['summary_dim'] or '-'}/{t['patch_dim']}", mega(t["num_params"]),
                      f"{flops['teachers'][i] / 1e9:.2f}")
    heads = "shared" if lad["shared_heads"] else "dedicated"
    table.add_row("ladder", f"blocks {lad['blocks']}", "", f"hidden {lad['hidden_dim']} / last "
                  f"{lad['last_hidden_dim']}, {heads}", mega(lad["num_params"]), "")
    console.print(table)
    d, mem = plan["data"], plan["memory_bytes"]
    console.print(f"data: {d['num_images']} images, {d['steps_per_epoch']} steps/epoch, {d['total_steps']} steps of "
                  f"{d['global_batch']} images; standardize={config.standardize}, "
                  f"teacher_drop_prob={config.teacher_drop_prob}")
    console.print(f"train step: {flops['train_step'] / 1e9:.2f} GFLOPs per image; peak memory estimate on "
                  f"{plan['device']} at batch {config.batch_size}: {mem['peak_estimate'] / 2**30:.2f} GiB "
                  f"(weights+grads+AdamW {mem['weights_grads_adam'] / 2**30:.2f}, teachers "
                  f"{mem['teachers'] / 2**30:.2f}, activations {mem['activations'] / 2**30:.2f})")
