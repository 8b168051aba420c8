"""`run_probe(config)`: students and teachers measured side by side (knn, linear, seg, depth, zeroshot).

Shape legend: M images, D feature width, N patch tokens.

Order of work: check the data layout and every model spec (no weights), then extract features once per
(model, split) through the cache, then fit each probe on cached features, then write probe.json / probe.md /
probe.png. Probes never touch training code: a student is read from its exported folder only.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from unic_cli.config import ProbeConfig
from unic_cli.devices import resolve_device
from unic_cli.errors import ProbeError
from unic_cli.files import atomic_write
from unic_cli.probe import report as report_lib
from unic_cli.probe.cache import FeatureCache
from unic_cli.probe.dense import run_depth_probe, run_seg_probe
from unic_cli.probe.encoder import ModelRef, load_encoder, normalise_model_name, resolve_model
from unic_cli.probe.features import (
    Job,
    ProgressFn,
    _no_progress,
    extract_features,
    load_native_targets,
    load_targets,
    run_jobs,
)
from unic_cli.probe.knn import run_knn_probe
from unic_cli.probe.linear import run_linear_probe
from unic_cli.probe.split import Split, check_same_classes, find_splits, list_class_split, list_dense_split
from unic_cli.probe.target import RaggedTargets
from unic_cli.probe.zeroshot import TEMPLATES, ClipSpace, clip_space_of, run_zeroshot_probe

__all__ = ["ProbeOutcome", "run_probe"]

log = logging.getLogger("unic_cli")


@dataclass
class ProbeOutcome:
    """What one `run_probe` call measured and wrote.

    Attributes:
        report: this call's results (probe.json layout, see `unic_cli.probe.report`).
        merged: OUT/probe.json after merging this call into earlier ones.
        files: the files written.
    """

    report: dict[str, Any]
    merged: dict[str, Any]
    files: list[Path]


def _free(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f} GiB"


def _memory_budget(device: str) -> int:
    """Bytes of features a probe may load at once on `device`: half its free memory (the rest for the head,
    batches, and other processes). Above it, dense probes read batches from the memory-mapped cache."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0] // 2
    try:  # MemAvailable counts the page cache the kernel can drop (free pages alone do not)
        with open("/proc/meminfo", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")) // 2
    except (OSError, StopIteration, ValueError):  # not Linux
        return 8 * 2**30


def _ok_rows(feats: dict[str, torch.Tensor], *arrays: torch.Tensor) -> list[torch.Tensor]:
    """Drop the rows of unreadable images from the features' companions (labels, targets)."""
    ok = feats["ok"]
    if bool(ok.all()):  # the usual case: no copy (ImageNet train summaries are 7.4 GiB per ViT-G feature)
        return list(arrays)
    return [a[ok] for a in arrays]


def _clip_teacher_of_student(ref: ModelRef) -> dict | None:
    """The first kept head (in unic.json) whose teacher is an open_clip model, or None."""
    meta = json.loads((ref.folder / "unic.json").read_text(encoding="utf-8"))
    kept = set((meta.get("heads") or {}).get("teachers") or ())
    for teacher in meta.get("teachers", []):
        if teacher.get("alias") in kept and teacher.get("source") == "open_clip":
            return teacher
    return None


def _clip_spec_problem(ref: ModelRef, teacher: dict) -> str | None:
    """Why the CLIP teacher spec recorded in a student's unic.json must not be loaded, or None.

    The student folder may come from someone else: only an open_clip spec (or an alias whose card here is an
    open_clip model) is loaded from it, never a `py:` module or an HF model with remote code, which would run
    code the user never typed.
    """
    from unic_cli.errors import UnicError
    from unic_cli.registry import get_card, parse_teacher_spec

    text = teacher.get("spec") or teacher.get("alias") or ""
    try:
        parsed = parse_teacher_spec(text)
        source = get_card(parsed.target).source if parsed.source == "alias" else parsed.source
    except UnicError as err:
        return f"student {ref.name!r}: its CLIP teacher {text!r} (unic.json) cannot be resolved here: {err}"
    if source != "open_clip":
        return (f"student {ref.name!r}: its unic.json names the CLIP teacher {text!r}, which is not an open_clip "
                "model; unic loads only open_clip teachers from a student's metadata (anything else could run "
                "code); probe that teacher yourself, or re-export the student with an open_clip --keep-heads")
    return None


def _check_zeroshot(refs: list[ModelRef], *, random_init: bool) -> None:
    """Every model must have a CLIP text tower (cheap check on cards and unic.json; confirmed after loading)."""
    problems = []
    for ref in refs:
        if ref.kind == "student" and random_init:
            # its images reach CLIP space only through the exported (trained) student and head: a "random init"
            # number would be the trained student's, filed as a baseline
            problems.append(f"--random-init --task zeroshot: student {ref.name!r} reaches the CLIP space only "
                            "through its trained encoder and head, so it has no random-init zero-shot baseline; "
                            "drop the student from this call (a random-init CLIP teacher gives the chance level)")
        elif ref.kind == "student":
            if (teacher := _clip_teacher_of_student(ref)) is None:
                problems.append(f"student {ref.name!r} has no CLIP head: export it with `unic export RUN --out DIR "
                                "--keep-heads CLIP_ALIAS` (a CLIP teacher it was distilled from)")
            elif problem := _clip_spec_problem(ref, teacher):
                problems.append(problem)
        elif ref.identity["card"]["source"] != "open_clip":
            problems.append(f"{ref.name!r} is not a CLIP model (source {ref.identity['card']['source']!r}); "
                            "zeroshot needs an open_clip teacher or a student with a kept CLIP head")
    if problems:
        raise ProbeError(problems[0] if len(problems) == 1 else
                         "--task zeroshot: " + "; ".join(problems))


def _zeroshot_inputs(ref: ModelRef, eval_split: Split, eval_feats: dict[str, torch.Tensor], *,
                     config: ProbeConfig, cache: FeatureCache, device: str, progress: ProgressFn
                     ) -> tuple[ClipSpace, torch.Tensor, torch.Tensor]:
    """(joint space, teacher-space summary [M, D], ok [M]) for a CLIP teacher or a student's CLIP head."""
    from unic_cli.teachers import load_teacher

    pretrained = not config.random_init
    if ref.kind == "teacher":
        encoder = load_encoder(ref, device=device)
        return clip_space_of(encoder.module, ref.name), eval_feats["summary"], eval_feats["ok"]
    from unic_cli.export import load_student

    teacher = _clip_teacher_of_student(ref)
    torch.manual_seed(config.seed)
    clip = load_teacher(teacher.get("spec") or teacher["alias"], grid=None, pretrained=pretrained, device=device)
    space = clip_space_of(clip, teacher["alias"])
    kind = f"clip-{teacher['alias']}"
    path = cache.path(ref, eval_split, kind)
    cached = cache.features(path)
    if cached is None:
        head = load_student(ref.folder, device=device).heads[teacher["alias"]]

        def fn(images_BCHW):
            return {"summary": head(images_BCHW).summary_BD.float()}

        meta = {"model": ref.name, "identity": ref.identity, "split": str(eval_split.root), "kind": kind}
        job = Job(ref.name, ref.image_size, path, fn, meta)
        cached = run_jobs([job], eval_split, stretch=False, batch_size=config.batch_size,
                          num_workers=config.num_workers, device=device, progress=progress)[ref.name]
    return space, cached["summary"], cached["ok"]


def _classification(config: ProbeConfig, refs: list[ModelRef], train: Split | None, evaluation: Split,
                    cache: FeatureCache, device: str, progress: ProgressFn) -> dict[str, dict[str, dict]]:
    common = dict(kind="pooled", cache=cache, batch_size=config.batch_size, num_workers=config.num_workers,
                  device=device, progress=progress)
    feats = extract_features(refs, [s for s in (train, evaluation) if s is not None], **common)
    _free(device)
    train_feats, eval_feats = feats.get(train.name if train else "", {}), feats[evaluation.name]
    num_classes = len(evaluation.classes)
    train_labels = torch.tensor(train.labels) if train is not None else None
    eval_labels = torch.tensor(evaluation.labels)
    results: dict[str, dict[str, dict]] = {ref.name: {} for ref in refs}
    # features are read from the cache one model at a time, and patch means only when the linear probe uses
    # them: ImageNet train with a ViT-G is 7.4 GiB per feature in float32
    with_patch = "linear" in config.tasks and config.concat_patch_mean
    for ref in refs:
        summary_train = patch_train = x_train = x_eval = None  # free the previous model's rows before reading
        ev = eval_feats[ref.name]
        y_eval, summary_eval = _ok_rows(ev, eval_labels, ev["summary"])
        patch_eval = _ok_rows(ev, ev["patch_mean"])[0] if with_patch else None
        if train is not None:
            tr = train_feats[ref.name]
            y_train, summary_train = _ok_rows(tr, train_labels, tr["summary"])
            patch_train = _ok_rows(tr, tr["patch_mean"])[0] if with_patch else None
        if "knn" in config.tasks:
            if too_big := [k for k in config.knn_ks if k > len(y_train)]:
                log.warning("%s: k = %s exceed(s) the %d training images, so top1_k%d and the like vote over all "
                            "of them; give knn_ks <= %d (--config) for a k-NN score", ref.name, too_big, len(y_train),
                            too_big[0], len(y_train))
            log.info("%s: k-NN on %d train / %d %s images", ref.name, len(y_train), len(y_eval), evaluation.name)
            results[ref.name]["knn"] = run_knn_probe(  # train rows go to the device chunk by chunk
                summary_train, y_train, summary_eval, y_eval, num_classes=num_classes, ks=config.knn_ks,
                temperature=config.knn_temperature, device=device)
        if "linear" in config.tasks:
            x_train, x_eval = summary_train, summary_eval
            if config.concat_patch_mean:
                x_train, x_eval = torch.cat([x_train, patch_train], 1), torch.cat([x_eval, patch_eval], 1)
                del patch_train, patch_eval
            num_settings = len(config.linear_lrs) * len(config.linear_weight_decays)
            log.info("%s: linear probe, %d settings", ref.name, num_settings)
            results[ref.name]["linear"] = run_linear_probe(
                x_train.to(device), y_train, x_eval.to(device), y_eval, num_classes=num_classes,
                lrs=config.linear_lrs, weight_decays=config.linear_weight_decays, num_steps=config.linear_steps,
                holdout_fraction=config.linear_holdout, seed=config.seed)
        if "zeroshot" in config.tasks:
            space, summary, ok = _zeroshot_inputs(ref, evaluation, ev, config=config, cache=cache, device=device,
                                                  progress=progress)
            results[ref.name]["zeroshot"] = run_zeroshot_probe(
                summary[ok], eval_labels[ok], space=space, classes=evaluation.classes,
                templates=config.prompt_templates or TEMPLATES)
            del space
            _free(device)
    return results


def _seg_classes(config: ProbeConfig, train_masks: torch.Tensor, eval_masks: RaggedTargets) -> int:
    """The number of seg classes: --num-classes, else the largest label of either split plus one.

    Labels are counted in the evaluation masks too: a class that only the evaluation split holds must count as
    missed pixels, not vanish from pixel accuracy and mIoU.
    """
    train_values, eval_values = _labels_in(train_masks), _labels_in(eval_masks.flat_P)
    values = sorted(train_values | eval_values)
    labels = [v for v in values if v != config.ignore_index and v >= 0]
    if config.ignore_index not in values:
        log.info("masks hold labels %s and no %d (--ignore-index); if one label is void (CamVid: 11), "
                 "pass --ignore-index LABEL", _span(labels), config.ignore_index)
    if unseen := sorted(v for v in eval_values - train_values if v != config.ignore_index and v >= 0):
        log.warning("evaluation masks hold label(s) %s that no training mask holds: the probe cannot learn them, "
                    "so their pixels count as errors", unseen)
    if config.num_classes is not None:
        if too_big := [v for v in labels if v >= config.num_classes]:
            raise ProbeError(f"--num-classes {config.num_classes}: the masks hold label(s) {_span(too_big)}, "
                             f"which need --num-classes {max(too_big) + 1} or more (or --ignore-index LABEL if "
                             "one of them is void)")
        return config.num_classes
    if not [v for v in train_values if v != config.ignore_index and v >= 0]:
        raise ProbeError(f"the training masks hold no label other than the ignore index {config.ignore_index}")
    return max(labels) + 1


def _labels_in(masks: torch.Tensor) -> set[int]:
    """The label values of uint8 masks (any shape), counted 2^24 pixels at a time (torch.unique would sort every
    pixel, and a memory-mapped buffer is read a block at a time)."""
    if masks.dtype != torch.uint8:
        return set(torch.unique(masks).tolist())
    pixels_P = masks.reshape(-1)
    counts = torch.zeros(256, dtype=torch.long)
    for start in range(0, len(pixels_P), 2**24):
        counts += torch.bincount(pixels_P[start : start + 2**24], minlength=256)
    return set(counts.nonzero().flatten().tolist())


def _span(labels: list[int]) -> str:
    if len(labels) == 1:
        return str(labels[0])
    return f"{labels[0]}-{labels[-1]}" if labels == list(range(labels[0], labels[-1] + 1)) else str(labels)


def _check_depth(depth_MHW: torch.Tensor, split: Split, depth_scale: float) -> None:
    """The depth head needs valid (finite, > 0) training pixels to set its range; refuse before any encoder runs."""
    valid = torch.isfinite(depth_MHW) & (depth_MHW > 0)
    if not bool(valid.any()):
        raise ProbeError(f"the depth maps in {str(split.root / 'depth')!r} hold no valid pixel (depth > 0, at "
                         f"--depth-scale {depth_scale:g}); check the files, or that they are 16-bit PNG or .npy")


def _dense(config: ProbeConfig, task: str, refs: list[ModelRef], train: Split, evaluation: Split,
           cache: FeatureCache, device: str, progress: ProgressFn) -> dict[str, dict[str, dict]]:
    common = dict(kind="patch", cache=cache, batch_size=config.batch_size, num_workers=config.num_workers,
                  device=device, progress=progress)
    kind = "mask" if task == "seg" else "depth"
    target_args = dict(cache=cache, depth_scale=config.depth_scale, num_workers=config.num_workers,
                       progress=progress)
    # training targets share one size (batches stack); scores use each test image's own target size (mmseg)
    train_targets = load_targets(train, kind, **target_args)
    eval_targets = load_native_targets(evaluation, kind, **target_args)
    num_classes = _seg_classes(config, train_targets, eval_targets) if task == "seg" else 0
    if task == "depth":
        _check_depth(train_targets, train, config.depth_scale)
    feats = extract_features(refs, [train, evaluation], dense_levels=config.dense_layers, **common)
    _free(device)
    train_feats, eval_feats = feats[train.name], feats[evaluation.name]
    results: dict[str, dict[str, dict]] = {}
    for ref in refs:
        tr, ev = train_feats[ref.name], eval_feats[ref.name]
        x_train, y_train = _ok_rows(tr, tr["patch"], train_targets)  # memory-mapped RowStores: nothing read yet
        x_eval, y_eval = _ok_rows(ev, ev["patch"], eval_targets)
        grid = tuple(int(g) for g in tr["grid"][0])
        args = dict(grid=grid, num_steps=config.dense_steps, batch_size=config.dense_batch_size, lr=config.dense_lr,
                    weight_decay=config.dense_weight_decay, seed=config.seed, device=device)
        log.info("%s: %s probe on a %dx%d grid of %d-d patch tokens", ref.name, task, *grid, x_train.shape[-1])
        budget = _memory_budget(device)
        if x_train.nbytes <= budget:  # the fast path: every row in memory, on the device
            x_train = x_train.load().to(device)
        else:
            log.info("%s: %s of train patch tokens exceed the %s this probe allows itself on %s: each step reads "
                     "its batch from the memory-mapped cache", ref.name, _gib(x_train.nbytes), _gib(budget), device)
        if x_eval.nbytes <= _memory_budget("cpu"):
            x_eval = x_eval.load()
        if task == "seg":
            metrics = run_seg_probe(x_train, y_train, x_eval, y_eval, num_classes=num_classes,
                                    ignore_index=config.ignore_index, **args)
        else:
            metrics = run_depth_probe(x_train, y_train, x_eval, y_eval, num_bins=config.depth_bins, **args)
        results[ref.name] = {task: {**metrics, "feature_levels": config.dense_layers}}
        del x_train
        _free(device)
    return results


def _task_info(config: ProbeConfig, task: str, evaluation: Split) -> dict[str, Any]:
    primary, higher = report_lib.PRIMARY[task]
    return {"task": task, "data": str(config.data_dir.resolve()), "split": evaluation.name,
            "primary": primary.format(k=knn_primary_k(config.knn_ks)), "higher_is_better": higher}


def knn_primary_k(ks: tuple[int, ...]) -> int:
    """The k of the k-NN primary metric: 20, the k that DINO and DINOv2 report, when probed; else the largest."""
    return 20 if 20 in ks else max(ks)


def _write(config: ProbeConfig, new: dict[str, Any]) -> tuple[dict[str, Any], list[Path]]:
    """Merge the results so far into OUT/probe.json (and RUN/probe.json), rewrite probe.md and probe.png."""
    new["rows"] = report_lib.flat_rows(new)
    merged, files = report_lib.write_report(config.resolved_out_dir, new)
    if config.run_dir is not None:
        run_file = config.run_dir / "probe.json"
        report_lib.write_json(run_file, report_lib.merge(report_lib.read_report(run_file), new, where=str(run_file)))
        files.append(run_file)
    return merged, files


def run_probe(config: ProbeConfig, *, progress: ProgressFn | None = None) -> ProbeOutcome:
    """Probe every model of `config` on every task, write OUT/probe.{json,md,png} (and RUN/probe.json).

    Args:
        config: the probe's settings (validated here too: a config built directly is checked before any data or
            weights load). Seeding happens in a fork of torch's random streams: the caller's come back unchanged.
        progress: called as (label, done, total) while features are extracted; the CLI draws a progress bar.

    Example:
        >>> run_probe(ProbeConfig.from_sources(None, {"models": ("students/a", "dinov2_g"), "tasks": ("knn",),
        ...                                           "data_dir": "data/pets"}))
    """
    config.validate()
    device = str(resolve_device(config.device))
    with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []):
        return _run_probe(config, device, progress or _no_progress)


def _run_probe(config: ProbeConfig, device: str, progress: ProgressFn) -> ProbeOutcome:
    tasks = list(dict.fromkeys(config.tasks))
    classification = [t for t in tasks if t in ("knn", "linear", "zeroshot")]
    dense = [t for t in tasks if t in ("seg", "depth")]

    # 1. data layout and model specs, before any weights load
    need_train = any(t != "zeroshot" for t in tasks)
    train_dir, eval_dir = find_splits(config.data_dir, need_train=need_train, eval_split=config.eval_split)
    splits: dict[str, tuple[Split | None, Split]] = {}
    if classification:
        evaluation = list_class_split(eval_dir)
        train = list_class_split(train_dir) if train_dir is not None else None
        if train is not None:
            check_same_classes(train, evaluation)
        splits["classification"] = (train, evaluation)
    for task in dense:
        folder = "masks" if task == "seg" else "depth"
        splits[task] = (list_dense_split(train_dir, folder), list_dense_split(eval_dir, folder))
    pretrained = not config.random_init
    refs = [resolve_model(m, pretrained=pretrained, seed=config.seed) for m in config.models]
    if dupes := sorted({r.name for r in refs if [x.name for x in refs].count(r.name) > 1}):
        raise ProbeError(f"MODEL {', '.join(map(repr, dupes))} given more than once (as "
                         f"{', '.join(repr(m) for m in config.models if normalise_model_name(m) in dupes)}); "
                         "give each model once")
    if "zeroshot" in classification:
        _check_zeroshot(refs, random_init=config.random_init)
    dense_refs = [resolve_model(m, image_size=config.dense_image_size, pretrained=pretrained, seed=config.seed)
                  for m in config.models] if dense else []
    if config.dense_layers > 1:
        for ref in dense_refs:
            if ref.kind == "teacher" and ref.identity["card"]["source"] != "timm":
                raise ProbeError(f"--dense-layers {config.dense_layers} reads intermediate feature levels of timm "
                                 f"models; {ref.name!r} is a {ref.identity['card']['source']} model: probe it in "
                                 "a separate call with --dense-layers 1")

    # 2. features and probes; the reports are rewritten after each task group, so a later failure or an
    # interrupt never loses the numbers already measured
    cache = FeatureCache(config.resolved_cache_dir)
    data_name = config.data_dir.resolve().name
    # a random-init model is a baseline next to the real one, never in its place
    names = {ref.name: ref.name if pretrained else report_lib.random_init_name(ref.name) for ref in refs}
    new = report_lib.empty_report()
    for ref in refs:
        new["models"][names[ref.name]] = ({"kind": ref.kind} if pretrained else
                                          {"kind": "baseline", "random_init_of": ref.kind, "seed": config.seed})
        if pretrained and ref.kind == "student":  # which checkpoint it came from: the export's card keeps its rows
            meta = json.loads((ref.folder / "unic.json").read_text(encoding="utf-8"))  # resolve_model read it
            if isinstance(source := meta.get("source_checkpoint"), dict):
                new["models"][names[ref.name]]["source_checkpoint"] = {"sha256": source.get("sha256"),
                                                                       "step": meta.get("step")}
        new["results"][names[ref.name]] = {}
    out_dir = config.resolved_out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    # folders absolute, as in a distill run's config.toml: `unic probe --config OUT/config.toml` works from anywhere
    absolute = {name: Path(os.path.abspath(getattr(config, name))) for name in ("data_dir", "run_dir", "cache_dir")
                if getattr(config, name) is not None}
    with atomic_write(out_dir / "config.toml", "w", encoding="utf-8") as f:
        f.write(replace(config, **absolute).to_toml())
    merged, files = None, []
    if classification:
        train, evaluation = splits["classification"]
        results = _classification(config, refs, train, evaluation, cache, device, progress)
        for task in classification:
            key = f"{task}/{data_name}"
            new["tasks"][key] = _task_info(config, task, evaluation)
            for ref in refs:
                new["results"][names[ref.name]][key] = results[ref.name][task]
        merged, files = _write(config, new)
    for task in dense:
        train, evaluation = splits[task]
        results = _dense(config, task, dense_refs, train, evaluation, cache, device, progress)
        key = f"{task}/{data_name}"
        new["tasks"][key] = _task_info(config, task, evaluation)
        for ref in dense_refs:
            new["results"][names[ref.name]][key] = results[ref.name][task]
        merged, files = _write(config, new)

    log.info("wrote %s", ", ".join(str(f) for f in files))
    return ProbeOutcome(new, merged, files)

