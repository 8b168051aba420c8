"""Training-loader throughput: decoded + augmented images per second, and where the time goes.

Measures `unic_cli.data.build_train_loader` exactly as `unic distill` uses it (seeded order, per-image
seeded UNIC augmentation, uint8 batches), after one warm-up batch (worker start-up, imports):

    python benchmarks/data_speed.py --data ../shared/data/hymenoptera/train --workers 2
    python benchmarks/data_speed.py --data shards/ --workers 0 --repeat 5 --image-size 224
    python benchmarks/data_speed.py --data DIR --profile          # per-stage cost, one process, 1 thread
    python benchmarks/data_speed.py --prepare OUT --from ../shared/data/hymenoptera
        # OUT/folder: every JPEG of --from resized to ImageNet's typical 500 px longer side (quality 90),
        # OUT/shards: the same files as 4 WebDataset tar shards

Prints one JSON line per run and a summary: median images/s over `--repeat` runs, and per worker
(`images/s / max(workers, 1)`). A GPU step that consumes N images/s needs about N / (per-worker rate)
decoding workers. On a shared machine, compare two versions in the same time window, interleaved:
`PYTHONPATH=/path/to/other/checkout python benchmarks/data_speed.py ...` runs that checkout's `unic_cli`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tarfile
import time
from pathlib import Path


def prepare(out: Path, source: Path, longer_side: int = 500) -> None:
    """Write `out/folder` (ImageNet-sized JPEGs made from `source`'s JPEGs) and `out/shards` (the same, tarred)."""
    from PIL import Image

    folder, shards = out / "folder", out / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    shards.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    for i, path in enumerate(files):
        with Image.open(path) as img:
            img = img.convert("RGB")
            scale = longer_side / max(img.size)
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
            img.save(folder / f"{i:06d}.jpg", quality=90)
    names = sorted(os.listdir(folder))
    for s in range(4):
        with tarfile.open(shards / f"train-{s:03d}.tar", "w") as tar:
            for name in names[s::4]:
                tar.add(folder / name, arcname=name)
    print(f"{len(names)} images in {folder} and {shards}")


def measure(args) -> float:
    """Images/s of one pass of `args.batches` batches after one warm-up batch."""
    import torch

    from unic_cli.data import build_train_loader

    torch.set_num_threads(args.threads)
    loader = build_train_loader(args.data, image_size=args.image_size, batch_size=args.batch_size,
                                num_workers=args.workers, seed=args.seed, augment=args.augment)
    batches = args.batches or max(loader.steps_per_epoch, 8)
    it = iter(loader)
    next(it)
    start, count = time.perf_counter(), 0
    for _ in range(batches):
        count += len(next(it).images_BCHW)
    rate = count / (time.perf_counter() - start)
    del it  # stops the workers
    return rate


def _read(source, index: int) -> bytes:
    data = source.open(index)
    return data.getvalue() if hasattr(data, "getvalue") else Path(data).read_bytes()


def profile(args, num_images: int = 200) -> None:
    """Milliseconds per image of each stage, in this process with one thread, on the first images; then each
    photometric op on one image, unic_cli's against torchvision's (a checkout without its own op shows '-')."""
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    from unic_cli.data import image as im
    from unic_cli.data.source import open_image_source

    torch.set_num_threads(1)
    source = open_image_source(args.data)
    n = min(num_images, len(source))
    stages: dict[str, float] = {}

    def timed(name, fn, *fn_args):
        start = time.perf_counter()
        out = fn(*fn_args)
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - start
        return out

    warm = im.load_crop(io.BytesIO(_read(source, 0)), args.image_size, im.center_square_box)
    im.augment_colour(warm, np.random.default_rng(0))  # imports torchvision outside the timings
    crops = []
    for i in range(n):
        rng = np.random.default_rng([args.seed, 0, i])
        data = _read(source, i)
        crops.append((timed("decode + crop/resize (load_crop)", im.load_crop, io.BytesIO(data), args.image_size,
                            lambda w, h, rng=rng: im.random_resized_crop_box(w, h, rng)), rng))
        timed("  a full decode alone (decode_image)", im.decode_image, io.BytesIO(data))
    for crop, rng in crops:
        timed("photometric (augment_colour)", im.augment_colour, crop, rng)
    tensors = timed("  to_tensor alone", lambda: [im.to_tensor(c) for c, _ in crops])
    timed("collate (stack)", lambda: [torch.stack(tensors[k:k + args.batch_size])
                                      for k in range(0, n, args.batch_size)])
    print(f"ms per image, {n} images of {args.data}, {args.image_size} px, 1 thread:")
    for name, seconds in stages.items():
        print(f"  {name:38s} {seconds / n * 1e3:7.3f}")

    x = tensors[0]
    ops = {  # name: (unic_cli's op or None, torchvision's)
        "brightness 1.2": ("adjust_brightness", lambda f: f(x, 1.2), lambda: TF.adjust_brightness(x, 1.2)),
        "contrast 1.2": ("adjust_contrast", lambda f: f(x, 1.2), lambda: TF.adjust_contrast(x, 1.2)),
        "saturation 1.1": ("adjust_saturation", lambda f: f(x, 1.1), lambda: TF.adjust_saturation(x, 1.1)),
        "hue 0.05": ("adjust_hue", lambda f: f(x, 0.05), lambda: TF.adjust_hue(x, 0.05)),
        "blur sigma 2": ("gaussian_blur", lambda f: f(x, 2.0), lambda: TF.gaussian_blur(x, [9, 9], [2.0, 2.0])),
    }

    def per_call(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(20):
            fn()
        return (time.perf_counter() - start) / 20 * 1e3

    print(f"one {args.image_size} px image, ms per call:      unic_cli  torchvision")
    for name, (attr, call, theirs) in ops.items():
        ours = getattr(im, attr, None)
        mine = f"{per_call(lambda: call(ours)):8.3f}" if ours is not None else "       -"
        print(f"  {name:38s} {mine}  {per_call(theirs):8.3f}")
    print(f"  {'flip (PIL)':38s} {per_call(lambda: crops[0][0].transpose(Image.Transpose.FLIP_LEFT_RIGHT)):8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a folder of images, WebDataset shards, or an HF dataset (as --data of distill)")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (0: in this process)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=0, help="batches timed per run (default: one epoch, >= 8)")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median is reported")
    parser.add_argument("--augment", default="unic", choices=("unic", "none"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the calling process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="per-stage cost instead of loader throughput")
    parser.add_argument("--prepare", type=Path, metavar="OUT", help="write an ImageNet-sized folder + shards")
    parser.add_argument("--from", dest="source", type=Path, help="source images for --prepare")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare, args.source)
        return
    if not args.data:
        parser.error("--data is required")
    if args.profile:
        profile(args)
        return
    rates = []
    for run in range(args.repeat):
        rates.append(measure(args))
        print(json.dumps({"run": run, "images_per_s": round(rates[-1], 1)}))
    median = statistics.median(rates)
    print(json.dumps({"data": str(args.data), "workers": args.workers, "image_size": args.image_size,
                      "batch_size": args.batch_size, "augment": args.augment, "median_images_per_s": round(median, 1),
                      "per_worker": round(median / max(args.workers, 1), 1),
                      "runs": [round(r, 1) for r in rates], "load_avg": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
