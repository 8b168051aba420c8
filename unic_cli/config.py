"""Frozen per-command configs (Distill/Export/Probe), layered from defaults, a TOML file and flags.

Each command gets one flat `frozen=True, kw_only=True` dataclass built by `from_sources(file, flags)`:
defaults < TOML file < flags that were given (None means "not given"). Unknown keys are rejected with a
close-name suggestion, and `validate()` collects every problem into one `ConfigError`, all before any
weights load. `to_toml()` writes a file that `--config` reads back into the same config.
"""

from __future__ import annotations

import difflib
import functools
import math
import sys
import types
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from unic_cli.devices import device_problem
from unic_cli.errors import ConfigError

C = TypeVar("C", bound="CommandConfig")

# torch.compile's modes, for --compile-mode (the last two add CUDA graphs)
COMPILE_MODES: tuple[str, ...] = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """Convert a TOML/flag value to the annotated field type (Path, tuple, float from int)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, inner[0], value) if len(inner) == 1 else value
    if annotation is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{name} must be a path, got {value!r}")
        if isinstance(value, str) and not value.strip():  # Path("") is ".": `--out ""` would write into the cwd
            raise ConfigError(f"{name} is empty ({value!r}); give a path")
        return Path(value).expanduser()
    if origin is tuple:
        if isinstance(value, (str, Path)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(name, item, v) for v in value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:  # a 400-digit integer
            raise ConfigError(f"{name} must be a finite number, got an integer of {len(str(abs(value)))} "
                              "digits") from None
    if annotation in (int, float, str, bool):
        if annotation is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise ConfigError(f"{name} must be {annotation.__name__}, got {value!r}")
        # nan passes every `x < bound` check and inf lr trains garbage; no setting means either
        if annotation is float and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")
        if annotation is int and not -2**63 <= value < 2**63:  # torch sizes and seeds are int64: fail here
            shown = str(value) if len(str(value)) <= 24 else f"{str(value)[:12]}... ({len(str(abs(value)))} digits)"
            raise ConfigError(f"{name} {shown} does not fit in 64 bits")
    return value


def _plain(value: Any) -> Any:
    """Plain TOML/JSON types: Path -> str, tuple -> list; None is dropped by the caller."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    return value


# fields whose flag is not `--field-name` (the rest are: `--batch-size` sets batch_size)
_FLAG_NAMES = {"data_dir": "--data", "out_dir": "--out", "run_dir": "--run", "profile_dir": "--profile",
               "tasks": "--task", "models": "MODEL", "checkpoint": "RUN_OR_CHECKPOINT"}


def flag_name(field_name: str) -> str:
    """The command-line name of a config field, for messages (`data_dir` -> `--data`)."""
    return _FLAG_NAMES.get(field_name, "--" + field_name.replace("_", "-"))


def output_folder_problem(flag: str, path: Path) -> str | None:
    """Why `path` cannot be created or used as an output folder (a file there, or a file among its parents)."""
    if path.exists() and not path.is_dir():
        return f"{flag} {str(path)!r} is a file, not a folder"
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{flag} {str(path)!r} cannot be created: {str(parent)!r} is a file"
            break
    return None


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@dataclass(frozen=True, kw_only=True)
class CommandConfig:
    """Base of the per-command configs: layering, coercion, validation and TOML round trip."""

    command: ClassVar[str] = ""
    # other commands whose config files this one reads too: command -> the keys it leaves out of them
    other_commands_read: ClassVar[dict[str, tuple[str, ...]]] = {}
    # settings that replace each other: a flag for one drops the others' values from the file (a run's
    # config.toml says `epochs = 1`; `--resume --steps 600` means steps now, not both)
    alternatives: ClassVar[tuple[tuple[str, ...], ...]] = ()

    def __post_init__(self) -> None:
        """Coerce every field as `from_sources` does, so a config built directly (`DistillConfig(teachers="a",
        data_dir="imgs")`, the Python API) holds Paths and tuples too; a wrong type is one ConfigError listing each.
        Values are checked by `validate()` (the library entry points call it), not here: a config read back from a
        checkpoint may name a data folder that is gone."""
        hints = _type_hints(type(self))
        problems = []
        for f in fields(self):
            try:
                object.__setattr__(self, f.name, _coerce(f.name, hints[f.name], getattr(self, f.name)))
            except ConfigError as err:
                problems.extend(err.problems)
        if problems:
            raise ConfigError(problems)

    @classmethod
    def field_defaults(cls) -> dict[str, Any]:
        """Field name -> default (MISSING for required fields): the one source of defaults for `--help`."""
        return {f.name: f.default for f in fields(cls)}

    @classmethod
    def from_sources(cls: type[C], config_file: Path | None = None, flags: dict[str, Any] | None = None) -> C:
        """Layer defaults < TOML file < given flags, reject unknown keys, coerce types, then validate()."""
        hints = _type_hints(cls)
        names = [f.name for f in fields(cls)]
        values: dict[str, Any] = {}
        problems: list[str] = []
        if config_file is not None:
            try:
                raw = tomllib.loads(Path(config_file).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
                raise ConfigError(f"cannot read config file {str(config_file)!r}: {err}; give a TOML file such as "
                                  f"a run's config.toml") from None
            raw.pop("unic_version", None)
            command = raw.pop("command", cls.command)
            if not isinstance(command, str):
                problems.append(f"{config_file}: command must be a string such as {cls.command!r}, got {command!r}")
            elif command in cls.other_commands_read:  # e.g. a run's config.toml for `unic bench`
                for key in cls.other_commands_read[command]:
                    raw.pop(key, None)
            elif command != cls.command:
                problems.append(f"{config_file} is a `unic {command}` config, not a `unic {cls.command}` one; give "
                                f"a `unic {cls.command}` config (or drop its `command = {command!r}` line)")
            for key in raw:
                if key not in names:
                    close = difflib.get_close_matches(key, names, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    problems.append(f"{config_file}: unknown key {key!r}{hint}")
            values.update({k: v for k, v in raw.items() if k in names})
        given = {key: value for key, value in (flags or {}).items() if value is not None and value != ()}
        for key in (flags or {}):
            if key not in names:  # a programming error (a Python keyword typo), not a user one: TypeError
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"{cls.__name__} has no field {key!r}{hint}")
        for group in cls.alternatives:
            if [key for key in group if key in given]:
                for key in group:
                    values.pop(key, None)
        values.update(given)
        for f in fields(cls):
            if f.name not in values:
                if f.default is MISSING and f.default_factory is MISSING:
                    problems.append(f"missing required setting {flag_name(f.name)}")
                continue
            # a wrong flag type is click's to report; a wrong value from the file names the file
            label = flag_name(f.name) if f.name in given else f"{config_file}: {f.name}"
            try:
                values[f.name] = _coerce(label, hints[f.name], values[f.name])
            except ConfigError as err:
                problems.extend(err.problems)
        if problems:
            raise ConfigError(problems)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise one ConfigError listing every problem; subclasses collect into `self.problems()`."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        return []

    def to_dict(self) -> dict[str, Any]:
        """Plain types (str paths, lists), None dropped: safe for JSON, TOML and `torch.load(weights_only=True)`."""
        return {k: _plain(v) for k, v in asdict(self).items() if v is not None}

    def to_toml(self) -> str:
        from unic_cli import __version__

        return tomli_w.dumps({"command": self.command, "unic_version": __version__, **self.to_dict()})

    @classmethod
    def from_dict(cls: type[C], raw: dict[str, Any]) -> C:
        """Rebuild from `to_dict()` output (e.g. the config stored in a checkpoint), without re-validating."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})  # __post_init__ coerces


@dataclass(frozen=True, kw_only=True)
class ExportConfig(CommandConfig):
    """`unic export`: a checkpoint (or run folder) -> a projector-free student folder.

    Attributes:
        checkpoint: a `unic distill` checkpoint file, or a run folder (its latest checkpoint).
        out: the folder to write (model.safetensors, config.json, unic.json, README.md).
        keep_heads: teacher aliases whose projector heads and statistics go to heads.safetensors.
        overwrite: replace an earlier export at `out`.
    """

    command: ClassVar[str] = "export"

    checkpoint: Path
    out: Path
    keep_heads: tuple[str, ...] = ()
    overwrite: bool = False

    def problems(self) -> list[str]:
        problems = []
        if not self.checkpoint.exists():
            problems.append(f"{str(self.checkpoint)!r} does not exist; give a `unic distill` run folder or a "
                            "checkpoint file")
        out = self.out
        if problem := output_folder_problem("--out", out):
            problems.append(problem)
        elif out.exists() and not (out.is_dir() and not any(out.iterdir())) and not self.overwrite:
            problems.append(f"{str(out)!r} already exists; pass --overwrite to replace it, or choose another --out")
        if self.checkpoint.exists() and out.exists() and out.resolve() == self.checkpoint.resolve():
            problems.append(f"--out {str(out)!r} is the run itself; choose another folder")
        if dupes := sorted({a for a in self.keep_heads if self.keep_heads.count(a) > 1}):
            problems.append(f"--keep-heads lists {', '.join(map(repr, dupes))} more than once")
        return problems


@dataclass(frozen=True, kw_only=True)
class DistillConfig(CommandConfig):
    """`unic distill`: teachers + an image folder -> a UNIC student (UNIC paper Sec. 3).

    The defaults are the paper's full recipe (Table 1, row 8): feature standardisation, dedicated summary/patch
    heads, the ladder on all blocks, teacher dropping with p = 0.5. The basic setup (row 4) is
    `standardize=false, shared_heads=true, ladder_blocks="last", teacher_drop_prob=0`.

    Attributes:
        teachers: registry aliases or explicit specs, in order (teacher i is `t{i}` in checkpoints).
        data_dir: a folder of images (class subfolders allowed, labels ignored).
        out_dir: the run folder (config.toml, metrics.jsonl, checkpoints/, plots).
        student: a timm ViT name (see `unic_cli.student`).
        image_size: student input size; each teacher sees its own size for the same patch grid.
        drop_path_rate: the student's stochastic depth.
        batch_size: images per process per micro-batch.
        grad_accum_steps: micro-batches per optimiser step.
        epochs, steps: training length (give one; neither means 100 epochs). Steps are optimiser steps.
        base_lr: peak learning rate per 256 images; the peak is base_lr * global batch / 256.
        min_lr: final learning rate of the cosine decay.
        warmup_steps: linear warm-up length; default 5% of training (official: 10 of 200 epochs).
        weight_decay: AdamW decay on weights (none on norms, biases, position embeddings, cls/register tokens).
        betas: AdamW betas.
        grad_clip: max global gradient norm; 0 turns clipping off.
        standardize: EMA feature standardisation of teacher outputs (Sec. 3.3).
        ema_momentum_start, ema_momentum_end: cosine schedule of the EMA momentum (official 1.0 -> 0.001).
        std_eps: added to the variance before the square root.
        shared_heads: one projector head for both token types instead of dedicated summary/patch heads.
        ladder_blocks: "all" (the ladder, Sec. 3.4), "last" (basic setup) or block indices "3,7,11"; the last
            block is always included.
        ladder_hidden: hidden width of intermediate-block heads; default the student width.
        ladder_last_hidden: hidden width of the last-block heads; default 4x the student width.
        teacher_drop_prob: Eq. 4's p (0 turns teacher dropping off; the paper uses 0.25 for large students).
        augment: data augmentation ("unic": the paper's recipe; "none": resize + center crop).
        crop_scale: area range of the "unic" random resized crop, as fractions of the image (official 0.08-1;
            milder crops, e.g. 0.35-1, keep small images such as CIFAR's 32 px recognisable to their teachers).
        device: "auto" (cuda when available), "cpu", "cuda" or "cuda:N".
        num_workers: image decoding processes per training process.
        seed: seeds the student init, the data order and augmentations, and teacher dropping.
        log_every: optimiser steps between metrics.jsonl lines.
        checkpoint_every: optimiser steps between checkpoints (one is also written at the end and on a signal).
        keep_checkpoints: newest step_*.pt files to keep (0 keeps all).
        skip_nonfinite: skip an optimiser step whose loss is NaN/inf instead of stopping.
        random_init_teachers: random teacher weights (tests and benchmarks; nothing is downloaded).
        teacher_dtype: "auto" (bf16 where the device has fast bf16 matrix units: CUDA, or a CPU with AVX512-BF16/AMX;
            else fp32), "bf16" or "fp32": the frozen teachers' weights and compute.
        student_dtype: "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16" or "fp32": student and ladder compute
            (weights, AdamW and losses stay fp32).
        compile: `torch.compile` each block of the student and teachers, and the ladder (slow first steps).
        compile_mode: torch.compile's mode with `compile`: "default", "max-autotune-no-cudagraphs" (inductor
            searches matmul tiles: minutes more compilation on a GPU), "max-autotune" or "reduce-overhead"
            (both add CUDA graphs).
        fsdp: shard the student, ladder and AdamW state with FSDP2 `fully_shard` instead of DDP (big students).
    """

    command: ClassVar[str] = "distill"
    alternatives: ClassVar[tuple[tuple[str, ...], ...]] = (("epochs", "steps"),)

    teachers: tuple[str, ...]
    data_dir: Path
    out_dir: Path = Path("runs/distill")
    student: str = "vit_base_patch16_224"
    image_size: int = 224
    drop_path_rate: float = 0.1
    batch_size: int = 128
    grad_accum_steps: int = 1
    epochs: int | None = None
    steps: int | None = None
    base_lr: float = 3e-4
    min_lr: float = 1e-6
    warmup_steps: int | None = None
    weight_decay: float = 0.03
    betas: tuple[float, ...] = (0.9, 0.99)
    grad_clip: float = 0.0
    standardize: bool = True
    ema_momentum_start: float = 1.0
    ema_momentum_end: float = 0.001
    std_eps: float = 1e-6
    shared_heads: bool = False
    ladder_blocks: str = "all"
    ladder_hidden: int | None = None
    ladder_last_hidden: int | None = None
    teacher_drop_prob: float = 0.5
    augment: str = "unic"
    crop_scale: tuple[float, ...] = (0.08, 1.0)
    device: str = "auto"
    num_workers: int = 4
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    skip_nonfinite: bool = False
    random_init_teachers: bool = False
    teacher_dtype: str = "auto"
    student_dtype: str = "auto"
    compile: bool = False
    compile_mode: str = "default"
    fsdp: bool = False

    DEFAULT_EPOCHS: ClassVar[int] = 100

    def problems(self) -> list[str]:
        problems = []
        if not self.teachers:
            problems.append("no teachers: give at least one with --teachers ALIAS [ALIAS ...]")
        for text in self.teachers:
            problems.extend(teacher_spec_problems(text))
        if dupes := sorted({t for t in self.teachers if self.teachers.count(t) > 1}):
            problems.append(f"--teachers lists {', '.join(map(repr, dupes))} more than once")
        # a single .tar / .parquet file or a shard brace pattern is data too (the loader checks it in detail)
        shard_file = self.data_dir.is_file() and self.data_dir.suffix.lower() in (".tar", ".parquet")
        if not (self.data_dir.is_dir() or shard_file or "{" in str(self.data_dir)):
            what = "is not a folder" if self.data_dir.exists() else "does not exist"
            problems.append(f"--data {str(self.data_dir)!r} {what}; give a folder of images")
        if problem := output_folder_problem("--out", self.out_dir):
            problems.append(problem)
        elif self.command == "distill" and self.data_dir.is_dir() and (
                self.out_dir.resolve() == self.data_dir.resolve() or self.data_dir.resolve() in
                self.out_dir.resolve().parents) and _read_as_image_files(self.data_dir):  # bench writes no run
            problems.append(f"--out {str(self.out_dir)!r} is inside --data {str(self.data_dir)!r}: the run's plots "
                            "(*.png) would become training images of later runs and resumes; choose an --out "
                            "outside the data folder")
        for name in ("image_size", "batch_size", "grad_accum_steps", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("epochs", "steps", "ladder_hidden", "ladder_last_hidden"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.epochs is not None and self.steps is not None:
            problems.append(f"give --epochs or --steps, not both (got {self.epochs} epochs and {self.steps} steps)")
        for name in ("warmup_steps", "num_workers", "seed", "keep_checkpoints"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.teacher_drop_prob < 1.0:
            problems.append(f"--teacher-drop-prob must be in [0, 1), got {self.teacher_drop_prob}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            problems.append(f"--drop-path-rate must be in [0, 1), got {self.drop_path_rate}")
        if self.base_lr <= 0 or self.min_lr < 0 or self.min_lr > self.base_lr:
            problems.append(f"need 0 <= min_lr <= base_lr and base_lr > 0, got base_lr={self.base_lr}, "
                            f"min_lr={self.min_lr}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.std_eps <= 0:
            problems.append("weight_decay and grad_clip must be >= 0 and std_eps > 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        for name in ("ema_momentum_start", "ema_momentum_end"):
            if not 0.0 < getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in (0, 1], got {getattr(self, name)}")
        blocks = self.ladder_blocks.strip().lower()
        indices = [p.strip() for p in blocks.split(",") if p.strip()]
        if blocks not in ("all", "last") and not (indices and all(p.lstrip("-").isdigit() for p in indices)):
            problems.append(f"--ladder-blocks must be 'all', 'last' or block indices like '3,7,11', "
                            f"got {self.ladder_blocks!r}")
        if self.augment not in ("unic", "none"):
            problems.append(f"--augment must be 'unic' or 'none', got {self.augment!r}")
        if not (len(self.crop_scale) == 2 and 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0):
            problems.append(f"--crop-scale must be two fractions 0 < MIN <= MAX <= 1 (e.g. 0.35 1), "
                            f"got {' '.join(map(str, self.crop_scale))}")
        if problem := device_problem(self.device):
            problems.append(problem)
        for name in ("teacher_dtype", "student_dtype"):
            if getattr(self, name) not in ("auto", "bf16", "fp32"):
                problems.append(f"--{name.replace('_', '-')} must be auto, bf16 or fp32, got {getattr(self, name)!r}")
        if self.compile_mode not in COMPILE_MODES:
            close = difflib.get_close_matches(self.compile_mode, COMPILE_MODES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got "
                            f"{self.compile_mode!r}{hint}")
        elif self.compile_mode != "default" and not self.compile:
            problems.append(f"--compile-mode {self.compile_mode} needs --compile (nothing is compiled without it)")
        return problems


def _read_as_image_files(data_dir: Path) -> bool:
    """Whether the loader reads `data_dir` as a folder of image files (any file under it may become a training
    image), not as tar shards or a saved Hugging Face dataset / parquet files (unic_cli.data.open_image_source)."""
    if (data_dir / "state.json").is_file() or (data_dir / "dataset_dict.json").is_file():
        return False
    return not any(p.suffix.lower() in (".tar", ".parquet") and p.is_file() and not p.name.startswith(".")
                   for p in data_dir.iterdir())


def teacher_spec_problems(text: str) -> list[str]:
    """What is wrong with one `--teachers` entry, as far as it can be told without importing torch: the spec's
    grammar, an alias and its `?key=value` overrides, the overrides' types, a weights path that does not exist."""
    from unic_cli.errors import UnicError
    from unic_cli.registry import apply_overrides, convert_overrides, get_card, parse_teacher_spec

    try:
        spec = parse_teacher_spec(text)
        if "," in spec.name:  # no model name has one: "--teachers a,b" meant two teachers
            return [f"teacher spec {text!r} holds a ','; give several teachers separated by spaces: "
                    f"--teachers {' '.join(spec.name.split(','))}"]
        origin = f"teacher spec {text!r}"
        if spec.source == "alias":  # explicit specs are checked in full when their library loads them
            apply_overrides(get_card(spec.target), spec.overrides, origin=origin)
        elif spec.overrides:
            convert_overrides(spec.overrides, origin=origin)
        # a file, or a folder (HF save_pretrained; a folder with one weight file): checked in detail on load
        if spec.weights is not None and not spec.weights.expanduser().exists():
            return [f"teacher {text!r}: weights {str(spec.weights)!r} do not exist"]
    except UnicError as err:
        return [str(err)]
    return []


PROBE_TASKS: tuple[str, ...] = ("knn", "linear", "seg", "depth", "zeroshot")


@dataclass(frozen=True, kw_only=True)
class ProbeConfig(CommandConfig):
    """`unic probe`: students and teachers measured side by side on one dataset.

    Attributes:
        models: exported student folders, registry aliases, teacher specs (`ALIAS=PATH` for local weights)
            or timm model names.
        tasks: any of knn, linear, zeroshot (class folders), or seg, depth (images/ + masks/ or depth/).
        data_dir: holds train/ and val/ or test/.
        out_dir: where probe.json, probe.md and probe.png go (default: RUN_DIR/probe with --run, else ./probe).
        run_dir: a `unic distill` run folder (config.toml, checkpoints/); results are merged into
            RUN_DIR/probe.json for the model card.
        cache_dir: the feature cache (default: OUT/cache).
        eval_split: `val` or `test` (default: test when present, else val).
        dense_image_size: the square input side for seg and depth (rounded to each ViT's patch size).
        dense_layers: seg and depth heads read the last N feature levels concatenated (a ViT's last N blocks, a
            ConvNet's last N stages on a stride-16 grid); 1 reads the model's output tokens. timm models only.
        random_init: random weights instead of pretrained ones (a baseline, reported as `MODEL (random init)`).
        concat_patch_mean: linear probe on [summary, mean patch token] instead of the summary alone.
        ignore_index: mask value left out of seg training and scores (CamVid: 11).
        num_classes: seg classes (default: the largest mask value below ignore_index, plus one).
        depth_bins: > 0 classifies depth into that many bins, 0 regresses it.
        depth_scale: 16-bit PNG depth value per metre (.npy maps are taken as metres).
        prompt_templates: zero-shot prompt templates with `{}` for the class name (default: built-in set).
    """

    command: ClassVar[str] = "probe"

    models: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    data_dir: Path
    out_dir: Path | None = None
    run_dir: Path | None = None
    cache_dir: Path | None = None
    eval_split: str | None = None
    batch_size: int = 64
    num_workers: int = 4
    device: str = "auto"
    random_init: bool = False
    seed: int = 0
    knn_ks: tuple[int, ...] = (10, 20)
    knn_temperature: float = 0.07
    linear_lrs: tuple[float, ...] = (1e-3, 1e-2)
    linear_weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
    linear_steps: int = 300
    linear_holdout: float = 0.2
    concat_patch_mean: bool = False
    dense_image_size: int = 448
    dense_layers: int = 1
    dense_steps: int = 1000
    dense_batch_size: int = 16
    dense_lr: float = 1e-3
    dense_weight_decay: float = 1e-4
    ignore_index: int = 255
    num_classes: int | None = None
    depth_bins: int = 256
    depth_scale: float = 1000.0
    prompt_templates: tuple[str, ...] = ()

    @property
    def resolved_out_dir(self) -> Path:
        if self.out_dir is not None:
            return self.out_dir
        return self.run_dir / "probe" if self.run_dir is not None else Path("probe")

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.resolved_out_dir / "cache"

    def problems(self) -> list[str]:
        problems = []
        if not self.models:
            problems.append("no models: give at least one MODEL (a student folder, teacher alias, spec or timm name)")
        if any(not m.strip() for m in self.models):
            problems.append(f"MODEL {[m for m in self.models if not m.strip()][0]!r} is empty; give a student "
                            "folder, teacher alias, spec or timm name")
        if dupes := sorted({m for m in self.models if self.models.count(m) > 1}):
            problems.append(f"MODEL {', '.join(map(repr, dupes))} given more than once")
        if not self.tasks:
            problems.append(f"no task: give --task {'|'.join(PROBE_TASKS)}")
        for task in self.tasks:
            if task not in PROBE_TASKS:
                close = difflib.get_close_matches(task, PROBE_TASKS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                problems.append(f"unknown --task {task!r}{hint} (choose from {', '.join(PROBE_TASKS)})")
        dense = sorted({t for t in self.tasks if t in ("seg", "depth")})
        classification = sorted({t for t in self.tasks if t in ("knn", "linear", "zeroshot")})
        if dense and classification:
            problems.append(f"--task {'/'.join(classification)} (class folders) and {'/'.join(dense)} "
                            "(images/ + masks/ or depth/) need different layouts; run them in separate calls")
        if not self.data_dir.is_dir():
            what = "is not a folder" if self.data_dir.exists() else "does not exist"
            problems.append(f"--data {str(self.data_dir)!r} {what}; give a folder with train/ and val/ or test/")
        if self.run_dir is not None and not self.run_dir.is_dir():
            problems.append(f"--run {str(self.run_dir)!r} is not a folder; give a `unic distill` run folder")
        elif self.run_dir is not None and not ((self.run_dir / "config.toml").is_file()
                                               and (self.run_dir / "checkpoints").is_dir()):
            problems.append(f"--run {str(self.run_dir)!r} is not a `unic distill` run folder (it needs config.toml "
                            "and checkpoints/); give the run the student was exported from, or use --out DIR to "
                            "only choose where the reports go")
        for name in ("out_dir", "cache_dir"):
            path = getattr(self, name)
            if path is not None and (problem := output_folder_problem(flag_name(name), path)):
                problems.append(problem)
            elif path is not None and self.data_dir.is_dir():
                # reports and caches in DATA/train/x would be read as class `x` (or images) by the next probe
                for split in ("train", "val", "test"):
                    folder = (self.data_dir / split).resolve()
                    if path.resolve() == folder or folder in path.resolve().parents:
                        problems.append(f"{flag_name(name)} {str(path)!r} is inside the data split "
                                        f"{str(self.data_dir / split)!r}: its files would become part of the "
                                        "dataset; choose a folder outside the data")
                        break
        if self.eval_split not in (None, "val", "test"):
            problems.append(f"--eval-split must be val or test, got {self.eval_split!r}")
        if not 1 <= self.dense_layers <= 8:
            problems.append(f"--dense-layers must be between 1 and 8, got {self.dense_layers}")
        for name in ("batch_size", "linear_steps", "dense_image_size", "dense_steps", "dense_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "seed", "depth_bins"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.knn_ks or any(k < 1 for k in self.knn_ks):
            problems.append(f"knn_ks must be positive integers, got {list(self.knn_ks)}")
        if self.knn_temperature <= 0:
            problems.append(f"knn_temperature must be > 0, got {self.knn_temperature}")
        if not self.linear_lrs or any(lr <= 0 for lr in self.linear_lrs):
            problems.append(f"linear_lrs must be positive, got {list(self.linear_lrs)}")
        if not self.linear_weight_decays or any(wd < 0 for wd in self.linear_weight_decays):
            problems.append(f"linear_weight_decays must be >= 0, got {list(self.linear_weight_decays)}")
        if not 0.0 < self.linear_holdout < 1.0:
            problems.append(f"linear_holdout must be in (0, 1), got {self.linear_holdout}")
        if self.dense_lr <= 0 or self.dense_weight_decay < 0:
            problems.append(f"need dense_lr > 0 and dense_weight_decay >= 0, got {self.dense_lr}, "
                            f"{self.dense_weight_decay}")
        if self.num_classes is not None and self.num_classes < 2:
            problems.append(f"--num-classes must be >= 2, got {self.num_classes}")
        if self.depth_scale <= 0:
            problems.append(f"--depth-scale must be > 0, got {self.depth_scale}")
        if bad := [t for t in self.prompt_templates if "{}" not in t]:
            problems.append(f"prompt templates need a '{{}}' for the class name: {bad}")
        if problem := device_problem(self.device):
            problems.append(problem)
        return problems


@dataclass(frozen=True, kw_only=True)
class BenchConfig(DistillConfig):
    """`unic bench`: every DistillConfig field (same flags), timing the training step with random weights.

    Attributes:
        data_dir: optional here: without it the step is fed a fixed random uint8 batch (no decoding timed).
        steps: timed steps (after `warmup` untimed ones).
        warmup: untimed steps first (allocator, autotuning, compilation).
        try_batch_sizes: per-process batch sizes to try in turn (the largest that fits and the fastest are
            reported); empty: `batch_size` only.
        profile_dir: after timing, one more step at the fastest batch size under torch.profiler: its trace
            (trace.json, for Perfetto or chrome://tracing), the op table (ops.txt), and the kernel time by
            kind (matrix products, attention, the rest) in the result.
    """

    command: ClassVar[str] = "bench"
    # a run's config.toml times as is; its training length and data (often not on the benchmarking machine)
    # are not used: bench times `steps` steps on a random batch unless --data is given
    other_commands_read: ClassVar[dict[str, tuple[str, ...]]] = {"distill": ("steps", "epochs", "data_dir")}

    data_dir: Path | None = None
    steps: int | None = 5
    warmup: int = 2
    try_batch_sizes: tuple[int, ...] = ()
    profile_dir: Path | None = None

    def problems(self) -> list[str]:
        from dataclasses import replace

        # The distill checks, with "no data" standing for the synthetic batch (an existing folder passes them).
        problems = DistillConfig.problems(replace(self, data_dir=self.data_dir or Path(".")))
        if self.warmup < 0:
            problems.append(f"--warmup must be >= 0, got {self.warmup}")
        if any(b < 1 for b in self.try_batch_sizes):
            problems.append(f"--try-batch-sizes must all be >= 1, got {list(self.try_batch_sizes)}")
        if self.profile_dir is not None and (problem := output_folder_problem("--profile", self.profile_dir)):
            problems.append(f"{problem}; give a folder for the trace")
        return problems
